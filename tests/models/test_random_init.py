"""Random init: HF's distribution, deterministic, identical on and off a mesh, no compile."""
import importlib.util
import os

import jax
import numpy as np
from flax import nnx

from balcap_jax.models.random_init import from_config
from balcap_jax.sharding import make_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tiny():
    spec = importlib.util.spec_from_file_location("tiny", os.path.join(ROOT, "configs/tiny.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.tiny_qwen_vl_config()
    c["initializer_range"] = 0.05
    return c


def _flat(model):
    return {"/".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(model))}


def test_distribution_and_determinism():
    a, b = _flat(from_config(_tiny(), seed=3)), _flat(from_config(_tiny(), seed=3))
    c = _flat(from_config(_tiny(), seed=4))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    kernels = [k for k in a if k.endswith(("kernel", "embedding"))]
    assert any(not np.array_equal(a[k], c[k]) for k in kernels)
    big = np.concatenate([a[k].ravel() for k in kernels])
    assert abs(big.std() - 0.05) < 0.002 and abs(big.mean()) < 0.002
    for k, v in a.items():
        if k.endswith("bias"):
            assert not v.any(), k
        if k.endswith("weight") and v.ndim == 1:
            assert (v == 1).all(), k
    # no two kernels of equal shape share values (each tensor has its own stream)
    same = [k for k in kernels if a[k].shape == a[kernels[0]].shape]
    assert len(same) < 2 or not np.array_equal(a[same[0]], a[same[1]])


def test_sharded_init_equals_unsharded_and_is_distributed():
    plain = _flat(from_config(_tiny(), seed=0))
    model = from_config(_tiny(), seed=0, mesh=make_mesh((2, 2, 2)))
    sharded = _flat(model)
    assert all(np.array_equal(plain[k], sharded[k]) for k in plain)
    leaves = jax.tree.leaves(nnx.state(model))
    assert sum(not x.sharding.is_fully_replicated for x in leaves) > len(leaves) // 2
