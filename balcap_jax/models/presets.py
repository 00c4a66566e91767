"""Architecture shapes of the paper's models, as their hub ``config.json`` files state them.

No weights: these dicts let the memory planner, benchmarks and GPU checks build random-init
models of the real shapes without a download. A local checkpoint's own config.json always wins.
"""
from __future__ import annotations

import copy

_QWEN25_VL_COMMON = dict(
    architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl",
    bos_token_id=151643, eos_token_id=151645, vision_start_token_id=151652,
    vision_end_token_id=151653, vision_token_id=151654, image_token_id=151655,
    video_token_id=151656, hidden_act="silu", max_position_embeddings=128000,
    rms_norm_eps=1e-6, rope_theta=1000000.0, attention_dropout=0.0, torch_dtype="bfloat16",
    rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
)
_QWEN25_VL_VISION = dict(
    depth=32, hidden_act="silu", hidden_size=1280, intermediate_size=3420, num_heads=16,
    in_chans=3, patch_size=14, spatial_merge_size=2, spatial_patch_size=14, window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, temporal_patch_size=2,
)

def tiny_qwen2_5_vl(*, hidden_size: int, intermediate_size: int, num_attention_heads: int,
                    num_key_value_heads: int, rope_theta: float, mrope_section: list[int],
                    vision_hidden_size: int, spatial_merge_size: int, window_size: int,
                    vocab_size: int = 512) -> dict:
    """A 2-layer Qwen2.5-VL (2-block vision tower, the last with full attention) for CPU runs,
    whose special-token ids match balcap_jax.tokenizers.train_tiny_bpe (<|endoftext|> 0,
    <|im_start|> 1, <|im_end|> 2, <|vision_start|> 3, <|vision_end|> 4, <|image_pad|> 5,
    <|video_pad|> 6). configs/tiny.py and configs/shapes.py differ only in the sizes."""
    return dict(
        model_type="qwen2_5_vl", architectures=["Qwen2_5_VLForConditionalGeneration"],
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=2, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, max_position_embeddings=1024,
        rms_norm_eps=1e-6, rope_theta=rope_theta, tie_word_embeddings=True,
        rope_scaling={"type": "mrope", "mrope_section": list(mrope_section)},
        bos_token_id=0, eos_token_id=2, pad_token_id=0, image_token_id=5, video_token_id=6,
        vision_start_token_id=3, vision_end_token_id=4, initializer_range=0.02,
        vision_config=dict(depth=2, hidden_size=vision_hidden_size,
                           intermediate_size=2 * vision_hidden_size, num_heads=2,
                           out_hidden_size=hidden_size, patch_size=14,
                           spatial_merge_size=spatial_merge_size, temporal_patch_size=2,
                           window_size=window_size, fullatt_block_indexes=[1], in_chans=3,
                           initializer_range=0.02))


PRESETS = {
    "qwen2_5_vl_3b": dict(
        _QWEN25_VL_COMMON, hidden_size=2048, intermediate_size=11008, num_attention_heads=16,
        num_hidden_layers=36, num_key_value_heads=2, tie_word_embeddings=True,
        vocab_size=151936, vision_config=dict(_QWEN25_VL_VISION, out_hidden_size=2048)),
    "qwen2_5_vl_7b": dict(
        _QWEN25_VL_COMMON, hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
        num_hidden_layers=28, num_key_value_heads=4, tie_word_embeddings=False,
        vocab_size=152064, vision_config=dict(_QWEN25_VL_VISION, out_hidden_size=3584)),
    "qwen2_5_7b": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=3584,
        intermediate_size=18944, num_attention_heads=28, num_hidden_layers=28,
        num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
        rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=32768,
        bos_token_id=151643, eos_token_id=151645, hidden_act="silu", torch_dtype="bfloat16"),
    "llava_1_5_7b": dict(
        architectures=["LlavaForConditionalGeneration"], model_type="llava",
        image_token_index=32000, projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy="default", tie_word_embeddings=False,
        text_config=dict(model_type="llama", hidden_size=4096, intermediate_size=11008,
                         num_attention_heads=32, num_hidden_layers=32, num_key_value_heads=32,
                         vocab_size=32064, rms_norm_eps=1e-5, rope_theta=10000.0,
                         max_position_embeddings=4096),
        vision_config=dict(model_type="clip_vision_model", hidden_size=1024,
                           intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                           image_size=336, patch_size=14, projection_dim=768)),
}


def preset(name: str) -> dict:
    """A deep copy of the named hub config (``qwen2_5_vl_3b``, ``qwen2_5_vl_7b``, ...)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
