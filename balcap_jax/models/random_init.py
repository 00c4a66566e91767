"""Random-init policies of any registered architecture, straight onto a mesh.

For smoke runs, benchmarks and GPU checks of the real shapes without a checkpoint. Parameters
are drawn on the host with numpy, one tensor at a time, and placed on their shardings as they
are made: nothing is compiled (a jitted init of a 36-layer model took minutes to compile on a
GPU) and no device or host ever holds more than one tensor's worth beyond its own shards.
The distribution is HF's: kernels and embeddings N(0, initializer_range), norm weights 1,
biases 0. Every process draws the same values (seeded by ``seed`` and the parameter's path),
so multi-host runs agree.
"""
from __future__ import annotations

import zlib

import jax
import numpy as np
from flax import nnx

from balcap_jax import sharding as shd
from balcap_jax.models import hf

__all__ = ["from_config"]


def _init_value(path: str, shape, dtype, std: float, seed: int) -> np.ndarray:
    leaf = path.rsplit("/", 1)[-1]
    if leaf in ("weight", "scale") and len(shape) == 1:       # RMSNorm / LayerNorm gains
        return np.ones(shape, dtype)
    if leaf == "bias":
        return np.zeros(shape, dtype)
    if leaf in ("kernel", "embedding", "class_embedding", "position_embedding"):
        rng = np.random.default_rng([seed, zlib.crc32(path.encode())])
        return (rng.standard_normal(shape, np.float32) * std).astype(dtype)
    raise ValueError(f"random_init: no rule for parameter {path!r} {tuple(shape)}; add one here")


def from_config(hf_config: dict, *, dtype="float32", seed: int = 0, mesh=None,
                rules: shd.Rules | None = None) -> nnx.Module:
    """A randomly initialised model for an HF config dict (its ``model_type`` picks the class)."""
    spec = hf.get_spec(hf_config.get("model_type"))
    cfg = spec.parse_config(hf_config)
    dt = hf._dtype(dtype)
    std = float(hf_config.get("initializer_range",
                              (hf_config.get("text_config") or {}).get("initializer_range", 0.02)))
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: spec.build(cfg, dt, nnx.Rngs(seed))))
    if mesh is not None:
        rules = rules or shd.Rules()
        shardings = dict(nnx.to_flat_state(shd.param_shardings(abstract, mesh, rules)))
    flat = []
    for path, var in nnx.to_flat_state(abstract):
        name = "/".join(str(p) for p in path)
        aval = var.get_value()
        # a stacked parameter draws each layer as the per-layer parameter it stands for
        parts = [_init_value(ps, shape, np.dtype(aval.dtype), std, seed)
                 for ps, _, shape in hf._per_layer(name, aval.shape)]
        value = parts[0] if len(parts) == 1 and "/stack/" not in f"/{name}/" else np.stack(parts)
        if mesh is None:
            arr = jax.numpy.asarray(value)
        else:
            arr = jax.make_array_from_callback(value.shape, shardings[path],
                                               lambda idx, v=value: v[idx])
        flat.append((path, var.replace(arr)))
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    if hasattr(model, "set_sharding"):
        model.set_sharding(mesh, rules)
    return model
