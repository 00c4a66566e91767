"""Chat prompts and batching processors: text + images -> padded numpy model inputs.

`Qwen25VLProcessor` equals transformers' `Qwen2_5_VLProcessor` and `LlavaProcessor` equals
transformers' `LlavaProcessor` (same tokenizer and chat template): prompts are rendered with the
chat template, each image's single placeholder token is expanded to the image's number of
tokens, the batch is padded (left by default) with the tokenizer's pad id, and the result holds
numpy input_ids, attention_mask, mm_token_type_ids (0 text, 1 image) and, when the batch has
images, the image processor's arrays. Integer arrays are int32.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from balcap_jax.processing.images import LlavaImageProcessor, QwenImageProcessor

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2-VL / Qwen2.5-VL-*-Instruct `chat_template.json` as published with the checkpoints: a
# default system message when the first turn is not a system turn, and
# "<|vision_start|><|image_pad|><|vision_end|>" for every image content item.
QWEN25_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# llava-hf/llava-1.5-*-hf `chat_template.json`: "USER: <image>\n{text} ASSISTANT:".
LLAVA15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")

# --------------------------------------------------------------------------- prompts

def caption_messages(instruction: str, *, num_images: int = 1,
                     system_prompt: str | None = None) -> list[dict]:
    """A one-turn chat: (optional system turn), user turn = `num_images` images then the text."""
    content = [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": instruction})
    msgs = [{"role": "user", "content": content}]
    if system_prompt is not None:
        msgs.insert(0, {"role": "system", "content": system_prompt})
    return msgs


def apply_chat_template(messages: list[dict], tokenizer, *, chat_template: str | None = None,
                        add_generation_prompt: bool = True) -> str:
    """Render one conversation to text with the tokenizer's (or the given) chat template.
    Image items keep a single placeholder; processors expand it."""
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError("the tokenizer has no chat_template; pass chat_template= (e.g. "
                         "QWEN25_VL_CHAT_TEMPLATE)")
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def build_caption_prompt(instruction: str, tokenizer, *, system_prompt: str | None = None,
                         num_images: int = 1, chat_template: str | None = None) -> str:
    """The captioning prompt text, e.g. for Qwen2.5-VL with the default system prompt:
    "<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n
    <|vision_start|><|image_pad|><|vision_end|>{instruction}<|im_end|>\\n<|im_start|>assistant\\n".
    `system_prompt=None` leaves the template's default in place."""
    return apply_chat_template(
        caption_messages(instruction, num_images=num_images, system_prompt=system_prompt),
        tokenizer, chat_template=chat_template, add_generation_prompt=True)


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int, *, padding_side: str = "left",
              pad_to_multiple_of: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Ragged id lists -> (ids int32 [B, T], attention_mask int32 [B, T]), padded with `pad_id`
    on `padding_side` to the longest row (rounded up to `pad_to_multiple_of`)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    length = max((len(r) for r in rows), default=0)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        sl = slice(length - len(r), length) if padding_side == "left" else slice(0, len(r))
        ids[i, sl] = r
        mask[i, sl] = 1
    return ids, mask


def _is_conversation(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(m, dict) for m in x)


def _images_in_messages(messages: list[dict]) -> list:
    """PIL/array images carried by content items ({"type": "image", "image": img})."""
    found = []
    for m in messages:
        if isinstance(m.get("content"), list):
            found += [c["image"] for c in m["content"] if isinstance(c, dict)
                      and isinstance(c.get("image"), (Image.Image, np.ndarray))]
    return found


def _row_images(images, batch: int) -> list[list]:
    if images is None:
        return [[] for _ in range(batch)]
    if isinstance(images, (Image.Image, np.ndarray)):
        images = [images]
    if len(images) != batch:
        raise ValueError(f"images has {len(images)} entries for {batch} prompts; give one entry "
                         "per prompt (an image, a list of images, or None for a text-only row)")
    return [[] if im is None else list(im) if isinstance(im, (list, tuple)) else [im]
            for im in images]


