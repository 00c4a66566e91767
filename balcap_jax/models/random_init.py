"""Random-init policies of any registered architecture, straight onto a mesh.

For smoke runs, benchmarks and GPU checks of the real shapes without a checkpoint. With a mesh
the parameters are created by one jitted init whose outputs are already sharded, so a 7B model
never sits whole on one device or on the host.
"""
from __future__ import annotations

import jax
from flax import nnx

from balcap_jax import sharding as shd
from balcap_jax.models import hf

__all__ = ["from_config"]


def from_config(hf_config: dict, *, dtype="float32", seed: int = 0, mesh=None,
                rules: shd.Rules | None = None) -> nnx.Module:
    """A randomly initialised model for an HF config dict (its ``model_type`` picks the class)."""
    spec = hf.get_spec(hf_config.get("model_type"))
    cfg = spec.parse_config(hf_config)
    dt = hf._dtype(dtype)
    build = lambda: spec.build(cfg, dt, nnx.Rngs(seed))
    if mesh is None:
        model = build()
    else:
        rules = rules or shd.Rules()
        graphdef, abstract = nnx.split(nnx.eval_shape(build))
        shardings = shd.param_shardings(abstract, mesh, rules)
        state = jax.jit(lambda: nnx.split(build())[1], out_shardings=shardings)()
        model = nnx.merge(graphdef, state)
    if hasattr(model, "set_sharding"):
        model.set_sharding(mesh, rules)
    return model
