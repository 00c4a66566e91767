"""Length control relative to the reference caption (SPEC.md section 3).

rho = gen_len / ref_len (lengths in whitespace words by default; the caller chooses the unit).
- `length_conditional_mask`: BalCapRL's masking, applied to the linguistic reward only: the reward
  is kept inside [tau_low, tau_high] (both bounds inclusive) and set to 0 outside.
- `linear_length_penalty`: the ablation's extra reward channel r_len = -coef * |rho - 1|.

Our decision where the spec is silent: a reference length <= 0 (no usable reference) gives
rho = NaN. The mask treats NaN rho as outside the window (reward 0: no credit for fluency when
the length cannot be judged); the linear penalty is NaN, which the advantage functions treat as
a missing reward (left out of that channel's group statistics, adds 0), not as a made-up number.
NaN rewards stay NaN under the mask (a judge failure is not turned into a score).
All functions are pure jnp, elementwise with broadcasting, jittable and vmappable.
"""
from __future__ import annotations

import jax.numpy as jnp


def _real(x, name: str):
    x = jnp.asarray(x)
    if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
        raise ValueError(f"{name} must be a float or integer array, got dtype {x.dtype}.")
    return x


def _broadcast(**arrays):
    try:
        return jnp.broadcast_shapes(*(a.shape for a in arrays.values()))
    except ValueError:
        shapes = ", ".join(f"{k}{list(a.shape)}" for k, a in arrays.items())
        raise ValueError(f"{' / '.join(arrays)} must have broadcastable shapes (usually all [N], "
                         f"one entry per rollout), got {shapes}.") from None


def length_ratio(gen_len, ref_len):
    """rho = gen_len / ref_len in float32 (or wider); NaN where ref_len <= 0."""
    gen_len = _real(gen_len, "gen_len")
    ref_len = _real(ref_len, "ref_len")
    _broadcast(gen_len=gen_len, ref_len=ref_len)
    dtype = jnp.result_type(gen_len.dtype, ref_len.dtype, jnp.float32)
    g = gen_len.astype(dtype)
    r = ref_len.astype(dtype)
    return jnp.where(r > 0, g / jnp.where(r > 0, r, 1), jnp.nan)


def _check_taus(tau_low, tau_high):
    if isinstance(tau_low, (int, float)) and isinstance(tau_high, (int, float)):
        if not 0 <= tau_low <= tau_high:
            raise ValueError(f"need 0 <= tau_low <= tau_high, got tau_low={tau_low}, "
                             f"tau_high={tau_high}.")


def in_length_window(gen_len, ref_len, *, tau_low: float = 0.5, tau_high: float = 2.0):
    """Bool: tau_low <= rho <= tau_high (inclusive); False where rho is NaN (ref_len <= 0)."""
    _check_taus(tau_low, tau_high)
    rho = length_ratio(gen_len, ref_len)
    return (rho >= tau_low) & (rho <= tau_high)


def length_conditional_mask(reward, gen_len, ref_len, *, tau_low: float = 0.5,
                            tau_high: float = 2.0):
    """r~ = reward if tau_low <= gen_len/ref_len <= tau_high else 0; NaN rewards stay NaN.

    Shapes broadcast (typically all [N]); returns the reward's float dtype (at least float32).
    """
    reward = _real(reward, "reward")
    gen_len = _real(gen_len, "gen_len")
    ref_len = _real(ref_len, "ref_len")
    _broadcast(reward=reward, gen_len=gen_len, ref_len=ref_len)
    reward = reward.astype(jnp.promote_types(reward.dtype, jnp.float32))
    keep = in_length_window(gen_len, ref_len, tau_low=tau_low, tau_high=tau_high)
    return jnp.where(keep | jnp.isnan(reward), reward, jnp.zeros_like(reward))


def linear_length_penalty(gen_len, ref_len, *, coef: float = 1.0):
    """r_len = -coef * |rho - 1| (0 at the reference length); NaN where ref_len <= 0.

    Under c-GDPO a coefficient inside the channel cancels in the group normalisation: weight the
    channel instead (SPEC.md section 3). The coefficient matters under GRPO.
    """
    if isinstance(coef, (int, float)) and coef < 0:
        raise ValueError(f"coef must be >= 0 (it scales a penalty), got {coef}.")
    return -coef * jnp.abs(length_ratio(gen_len, ref_len) - 1.0)
