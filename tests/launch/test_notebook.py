"""launch/colab.ipynb: in step with its source launch/colab.py, every code cell explained,
and executed top to bottom in smoke mode (`notebook_run`, which tests/launch/notebook.py runs
through nbclient), its ShapesWorld section being the shortened demo from scratch (vision
pretraining -> warm start (60 steps) -> before -> 4 RL steps -> after -> control) whose
summary is checked here. One module holds everything that reads the execution, so that under
pytest-xdist's --dist loadfile the notebook runs once."""
import importlib.util
import json
import os

import numpy as np
import pytest

from tests.shapes.demo_config import KEYS, short_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def notebook_run(tmp_path_factory):
    """launch/colab.ipynb executed once in smoke mode (tests/launch/notebook.py): (executed
    notebook, its workdir). The kernel (one CPU device) has a compile cache of its own:
    executables it wrote, read back by this 8-device process, segfaulted (jax 0.10.2)."""
    from tests.conftest import XLA_CACHE
    from tests.launch.notebook import execute
    return execute(str(tmp_path_factory.mktemp("notebook")), cache_dir=XLA_CACHE + "_notebook")


@pytest.fixture(scope="module")
def demo_run(notebook_run):
    """The Colab notebook's ShapesWorld section, run by the suite's notebook execution with
    the shortened settings of `short_config` (one run serves both checks)."""
    import ml_collections
    _, work = notebook_run
    workdir = os.path.join(work, "shapes")
    cfg = ml_collections.ConfigDict(json.load(open(os.path.join(workdir, "config.json"))))
    return cfg, workdir, json.load(open(os.path.join(workdir, "summary.json")))


@pytest.mark.heavy
def test_notebook_runs_the_short_demo(demo_run):
    cfg, _, _ = demo_run
    want = short_config("unused")
    for key in ("data.num_train", "data.num_eval", "sft.max_steps", "sft.warmup_steps",
                "sft.chunk", "sft.vision_pretrain_steps", "train.steps"):
        a, b = cfg, want
        for k in key.split("."):
            a, b = a[k], b[k]
        assert a == b, key


@pytest.mark.heavy
def test_demo_summary(demo_run):
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
    assert s["vision_pretrain"]["steps"] == cfg.sft.vision_pretrain_steps
    assert np.isfinite(s["vision_pretrain"]["final_loss"])
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
    # the evaluation harness's report beside the summary, over the held-out images
    assert set(s["evaluation"]) == {"before", "after", "sft_control"}
    assert os.path.getsize(os.path.join(workdir, "report.html")) > 1000
    assert json.load(open(os.path.join(workdir, "eval", "results.json")))["images"] == \
        cfg.data.num_eval
    # the warm start's parameters, for benchmarks/shapes_ablation.py --warm-from
    with np.load(os.path.join(workdir, "warm_start.npz")) as f:
        assert len(f.files) > 10 and all(np.isfinite(f[k]).all() for k in f.files)


def _sync():
    spec = importlib.util.spec_from_file_location(
        "sync_notebook", os.path.join(ROOT, "launch", "sync_notebook.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ipynb_is_its_source_rendered():
    sync = _sync()
    with open(sync.SOURCE) as f:
        want = sync.render(f.read())
    assert open(sync.NOTEBOOK).read() == want, "run python launch/sync_notebook.py"


def test_every_code_cell_follows_a_sentence_saying_what_it_does():
    nb = json.load(open(os.path.join(ROOT, "launch", "colab.ipynb")))
    cells = nb["cells"]
    assert sum(c["cell_type"] == "code" for c in cells) >= 8
    for i, c in enumerate(cells):
        if c["cell_type"] == "code":
            before = cells[i - 1]
            assert before["cell_type"] == "markdown", f"code cell {i} has no explanation"
            text = "".join(before["source"])
            assert text.count(".") >= 1 and len(text.split()) >= 8, (i, text)


@pytest.mark.heavy
def test_notebook_executes_in_smoke_mode(notebook_run):
    """Every cell ran (a failing cell raises in nbclient); the LoRA run wrote its steps, the
    merged and PEFT exports and the captions before and after; the curves were displayed."""
    nb, work = notebook_run
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2                          # ShapesWorld curves, the LoRA metrics
    rows = [json.loads(line) for line in open(os.path.join(work, "lora", "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2]
    export = os.path.join(work, "lora", "export")
    assert os.path.exists(os.path.join(export, "config.json"))
    adapter = json.load(open(os.path.join(export, "adapter", "adapter_config.json")))
    assert adapter["r"] == 16 and adapter["peft_type"] == "LORA"
    for name in ("captions_before.jsonl", "captions_after.jsonl"):
        assert len(open(os.path.join(work, name)).readlines()) == 4
