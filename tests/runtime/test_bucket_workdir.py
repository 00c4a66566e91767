"""A workdir in a bucket: gs:// served by an in-memory fsspec filesystem (not the OS path
functions), through the same etils.epath code a real bucket uses (gcsfs there).

Orbax is the one writer not covered: it writes gs:// through tensorstore's own GCS driver,
which no offline fake reaches, so the end-to-end run keeps its checkpoints on the local disk.
"""
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from balcap_jax import build, checkpoint, main
from balcap_jax import workdir as wd
from balcap_jax.config import load_config_file
from balcap_jax.metrics import MetricsWriter
from balcap_jax.sharding import make_mesh
from tests._fakes.bucket import memory_bucket

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def bucket(monkeypatch, tmp_path):
    """gs:// in memory, emptied per test, and a fresh local mirror root (a new machine)."""
    return memory_bucket(monkeypatch, str(tmp_path / "mirror0"))


def _read(bucket, url):
    return bucket.store[url].getvalue().decode()


def _rows(bucket, url):
    return [json.loads(line) for line in _read(bucket, url).splitlines()]


def test_mirror_round_trip_of_files_and_folders(bucket, tmp_path, monkeypatch):
    m = wd.Mirror("gs://b/run")
    assert m.is_remote and m.local.startswith(str(tmp_path / "mirror0"))
    os.makedirs(m.path("tb", "sub"))
    for rel, text in (("a.jsonl", "1\n"), ("tb/e1", "x"), ("tb/sub/e2", "y")):
        open(m.path(rel), "w").write(text)
    m.sync()
    assert {k for k in bucket.store} == {"gs://b/run/a.jsonl", "gs://b/run/tb/e1",
                                         "gs://b/run/tb/sub/e2"}
    # another machine: an empty mirror pulls what the bucket holds, replacing stale copies
    monkeypatch.setattr(wd, "MIRROR_ROOT", str(tmp_path / "mirror1"))
    m2 = wd.Mirror("gs://b/run")
    os.makedirs(m2.path("tb"))
    open(m2.path("tb", "stale"), "w").write("old")
    m2.pull("a.jsonl", "tb", "missing")
    assert open(m2.path("a.jsonl")).read() == "1\n"
    assert sorted(os.listdir(m2.path("tb"))) == ["e1", "sub"]
    assert open(m2.path("tb", "sub", "e2")).read() == "y"
    # a local directory is its own mirror: nothing is copied
    local = wd.Mirror(str(tmp_path / "plain"))
    assert local.local == str(tmp_path / "plain") and not local.is_remote
    wd.write_text("gs://b/run/config.json", "{}")
    assert _read(bucket, "gs://b/run/config.json") == "{}"
    assert wd.join("gs://b/run", "export") == "gs://b/run/export"


def test_metrics_in_a_bucket_resume_on_another_machine(bucket, tmp_path, monkeypatch):
    w = MetricsWriter("gs://b/run")
    for step in (1, 2, 3):
        w.write(step, {"loss": float(step)})
    w.write_completions(3, [{"caption": "a red circle"}])
    # the bucket has each row as soon as it is written (a crash loses nothing written)
    assert [r["step"] for r in _rows(bucket, "gs://b/run/metrics.jsonl")] == [1, 2, 3]
    w.close()
    assert any(k.startswith("gs://b/run/tensorboard/") for k in bucket.store)
    # killed after step 3's row, resumed from the step-2 checkpoint on a new machine
    monkeypatch.setattr(wd, "MIRROR_ROOT", str(tmp_path / "mirror1"))
    w = MetricsWriter("gs://b/run", resume_step=2)
    w.write(3, {"loss": 30.0})
    w.close()
    rows = _rows(bucket, "gs://b/run/metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert _rows(bucket, "gs://b/run/completions.jsonl") == []


def _tiny(steps):
    c = load_config_file(os.path.join(ROOT, "configs/tiny.py"))
    c.train.steps, c.train.eval_every, c.checkpoint.every = steps, 2, 2
    c.workdir = "gs://b/run"
    return c


@pytest.mark.heavy
def test_a_run_with_its_workdir_in_a_bucket(bucket, tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    monkeypatch.setattr(build, "mesh_and_rules", lambda cfg, sizes: (
        make_mesh((1, 1, 1), jax.devices()[:1]), None))
    cfg = _tiny(steps=2)
    cfg.checkpoint.directory = str(tmp_path / "ckpt")   # orbax: local (the module docstring)
    main.run(cfg)
    # resumed to step 3 on a new machine (a fresh local mirror)
    monkeypatch.setattr(wd, "MIRROR_ROOT", str(tmp_path / "mirror1"))
    cfg.train.steps = 3
    main.run(cfg)

    keys = set(bucket.store)
    assert [r["step"] for r in _rows(bucket, "gs://b/run/metrics.jsonl")] == [1, 2, 3]
    assert {r["step"] for r in _rows(bucket, "gs://b/run/completions.jsonl")} == {2, 3}
    assert json.loads(_read(bucket, "gs://b/run/config.json"))["train"]["steps"] == 3
    assert any(k.startswith("gs://b/run/tensorboard/events") for k in keys)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert f"gs://b/run/export/{name}" in keys, name
    # the export in the bucket is the trained policy
    from balcap_jax.models import from_pretrained
    down = wd.Mirror("gs://b/run/export")
    down.pull("config.json", "model.safetensors")
    policy = from_pretrained(down.local)
    final, _ = checkpoint.Checkpointer("", directory=str(tmp_path / "ckpt")).read(3)
    got = jax.tree.leaves(nnx.state(policy))
    want = jax.tree.leaves(final["params"])
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
