"""Qwen2.5-VL end to end against transformers v5: logits, configs, save/load, sharding, decoding.

Tolerances: float32 logits atol 1e-4 (observed ~1e-6); bfloat16 weights and activations vs the
float32 reference: max |diff| <= BF16_ATOL (stated below) with argmax agreement on >= 90% of
valid tokens. Only valid (non-padding) positions are compared: HF's logits at left-padding
positions are not meaningful.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from balcap_jax import sharding as shd
from balcap_jax.models import from_pretrained, save_pretrained
from balcap_jax.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig
from tests.models import qwen_vl_fixtures as fx

ATOL = 1e-4
BF16_ATOL = 0.3      # observed <= 0.19 with logit std ~1.6; bf16 keeps ~3 significant digits


def _hf_logits(hf, batch):
    with torch.no_grad():
        return hf(**fx.torch_inputs(batch)).logits.float().numpy()


def _max_err(a, b, mask):
    return float(np.abs(np.asarray(a) - np.asarray(b))[mask.astype(bool)].max())


@pytest.fixture(scope="module", params=sorted(fx.CONFIGS))
def trio(request, tmp_path_factory):
    hf, ours, path = fx.hf_and_ours(request.param, tmp_path_factory.mktemp("qvl"))
    return hf, ours, path


@pytest.fixture(scope="module")
def mixed():
    return fx.make_batch(fx.MIXED_ROWS)


def test_full_logits_parity(trio, mixed):
    hf, ours, _ = trio
    assert isinstance(ours, Qwen2_5_VL)
    want = _hf_logits(hf, mixed)
    got = ours(**mixed)
    assert got.dtype == jnp.float32 and got.shape == want.shape
    err = _max_err(got, want, mixed["attention_mask"])
    assert err < ATOL, err
    # logits are not flat: a real test of the weights
    assert np.std(want[mixed["attention_mask"].astype(bool)]) > 0.5


def test_mm_token_type_ids_optional_and_padding_invariant(trio, mixed):
    hf, ours, _ = trio
    full = np.asarray(ours(**mixed))
    no_mm = {k: v for k, v in mixed.items() if k != "mm_token_type_ids"}
    np.testing.assert_allclose(np.asarray(ours(**no_mm)), full, atol=1e-6)
    # row 0 alone (no padding, one image) gives the same logits as inside the padded batch
    row = fx.make_batch(fx.MIXED_ROWS[:1])
    t0 = row["input_ids"].shape[1]
    np.testing.assert_allclose(np.asarray(ours(**row))[0], full[0, -t0:], atol=ATOL)


def test_images_padded_to_their_slot_keep_parity(trio):
    """Fixed-shape mode (model.vision_slot, set from data.max_image_tokens): every image is
    padded to a slot of 64 patches, whatever its size, so the vision shapes depend on the image
    count alone. Images below the cap (4 to 64 patches, several aspect ratios, two in one row)
    must keep parity with transformers, and equal the unpadded layout."""
    hf, ours, _ = trio
    rows = [[1, (1, 2, 2), 5, 6], [1, 7, (1, 4, 6), 8, (1, 8, 8), 9], [1, (1, 6, 10), 11],
            [1, 12, (1, 2, 8), 13]]
    batch = fx.make_batch(rows)
    want = _hf_logits(hf, batch)
    unpadded = np.asarray(ours(**batch))
    try:
        ours.vision_slot = 64
        vi = ours.prepare_vision_inputs(batch["pixel_values"], batch["image_grid_thw"])
        assert vi.pixel_values.shape[0] == 5 * 64          # five images, one slot each
        got = np.asarray(ours(**batch))
    finally:
        ours.vision_slot = None
    err = _max_err(got, want, batch["attention_mask"])
    assert err < ATOL, err
    assert _max_err(got, unpadded, batch["attention_mask"]) < 1e-5
    assert np.std(want[batch["attention_mask"].astype(bool)]) > 0.5


def test_an_image_over_its_slot_is_an_error(trio):
    _, ours, _ = trio
    batch = fx.make_batch([[1, (1, 8, 10), 5]])
    try:
        ours.vision_slot = 64
        with pytest.raises(ValueError, match="max_image_tokens"):
            ours(**batch)
    finally:
        ours.vision_slot = None


def test_text_only_batch(trio):
    hf, ours, _ = trio
    batch = fx.make_batch([[1, 20, 21, 22, 23, 24], [1, 30, 31, 32, 33, 34]])
    want = _hf_logits(hf, batch)   # no padding: HF's 1-D fallback positions agree with ours
    got = ours(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert _max_err(got, want, batch["attention_mask"]) < ATOL


@pytest.mark.heavy
def test_spatial_merge_size_1(tmp_path, monkeypatch):
    """No 2x2 merge (one image token per patch, as configs/shapes.py uses): HF's window index and
    our packed rows must still agree. One 8x8 image in one window, a 4x6 one split in two, and the
    3x3 grid ShapesWorld feeds (42 px, an odd size)."""
    base = fx.hf_config

    def merge1(name):
        c = base(name)
        c.vision_config.spatial_merge_size = 1
        return c
    monkeypatch.setattr(fx, "hf_config", merge1)
    hf, ours, _ = fx.hf_and_ours("win56_full1", tmp_path)
    assert ours.cfg.vision.spatial_merge_size == 1
    batch = fx.make_batch([[1, 5, (1, 8, 8), 7, 8], [1, 9, (1, 4, 6), 7], [1, (1, 3, 3), 7]],
                          merge=1)
    want = _hf_logits(hf, batch)
    assert _max_err(ours(**batch), want, batch["attention_mask"]) < ATOL   # observed ~3e-5
    assert np.std(want[batch["attention_mask"].astype(bool)]) > 0.5


def test_image_token_mismatch_is_an_error(trio, mixed):
    _, ours, _ = trio
    bad = dict(mixed, image_grid_thw=mixed["image_grid_thw"][:2])
    with pytest.raises(ValueError, match="image tokens"):
        ours(**bad)


def test_config_v4_equals_v5(trio):
    _, ours, path = trio
    with open(os.path.join(path, "config.json")) as f:
        v5 = json.load(f)
    v4 = {k: v for k, v in v5.items() if k != "text_config"}
    text = dict(v5["text_config"])
    rope = text.pop("rope_parameters")
    v4.update(text, rope_theta=rope["rope_theta"], model_type="qwen2_5_vl",
              rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]})
    v4["vision_config"] = dict(v5["vision_config"])
    v4["vision_config"]["in_chans"] = v4["vision_config"].pop("in_channels")
    a, b = Qwen2_5_VLConfig.from_hf(v4), Qwen2_5_VLConfig.from_hf(v5)
    assert (a.text.mrope_section, a.text.rope_theta, a.vision, a.image_token_id) == \
           (b.text.mrope_section, b.text.rope_theta, b.vision, b.image_token_id)
    assert a.text.tie_word_embeddings == b.text.tie_word_embeddings == ours.cfg.tie_word_embeddings


@pytest.mark.heavy
def test_v4_directory_loads_with_same_logits(trio, mixed, tmp_path):
    """A v4-style config.json (top-level text keys, rope_scaling mrope) next to the same weights."""
    _, ours, path = trio
    with open(os.path.join(path, "config.json")) as f:
        v5 = json.load(f)
    text = dict(v5.pop("text_config"))
    rope = text.pop("rope_parameters")
    text.pop("model_type")
    v4 = dict(v5, **text, rope_theta=rope["rope_theta"],
              rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]})
    os.symlink(os.path.join(path, "model.safetensors"), tmp_path / "model.safetensors")
    with open(tmp_path / "config.json", "w") as f:
        json.dump(v4, f)
    other = from_pretrained(str(tmp_path))
    np.testing.assert_array_equal(np.asarray(other(**mixed)), np.asarray(ours(**mixed)))


@pytest.mark.heavy
def test_save_then_transformers_load(trio, mixed, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration
    _, ours, _ = trio
    save_pretrained(ours, str(tmp_path))
    back = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    want = _hf_logits(back, mixed)
    assert _max_err(ours(**mixed), want, mixed["attention_mask"]) < ATOL


@pytest.mark.heavy
def test_bfloat16(trio, mixed):
    hf, _, path = trio
    ours16 = from_pretrained(path, dtype="bfloat16")
    assert ours16.visual.patch_embed.kernel[...].dtype == jnp.bfloat16
    want = _hf_logits(hf, mixed)
    got = np.asarray(ours16(**mixed))
    m = mixed["attention_mask"].astype(bool)
    assert _max_err(got, want, m) < BF16_ATOL
    assert (got.argmax(-1) == want.argmax(-1))[m].mean() >= 0.9


@pytest.mark.heavy
def test_sharded_load_on_8_devices(trio, mixed):
    assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
    _, ours, path = trio
    mesh = shd.make_mesh((2, 2, 2))
    sharded = from_pretrained(path, mesh=mesh)
    k = sharded.model.layers.stack.self_attn.q_proj.kernel[...]   # [layers, embed, heads, hd]
    assert len(k.sharding.device_set) == 8 and not k.sharding.is_fully_replicated
    np.testing.assert_allclose(np.asarray(sharded(**mixed)), np.asarray(ours(**mixed)), atol=ATOL)


@pytest.fixture(scope="module")
def decode_fns():
    @nnx.jit
    def prefill(model, embed_inputs, positions, kv_mask, cache):
        x = model.embed_prompt(embed_inputs)
        hidden, cache = model.forward_embeds(x, positions, kv_mask, cache, 0)
        return model.logits(hidden), cache

    @nnx.jit
    def step(model, tok, pos, kv_mask, cache, index):
        hidden, cache = model.forward_embeds(model.embed(tok), pos, kv_mask, cache, index)
        return model.logits(hidden), cache

    return prefill, step


@pytest.mark.heavy
def test_prefill_and_decode_with_deltas_match_hf(trio, mixed, decode_fns):
    """Sampler contract: prepare_prompt + embed_prompt prefill, then one token at a time at
    cache slot T+j with positions T+j+delta, equals HF on the whole sequence."""
    hf, ours, _ = trio
    prefill, step = decode_fns
    b, t = mixed["input_ids"].shape
    extra = np.array([[30, 31, 32]] * b)
    n = extra.shape[1]
    full = dict(mixed, input_ids=np.concatenate([mixed["input_ids"], extra], 1),
                attention_mask=np.concatenate([mixed["attention_mask"], np.ones_like(extra)], 1),
                mm_token_type_ids=np.concatenate([mixed["mm_token_type_ids"],
                                                  np.zeros_like(extra)], 1))
    want = _hf_logits(hf, full)

    embed_inputs, positions, deltas = ours.prepare_prompt(mixed)
    kv_mask = jnp.asarray(full["attention_mask"], jnp.int32)
    cache = ours.init_cache(b, t + n)
    logits, cache = prefill(ours, embed_inputs, jnp.asarray(positions), kv_mask, cache)
    m = mixed["attention_mask"].astype(bool)
    assert _max_err(logits, want[:, :t], m) < ATOL
    for j in range(n):
        pos = jnp.broadcast_to(jnp.asarray(t + j + deltas)[None, :, None], (3, b, 1))
        logits, cache = step(ours, jnp.asarray(extra[:, j:j + 1]), pos, kv_mask, cache, t + j)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], want[:, t + j], atol=ATOL)
