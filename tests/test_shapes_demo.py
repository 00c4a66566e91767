"""The ShapesWorld demo pipeline, shortened: warm start -> before -> BalCapRL -> after -> the
supervised control, end to end through balcap_jax.shapes_demo.run_demo (run once per module).

`test_summary` checks what the pipeline writes. `test_rl_improves_on_warm_start` checks the
direction of the change (held-out b-CapScore after RL > before). It is an expected failure: a
run short enough for the suite does not move the score reliably. Measured with a 500-step warm
start and 20 RL steps on 32 held-out images: 42.1 -> 45.8 in one process on one device, but
45.6 -> 44.3 on the suite's 8-device mesh (another reduction order, another trajectory). The
full demo's gains (100 RL steps from a 1100-1400-step warm start, three seeds) are in
configs/shapes.py. The shortened run here stays small (60 warm-start steps, 4 RL steps) since
it only feeds `test_summary`; the xfail is not strict, so a gain reports XPASS."""
import json
import os

import numpy as np
import pytest

KEYS = ("precision", "recall", "linguistic", "b_capscore", "mean_words")


def short_config(workdir):
    from configs.shapes import get_config
    c = get_config()
    c.workdir = str(workdir)
    c.compile_cache_dir = ""          # tests/conftest.py already sets a persistent cache
    c.data.num_train = 256
    c.data.num_eval = 16
    c.sft.max_steps = 60
    c.sft.warmup_steps = 5            # the full run's 50 would take most of the short run
    c.sft.chunk = 20
    c.train.steps = 4
    return c


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from balcap_jax.shapes_demo import run_demo
    workdir = tmp_path_factory.mktemp("shapes_demo")
    cfg = short_config(workdir)
    return cfg, workdir, run_demo(cfg, progress=False)


@pytest.mark.heavy
def test_summary(demo_run):
    cfg, workdir, s = demo_run
    for name in ("before", "after", "sft_control"):
        assert set(KEYS) <= set(s[name]), f"{name} lacks {set(KEYS) - set(s[name])}"
        for k in ("precision", "recall", "linguistic"):
            assert 0.0 <= s[name][k] <= 1.0, (name, k, s[name][k])
        assert 0.0 <= s[name]["b_capscore"] <= 100.0
        assert s[name]["mean_words"] > 0
    assert s["held_out_images"] == cfg.data.num_eval
    assert s["rl"]["steps"] == cfg.train.steps
    assert s["warm_start"]["steps"] <= cfg.sft.max_steps
    # the control ran supervised steps for (at least) the RL phase's wall time
    assert s["sft_control_run"]["seconds"] >= s["rl"]["seconds"]
    assert s["sft_control_run"]["steps"] >= 1
    on_disk = json.load(open(os.path.join(workdir, "summary.json")))
    assert np.isclose(on_disk["after"]["b_capscore"], s["after"]["b_capscore"])
    from PIL import Image
    assert Image.open(os.path.join(workdir, "curves.png")).size[0] > 0
    rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
    assert len(rows) == cfg.train.steps and "reward/precision" in rows[0]
    # the supervised loss fell during the warm start (it learns the caption language)
    curves = json.load(open(os.path.join(workdir, "curves.json")))
    losses = curves["warm_start_loss"]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
    # the warm start's parameters, for benchmarks/shapes_ablation.py --warm-from
    with np.load(os.path.join(workdir, "warm_start.npz")) as f:
        assert len(f.files) > 10 and all(np.isfinite(f[k]).all() for k in f.files)


@pytest.mark.heavy
@pytest.mark.xfail(strict=False, reason="a run short enough for the suite does not move the "
                   "score reliably: +3.7 on one device, -1.2 on the 8-device mesh (module doc)")
def test_rl_improves_on_warm_start(demo_run):
    _, _, s = demo_run
    assert s["after"]["b_capscore"] > s["before"]["b_capscore"], (s["before"], s["after"])
