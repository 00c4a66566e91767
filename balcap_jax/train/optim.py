"""The RL optimiser: AdamW with a warm-up and a schedule, global-norm clipping, and an optional
frozen vision tower (its updates exactly zero, no moments kept). The supervised warm start
(train/sft.py) freezes the tower the same way."""
from __future__ import annotations

import jax
import optax

__all__ = ["make_optimizer", "freeze_vision_tower", "is_vision_path"]


def is_vision_path(path) -> bool:
    return any(str(getattr(p, "key", p)).startswith(("visual", "vision")) for p in path)


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
        optax.clip_by_global_norm(tc.grad_clip) if tc.grad_clip > 0 else optax.identity(),
        optax.adamw(lr, b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay))
    if tc.freeze_vision:
        if params is None:
            raise ValueError("make_optimizer(freeze_vision=True) needs params to label")
        opt = freeze_vision_tower(opt, params)
    return opt


def freeze_vision_tower(opt: optax.GradientTransformation, params) -> optax.GradientTransformation:
    """`opt` on everything but the vision tower, whose updates are exactly zero (no moments, and
    its gradients are left out of `opt`'s global-norm clip)."""
    labels = jax.tree_util.tree_map_with_path(
        lambda p, _: "frozen" if is_vision_path(p) else "train", params)
    return optax.multi_transform({"train": opt, "frozen": optax.set_to_zero()}, labels)
