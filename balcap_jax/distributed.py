"""Several processes (hosts), one global batch: placement and host <-> global helpers.

Multi-host layout of a train step (``train.Trainer``):
  1. every host loads its own examples (the data loaders shard by ``jax.process_index()``);
  2. the processor runs on the host's own examples; `gather_inputs` concatenates all hosts'
     prompt arrays in process order, so every host holds the same global prompt batch (the
     vision patches of all images are one concatenated array with no batch axis and are
     replicated on the mesh: they cannot be assembled from per-host rows);
  3. jitted code sees global jax.Arrays made by `global_array` (every process fills the shards
     its devices hold from the same host value); outputs come back with `to_host`;
  4. each host scores only its own rollouts (the judges' work is split, not repeated); the
     rewards are gathered with `allgather_rows`, so advantage statistics are global and every
     host computes the same advantages.
With one process every helper here is the single-process operation itself (``device_put``,
``np.asarray``), so single-host runs are unchanged.

Start a multi-host run with ``balcap_jax.main`` and BALCAP_COORDINATOR=host:port,
BALCAP_NUM_PROCESSES, BALCAP_PROCESS_ID on each host (CPU hosts use gloo collectives); the
global mesh spans all hosts' devices, and ``train.batch_size`` is the global batch.
"""
from __future__ import annotations

import json
import os
import warnings

import jax
import numpy as np

from balcap_jax.padding import to_numpy

__all__ = ["initialize_from_env", "is_multiprocess", "global_array", "to_host", "allgather_rows",
           "gather_inputs", "host_slice", "mean_over_hosts", "allgather_json"]

# per-token arrays of a processor batch: padded on the left (the processor's side) to one length
_PER_TOKEN = ("input_ids", "attention_mask", "mm_token_type_ids")


def initialize_from_env() -> None:
    """jax.distributed.initialize when the environment asks for it (several processes).

    Set BALCAP_COORDINATOR=host:port, BALCAP_NUM_PROCESSES and BALCAP_PROCESS_ID, or run on a
    TPU pod / SLURM / Kubernetes where JAX detects the cluster itself (BALCAP_DISTRIBUTED=1).
    """
    coord = os.environ.get("BALCAP_COORDINATOR")
    if jax.distributed.is_initialized():   # by the caller, or by an earlier run() in-process
        return
    if coord:
        if os.environ.get("JAX_PLATFORMS", "") == "cpu" or jax.config.jax_platforms == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coord,
                                   num_processes=int(os.environ["BALCAP_NUM_PROCESSES"]),
                                   process_id=int(os.environ["BALCAP_PROCESS_ID"]))
    elif os.environ.get("BALCAP_DISTRIBUTED") == "1":
        jax.distributed.initialize()


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def global_array(x, sharding) -> jax.Array:
    """A jax.Array with ``sharding`` from a host value that is the same on every process.

    One process: ``device_put``. Several: each process fills its addressable shards from x
    (``make_array_from_callback``), no bytes cross hosts."""
    x = np.asarray(x)
    if not is_multiprocess():
        return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def to_host(x) -> np.ndarray:
    """The full value of a (possibly global, multi-host) array as numpy on this host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _allgather(x: np.ndarray) -> np.ndarray:
    """[P, *x.shape]: x of every process, stacked in process order (shapes must agree)."""
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=False))


def allgather_rows(x) -> tuple[np.ndarray, tuple[int, int]]:
    """Concatenates every host's rows of x (axis 0; row counts may differ, trailing dims must
    agree) in process order. Returns (global array, (offset, count) of this host's rows)."""
    x = np.asarray(x)
    if not is_multiprocess():
        return x, (0, len(x))
    counts = _allgather(np.asarray(len(x), np.int32))
    width = int(counts.max())
    padded = np.zeros((width,) + x.shape[1:], x.dtype)
    padded[:len(x)] = x
    stacked = _allgather(padded)
    # (the gather runs in jax's dtypes: int64 travels as int32; give back the host's dtype)
    out = np.concatenate([stacked[p, :int(n)] for p, n in enumerate(counts)]).astype(x.dtype)
    me = jax.process_index()
    return out, (int(counts[:me].sum()), int(counts[me]))


def gather_inputs(inputs: dict) -> tuple[dict, tuple[int, int]]:
    """A processor batch of this host's prompts -> the global batch (all hosts' prompts in
    process order) and (offset, count) of this host's prompts in it. Per-token arrays are
    left-padded to the longest host first (attention_mask 0 marks the padding)."""
    inputs = {k: to_numpy(v) for k, v in inputs.items() if v is not None}
    n = len(inputs["input_ids"])
    if not is_multiprocess():
        return inputs, (0, n)
    length = int(_allgather(np.asarray(inputs["input_ids"].shape[1], np.int32)).max())
    out, rows = {}, None
    for k in sorted(inputs):      # the same order on every host: the gathers are collective
        v = inputs[k]
        if k in _PER_TOKEN:
            v = np.pad(v, ((0, 0), (length - v.shape[1], 0)))
        out[k], span = allgather_rows(v)
        if k == "input_ids":
            rows = span
    return out, rows


def host_slice(offset: int, count: int, per_row: int = 1) -> slice:
    """Rows of this host's prompts in a prompt-major array with ``per_row`` rows per prompt."""
    return slice(offset * per_row, (offset + count) * per_row)


def mean_over_hosts(values: dict[str, float]) -> dict[str, float]:
    """Per-host scalar diagnostics -> their mean over hosts (keys must agree across hosts; with
    equal host batches the mean of host means is the global mean)."""
    if not is_multiprocess() or not values:
        return dict(values)
    keys = sorted(values)
    arr = _allgather(np.asarray([float(values[k]) for k in keys], np.float32))
    with warnings.catch_warnings():   # a value NaN on every host stays NaN, silently
        warnings.simplefilter("ignore", RuntimeWarning)
        return {k: float(v) for k, v in zip(keys, np.nanmean(arr, axis=0))}


def allgather_json(value) -> list:
    """Every process's JSON-able ``value``, in process order (one process: [value])."""
    if not is_multiprocess():
        return [value]
    data = np.frombuffer(json.dumps(value, sort_keys=True).encode(), np.uint8)
    counts = _allgather(np.asarray(len(data), np.int32))
    padded = np.zeros(int(counts.max()), np.uint8)
    padded[:len(data)] = data
    stacked = _allgather(padded)
    return [json.loads(stacked[p, :int(n)].tobytes().decode()) for p, n in enumerate(counts)]
