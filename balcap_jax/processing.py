"""Image processors and chat prompts for the policies, equal to the Hugging Face processors.

Qwen2.5-VL: `QwenImageProcessor` reproduces transformers' `Qwen2VLImageProcessor` (its PIL/NumPy
backend, the one used without torchvision): convert to RGB (transparency composited onto white),
`smart_resize` to multiples of patch*merge, PIL bicubic resize of the uint8 image, rescale by 1/255
in float64 then cast to float32, normalise in float32, and flatten into patches ordered
(merge-block row, merge-block col, row in block, col in block) x (C, T, P, P). The float steps are
done through a 256-entry lookup table that performs exactly those operations, so outputs are
bit-identical to transformers (tests assert atol 1e-6).

`Qwen25VLProcessor` renders prompts with the model's chat template, expands each image's single
`<|image_pad|>` to grid_t*grid_h*grid_w / merge_size**2 copies, pads the batch (left by default)
and returns numpy arrays: input_ids, attention_mask, mm_token_type_ids (0 text, 1 image) and, when
the batch has images, pixel_values and image_grid_thw. Integer arrays are int32.

numpy + PIL only at run time; torch is used only by the tests.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
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

ImageLike = Any  # PIL.Image.Image or np.ndarray uint8 [H, W], [H, W, 1|3|4]


# --------------------------------------------------------------------------- image decoding

def to_rgb(image: ImageLike) -> Image.Image:
    """An RGB PIL image, as transformers' `convert_to_rgb` makes it.

    PIL: images with an alpha band or a `transparency` entry (palette/greyscale with a
    transparent colour) are alpha-composited onto white; others use `Image.convert("RGB")`.
    numpy (uint8, channels last): 1 channel repeated, 4 channels blended onto white in float64
    and rounded, as transformers does for arrays.
    """
    if isinstance(image, Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"image array has dtype {image.dtype}; pass uint8 [H, W, C] pixels "
                            "(e.g. (x * 255).round().astype(np.uint8)) or a PIL image")
        arr = image[..., None] if image.ndim == 2 else image
        if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
            raise ValueError(f"image array has shape {image.shape}; expected channels-last "
                             "[H, W], [H, W, 1], [H, W, 3] or [H, W, 4]")
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        elif arr.shape[-1] == 4:
            alpha = arr[..., 3:4] / 255
            arr = np.round(alpha * arr[..., :3] + (1 - alpha) * 255).astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(arr))
    raise TypeError(f"expected a PIL image or a uint8 numpy array, got {type(image).__name__}")


def _normalize_lut(image_mean: Sequence[float], image_std: Sequence[float],
                   rescale_factor: float) -> np.ndarray:
    """[3, 256] float32: the normalised value of each uint8 level per channel.

    Same arithmetic as transformers: uint8 -> float64 * rescale -> float32, then
    (x - float32(mean)) / float32(std) in float32.
    """
    levels = (np.arange(256, dtype=np.float64) * rescale_factor).astype(np.float32)
    mean = np.asarray(image_mean, np.float32)[:, None]
    std = np.asarray(image_std, np.float32)[:, None]
    return ((levels[None, :] - mean) / std).astype(np.float32)


# --------------------------------------------------------------------------- Qwen2-VL images

def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """Qwen2-VL's target size: both sides multiples of `factor`, area within [min, max] pixels,
    aspect ratio kept as closely as possible (transformers' `smart_resize`, same rounding)."""
    if height < 1 or width < 1:
        raise ValueError(f"image size {height}x{width} is empty")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image {height}x{width}: aspect ratio must be at most 200, got "
                         f"{max(height, width) / min(height, width):.1f}; crop or pad it first")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclasses.dataclass(frozen=True)
