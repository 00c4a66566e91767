"""The ShapesWorld demo pipeline, shortened: warm start -> before -> BalCapRL -> after -> the
supervised control, end to end through balcap_jax.shapes_demo.run_demo (run once per module).

`test_summary` checks what the pipeline writes. `test_rl_improves_on_warm_start` checks the
direction of the change: after 20 BalCapRL steps from a 500-step warm start, the held-out
b-CapScore on 32 images is above the warm start's (42.1 -> 45.8 when measured, configs/shapes.py
otherwise). The full demo's gains are in configs/shapes.py; the short run is too short for
RL to beat the control, so only the direction is checked."""
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
    c.data.num_train = 512
    c.data.num_eval = 32
    c.sft.max_steps = 500             # the loss still falls: no plateau stop
    c.sft.chunk = 50
    c.train.steps = 20
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
def test_rl_improves_on_warm_start(demo_run):
    _, _, s = demo_run
    assert s["after"]["b_capscore"] > s["before"]["b_capscore"], (s["before"], s["after"])