class _ChatProcessor:
    """Shared batching: chat rendering, per-row image lists, placeholder expansion, padding."""
    image_token: str

    def __init__(self, tokenizer, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {self.image_token!r} token; add it "
                             f"(tokenizer.add_tokens([{self.image_token!r}], special_tokens=True))")
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer has no pad token; set tokenizer.pad_token first")

    def _texts_and_images(self, text, images):
        if isinstance(text, str) or _is_conversation(text):
            text = [text]
        texts, found = [], []
        for row in text:
            if _is_conversation(row):
                texts.append(apply_chat_template(list(row), self.tokenizer,
                                                 chat_template=self.chat_template))
                found.append(_images_in_messages(row))
            elif isinstance(row, str):
                texts.append(row)
                found.append([])
            else:
                raise TypeError(f"text rows must be strings or conversations (lists of message "
                                f"dicts), got {type(row).__name__}")
        rows = _row_images(images, len(texts)) if images is not None else found
        return texts, rows

    def _image_features(self, flat_images) -> tuple[dict, list[int]]:
        raise NotImplementedError

    def __call__(self, text, images=None, *, padding_side: str = "left",
                 pad_to_multiple_of: int | None = None) -> dict[str, np.ndarray]:
        texts, rows = self._texts_and_images(text, images)
        encoded = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        for i, (ids, row_imgs) in enumerate(zip(encoded, rows)):
            n_placeholders = sum(1 for t in ids if t == self.image_token_id)
            if n_placeholders != len(row_imgs):
                raise ValueError(f"prompt {i} has {n_placeholders} {self.image_token} "
                                 f"placeholders but {len(row_imgs)} images; put one placeholder "
                                 "per image (the chat template does this for image items)")
        flat = [im for r in rows for im in r]
        feats, counts = self._image_features(flat) if flat else ({}, [])
        expanded, k = [], 0
        for ids in encoded:
            out = []
            for t in ids:
                if t == self.image_token_id:
                    out += [t] * counts[k]
                    k += 1
                else:
                    out.append(t)
            expanded.append(out)
        input_ids, attention_mask = pad_batch(expanded, self.tokenizer.pad_token_id,
                                              padding_side=padding_side,
                                              pad_to_multiple_of=pad_to_multiple_of)
        mm_types = (input_ids == self.image_token_id).astype(np.int32)
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "mm_token_type_ids": mm_types, **feats}

    def decode(self, ids, **kw) -> str:
        return self.tokenizer.decode(ids, **kw)

    def batch_decode(self, ids, **kw) -> list[str]:
        return self.tokenizer.batch_decode(ids, **kw)


class Qwen25VLProcessor(_ChatProcessor):
    """Prompts + images -> model inputs, equal to transformers' `Qwen2_5_VLProcessor`.

    `__call__(text, images=None, *, padding_side="left", pad_to_multiple_of=None)`:
    text is a str, a list of str (already templated, one `<|image_pad|>` per image), or one or a
    list of conversations (message dicts, rendered with the chat template and a generation
    prompt; images may ride in content items as {"type": "image", "image": PIL}). images has one
    entry per row: an image, a list of images, or None for a text-only row.
    """
    image_token = "<|image_pad|>"

    def __init__(self, tokenizer, image_processor: QwenImageProcessor | None = None,
                 chat_template: str | None = None):
        super().__init__(tokenizer, chat_template or getattr(tokenizer, "chat_template", None)
                         or QWEN25_VL_CHAT_TEMPLATE)
        self.image_processor = image_processor or QwenImageProcessor()

    def _image_features(self, flat_images):
        feats = self.image_processor(flat_images)
        merge = self.image_processor.merge_size ** 2
        return feats, [int(np.prod(g)) // merge for g in feats["image_grid_thw"]]


class LlavaProcessor(_ChatProcessor):
    """Prompts + images -> model inputs, equal to transformers' `LlavaProcessor`.

    Each `<image>` becomes (crop_h // patch) * (crop_w // patch) + num_additional_image_tokens
    tokens, minus 1 with the "default" feature strategy (CLS dropped): 576 for LLaVA-1.5.
    Same call signature as `Qwen25VLProcessor`; pixel_values is [num_images, 3, H, W].
    """

    def __init__(self, tokenizer, image_processor: LlavaImageProcessor | None = None,
                 chat_template: str | None = None, *, patch_size: int = 14,
                 num_additional_image_tokens: int = 1,
                 vision_feature_select_strategy: str = "default", image_token: str = "<image>"):
        self.image_token = image_token
        super().__init__(tokenizer, chat_template or getattr(tokenizer, "chat_template", None)
                         or LLAVA15_CHAT_TEMPLATE)
        self.image_processor = image_processor or LlavaImageProcessor()
        ch, cw = self.image_processor.crop_size
        self.num_image_tokens = ((ch // patch_size) * (cw // patch_size)
                                 + num_additional_image_tokens
                                 - (vision_feature_select_strategy == "default"))

    def _image_features(self, flat_images):
        return self.image_processor(flat_images), [self.num_image_tokens] * len(flat_images)
