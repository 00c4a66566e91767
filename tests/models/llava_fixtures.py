"""Tiny random LLaVA reference models (transformers v5, torch CPU) and batch builders.

Two configs: (a) CLIP 3 layers at 28 px / patch 14 (4 tokens per image), features from layer -2
with the class token dropped, GQA Llama, untied, projector with bias; (b) CLIP 2 layers at
42 px (9 patches), features from layers [-3, -1] concatenated with the class token kept
("full": 10 tokens per image), MHA Llama with a different rope theta, tied embeddings, projector
without bias. Weights use initializer_range 0.2 and LayerNorm/RMSNorm weights and biases are
randomised too, so every mapping is exercised and the logits are not flat.
"""
from __future__ import annotations

import numpy as np

IMG = 100
VOCAB = 128

CONFIGS = {
    "l2_default": dict(image_size=28, vision_layers=3, feature_layer=-2, strategy="default",
                       heads=(4, 2), theta=1e4, tie=False, proj_bias=True),
    "cat_full_tied": dict(image_size=42, vision_layers=2, feature_layer=[-3, -1],
                          strategy="full", heads=(4, 4), theta=5e5, tie=True, proj_bias=False),
}


def tokens_per_image(name: str) -> int:
    c = CONFIGS[name]
    return (c["image_size"] // 14) ** 2 + (c["strategy"] == "full")


def hf_config(name: str, *, vocab_size: int = VOCAB, image_token: int = IMG):
    from transformers import LlavaConfig
    c = CONFIGS[name]
    return LlavaConfig(
        text_config=dict(model_type="llama", vocab_size=vocab_size, hidden_size=64,
                         intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=c["heads"][0], num_key_value_heads=c["heads"][1],
                         max_position_embeddings=512, initializer_range=0.2, rms_norm_eps=1e-5,
                         rope_parameters={"rope_type": "default", "rope_theta": c["theta"]},
                         bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         tie_word_embeddings=c["tie"]),
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=48,
                           num_hidden_layers=c["vision_layers"], num_attention_heads=2,
                           image_size=c["image_size"], patch_size=14, projection_dim=16,
                           hidden_act="quick_gelu", initializer_range=0.2,
                           initializer_factor=4.0),
        image_token_index=image_token, vision_feature_layer=c["feature_layer"],
        vision_feature_select_strategy=c["strategy"], projector_hidden_act="gelu",
        multimodal_projector_bias=c["proj_bias"], tie_word_embeddings=c["tie"],
        image_seq_length=tokens_per_image(name))


def hf_model(name: str, seed: int = 0, **config_kw):
    import torch
    from transformers import LlavaForConditionalGeneration
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(hf_config(name, **config_kw)).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname and pname.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif pname.endswith("bias") or "class_embedding" in pname:
                p.copy_(0.2 * torch.randn_like(p))
            elif "vision_tower" in pname or "projector" in pname:
                p.copy_(0.2 * torch.randn_like(p))   # CLIP's own init is far smaller
    return model


def make_batch(rows, name: str, *, pad_id: int = 0, seed: int = 0):
    """rows: lists of items, each an int text token or "I" (an image). Returns numpy
    input_ids, attention_mask (left padded), position_ids (cumsum(mask) - 1 as HF generate)
    and pixel_values [N, 3, S, S] when there are images."""
    n_tok, size = tokens_per_image(name), CONFIGS[name]["image_size"]
    seqs, n_img = [], 0
    for row in rows:
        seq = []
        for item in row:
            if item == "I":
                seq += [IMG] * n_tok
                n_img += 1
            else:
                seq.append(int(item))
        seqs.append(seq)
    length = max(len(s) for s in seqs)
    ids = np.full((len(seqs), length), pad_id, np.int64)
    mask = np.zeros((len(seqs), length), np.int64)
    for i, s in enumerate(seqs):
        ids[i, length - len(s):] = s
        mask[i, length - len(s):] = 1
    out = dict(input_ids=ids, attention_mask=mask,
               position_ids=np.clip(np.cumsum(mask, 1) - 1, 0, None))
    if n_img:
        out["pixel_values"] = np.random.default_rng(seed).standard_normal(
            (n_img, 3, size, size)).astype(np.float32)
    return out


# left padding, two images in one row, an image mid-prompt, a text-only row
MIXED_ROWS = [
    [1, 5, "I", 7, 8, 9],
    [1, "I", 11, 12, "I", 13],
    [1, 20, 21, 22, 23, 24],
]


def torch_inputs(batch):
    import torch
    return {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}


def hf_and_ours(name: str, tmpdir, dtype="float32"):
    """(HF torch model, our model loaded through save_pretrained -> hf.from_pretrained, dir)."""
    from balcap_jax.models import from_pretrained
    hf = hf_model(name)
    path = str(tmpdir / name)
    hf.save_pretrained(path)
    return hf, from_pretrained(path, dtype=dtype), path
