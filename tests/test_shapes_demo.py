"""The ShapesWorld demo pipeline, shortened: warm start -> before -> BalCapRL -> after -> the
supervised control, end to end through balcap_jax.shapes_demo.run_demo, checking the direction
of the change (held-out b-CapScore after RL > before) and the summary's shape."""
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
    c.data.num_eval = 48
    c.sft.max_steps = 150
    c.sft.chunk = 50
    c.train.steps = 12
    return c


@pytest.mark.heavy
def test_shortened_demo_improves_b_capscore(tmp_path):
    from balcap_jax.shapes_demo import run_demo
    cfg = short_config(tmp_path)
    s = run_demo(cfg, progress=False)
    for name in ("before", "after", "sft_control"):
        assert set(KEYS) <= set(s[name]), f"{name} lacks {set(KEYS) - set(s[name])}"
        for k in ("precision", "recall", "linguistic"):
            assert 0.0 <= s[name][k] <= 1.0, (name, k, s[name][k])
        assert 0.0 <= s[name]["b_capscore"] <= 100.0
        assert s[name]["mean_words"] > 0
    assert s["held_out_images"] == cfg.data.num_eval
    assert s["rl"]["steps"] == cfg.train.steps
    # the control ran supervised steps for (at least) the RL phase's wall time
    assert s["sft_control_run"]["seconds"] >= s["rl"]["seconds"]
    assert s["sft_control_run"]["steps"] >= 1
    # the direction of the change: RL improves on its own warm start
    assert s["after"]["b_capscore"] > s["before"]["b_capscore"], s
    on_disk = json.load(open(os.path.join(tmp_path, "summary.json")))
    assert np.isclose(on_disk["after"]["b_capscore"], s["after"]["b_capscore"])
    from PIL import Image
    assert Image.open(os.path.join(tmp_path, "curves.png")).size[0] > 0
    rows = [json.loads(l) for l in open(os.path.join(tmp_path, "metrics.jsonl"))]
    assert len(rows) == cfg.train.steps and "reward/precision" in rows[0]
