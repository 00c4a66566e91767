"""A multi-host rehearsal on the CPU: configs/tiny.py on 4 processes x 2 fake devices (a 2 x 4
data x fsdp mesh) through launch/local_multiprocess.sh, the workdir in a bucket (gs:// served
from a local directory through fsspec, shared by the processes), checkpoints every step.

Run 1 loses process 1 right after step 2's checkpoint (SIGKILL); the script stops the other
three. Run 2, the same command, resumes from step 2 and finishes step 3. Checked: the metrics
in the bucket hold steps 1, 2, 3 once each, and the export in the bucket loads and equals the
final checkpoint. About three minutes on two cores, so it has its own command instead of a
place in the suite (which must stay under 20 minutes); it prints the two runs' wall times:

    .venv/bin/python tests/train/rehearsal.py
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SITE = os.path.join(ROOT, "tests", "_fakes", "rehearsal_site")
PROCESSES, DEVICES = 4, 2


def _launch(tmp: str, logdir: str, kill_at: int | None) -> tuple[int, float, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
    env.update(PYTHONPATH=f"{SITE}:{ROOT}", BALCAP_FAKE_BUCKET_ROOT=os.path.join(tmp, "bucket"),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if kill_at is not None:
        env.update(BALCAP_KILL_AT_STEP=str(kill_at), BALCAP_KILL_PROCESS="1")
    cmd = ["bash", os.path.join(ROOT, "launch", "local_multiprocess.sh"),
           "--processes", str(PROCESSES), "--devices-per-process", str(DEVICES),
           "--logdir", logdir, "--",
           "--config.mesh.data=2", "--config.mesh.fsdp=4", "--config.train.batch_size=8",
           "--config.train.steps=3", "--config.checkpoint.every=1",
           "--config.data.num_eval=4", "--config.train.eval_every=3",
           "--config.workdir=gs://b/run",
           f"--config.checkpoint.directory={os.path.join(tmp, 'ckpt')}"]
    t = time.time()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    return p.returncode, time.time() - t, p.stdout + p.stderr


def rehearse(tmp: str) -> dict:
    """Both runs and every check; returns their wall times."""
    rc1, t1, out1 = _launch(tmp, os.path.join(tmp, "logs1"), kill_at=2)
    log1 = open(os.path.join(tmp, "logs1", "proc1.log")).read()
    assert rc1 != 0 and "killed after step 2" in log1, out1[-3000:]
    rc2, t2, out2 = _launch(tmp, os.path.join(tmp, "logs2"), kill_at=None)
    logs2 = [open(os.path.join(tmp, "logs2", f"proc{i}.log")).read() for i in range(PROCESSES)]
    assert rc2 == 0, out2[-3000:] + logs2[0][-3000:]
    assert "resumed from step 2" in logs2[0], logs2[0][-3000:]

    run = os.path.join(tmp, "bucket", "b", "run")      # what the bucket holds
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3], rows
    assert "eval/frequency" in rows[-1]
    import jax
    from flax import nnx

    from balcap_jax.checkpoint import Checkpointer
    from balcap_jax.models import from_pretrained
    policy = from_pretrained(os.path.join(run, "export"))
    final, meta = Checkpointer("", directory=os.path.join(tmp, "ckpt")).read(3)
    assert len(meta["data_by_process"]) == PROCESSES
    got, want = jax.tree.leaves(nnx.state(policy)), jax.tree.leaves(final["params"])
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    return {"run1_s": round(t1, 1), "run2_s": round(t2, 1)}


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        print(rehearse(d))
        sys.exit(0)
