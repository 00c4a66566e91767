"""A run killed (SIGKILL) after a step's metrics line but before its checkpoint logs each step
once when it resumes: metrics.jsonl, completions.jsonl and TensorBoard (as TensorBoard reads
the events: a SessionLog.START at step s hides earlier events with step >= s)."""
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import XLA_CACHE, xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# main, with the process killing itself right after writing step KILL_AT's metrics line (step
# KILL_AT's checkpoint is not due: checkpoint.every=4, so the last checkpoint is step 4)
RUN = """
import os, signal, sys
from absl import app
from balcap_jax import main, metrics
kill_at = int(os.environ.get("KILL_AT", "0"))
real = metrics.MetricsWriter.write
def write(self, step, m):
    row = real(self, step, m)
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return row
metrics.MetricsWriter.write = write
sys.argv = ["main"] + sys.argv[1:]
app.run(main.main)
"""


def _run(workdir, kill_at=0):
    env = dict(os.environ, XLA_FLAGS=xla_flags(1),
               PYTHONPATH=ROOT, KILL_AT=str(kill_at),
               JAX_COMPILATION_CACHE_DIR=XLA_CACHE)
    return subprocess.run(
        [sys.executable, "-c", RUN, "--config=configs/tiny.py", f"--config.workdir={workdir}",
         "--config.train.steps=8", "--config.checkpoint.every=4", "--config.train.eval_every=2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _tensorboard_scalars(logdir, tag):
    """{step: value} of `tag` as TensorBoard shows it: events in file order, and a
    SessionLog.START at step s drops the events read so far with step >= s."""
    from tensorboardX.proto import event_pb2
    seen = {}
    for name in sorted(os.listdir(logdir)):
        data = open(os.path.join(logdir, name), "rb").read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == 1:   # START
                seen = {s: v for s, v in seen.items() if s < event.step}
            for v in event.summary.value:
                if v.tag == tag:
                    seen[event.step] = v.simple_value
    return seen


@pytest.mark.heavy
def test_each_step_logged_once_after_a_kill(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert _run(straight).returncode == 0
    first = _run(killed, kill_at=6)
    assert first.returncode == -9, first.stderr[-2000:]
    before = [r["step"] for r in _rows(killed / "metrics.jsonl")]
    assert before == [1, 2, 3, 4, 5, 6]                   # 5 and 6 will be logged again
    second = _run(killed)
    assert second.returncode == 0, second.stderr[-3000:]

    a, b = _rows(straight / "metrics.jsonl"), _rows(killed / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 9))
    for x, y in zip(a, b):
        for k in ("reward/frequency", "loss", "grad_norm", "length/tokens", "eval/frequency"):
            if k in x:
                np.testing.assert_allclose(y[k], x[k], rtol=1e-5, atol=1e-7, err_msg=k)
    comp = [r["step"] for r in _rows(killed / "completions.jsonl")]
    assert comp == [r["step"] for r in _rows(straight / "completions.jsonl")]
    assert sorted(set(comp)) == [2, 4, 6, 8]
    tb = _tensorboard_scalars(killed / "tensorboard", "reward/frequency")
    assert sorted(tb) == list(range(1, 9))
    np.testing.assert_allclose([tb[s] for s in range(1, 9)],
                               [r["reward/frequency"] for r in a], rtol=1e-5)
