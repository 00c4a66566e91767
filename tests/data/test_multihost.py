"""Two JAX processes on this machine (gloo collectives over 127.0.0.1): make_loader builds the
dataset once (process 0; the other waits at the barrier) and the hosts' default shards are
disjoint and cover the split."""
import json
import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import TEST_XLA_FLAGS
from tests.data import fakes

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORKER = r"""
import json, os, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address="127.0.0.1:" + sys.argv[1], num_processes=2,
                           process_id=int(sys.argv[2]), initialization_timeout=60)
from balcap_jax.data import config as dc
cfg = dc.default_data_config()
cfg.update(json.loads(sys.argv[3]))
loader = dc.make_loader(cfg, batch_size=1, seed=5)
ids = [e["image_id"] for _ in range(loader.examples_per_epoch) for e in next(loader)]
print("RESULT " + json.dumps({"shard": [loader.shard_index, loader.shard_count], "ids": ids}))
jax.distributed.shutdown()
"""


@pytest.mark.heavy
def test_two_processes_share_one_build_and_split_the_data(tmp_path):
    root = str(tmp_path)
    images = fakes.make_images(root)
    cfg = {"builder": "captions", "files": fakes.write_csv(root, images),
           "image_root": os.path.join(root, "img"), "data_dir": os.path.join(root, "tfds"),
           "max_side": fakes.MAX_SIDE, "max_pixels": fakes.MAX_PIXELS}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": TEST_XLA_FLAGS}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, port, str(i), json.dumps(cfg)],
                              env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=150)
            assert p.returncode == 0, err[-3000:]
            outs.append((out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    results = [json.loads(next(line[7:] for line in out.splitlines()
                                if line.startswith("RESULT "))) for out, _ in outs]
    assert [r["shard"] for r in results] == [[0, 2], [1, 2]]
    a, b = (set(r["ids"]) for r in results)
    assert (len(a), len(b)) == (13, 13) and not a & b
    assert a | b == set(fakes.usable(images))
    # Only process 0 prepared the dataset.
    assert "Downloading and preparing" in outs[0][0] + outs[0][1]
    assert "Downloading and preparing" not in outs[1][0] + outs[1][1]
