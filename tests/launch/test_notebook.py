"""launch/colab.ipynb: in step with its source launch/colab.py, every code cell explained,
and executed top to bottom in smoke mode (tests/conftest.py::notebook_run, which
tests/launch/notebook.py runs through nbclient)."""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
