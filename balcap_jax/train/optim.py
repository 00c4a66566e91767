"""The RL optimiser: AdamW (float32 or bfloat16 moments) or Adafactor, with a warm-up and a
schedule, global-norm clipping, and an optional frozen vision tower (its updates exactly zero,
no moments kept). The supervised warm start (train/sft.py) freezes the tower the same way."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from balcap_jax.models.lora import is_vision_path

__all__ = ["make_optimizer", "clip_by_global_norm", "freeze_vision_tower", "is_vision_path",
           "stored_in"]


def make_optimizer(tc, params=None) -> optax.GradientTransformation:
    """AdamW with warm-up + (constant | cosine) schedule, global-norm clipping and optional
    frozen vision tower (its updates are exactly zero and it keeps no moments)."""
    if tc.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, tc.lr, max(tc.warmup_steps, 1),
                                                max(tc.steps, tc.warmup_steps + 1))
    elif tc.warmup_steps > 0:
        lr = optax.join_schedules([optax.linear_schedule(0.0, tc.lr, tc.warmup_steps),
                                   optax.constant_schedule(tc.lr)], [tc.warmup_steps])
    else:
        lr = tc.lr
    opt = optax.chain(
        clip_by_global_norm(tc.grad_clip) if tc.grad_clip > 0 else optax.identity(),
        _base_optimizer(tc, lr))
    if tc.freeze_vision:
        if params is None:
            raise ValueError("make_optimizer(freeze_vision=True) needs params to label")
        opt = freeze_vision_tower(opt, params)
    return opt


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """optax.clip_by_global_norm (the same state and arithmetic) that takes the updates'
    global norm as the extra argument `grad_norm` when the caller has it: a step of one
    micro-batch gets it from its gradient pass (train/step.py), and computing it again is one
    more pass over every gradient (4 of the 15 ms of the step benchmark's update)."""
    def update(updates, state, params=None, *, grad_norm=None, **extra_args):
        del params, extra_args
        norm = optax.global_norm(updates) if grad_norm is None else grad_norm
        keep = jnp.squeeze(norm < max_norm)
        return jax.tree.map(
            lambda t: jax.lax.select(keep, t, (t / norm.astype(t.dtype)) * max_norm),
            updates), state
    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)


def _base_optimizer(tc, lr) -> optax.GradientTransformation:
    """train.optimizer: AdamW (moments in train.moment_dtype) or Adafactor."""
    name = tc.get("optimizer", "adamw")
    if name == "adafactor":
        # factored second moments of matrices, no first moment: state ~ rows + columns. No
        # parameter-scale multiplier, so train.lr is an absolute step as for AdamW.
        return optax.adafactor(lr, multiply_by_parameter_scale=False,
                               weight_decay_rate=tc.weight_decay or None)
    if name != "adamw":
        raise ValueError(f"train.optimizer={name!r}: use 'adamw' or 'adafactor'")
    opt = optax.adamw(lr, b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay)
    dtype = jnp.dtype(tc.get("moment_dtype", "float32"))
    return opt if dtype == jnp.float32 else stored_in(opt, dtype)


def stored_in(opt: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
    """`opt` with its floating state stored in `dtype` between steps and computed in float32
    (bfloat16 AdamW moments: half the state memory, the same float32 update arithmetic)."""
    def cast(tree, to):
        return jax.tree.map(lambda x: x.astype(to) if hasattr(x, "dtype") and
                            jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    def init(params):
        return cast(opt.init(params), dtype)

    def update(updates, state, params=None):
        updates, state = opt.update(updates, cast(state, jnp.float32), params)
        return updates, cast(state, dtype)
    return optax.GradientTransformation(init, update)


def freeze_vision_tower(opt: optax.GradientTransformation, params) -> optax.GradientTransformation:
    """`opt` on everything but the vision tower, whose updates are exactly zero (no moments, and
    its gradients are left out of `opt`'s global-norm clip)."""
    labels = jax.tree_util.tree_map_with_path(
        lambda p, _: "frozen" if is_vision_path(p) else "train", params)
    return optax.multi_transform({"train": opt, "frozen": optax.set_to_zero()}, labels)
