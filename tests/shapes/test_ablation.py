"""benchmarks/shapes_ablation.py without a model: the variants change exactly their knob, the
no-pointability scorer counts commentary as true, and the table averages over seeds."""
import numpy as np
import pytest

from benchmarks import shapes_ablation as ab


def test_variants_change_only_their_knob():
    from configs.shapes import get_config
    base = get_config()
    expect = {"grpo": {"rl.advantage": "grpo"}, "linear_length": {"rl.length_control": "linear"},
              "no_length": {"rl.length_control": "none"}, "ppo_epochs_4": {"rl.ppo_epochs": 4},
              "no_linguistic": {"rl.rewards": ["precision", "recall"], "rl.weights": [1.0, 1.0],
                                "rl.length_control": "none", "rl.length_reward": "precision"},
              "dynamic_sampling": {"rl.dynamic_sampling": 2}, "balcap": {},
              "no_pointability": {}}
    assert set(expect) == set(ab.VARIANTS)
    flat = lambda c: {f"{a}.{b}": v for a, d in c.items() if hasattr(d, "items")
                      for b, v in d.items()}
    for name, changes in expect.items():
        got = flat(ab.variant_config(base, name).to_dict())
        want = flat(base.to_dict())
        diff = {k: got[k] for k in got if got[k] != want.get(k)}
        assert diff == changes, (name, diff)
    with pytest.raises(ValueError, match="unknown variant"):
        ab.variant_config(base, "nope")


def test_no_pointability_counts_commentary_as_true():
    from balcap_jax.shapes.scorer import ShapesScorer, score_caption
    from balcap_jax.shapes.world import make_scene
    scene = make_scene(0, "eval", 3)
    o = scene["objects"][0]
    cap = (f"there is a {o['size']} {o['color']} {o['shape']} at the {o['position']}. "
           "the picture feels calm.")
    ref = [f"a {o['size']} {o['color']} {o['shape']} is at the {o['position']}."]
    full = ShapesScorer()(None, [cap], [ref], scenes=[scene]).rewards["precision"][0]
    nop = ab.NoPointabilityScorer(ShapesScorer())(None, [cap], [ref],
                                                  scenes=[scene]).rewards["precision"][0]
    sc = score_caption(cap, ref, scene)
    assert sc.commentary == 1 and sc.assertions >= 2
    assert full == pytest.approx(sc.true_assertions / sc.assertions)
    assert nop == pytest.approx((sc.true_assertions + 1) / sc.assertions)
    assert nop > full


def test_table_means_over_seeds():
    row = lambda b, p: {"precision": p, "recall": 0.5, "linguistic": 1.0, "b_capscore": b,
                        "mean_words": 10.0, "rl_seconds": 2.0}
    results = {0: {"warm_start": row(50.0, 0.4), "balcap": row(60.0, 0.6)},
               1: {"warm_start": row(40.0, 0.4), "balcap": row(44.0, 0.8)}}
    lines = ab.table(results).splitlines()
    balcap = lines[2].split()
    assert balcap[0] == "balcap"
    assert float(balcap[1]) == pytest.approx(0.7)        # mean precision
    assert float(balcap[4]) == pytest.approx(52.0)       # mean b-CapScore
    assert float(balcap[6]) == pytest.approx(7.0)        # mean of (+10, +4) over the warm start
    assert lines[2].endswith("60.0 / 44.0")


def test_warm_start_params_round_trip(tmp_path):
    """shapes_demo.save_params / load_params, which --warm-from relies on."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from balcap_jax.shapes_demo import load_params, save_params
    params = nnx.state(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Param)
    save_params(str(tmp_path / "w.npz"), params)
    back = load_params(str(tmp_path / "w.npz"), jax.tree.map(jnp.zeros_like, params))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = nnx.state(nnx.Linear(3, 5, rngs=nnx.Rngs(0)), nnx.Param)
    with pytest.raises(ValueError, match="another config"):
        load_params(str(tmp_path / "w.npz"), other)
