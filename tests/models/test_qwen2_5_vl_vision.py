"""Qwen2.5-VL vision tower: per-submodule and whole-tower parity with transformers (float32).

Tolerance: atol 1e-4 (float32 both sides; observed errors are ~1e-6).
"""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from balcap_jax.models import qwen2_5_vl_index as qi
from balcap_jax.models.qwen2_5_vl_vision import VisionConfig
from tests.models import qwen_vl_fixtures as fx

ATOL = 1e-4
GRIDS = [(1, 6, 10), (1, 4, 4), (1, 10, 6)]   # ragged against 2x2, 3x3 and 4x4 windows


@pytest.fixture(scope="module", params=sorted(fx.CONFIGS))
def pair(request, tmp_path_factory):
    hf, ours, _ = fx.hf_and_ours(request.param, tmp_path_factory.mktemp("qvl"))
    return hf, ours.visual, ours.visual.cfg


def _max_window(cfg):
    return (cfg.window_size // cfg.spatial_merge_size // cfg.patch_size) ** 2 * 4


# (window_row, full_row): dense single rows, tightest packing, and the defaults
LAYOUTS = {"dense": (10 ** 6, None), "tight": ("max_window", "auto"), "default": (256, "auto")}


def _prep(cfg, grids, bucket=None, seed=0, layout="default"):
    pix = fx.pixels_for(grids, seed)
    wr, fr = LAYOUTS[layout]
    vi = qi.prepare_vision_inputs(pix, grids, spatial_merge_size=cfg.spatial_merge_size,
                                  window_size=cfg.window_size, patch_size=cfg.patch_size,
                                  bucket=bucket,
                                  window_row=_max_window(cfg) if wr == "max_window" else wr,
                                  full_row=fr)
    return pix, vi


def _hf_rotary(visual, grids):
    """HF's permuted (cos, sin) and its window bookkeeping, as its forward computes them."""
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index
    g = torch.tensor(grids)
    pos = get_vision_position_ids(g, visual.spatial_merge_size)
    widx, cu_win = get_vision_window_index(g, visual.spatial_merge_size, visual.window_size,
                                           visual.patch_size)
    n = int(pos.shape[0])
    cos, sin = visual.rotary_pos_emb(torch.zeros(n, 1), pos)
    cos, sin = (visual.permute_input_for_window_attn(t, widx, seq_len=n) for t in (cos, sin))
    return cos, sin, cu_win


def test_config_from_v4_and_v5_dicts():
    v5 = fx.hf_config("win56_full1").vision_config.to_dict()
    v4 = dict(depth=2, hidden_act="silu", hidden_size=32, intermediate_size=48, num_heads=2,
              in_chans=3, out_hidden_size=64, patch_size=14, spatial_merge_size=2,
              spatial_patch_size=14, window_size=56, fullatt_block_indexes=[1],
              tokens_per_second=2, temporal_patch_size=2)
    assert VisionConfig.from_hf(v4) == VisionConfig.from_hf(v5)
    assert VisionConfig.from_hf(VisionConfig.from_hf(v5).to_hf()) == VisionConfig.from_hf(v5)


def test_patch_embed_and_rotary(pair):
    hf, tower, cfg = pair
    pix, vi = _prep(cfg, GRIDS)
    with torch.no_grad():
        want = hf.model.visual.patch_embed(torch.from_numpy(pix)).numpy()
    got = np.asarray(tower.patch_embed(jnp.asarray(pix)))
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    cos, sin, _ = _hf_rotary(hf.model.visual, GRIDS)
    n = pix.shape[0]
    gcos, gsin = tower.rotary(jnp.asarray(vi.rotary_pos))
    np.testing.assert_allclose(np.asarray(gcos)[:n], cos.numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(gsin)[:n], sin.numpy(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("kind", ["window", "full"])
def test_vision_block(pair, kind, layout):
    """One block on window-permuted hidden states: HF with cu_(window_)seqlens vs our segment mask
    (bucket-padded with garbage rows that must not leak into real ones)."""
    from transformers.vision_utils import get_vision_cu_seqlens
    hf, tower, cfg = pair
    pix, vi = _prep(cfg, GRIDS, bucket=64, layout=layout)
    n, n_pad = pix.shape[0], vi.pixel_values.shape[0]
    cos, sin, cu_win = _hf_rotary(hf.model.visual, GRIDS)
    cu = cu_win if kind == "window" else get_vision_cu_seqlens(torch.tensor(GRIDS))
    x = np.random.default_rng(1).standard_normal((n_pad, cfg.hidden_size)).astype(np.float32)
    with torch.no_grad():
        want = hf.model.visual.blocks[0](torch.from_numpy(x[:n]), cu_seqlens=cu.int(),
                                         position_embeddings=(cos, sin)).numpy()
    layout = ((vi.window_rows, vi.window_slots, vi.window_segments) if kind == "window"
              else (vi.full_rows, vi.full_slots, vi.full_segments))
    gcos, gsin = tower.rotary(jnp.asarray(vi.rotary_pos))
    got = _jit_block(tower.blocks.layer(0), jnp.asarray(x), gcos, gsin, *map(jnp.asarray, layout))
    np.testing.assert_allclose(np.asarray(got)[:n], want, atol=ATOL, rtol=0)


def test_merger(pair):
    hf, tower, cfg = pair
    x = np.random.default_rng(2).standard_normal((48, cfg.hidden_size)).astype(np.float32)
    with torch.no_grad():
        want = hf.model.visual.merger(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(tower.merger(jnp.asarray(x))), want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("bucket,layout", [(None, "dense"), (128, "tight"), (128, "default")])
def test_tower_equals_hf_image_features(pair, bucket, layout):
    hf, tower, cfg = pair
    pix, vi = _prep(cfg, GRIDS, bucket=bucket, layout=layout)
    with torch.no_grad():
        feats = hf.model.get_image_features(torch.from_numpy(pix),
                                            torch.tensor(GRIDS)).pooler_output
    want = torch.cat(feats).numpy()
    got = np.asarray(_jit_tower(tower, jax_tree(vi)))
    m = want.shape[0]
    assert got.shape == (vi.merge_inverse.shape[0], cfg.out_hidden_size)
    np.testing.assert_allclose(got[:m], want, atol=ATOL, rtol=0)
    assert not got[m:].any()


@nnx.jit
def _jit_block(block, *args):
    return block(*args)


@nnx.jit
def _jit_tower(tower, vi):
    return tower(vi)


def jax_tree(vi):
    return qi.VisionInputs(*(jnp.asarray(a) for a in vi))


def test_slot_layout_equals_hf_image_features(pair):
    """Training's fixed-shape layout: each image padded to its own slot of 64 patches."""
    hf, tower, cfg = pair
    pix = fx.pixels_for(GRIDS)
    vi = qi.prepare_vision_inputs(pix, GRIDS, spatial_merge_size=cfg.spatial_merge_size,
                                  window_size=cfg.window_size, patch_size=cfg.patch_size,
                                  slot=64)
    assert vi.pixel_values.shape[0] == 3 * 64 and vi.full_rows.shape == (3, 64)
    with torch.no_grad():
        feats = hf.model.get_image_features(torch.from_numpy(pix),
                                            torch.tensor(GRIDS)).pooler_output
    want = torch.cat(feats).numpy()
    got = np.asarray(_jit_tower(tower, jax_tree(vi)))
    np.testing.assert_allclose(got[:want.shape[0]], want, atol=ATOL, rtol=0)
    assert not got[want.shape[0]:].any()


def test_attention_in_row_chunks_equals_all_rows(pair, monkeypatch):
    """Whole-image attention rows go through in chunks (bounded float32 scores); outputs and
    gradients must equal the all-rows computation."""
    import jax

    from balcap_jax.models import qwen2_5_vl_vision as qv
    _, tower, cfg = pair
    pix = fx.pixels_for(GRIDS)
    vi = jax_tree(qi.prepare_vision_inputs(pix, GRIDS, spatial_merge_size=cfg.spatial_merge_size,
                                           window_size=cfg.window_size, slot=64,
                                           patch_size=cfg.patch_size,
                                           window_row=_max_window(cfg)))
    graph, state = nnx.split(tower)

    def run():
        f = lambda st: jnp.sum(jnp.sin(nnx.merge(graph, st)(vi)))
        return jax.jit(jax.value_and_grad(f))(state)
    whole, g_whole = run()
    monkeypatch.setattr(qv, "ATTN_SCORES", 1)           # one row per chunk
    jaxpr = str(jax.make_jaxpr(lambda st: nnx.merge(graph, st)(vi))(state))
    assert "while" in jaxpr or "scan" in jaxpr          # the chunked path really runs
    chunked, g_chunked = run()
    # a float32 sum of thousands of sines: each output's rounding adds up to ~1e-6 of it
    np.testing.assert_allclose(float(chunked), float(whole), rtol=5e-6)
    scale = max(float(np.abs(b).max()) for b in jax.tree.leaves(g_whole))
    assert scale > 1e-2
    for a, b in zip(jax.tree.leaves(g_chunked), jax.tree.leaves(g_whole)):   # float32 noise
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * scale, rtol=0)


def test_remat_blocks_keep_gradients(pair):
    """train.remat also rematerialises the vision blocks (only each block's input is kept for
    the backward pass): values and gradients must not change."""
    import jax
    _, tower, cfg = pair
    vi = jax_tree(_prep(cfg, GRIDS, bucket=128)[1])
    graph, state = nnx.split(tower)

    def run():
        f = lambda st: jnp.sum(jnp.sin(nnx.merge(graph, st)(vi)))
        return jax.jit(jax.value_and_grad(f))(state)
    plain, g_plain = run()
    try:
        tower.remat = True
        graph, state = nnx.split(tower)
        assert "remat" in str(jax.make_jaxpr(jax.grad(
            lambda st: jnp.sum(nnx.merge(graph, st)(vi))))(state))
        remat, g_remat = run()
    finally:
        tower.remat = False
    np.testing.assert_allclose(float(remat), float(plain), rtol=1e-6)
    scale = max(float(np.abs(b).max()) for b in jax.tree.leaves(g_plain))
    for a, b in zip(jax.tree.leaves(g_remat), jax.tree.leaves(g_plain)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * scale, rtol=0)
