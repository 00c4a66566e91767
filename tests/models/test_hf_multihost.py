"""A checkpoint directory loaded by two processes (2 fake CPU devices each, one 4-device fsdp
mesh): each host reads only the slices its own devices hold, and the parameters equal a
one-process load.

Run as a script, this file is the worker:
    BALCAP_COORDINATOR=127.0.0.1:PORT BALCAP_NUM_PROCESSES=2 BALCAP_PROCESS_ID=i \\
    python tests/models/test_hf_multihost.py OUT_DIR
"""
import json
import os
import sys

import numpy as np
import pytest

from tests._fakes.processes import run_processes

HOSTS, DEVICES_PER_HOST = 2, 2


def worker(out_dir: str) -> None:
    from balcap_jax.distributed import initialize_from_env
    initialize_from_env()
    import jax
    from flax import nnx
    from jax.experimental import multihost_utils

    from balcap_jax.models import hf as H
    from balcap_jax.sharding import make_mesh
    stats = H.LoadStats()
    model = H.from_pretrained(os.path.join(out_dir, "ckpt"),
                              mesh=make_mesh((1, HOSTS * DEVICES_PER_HOST, 1)), stats=stats)
    values = [np.asarray(multihost_utils.process_allgather(v.get_value(), tiled=True))
              for _, v in nnx.to_flat_state(nnx.state(model))]
    spans = sum(not v.get_value().is_fully_addressable
                for _, v in nnx.to_flat_state(nnx.state(model)))
    if jax.process_index() == 0:
        np.savez(os.path.join(out_dir, "params.npz"), *values)
    with open(os.path.join(out_dir, f"result{jax.process_index()}.json"), "w") as f:
        json.dump({"bytes_read": stats.bytes_read, "bytes_total": stats.bytes_total,
                   "whole": stats.whole, "spans_hosts": spans}, f)
    jax.distributed.shutdown()


@pytest.mark.heavy
def test_two_hosts_read_their_own_slices_and_equal_one_process(hf_models, tmp_path):
    from flax import nnx

    from balcap_jax.models import from_pretrained, save_pretrained
    d, _ = hf_models["qwen2_gqa"]
    ckpt = tmp_path / "ckpt"
    save_pretrained(from_pretrained(d), ckpt, max_shard_size=50_000)     # several files
    assert (ckpt / "model.safetensors.index.json").exists()

    run_processes(__file__, str(tmp_path), processes=HOSTS,
                  devices_per_process=DEVICES_PER_HOST, timeout_s=180)
    results = [json.load(open(tmp_path / f"result{i}.json")) for i in range(HOSTS)]
    total = results[0]["bytes_total"]
    for r in results:
        assert r["bytes_total"] == total and r["whole"] == [] and r["spans_hosts"] > 0
        # the fsdp-split tensors are half read; the replicated ones (norms) whole
        assert 0.4 * total < r["bytes_read"] < 0.6 * total, r
    assert sum(r["bytes_read"] for r in results) >= total

    ref = [np.asarray(v.get_value())
           for _, v in nnx.to_flat_state(nnx.state(from_pretrained(str(ckpt))))]
    got = np.load(tmp_path / "params.npz")
    assert len(got.files) == len(ref)
    for i, x in enumerate(ref):
        np.testing.assert_array_equal(got[f"arr_{i}"], x, err_msg=f"leaf {i}")


if __name__ == "__main__":
    worker(sys.argv[1])
