"""Group-relative advantages: vanilla GRPO ("sum then normalise") and c-GDPO ("normalise then sum").

SPEC.md section 4. Rewards are [B, G, K] (B prompts, G samples per prompt, K reward channels),
prompt-major as the sampler returns them. Everything here is a pure jnp function: jittable,
vmappable, and written as whole-array reductions so that under jit with a batch sharded over
devices XLA computes the batch statistics globally (every device, every host).

NaN marks a judge-side failure (SPEC.md section 2); it never becomes a number here:
- a NaN reward is left out of that reward's group statistics and adds 0 to the weighted sum;
- a rollout whose rewards are all NaN gets advantage 0 and is left out of every statistic;
- a group whose values are constant, or that has fewer than 2 valid values, contributes exactly 0
    (set explicitly: float32 rounding noise divided by eps is not 0);
- if the batch std falls below BATCH_STD_FLOOR the batch-normalised advantages are 0.
"""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

DEFAULT_EPS = 1e-4
BATCH_STD_FLOOR = 1e-6


def _as_float(x, name: str):
    x = jnp.asarray(x)
    if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)
                    or x.dtype == jnp.bool_):
        raise ValueError(f"{name} must be a real (float or integer) array, got dtype {x.dtype}.")
    # Statistics in at least float32: bf16 rewards would round the group means.
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_rewards_weights(rewards, weights):
    rewards = _as_float(rewards, "rewards")
    weights = _as_float(weights, "weights")
    if rewards.ndim != 3:
        raise ValueError(
            f"rewards must have shape [B, G, K] (prompts, samples per prompt, reward channels), "
            f"got shape {rewards.shape}; reshape flat prompt-major rewards [B*G, K] with "
            f".reshape(B, G, K).")
    k = rewards.shape[-1]
    if weights.shape != (k,):
        raise ValueError(f"weights must have shape [K] = ({k},) to match rewards {rewards.shape}, "
                         f"got shape {weights.shape}.")
    return rewards, weights


def _check_eps_ddof(eps, ddof):
    if isinstance(eps, (int, float)) and eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}.")
    if not isinstance(ddof, int) or ddof < 0:
        raise ValueError(f"ddof must be a non-negative Python int, got {ddof!r}.")


def masked_mean_std(x, valid, *, axis, ddof: int = 1):
    """Mean and std of x over `axis`, counting only entries where `valid`; returns (mean, std, n).

    Invalid entries (NaN included) never enter the arithmetic. With n - ddof <= 0 the std is 0.
    Reductions keep dims so results broadcast against x.
    """
    n = jnp.sum(valid, axis=axis, keepdims=True).astype(x.dtype)
    x0 = jnp.where(valid, x, 0.0)
    mean = jnp.sum(x0, axis=axis, keepdims=True) / jnp.maximum(n, 1.0)
    dev = jnp.where(valid, x - mean, 0.0)
    var = jnp.sum(dev * dev, axis=axis, keepdims=True) / jnp.maximum(n - ddof, 1.0)
    std = jnp.where(n - ddof > 0, jnp.sqrt(var), 0.0)
    return mean, std, n


def group_normalize(x, valid, *, eps: float = DEFAULT_EPS, ddof: int = 1):
    """(x - mean_g) / (std_g + eps) within each group (row) of x [B, G], over valid entries only.

    Invalid entries get 0. A row whose valid values are all equal, or that has fewer than 2 valid
    values, gets exactly 0 everywhere.
    """
    x = _as_float(x, "x")
    valid = jnp.asarray(valid)
    if x.ndim != 2:
        raise ValueError(f"x must have shape [B, G], got shape {x.shape}.")
    if valid.shape != x.shape or valid.dtype != jnp.bool_:
        raise ValueError(f"valid must be a bool array of shape {x.shape} like x, got "
                         f"{valid.dtype}{list(valid.shape)}.")
    _check_eps_ddof(eps, ddof)
    mean, std, n = masked_mean_std(x, valid, axis=-1, ddof=ddof)
    hi = jnp.max(jnp.where(valid, x, -jnp.inf), axis=-1, keepdims=True)
    lo = jnp.min(jnp.where(valid, x, jnp.inf), axis=-1, keepdims=True)
    degenerate = (n < 2) | (hi == lo)
    z = (x - mean) / (std + eps)
    return jnp.where(valid & ~degenerate, z, 0.0)