class QwenImageProcessor:
    """numpy/PIL twin of transformers' `Qwen2VLImageProcessor` (defaults equal to its defaults;
    the Qwen2.5-VL checkpoints' preprocessor_config.json uses max_pixels=12845056)."""
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = int(Image.Resampling.BICUBIC)

    def __post_init__(self):
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels={self.min_pixels} exceeds max_pixels={self.max_pixels}")
        object.__setattr__(self, "_lut", _normalize_lut(self.image_mean, self.image_std,
                                                        self.rescale_factor))

    @classmethod
    def from_config(cls, config: dict) -> "QwenImageProcessor":
        """From a preprocessor_config.json dict (v4 `min_pixels`/`max_pixels` or v5 `size`)."""
        size = config.get("size") or {}
        kw = dict(min_pixels=config.get("min_pixels", size.get("shortest_edge")),
                  max_pixels=config.get("max_pixels", size.get("longest_edge")),
                  **{k: config.get(k) for k in ("patch_size", "temporal_patch_size", "merge_size",
                                                "rescale_factor", "resample")})
        for k in ("image_mean", "image_std"):
            if config.get(k) is not None:
                kw[k] = tuple(config[k])
        return cls(**{k: v for k, v in kw.items() if v is not None})

    @classmethod
    def from_pretrained(cls, path: str) -> "QwenImageProcessor":
        """From `<path>/preprocessor_config.json` of a Hugging Face checkpoint directory."""
        file = os.path.join(path, "preprocessor_config.json")
        if not os.path.exists(file):
            raise FileNotFoundError(f"{file} not found: pass the checkpoint directory that holds "
                                    "preprocessor_config.json, or build QwenImageProcessor(...)")
        with open(file) as f:
            return cls.from_config(json.load(f))

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def grid_thw(self, height: int, width: int) -> tuple[int, int, int]:
        """(t, h, w) patch grid of an image of this size."""
        h, w = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        return 1, h // self.patch_size, w // self.patch_size

    def num_image_tokens(self, height: int, width: int) -> int:
        """Number of `<|image_pad|>` tokens (merged patches) for an image of this size."""
        t, h, w = self.grid_thw(height, width)
        return t * h * w // self.merge_size ** 2

    def preprocess(self, image: ImageLike) -> tuple[np.ndarray, tuple[int, int, int]]:
        """One image -> (patches float32 [t*h*w, C*T*P*P], grid (t, h, w))."""
        rgb = to_rgb(image)
        width, height = rgb.size
        rh, rw = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        pixels = np.asarray(rgb.resize((rw, rh), resample=self.resample))  # [H, W, 3] uint8
        chw = self._lut[np.arange(3)[:, None, None], pixels.transpose(2, 0, 1)]  # [3, H, W] f32
        p, m, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        gh, gw = rh // p, rw // p
        x = chw.reshape(3, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
        # An image is one frame repeated over the temporal patch: (.., C, T, P, P).
        x = np.broadcast_to(x[:, :, :, :, :, None], x.shape[:5] + (tp, p, p))
        return np.ascontiguousarray(x.reshape(gh * gw, 3 * tp * p * p)), (1, gh, gw)

    def __call__(self, images: Sequence[ImageLike]) -> dict[str, np.ndarray]:
        """A flat list of images -> {pixel_values [sum N_i, C*T*P*P], image_grid_thw [n, 3]}."""
        if isinstance(images, (Image.Image, np.ndarray)):
            images = [images]
        if len(images) == 0:
            raise ValueError("QwenImageProcessor got an empty image list")
        out = [self.preprocess(im) for im in images]
        return {"pixel_values": np.concatenate([o[0] for o in out], axis=0),
                "image_grid_thw": np.asarray([o[1] for o in out], np.int32)}


def preprocess_image(image: ImageLike, **kwargs) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Functional form of `QwenImageProcessor(**kwargs).preprocess(image)`."""
    return QwenImageProcessor(**kwargs).preprocess(image)


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
            found += [c["image"] for c in m["content"]
                      if isinstance(c, dict) and isinstance(c.get("image"), (Image.Image, np.ndarray))]
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
        flat = [im for r in rows for im in r]
        feats, counts = self._image_features(flat) if flat else ({}, [])
        encoded = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        expanded, k = [], 0
        for i, (ids, row_imgs) in enumerate(zip(encoded, rows)):
            n_placeholders = sum(1 for t in ids if t == self.image_token_id)
            if n_placeholders != len(row_imgs):
                raise ValueError(f"prompt {i} has {n_placeholders} {self.image_token} "
                                 f"placeholders but {len(row_imgs)} images; put one placeholder "
                                 "per image (the chat template does this for image items)")
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
