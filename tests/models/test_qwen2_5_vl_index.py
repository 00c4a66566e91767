"""Host-side Qwen2.5-VL index arrays against transformers' own functions (exact integer equality)."""
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
    np.testing.assert_array_equal(qi.vision_position_ids(grids, 2), get_vision_position_ids(g, 2).numpy())


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
    assert (vi.window_segments[n:] == qi.PAD_SEGMENT).all() and (vi.full_segments[n:] == qi.PAD_SEGMENT).all()
    # merge_inverse undoes the window permutation on merged units; padding is the identity
    m = n // 4
    np.testing.assert_array_equal(widx.numpy()[vi.merge_inverse[:m]], np.arange(m))
    np.testing.assert_array_equal(vi.merge_inverse[m:], np.arange(m, n_pad // 4))
    assert vi.token_valid.sum() == m
    np.testing.assert_array_equal(vi.pixel_values[:n], pix)
    assert not vi.pixel_values[n:].any()


def test_prepare_vision_inputs_errors_name_the_input():
    with pytest.raises(ValueError, match="pixel_values"):
        qi.prepare_vision_inputs(np.zeros((10, 1176)), [(1, 4, 4)])
    with pytest.raises(ValueError, match="spatial_merge_size"):
        qi.prepare_vision_inputs(np.zeros((15, 1176)), [(1, 3, 5)])
    with pytest.raises(ValueError, match="bucket"):
        qi.prepare_vision_inputs(np.zeros((16, 1176)), [(1, 4, 4)], bucket="big")


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
    pos2, delta2 = qi.rope_index(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"],
                                 image_token_id=-1, mm_token_type_ids=batch["mm_token_type_ids"])
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
        qi.rope_index(batch["input_ids"], batch["attention_mask"], [(1, 4, 8)], image_token_id=fx.IMG)