def batch_normalize(x, valid, *, eps: float = DEFAULT_EPS, ddof: int = 1):
    """(x - mean) / (std + eps) over every valid entry of x (any shape); invalid entries get 0.

    Written as plain reductions over the whole array: with x sharded, XLA makes them global.
    If the std is below BATCH_STD_FLOOR (or fewer than ddof + 1 valid entries) everything is 0.
    """
    x = _as_float(x, "x")
    valid = jnp.asarray(valid)
    if valid.shape != x.shape or valid.dtype != jnp.bool_:
        raise ValueError(f"valid must be a bool array of shape {x.shape} like x, got "
                         f"{valid.dtype}{list(valid.shape)}.")
    _check_eps_ddof(eps, ddof)
    axes = tuple(range(x.ndim))
    mean, std, _ = masked_mean_std(x, valid, axis=axes, ddof=ddof)
    z = (x - mean) / (std + eps)
    return jnp.where(valid & (std >= BATCH_STD_FLOOR), z, 0.0)


def grpo_advantages(rewards, weights, *, eps: float = DEFAULT_EPS, ddof: int = 1):
    """Vanilla GRPO: s_ij = sum_k w_k R_ijk, then A_ij = (s_ij - mean_j) / (std_j + eps). -> [B, G].

    NaN rewards add 0 to s; an all-NaN rollout gets 0 and is left out of its group's statistics;
    a group with a constant s (over its valid rollouts) or fewer than 2 valid rollouts gets 0.
    No batch normalisation (the ablation baseline, as TRL's GRPO).
    """
    rewards, weights = _check_rewards_weights(rewards, weights)
    finite = ~jnp.isnan(rewards)
    s = jnp.sum(jnp.where(finite, rewards, 0.0) * weights, axis=-1)
    rollout_valid = jnp.any(finite, axis=-1)
    return group_normalize(s, rollout_valid, eps=eps, ddof=ddof)


def per_reward_group_advantages(rewards, *, eps: float = DEFAULT_EPS, ddof: int = 1):
    """c-GDPO's first step: each reward channel normalised within its group. [B,G,K] -> [B,G,K].

    NaN entries (and degenerate groups of a channel) are exactly 0.
    """
    rewards = _as_float(rewards, "rewards")
    if rewards.ndim != 3:
        raise ValueError(f"rewards must have shape [B, G, K], got shape {rewards.shape}.")
    # Move K next to B so each (prompt, reward) pair is one row of group_normalize.
    r = jnp.moveaxis(rewards, -1, 1)                      # [B, K, G]
    b, k, g = r.shape
    r = r.reshape(b * k, g)
    a = group_normalize(r, ~jnp.isnan(r), eps=eps, ddof=ddof)
    return jnp.moveaxis(a.reshape(b, k, g), 1, -1)


def cgdpo_advantages(rewards, weights, *, eps: float = DEFAULT_EPS, ddof: int = 1,
                                          batch_norm: bool = True):
    """c-GDPO: normalise each reward within its group, weight and sum, then normalise over the
    batch.

    A_ijk = (R_ijk - mean_j R_i.k) / (std_j R_i.k + eps); A_ij = sum_k w_k A_ijk;
    Ahat = (A - mean(A)) / (std(A) + eps) over every valid rollout of the step (batch_norm=True,
    GDPO's code, our default). -> [B, G]. Edge cases as the module docstring.
    """
    rewards, weights = _check_rewards_weights(rewards, weights)
    _check_eps_ddof(eps, ddof)
    per_reward = per_reward_group_advantages(rewards, eps=eps, ddof=ddof)
    adv = jnp.sum(per_reward * weights, axis=-1)
    rollout_valid = jnp.any(~jnp.isnan(rewards), axis=-1)
    if batch_norm:
        return batch_normalize(adv, rollout_valid, eps=eps, ddof=ddof)
    return jnp.where(rollout_valid, adv, 0.0)


# Config lookup (TunIX style): config.rl.advantage_estimator names one of these.
ADVANTAGE_ESTIMATORS: dict[str, Callable] = {
    "grpo": grpo_advantages,
    "cgdpo": cgdpo_advantages,
}


def get_advantage_estimator(name: str) -> Callable:
    """The advantage function registered under `name`; a clear error for unknown names."""
    try:
        return ADVANTAGE_ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"Unknown advantage estimator {name!r}; choose one of "
                         f"{sorted(ADVANTAGE_ESTIMATORS)}.") from None

