"""The clipped policy-gradient loss with an optional k3 KL term and TRL-named aggregations.

SPEC.md section 5. Per completion token t of rollout n, r_t = exp(logp_t - old_logp_t):

    pg_t = -min(r_t * A_n, clip(r_t, 1 - eps_low, 1 + eps_high) * A_n)
    kl_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1            (k3, only when beta != 0)

Aggregations over the completion mask m [N, L]:
  dapo     sum(l * m) / sum(m)                           (our default; no length bias)
  grpo     sum_n [sum_t(l * m) / sum_t(m)] / N           (a sequence with no tokens adds 0)
  dr_grpo  sum(l * m) / (N * L_max), L_max = max_completion_length or the mask width
  bnpo     sum(l * m) / sum(m) over this micro-batch only

Gradient accumulation: pass `normalizer` = the full batch's denominator (sum(m) for dapo, N for
grpo, N * L_max for dr_grpo; `loss_normalizer` computes it) to every micro-batch, and the
micro-batch losses SUM to the full-batch loss exactly. bnpo is per micro-batch by definition:
average its micro-batch losses instead.

Metrics come back as {name: (numerator, denominator)} so that summing them over micro-batches
(`accumulate_metrics`) and dividing once (`reduce_metrics`) gives exact full-batch values.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

LOSS_AGGREGATIONS = ("dapo", "grpo", "dr_grpo", "bnpo")
LOG_RATIO_CLAMP = 20.0   # as tunix: keeps exp() finite for stale or far-off log-probs


def _float(x, name: str):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a float array (per-token log-probabilities), got dtype "
                         f"{x.dtype}.")
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_aggregation(aggregation: str):
    if aggregation not in LOSS_AGGREGATIONS:
        raise ValueError(f"Unknown aggregation {aggregation!r}; choose one of {LOSS_AGGREGATIONS}.")


def _max_len(mask, max_completion_length):
    if max_completion_length is None:
        return mask.shape[1]
    if not isinstance(max_completion_length, int) or max_completion_length <= 0:
        raise ValueError(f"max_completion_length must be a positive int, got "
                         f"{max_completion_length!r}.")
    return max_completion_length


def loss_normalizer(mask, *, aggregation: str = "dapo", max_completion_length: int | None = None):
    """The full batch's denominator for `policy_loss(..., normalizer=)`: pass it to every
    micro-batch.

    dapo: number of completion tokens; grpo: number of sequences; dr_grpo: N * L_max.
    bnpo has none (per micro-batch by definition): asking for it raises.
    """
    _check_aggregation(aggregation)
    mask = jnp.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must have shape [N, L], got shape {mask.shape}.")
    n = mask.shape[0]
    if aggregation == "dapo":
        return jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)
    if aggregation == "grpo":
        return jnp.float32(n)
    if aggregation == "dr_grpo":
        return jnp.float32(n * _max_len(mask, max_completion_length))
    raise ValueError("bnpo normalises each micro-batch by its own token count; it takes no global "
                     "normalizer. Average the micro-batch losses instead.")


def k3_kl(logp, ref_logp):
    """Per-token k3 estimator of KL(pi || ref): exp(d) - d - 1 with d = ref - logp clamped to +-20.

    >= 0 everywhere, 0 exactly where ref == logp. Written as expm1(d) - d: exp(d) - d - 1 in
    float32 goes slightly negative for tiny d; the max() only removes rounding below 0.
    """
    d = jnp.clip(ref_logp - logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return jnp.maximum(jnp.expm1(d) - d, 0.0)


def policy_loss(logp, old_logp, advantages, mask, *, ref_logp=None, eps_low: float = 0.2,
                eps_high: float = 0.2, beta: float = 0.0, aggregation: str = "dapo",
                max_completion_length: int | None = None, normalizer=None):
    """Clipped surrogate loss (+ beta * k3 KL). Returns (loss scalar, metrics {name: (num, den)}).

    logp, old_logp, mask (and ref_logp): [N, L] per completion token; advantages: [N].
    Tokens outside the mask never reach the arithmetic (their logp may be garbage) and get
    zero gradient. Differentiate w.r.t. logp; old_logp and ref_logp are treated as constants.
    Metrics: pg_loss, ratio, clip_low, clip_high, clip_region (token means) and, whenever
    ref_logp is given (even with beta = 0, as a diagnostic), kl.
    """
    _check_aggregation(aggregation)
    logp = _float(logp, "logp")
    old_logp = _float(old_logp, "old_logp")
    advantages = _float(advantages, "advantages")
    mask = jnp.asarray(mask)
    if logp.ndim != 2:
        raise ValueError(f"logp must have shape [N, L] (sequences, completion tokens), got shape "
                         f"{logp.shape}.")
    n, length = logp.shape
    for name, x in (("old_logp", old_logp), ("mask", mask)):
        if x.shape != logp.shape:
            raise ValueError(f"{name} must have the shape of logp {logp.shape}, got {x.shape}.")
    if advantages.shape != (n,):
        raise ValueError(f"advantages must have shape [N] = ({n},), one per sequence, got "
                         f"{advantages.shape}; flatten [B, G] advantages with .reshape(-1).")
    if not (mask.dtype == jnp.bool_ or jnp.issubdtype(mask.dtype, jnp.number)):
        raise ValueError(f"mask must be bool or numeric, got dtype {mask.dtype}.")
    if aggregation == "bnpo" and normalizer is not None:
        raise ValueError("bnpo normalises each micro-batch by its own token count; pass "
                         "normalizer=None (or use dapo for a global token normaliser).")
    use_kl = ref_logp is not None and not (isinstance(beta, (int, float)) and beta == 0)
    if isinstance(beta, (int, float)) and beta != 0 and ref_logp is None:
        raise ValueError(f"beta={beta} needs ref_logp (the reference model's per-token "
                         f"log-probabilities); pass ref_logp or set beta=0.")
    if ref_logp is not None:
        ref_logp = _float(ref_logp, "ref_logp")
        if ref_logp.shape != logp.shape:
            raise ValueError(f"ref_logp must have the shape of logp {logp.shape}, got "
                             f"{ref_logp.shape}.")

    valid = mask.astype(bool)
    m = valid.astype(logp.dtype)
    old_logp = jax.lax.stop_gradient(old_logp)
    # where() before any arithmetic: masked-out garbage (inf, NaN) cannot leak into values/grads.
    log_ratio = jnp.where(valid, logp - old_logp, 0.0)
    ratio = jnp.exp(jnp.clip(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    a = advantages[:, None]
    surrogate = ratio * a
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * a
    per_token = -jnp.minimum(surrogate, clipped)
    metrics = {}
    if ref_logp is not None:
        ref_logp = jax.lax.stop_gradient(ref_logp)
        kl = k3_kl(jnp.where(valid, logp, 0.0), jnp.where(valid, ref_logp, 0.0))
        metrics["kl"] = (jnp.sum(kl * m), jnp.sum(m))
        if use_kl:
            per_token = per_token + beta * kl

    token_sum = jnp.sum(per_token * m)
    if aggregation in ("dapo", "bnpo"):
        den = jnp.maximum(jnp.sum(m), 1.0) if normalizer is None else normalizer
        loss = token_sum / den
    elif aggregation == "grpo":
        seq_mean = jnp.sum(per_token * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
        loss = jnp.sum(seq_mean) / (n if normalizer is None else normalizer)
    else:  # dr_grpo
        den = n * _max_len(mask, max_completion_length) if normalizer is None else normalizer
        loss = token_sum / den

    # Clip fractions as TRL's GRPOTrainer (trl/trainer/grpo_trainer.py, _compute_loss): a token
    # is low-clipped when r < 1 - eps_low and A < 0, high-clipped when r > 1 + eps_high and A > 0
    # -- exactly the tokens whose clipped branch is the active min (zero gradient).
    clip_low = (ratio < 1.0 - eps_low) & (a < 0)
    clip_high = (ratio > 1.0 + eps_high) & (a > 0)
    tokens = jnp.sum(m)
    metrics.update({
        "pg_loss": (jnp.sum(-jnp.minimum(surrogate, clipped) * m), tokens),
        "ratio": (jnp.sum(ratio * m), tokens),
        "clip_low": (jnp.sum(clip_low * m), tokens),
        "clip_high": (jnp.sum(clip_high * m), tokens),
        "clip_region": (jnp.sum((clip_low | clip_high) * m), tokens),
    })
    metrics = {k: tuple(jax.lax.stop_gradient(v) for v in nd) for k, nd in metrics.items()}
    return loss, metrics


def accumulate_metrics(total: Mapping | None, new: Mapping) -> dict:
    """Sum (num, den) pairs over micro-batches; `total=None` starts a fresh accumulation."""
    if total is None:
        return dict(new)
    if set(total) != set(new):
        raise ValueError(f"metric names differ: {sorted(total)} vs {sorted(new)}.")
    return {k: (total[k][0] + new[k][0], total[k][1] + new[k][1]) for k in new}


def reduce_metrics(metrics: Mapping) -> dict:
    """{name: num / den}; NaN where den is 0 (no tokens: nothing to report, not a made-up 0).
    Sums already on the host (numpy, e.g. from jax.device_get) are reduced with numpy: no
    device work to queue behind whatever the device runs next."""
    def one(num, den):
        xp = np if all(isinstance(x, (np.ndarray, np.generic)) for x in (num, den)) else jnp
        return xp.where(den > 0, num / xp.where(den > 0, den, 1.0), xp.nan)
    return {k: one(num, den) for k, (num, den) in metrics.items()}
