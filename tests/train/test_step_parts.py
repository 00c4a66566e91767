"""Host-side pieces of the train step: reward stacking + length control, row gathering."""
import ml_collections
import numpy as np
import pytest

from balcap_jax.config import base_config
from balcap_jax.rewards.scripted import TokenFrequencyScorer
from balcap_jax.rewards.types import ScoreResult
from balcap_jax.train import gather_rows, rollout_rewards


def _rl(**kw):
    rl = base_config().rl
    for k, v in kw.items():
        setattr(rl, k, v)
    return rl


def test_rollout_rewards_masks_only_linguistic_outside_window():
    caps = ["one two", "one two three four", "w " * 9, "a b c d e f g h"]  # 2, 4, 9, 8 words
    refs = [["x y z w"]] * 4                                                  # 4 words
    res = ScoreResult({"precision": np.full(4, .5), "recall": np.full(4, .6),
                       "linguistic": np.full(4, .7)})
    r, names, w, diag = rollout_rewards(res, _rl(), caps, refs, 2, 2)
    assert r.shape == (2, 2, 3) and names == ["precision", "recall", "linguistic"]
    flat = r.reshape(4, 3)
    # rho = 0.5 (kept: inclusive), 1.0 (kept), 2.25 (masked), 2.0 (kept: inclusive)
    np.testing.assert_array_equal(flat[:, 2], np.float32([.7, .7, 0, .7]))
    np.testing.assert_array_equal(flat[:, 0], .5)
    np.testing.assert_array_equal(flat[:, 1], np.float32(.6))
    assert diag["masked_fraction"] == 0.25


def test_rollout_rewards_linear_channel_and_missing_name():
    res = ScoreResult({"precision": np.ones(2), "recall": np.ones(2), "linguistic": np.ones(2)})
    r, names, w, _ = rollout_rewards(res, _rl(length_control="linear", w_len=0.5),
                                     ["a b", "a b c d"], [["a b"], ["a b"]], 1, 2)
    assert names[-1] == "length" and w[-1] == 0.5
    np.testing.assert_allclose(r[0, :, -1], [0.0, -1.0])      # -|rho - 1|
    with pytest.raises(KeyError, match="asks for \\['recall'\\]"):
        rollout_rewards(ScoreResult({"precision": np.ones(2), "linguistic": np.ones(2)}),
                        _rl(), ["a", "b"], [["a"], ["b"]], 1, 2)


def test_gather_rows_keeps_pixels_aligned():
    grid = np.array([[1, 2, 2], [1, 2, 4]])                    # 4 and 8 patches
    pv = np.arange(12 * 3, dtype=np.float32).reshape(12, 3)
    inputs = {"input_ids": np.array([[1, 2], [3, 4]]), "attention_mask": np.ones((2, 2)),
              "pixel_values": pv, "image_grid_thw": grid}
    out = gather_rows(inputs, np.array([1, 1, 0]))
    np.testing.assert_array_equal(out["input_ids"], [[3, 4], [3, 4], [1, 2]])
    np.testing.assert_array_equal(out["pixel_values"], np.concatenate([pv[4:], pv[4:], pv[:4]]))
    np.testing.assert_array_equal(out["image_grid_thw"], grid[[1, 1, 0]])


def test_token_frequency_scorer_counts_only_generated_tokens():
    s = TokenFrequencyScorer(7, names=("a", "b"))
    ids = np.array([[7, 7, 1, 7], [1, 7, 0, 0]])
    out = s([None] * 2, ["", ""], [[""]] * 2, token_ids=ids, lengths=np.array([3, 2]))
    np.testing.assert_allclose(out.rewards["a"], [2 / 3, 1 / 2])
    np.testing.assert_array_equal(out.rewards["a"], out.rewards["b"])


def test_scorer_metadata_written_beside_config(tmp_path):
    import json

    from balcap_jax.train import Trainer

    class Judged:
        def metadata(self):
            return {"prompt/verify": "verify-v1", "judge/text": "ckpt-a"}

    cfg = ml_collections.ConfigDict({"workdir": str(tmp_path / "run")})
    Trainer._write_scorer_metadata(cfg, Judged())
    Trainer._write_scorer_metadata(cfg, TokenFrequencyScorer(1))   # no metadata: nothing
    got = json.loads((tmp_path / "run" / "scorer_metadata.json").read_text())
    assert got == {"prompt/verify": "verify-v1", "judge/text": "ckpt-a"}


def test_gather_rows_llava_images_follow_rows():
    pv = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    out = gather_rows({"input_ids": np.array([[1], [2]]), "pixel_values": pv}, np.array([1, 0, 1]))
    np.testing.assert_array_equal(out["pixel_values"], pv[[1, 0, 1]])
    np.testing.assert_array_equal(out["input_ids"], [[2], [1], [2]])
