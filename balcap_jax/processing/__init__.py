"""Image processors and chat prompts, equal to the Hugging Face processors (numpy/PIL only).

images.py: `QwenImageProcessor` (= transformers' Qwen2VLImageProcessor), `LlavaImageProcessor`
(= LlavaImageProcessor(do_pad=True)), `smart_resize`, `to_rgb`. prompts.py: chat templates,
`build_caption_prompt`, and the batching processors `Qwen25VLProcessor` and `LlavaProcessor`.
"""
from balcap_jax.processing.images import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    LlavaImageProcessor,
    QwenImageProcessor,
    center_crop,
    pad_to_square,
    preprocess_image,
    shortest_edge_size,
    smart_resize,
    to_rgb,
)
from balcap_jax.processing.prompts import (
    DEFAULT_SYSTEM_PROMPT,
    LLAVA15_CHAT_TEMPLATE,
    QWEN25_VL_CHAT_TEMPLATE,
    LlavaProcessor,
    Qwen25VLProcessor,
    apply_chat_template,
    build_caption_prompt,
    caption_messages,
    pad_batch,
)

__all__ = [
    "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "LlavaImageProcessor", "QwenImageProcessor",
    "center_crop", "pad_to_square", "preprocess_image", "shortest_edge_size", "smart_resize",
    "to_rgb", "DEFAULT_SYSTEM_PROMPT", "LLAVA15_CHAT_TEMPLATE", "QWEN25_VL_CHAT_TEMPLATE",
    "LlavaProcessor", "Qwen25VLProcessor", "apply_chat_template", "build_caption_prompt",
    "caption_messages", "pad_batch"]
