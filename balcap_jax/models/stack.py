"""Repeated layers as one module with stacked parameters, run under `jax.lax.scan`.

A model of 36 layers then compiles one layer body, not 36 copies of it: compile time stops
growing with depth. Every parameter gains a leading [layers] axis (logical axis "layers",
replicated), which the Hugging Face key maps expand to `{i}` on load and save
(`StackedLayers.num` tells them how many), so checkpoints are unchanged.

    blocks = StackedLayers([Block(...) for _ in range(n)])
    x, outs = blocks.scan(lambda block, x, xs: block(x, *xs), x, xs, remat_policy="full")
    block_3 = blocks.layer(3)              # one layer as a module (tests, inspection)
    set_unroll(model, 2)                   # every stack in model: 2 layers per loop iteration

`unroll` trades compile time for speed: the loop's per-iteration work (slicing each layer's
parameters, stacking the residuals the backward pass keeps and the stacked gradients) goes
away with the loop; a shallow model compiles quickly either way.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from balcap_jax.models.layers import lora_dropout_layer

__all__ = ["StackedLayers", "REMAT_POLICIES", "remat_policy", "set_unroll"]

# name -> jax.checkpoint policy: what the backward pass keeps of each layer's forward
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,        # keep only each layer's input
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,   # keep matmul outputs
    "none": jax.checkpoint_policies.everything_saveable,     # keep everything
}


def remat_policy(name: str):
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat policy {name!r}: use one of {sorted(REMAT_POLICIES)}")
    return REMAT_POLICIES[name]


def _stack_vars(*vs):
    first = vs[0]
    names = first.get_metadata().get("out_sharding")
    value = jnp.stack([v.get_value() for v in vs])
    meta = {k: v for k, v in first.get_metadata().items() if k != "out_sharding"}
    if names is not None:
        meta["out_sharding"] = ("layers",) + tuple(names)
    return type(first)(value, **meta)


class StackedLayers(nnx.Module):
    """`num` layers of one architecture, their parameters stacked on a leading axis."""

    def __init__(self, layers: Sequence[nnx.Module]):
        if not layers:
            raise ValueError("StackedLayers needs at least one layer")
        graphdef, first = nnx.split(layers[0])
        states = [first] + [nnx.split(m)[1] for m in layers[1:]]
        stacked = jax.tree.map(_stack_vars, *states,
                               is_leaf=lambda x: isinstance(x, nnx.Variable))
        self.num = len(layers)
        self.stack = nnx.merge(graphdef, stacked)
        self.unstacked = None    # set by unstack()
        self.unroll = 1          # layers per scan iteration (set_unroll); 0 = all

    def _split(self):
        return nnx.split(self.stack)

    def layer(self, i: int) -> nnx.Module:
        """Layer i as a module of its own (a copy of its slice of the parameters)."""
        if self.unstacked is not None:
            return self.unstacked[i]
        graphdef, state = self._split()
        return nnx.merge(graphdef, jax.tree.map(lambda x: x[i], state))

    def unstack(self) -> None:
        """Slice every layer out of the stack once; `layer(i)` then returns these modules.
        For a module merged inside a jitted function that loops over decode steps: the
        slices are taken before the loop, not copied on every step (XLA does not hoist a
        bare slice out of a while loop)."""
        if self.unstacked is None:
            self.unstacked = nnx.data(tuple(self.layer(i) for i in range(self.num)))

    def scan(self, fn: Callable[[nnx.Module, Any, Any], tuple[Any, Any]], carry, xs=None, *,
             remat: str | None = None, start: int = 0, stop: int | None = None):
        """lax.scan of fn(layer, carry, xs_i) -> (carry, y_i) over layers start..stop-1
        (default all); xs and the ys have a leading layers axis. `remat` names a policy of
        REMAT_POLICIES (None: no rematerialisation)."""
        graphdef, state = self._split()
        stop = self.num if stop is None else int(stop)
        if (start, stop) != (0, self.num):
            state = jax.tree.map(lambda x: x[start:stop], state)

        def body(c, inputs):
            st, x_i, i = inputs
            with lora_dropout_layer(i):     # a LoRA dropout mask of this layer's own
                return fn(nnx.merge(graphdef, st), c, x_i)
        if remat is not None:
            body = jax.checkpoint(body, policy=remat_policy(remat), prevent_cse=False)
        n = stop - start
        return jax.lax.scan(body, carry, (state, xs, jnp.arange(start, stop)), length=n,
                            unroll=min(self.unroll or n, n))


def set_unroll(model: nnx.Module, layers_per_iteration: int) -> int:
    """Run every StackedLayers in `model` with `layers_per_iteration` layers per scan iteration
    (1: one compiled layer body; 0: all of them, straight-line code whose compile time grows
    with depth). Returns the number of stacks changed."""
    k = int(layers_per_iteration)
    if k < 0:
        raise ValueError(f"layers per scan iteration must be >= 0 (0 = all), got {k}")
    stacks = [m for _, m in nnx.iter_modules(model) if isinstance(m, StackedLayers)]
    for m in stacks:
        m.unroll = k
    return len(stacks)
