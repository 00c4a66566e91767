"""Host-side Qwen2.5-VL index arrays against transformers' own functions (exact integer
equality)."""
import numpy as np
import pytest
import torch

from balcap_jax.models import qwen2_5_vl_index as qi
from tests.models import qwen_vl_fixtures as fx

GRID_SETS = [
    [(1, 4, 6)],
    [(1, 6, 10), (1, 4, 4)],
    [(1, 8, 8), (2, 4, 6), (1, 2, 2)],     # a 2-frame entry and a single merged unit
    [(1, 16, 12), (1, 10, 14)],
]


@pytest.mark.parametrize("window_size", [28, 56, 84, 112])
@pytest.mark.parametrize("grids", GRID_SETS)
def test_window_index_and_positions_equal_hf(grids, window_size):
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index
    g = torch.tensor(grids)
    want_idx, want_cu = get_vision_window_index(g, spatial_merge_size=2, window_size=window_size,
                                                patch_size=14)
    idx, cu = qi.window_index(grids, spatial_merge_size=2, window_size=window_size, patch_size=14)
    np.testing.assert_array_equal(idx, want_idx.numpy())
    np.testing.assert_array_equal(cu, want_cu.numpy())
    np.testing.assert_array_equal(qi.vision_position_ids(grids, 2),
                                  get_vision_position_ids(g, 2).numpy())


