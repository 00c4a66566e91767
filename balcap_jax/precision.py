"""Float32 master weights for low-precision (bfloat16 / float16) parameters.

An AdamW step at the paper's lr = 1e-6 moves a weight by about 1e-6; half a bfloat16 spacing at
|w| = 0.02 is 6e-5, so adding the update to bfloat16 parameters rounds it away for nearly every
weight. The optimiser therefore updates a float32 copy of each trainable low-precision leaf (the
master), and the bfloat16 working copy that the sampler and the loss read is re-rounded from it
after every update. The export and the checkpoints keep the master.

Why a master copy rather than a Kahan-compensated update (EasyR1's bf16 AdamW): a bfloat16
compensation buffer costs 2 B/param but cannot hold a 1e-6 update for weights near 1 (norm
scales: the compensation's own spacing there is ~1.5e-5), so it fails on exactly the small steps
this fixes; a float32 compensation buffer costs the same 4 B/param as the master and is harder
to restore and export. Why not float32 parameters cast to bfloat16 inside each forward
(MaxText): the decode loop reads the weights at every token, so rollouts would cast once per
step to a bfloat16 copy anyway; the peak is the same, and one persistent working copy keeps
every jitted function reading the parameters it is given.

Leaves that need no master (already float32, or frozen: their update is exactly zero) hold an
`optax.MaskedNode()` in the master tree, so they cost nothing.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

__all__ = ["init_master", "apply_updates", "optimizer_view", "is_masked"]

_LOW = (jnp.bfloat16, jnp.float16)


def is_masked(x) -> bool:
    return isinstance(x, optax.MaskedNode)


def init_master(params, frozen: Callable[[Any], bool] | None = None):
    """Float32 copies of the trainable low-precision leaves of `params` (a MaskedNode for the
    others), or None when no leaf needs one (a float32 model: no extra memory).
    `frozen(path) -> bool` marks leaves the optimiser never updates."""
    def leaf(path, p):
        if jnp.dtype(p.dtype) not in [jnp.dtype(d) for d in _LOW]:
            return optax.MaskedNode()
        if frozen is not None and frozen(path):
            return optax.MaskedNode()
        return p.astype(jnp.float32)

    master = jax.tree_util.tree_map_with_path(leaf, params)
    return master if any(not is_masked(m) for m in
                         jax.tree.leaves(master, is_leaf=is_masked)) else None


def optimizer_view(params, master):
    """What the optimiser sees as the parameters: the master where there is one (weight decay
    and the update are computed against the float32 values), else the parameter in float32."""
    if master is None:
        return jax.tree.map(lambda p: p.astype(jnp.float32), params)
    return jax.tree.map(lambda m, p: p.astype(jnp.float32) if is_masked(m) else m,
                        master, params, is_leaf=is_masked)


def apply_updates(params, master, updates):
    """(new params, new master): masters take the float32 update and the working copy is
    rounded from them; leaves without a master are updated as optax.apply_updates does."""
    if master is None:
        return optax.apply_updates(params, updates), None
    new_master = jax.tree.map(lambda m, u: m if is_masked(m) else m + u.astype(jnp.float32),
                              master, updates, is_leaf=is_masked)
    new_params = jax.tree.map(
        lambda m, p, u: (p + u.astype(p.dtype)).astype(p.dtype) if is_masked(m)
        else m.astype(p.dtype), new_master, params, updates, is_leaf=is_masked)
    return new_params, new_master
