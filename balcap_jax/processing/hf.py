"""transformers' Qwen2.5-VL processor for images only.

`Qwen2_5_VLProcessor` builds a video processor that needs torchvision, which this project does
not install. This subclass skips it: the reference our processor is tested against
(tests/processing) and the processor TRL's trainer gets in benchmarks/trl_step.py.
"""
from __future__ import annotations


def image_only_qwen2_5_vl_processor(image_processor, tokenizer, chat_template=None):
    """A `Qwen2_5_VLProcessor` over `image_processor` and `tokenizer`, with no video processor."""
    from transformers import Qwen2_5_VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyQwen25VLProcessor(Qwen2_5_VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImageOnlyQwen25VLProcessor(image_processor, tokenizer, chat_template=chat_template)