@pytest.mark.parametrize("bucket", [None, 64, "pow2"])
def test_prepare_vision_inputs_segments_and_orders(bucket):
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_window_index
    grids = [(1, 6, 10), (2, 4, 4)]
    pix = fx.pixels_for(grids)
    vi = qi.prepare_vision_inputs(pix, grids, spatial_merge_size=2, window_size=56, patch_size=14,
                                  bucket=bucket)
    n = pix.shape[0]
    n_pad = vi.pixel_values.shape[0]
    assert n_pad % 4 == 0 and n_pad >= n
    if bucket == 64:
        assert n_pad == 128
    if bucket == "pow2":
        assert n_pad == 128
    # window permutation of HF, expressed on patches
    widx, cu_win = get_vision_window_index(torch.tensor(grids), 2, 56, 14)
    perm = (widx.numpy()[:, None] * 4 + np.arange(4)).reshape(-1)
    np.testing.assert_array_equal(vi.patch_order[:n], perm)
    # segments reproduce cu_window_seqlens / cu_seqlens as boundaries in the permuted order
    def boundaries(seg):
        change = np.nonzero(np.diff(seg[:n]))[0] + 1
        return np.concatenate([[0], change, [n]])
    np.testing.assert_array_equal(boundaries(vi.window_segments), cu_win.numpy())
    np.testing.assert_array_equal(boundaries(vi.full_segments),
                                  get_vision_cu_seqlens(torch.tensor(grids)).numpy())
    assert ((vi.window_segments[n:] == qi.PAD_SEGMENT).all()
            and (vi.full_segments[n:] == qi.PAD_SEGMENT).all())
    # merge_inverse undoes the window permutation on merged units; padding is the identity
    m = n // 4
    np.testing.assert_array_equal(widx.numpy()[vi.merge_inverse[:m]], np.arange(m))
    np.testing.assert_array_equal(vi.merge_inverse[m:], np.arange(m, n_pad // 4))
    assert vi.token_valid.sum() == m
    np.testing.assert_array_equal(vi.pixel_values[:n], pix)
    assert not vi.pixel_values[n:].any()


@pytest.mark.parametrize("window_row,full_row", [(16, "auto"), (24, 64), (256, None)])
def test_attention_rows_pack_whole_segments(window_row, full_row):
    grids = [(1, 6, 10), (2, 4, 4), (1, 2, 2), (1, 8, 6)]
    pix = fx.pixels_for(grids)
    vi = qi.prepare_vision_inputs(pix, grids, window_size=56, bucket=64, window_row=window_row,
                                  full_row=full_row)
    n, n_pad = pix.shape[0], vi.pixel_values.shape[0]
    for rows, slots, seg in ((vi.window_rows, vi.window_slots, vi.window_segments),
                             (vi.full_rows, vi.full_slots, vi.full_segments)):
        g, r = rows.shape
        flat = rows.reshape(-1)
        real = flat[flat < n_pad]
        # every real slot exactly once, padding slots never, in order
        np.testing.assert_array_equal(real, np.arange(n))
        np.testing.assert_array_equal(flat[slots[:n]], np.arange(n))
        assert (slots[n:] == g * r).all()
        # a segment never straddles two rows
        row_of = slots[:n] // r
        for sid in np.unique(seg[:n]):
            assert len(np.unique(row_of[seg[:n] == sid])) == 1
    if full_row is None:
        assert vi.full_rows.shape == (1, n_pad)


def test_window_row_count_depends_only_on_the_bucket():
    """Different grids with the same padded patch count share every static shape."""
    a = qi.prepare_vision_inputs(fx.pixels_for([(1, 6, 10)]), [(1, 6, 10)], window_size=56,
                                 bucket=64, window_row=32, full_row=64)
    b = qi.prepare_vision_inputs(fx.pixels_for([(1, 2, 2)] * 8), [(1, 2, 2)] * 8, window_size=56,
                                 bucket=64, window_row=32, full_row=64)
    assert [x.shape for x in a] == [x.shape for x in b]


def test_prepare_vision_inputs_errors_name_the_input():
    with pytest.raises(ValueError, match="pixel_values"):
        qi.prepare_vision_inputs(np.zeros((10, 1176)), [(1, 4, 4)])
    with pytest.raises(ValueError, match="spatial_merge_size"):
        qi.prepare_vision_inputs(np.zeros((15, 1176)), [(1, 3, 5)])
    with pytest.raises(ValueError, match="bucket"):
        qi.prepare_vision_inputs(np.zeros((16, 1176)), [(1, 4, 4)], bucket="big")
    with pytest.raises(ValueError, match="window_row"):
        qi.prepare_vision_inputs(np.zeros((64, 1176)), [(1, 8, 8)], window_size=112, window_row=32)
    with pytest.raises(ValueError, match="full_row"):
        qi.prepare_vision_inputs(np.zeros((64, 1176)), [(1, 8, 8)], full_row=32, window_size=28)


@pytest.fixture(scope="module")
def hf_vl():
    return fx.hf_model("win56_full1")


ROPE_CASES = {
    "mixed": fx.MIXED_ROWS,
    "single": [[1, 5, 6, (1, 4, 6), 7, 8, 9]],
    "tall_then_wide": [[1, (1, 10, 4), 3, (1, 2, 8)], [4, 5, (1, 6, 6), 7]],
    "image_first": [[(1, 4, 4), 9], [1, 2, 3, 4, 5, (1, 2, 2), 6, 7]],
}


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_rope_index_equals_hf(hf_vl, case):
    batch = fx.make_batch(ROPE_CASES[case])
    tb = fx.torch_inputs(batch)
    want_pos, want_delta = hf_vl.model.get_rope_index(
        tb["input_ids"], mm_token_type_ids=tb["mm_token_type_ids"],
        image_grid_thw=tb["image_grid_thw"], attention_mask=tb["attention_mask"])
    pos, delta = qi.rope_index(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"],
                               image_token_id=fx.IMG, spatial_merge_size=2)
    np.testing.assert_array_equal(pos, want_pos.numpy())
    # ours: position at cache index i past a left-padded prompt is i + delta; HF's delta counts
    # valid tokens only, so the two differ by the row's left padding.
    n_pad = (batch["attention_mask"] == 0).sum(1)
    np.testing.assert_array_equal(delta, want_delta.numpy()[:, 0] - n_pad)
    # same result when the token types are given explicitly
    pos2, delta2 = qi.rope_index(batch["input_ids"], batch["attention_mask"],
                                 batch["image_grid_thw"], image_token_id=-1,
                                 mm_token_type_ids=batch["mm_token_type_ids"])
    np.testing.assert_array_equal(pos2, pos)
    np.testing.assert_array_equal(delta2, delta)


def test_rope_index_decode_positions_match_hf_generation_rule(hf_vl):
    """HF continues decoding at (#valid tokens so far) + rope_delta; ours at cache index + delta."""
    batch = fx.make_batch(fx.MIXED_ROWS)
    tb = fx.torch_inputs(batch)
    _, want_delta = hf_vl.model.get_rope_index(
        tb["input_ids"], mm_token_type_ids=tb["mm_token_type_ids"],
        image_grid_thw=tb["image_grid_thw"], attention_mask=tb["attention_mask"])
    _, delta = qi.rope_index(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"],
                             image_token_id=fx.IMG)
    t = batch["input_ids"].shape[1]
    valid = batch["attention_mask"].sum(1)
    for step in range(3):
        np.testing.assert_array_equal(t + step + delta, valid + step + want_delta.numpy()[:, 0])


def test_rope_index_errors():
    batch = fx.make_batch([[1, (1, 4, 4), 2]])
    with pytest.raises(ValueError, match="image_grid_thw"):
        qi.rope_index(batch["input_ids"], batch["attention_mask"], [(1, 4, 4), (1, 2, 2)],
                      image_token_id=fx.IMG)
    with pytest.raises(ValueError, match="image tokens"):
        qi.rope_index(batch["input_ids"], batch["attention_mask"], [(1, 4, 8)],
                      image_token_id=fx.IMG)
