"""Tiny random Qwen2.5-VL reference models (transformers v5, torch CPU) and batch builders.

Three configs differ in window size against the grids (patch 14, merge 2: window 56 -> 2x2
merged units per window, 84 -> 3x3, 112 -> 4x4), in full-attention block indexes and in tied
embeddings. Weights are drawn with initializer_range 0.2, and norms/biases (which HF initialises
to 1/0) are randomised too, so every parameter mapping is exercised and logits are not flat.
"""
from __future__ import annotations

import numpy as np

IMG, VSTART, VEND, VID = 100, 101, 102, 103
VOCAB = 128

CONFIGS = {
    # name: (window_size, fullatt_block_indexes, vision depth, tie_word_embeddings)
    "win56_full1": dict(window_size=56, fullatt_block_indexes=[1], depth=2, tie=False),
    "win112_full02_tied": dict(window_size=112, fullatt_block_indexes=[0, 2], depth=3, tie=True),
    "win84_nofull": dict(window_size=84, fullatt_block_indexes=[], depth=2, tie=False),
}


def hf_config(name: str):
    from transformers import Qwen2_5_VLConfig
    c = CONFIGS[name]
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                          "mrope_section": [2, 3, 3]},
                         initializer_range=0.2, rms_norm_eps=1e-6,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         tie_word_embeddings=c["tie"]),
        vision_config=dict(depth=c["depth"], hidden_size=32, intermediate_size=48, num_heads=2,
                           out_hidden_size=64, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=c["window_size"],
                           fullatt_block_indexes=c["fullatt_block_indexes"], initializer_range=0.2),
        image_token_id=IMG, video_token_id=VID, vision_start_token_id=VSTART,
        vision_end_token_id=VEND, tie_word_embeddings=c["tie"])


def hf_model(name: str, seed: int = 0):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(hf_config(name)).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname or "ln_q" in pname:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif pname.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
    return model


def pixels_for(grids, seed: int = 0) -> np.ndarray:
    """Random pixel_values [sum t*h*w, 3*2*14*14] for the given grids."""
    n = sum(t * h * w for t, h, w in grids)
    return np.random.default_rng(seed).standard_normal((n, 3 * 2 * 14 * 14)).astype(np.float32)


def make_batch(rows, *, merge: int = 2, pad_id: int = 0, seed: int = 0):
    """rows: list of lists of items, each an int text token or a (t, h, w) image grid.
    Returns dict(input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw)
    as numpy, left-padded to the longest row."""
    seqs, grids = [], []
    for row in rows:
        seq = []
        for item in row:
            if isinstance(item, tuple):
                grids.append(item)
                t, h, w = item
                seq += [VSTART] + [IMG] * (t * h * w // merge ** 2) + [VEND]
            else:
                seq.append(int(item))
        seqs.append(seq)
    length = max(len(s) for s in seqs)
    ids = np.full((len(seqs), length), pad_id, np.int64)
    mask = np.zeros((len(seqs), length), np.int64)
    for i, s in enumerate(seqs):
        ids[i, length - len(s):] = s
        mask[i, length - len(s):] = 1
    out = dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == IMG).astype(np.int64))
    if grids:
        out["pixel_values"] = pixels_for(grids, seed)
        out["image_grid_thw"] = np.asarray(grids, np.int64)
    return out


# A batch with left padding, two images of different sizes in one row, ragged windows
# (grids not divisible by the windows) and a text-only row.
MIXED_ROWS = [
    [1, 5, 6, (1, 4, 6), 7, 8, 9],
    [1, (1, 6, 10), 11, 12, (1, 4, 4), 13],
    [1, 20, 21, 22, 23, 24],
]


def torch_inputs(batch):
    import torch
    return {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}



def hf_and_ours(name: str, tmpdir, dtype="float32"):
    """(HF torch model, our model loaded through save_pretrained -> hf.from_pretrained)."""
    from balcap_jax.models import from_pretrained
    hf = hf_model(name)
    path = str(tmpdir / name)
    hf.save_pretrained(path)
    return hf, from_pretrained(path, dtype=dtype), path
