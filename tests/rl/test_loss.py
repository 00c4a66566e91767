"""policy_loss: closed forms at ratio 1, clipping, analytic gradients, exact micro-batch sums,
k3."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balcap_jax.rl import loss as L

AGGS = ("dapo", "grpo", "dr_grpo", "bnpo")
N, T = 6, 5


STATIC = ("aggregation", "beta", "max_completion_length", "eps_high")


@functools.partial(jax.jit, static_argnames=STATIC)
def loss_fn(logp, old, adv, mask, ref=None, normalizer=None, *, aggregation="dapo", beta=0.0,
            max_completion_length=None, eps_high=0.2):
    return L.policy_loss(logp, old, adv, mask, ref_logp=ref, beta=beta, aggregation=aggregation,
                         max_completion_length=max_completion_length, normalizer=normalizer,
                         eps_high=eps_high)


@functools.partial(jax.jit, static_argnames=STATIC)
def value_and_grad_fn(logp, old, adv, mask, ref=None, normalizer=None, **kw):
    """(loss, metrics), d loss / d logp: one compile per static config and shape."""
    return jax.value_and_grad(lambda x: loss_fn(x, old, adv, mask, ref, normalizer, **kw),
                              has_aux=True)(logp)


def _batch(seed, *, empty_row=False):
    rng = np.random.default_rng(seed)
    old = rng.normal(-2.0, 1.0, (N, T)).astype(np.float32)
    logp = (old + rng.normal(0, 0.3, (N, T))).astype(np.float32)
    adv = rng.normal(0, 1, N).astype(np.float32)
    lens = rng.integers(1, T + 1, N)
    if empty_row:
        lens[2] = 0
    mask = np.arange(T)[None] < lens[:, None]
    return logp, old, adv, mask


def _denominator(mask, aggregation, lmax=None):
    n_tok = mask.sum(1).astype(np.float64)
    if aggregation in ("dapo", "bnpo"):
        return lambda per_tok: (per_tok * mask).sum() / mask.sum()
    if aggregation == "grpo":
        return lambda per_tok: ((per_tok * mask).sum(1) / np.maximum(n_tok, 1)).sum() / len(mask)
    return lambda per_tok: (per_tok * mask).sum() / (len(mask) * (lmax or mask.shape[1]))


# ---------------------------------------------------------------- closed forms
@pytest.mark.parametrize("aggregation", AGGS)
def test_ratio_one_closed_form(aggregation):
    _, old, adv, mask = _batch(0)
    n_tok = mask.sum(1)
    loss, metrics = loss_fn(old, old, adv, mask, aggregation=aggregation)
    expect = {"dapo": -(adv * n_tok).sum() / n_tok.sum(),
              "bnpo": -(adv * n_tok).sum() / n_tok.sum(),
              "grpo": -adv.mean(),
              "dr_grpo": -(adv * n_tok).sum() / (N * T)}[aggregation]
    np.testing.assert_allclose(loss, expect, rtol=1e-6, atol=1e-7)
    m = L.reduce_metrics(metrics)
    assert float(m["ratio"]) == 1.0 and float(m["clip_low"]) == 0.0 and float(m["clip_high"]) == 0.0


def test_grpo_empty_sequence_adds_zero_but_counts():
    _, old, adv, mask = _batch(1, empty_row=True)
    loss, _ = loss_fn(old, old, adv, mask, aggregation="grpo")
    np.testing.assert_allclose(loss, -(adv.sum() - adv[2]) / N, rtol=1e-6)


def test_dr_grpo_uses_max_completion_length():
    _, old, adv, mask = _batch(2)
    loss, _ = loss_fn(old, old, adv, mask, aggregation="dr_grpo", max_completion_length=16)
    np.testing.assert_allclose(loss, -(adv * mask.sum(1)).sum() / (N * 16), rtol=1e-6)


def test_clipping_both_sides_hand_computed():
    # tokens: (A=+1, r=1.5) clipped high -> -1.2; (A=+1, r=.5) unclipped -> -.5;
    #         (A=-1, r=.5) clipped low -> .8;    (A=-1, r=1.5) unclipped -> 1.5
    old = jnp.zeros((2, 2))
    logp = jnp.log(jnp.array([[1.5, .5], [.5, 1.5]]))
    adv = jnp.array([1., -1.])
    mask = jnp.ones((2, 2), bool)
    loss, metrics = loss_fn(logp, old, adv, mask)
    np.testing.assert_allclose(loss, (-1.2 - .5 + .8 + 1.5) / 4, rtol=1e-6)
    m = L.reduce_metrics(metrics)
    np.testing.assert_allclose([m["clip_low"], m["clip_high"], m["clip_region"]], [.25, .25, .5])
    np.testing.assert_allclose(m["ratio"], 1.0, rtol=1e-6)
    # asymmetric eps (DAPO's clip-higher): eps_high = .6 lets r = 1.5 through
    loss2, _ = loss_fn(logp, old, adv, mask, eps_high=0.6)
    np.testing.assert_allclose(loss2, (-1.5 - .5 + .8 + 1.5) / 4, rtol=1e-6)


def test_log_ratio_clamped():
    old = jnp.zeros((1, 2))
    logp = jnp.array([[100., -100.]])
    loss, metrics = loss_fn(logp, old, jnp.array([-1.]), jnp.ones((1, 2)))
    assert np.isfinite(float(loss))
    r = np.exp([20., -20.])
    np.testing.assert_allclose(L.reduce_metrics(metrics)["ratio"], r.mean(), rtol=1e-5)


def test_masked_garbage_does_not_leak():
    logp, old, adv, mask = _batch(3)
    bad = np.where(mask, logp, np.nan).astype(np.float32)
    bad[0, -1] = -np.inf if not mask[0, -1] else bad[0, -1]
    for agg in AGGS:
        (l1, _), g1 = value_and_grad_fn(bad, old, adv, mask, aggregation=agg)
        l2, _ = loss_fn(logp, old, adv, mask, aggregation=agg)
        np.testing.assert_allclose(l1, l2, rtol=1e-6)
        assert np.all(np.isfinite(g1)) and np.all(np.asarray(g1)[~mask] == 0.0)


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("aggregation", AGGS)
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_grad_matches_analytic(aggregation, beta):
    rng = np.random.default_rng(4)
    logp, old, adv, mask = _batch(4)
    logp = (old + rng.uniform(-0.5, 0.5, (N, T))).astype(np.float32)   # many tokens clipped
    ref = (logp + rng.normal(0, 0.5, (N, T))).astype(np.float32)
    ref_arg = ref if beta else None
    _, grad = value_and_grad_fn(logp, old, adv, mask, ref_arg, aggregation=aggregation, beta=beta)
    r = np.exp(logp.astype(np.float64) - old)
    a = adv[:, None].astype(np.float64)
    clipped = ((a > 0) & (r > 1.2)) | ((a < 0) & (r < 0.8))
    assert clipped[mask].any() and (~clipped[mask]).any()
    dtok = np.where(clipped, 0.0, -a * r)                  # d pg / d logp
    if beta:
        dtok += beta * (1.0 - np.exp(ref - logp.astype(np.float64)))   # d k3 / d logp
    n_tok = mask.sum(1, keepdims=True)
    weight = {"dapo": 1 / mask.sum(), "bnpo": 1 / mask.sum(),
              "grpo": 1 / (np.maximum(n_tok, 1) * N),
              "dr_grpo": 1 / (N * T)}[aggregation]
    expect = np.where(mask, dtok * weight, 0.0)
    np.testing.assert_allclose(grad, expect, rtol=1e-4, atol=1e-7)
    assert np.all(np.asarray(grad)[clipped & mask & (beta == 0)] == 0.0)


# ---------------------------------------------------------------- micro-batch accumulation
@pytest.mark.parametrize("aggregation", ("dapo", "grpo", "dr_grpo"))
def test_microbatches_sum_to_full_batch(aggregation):
    rng = np.random.default_rng(5)
    logp, old, adv, mask = _batch(5, empty_row=True)
    ref = (logp + rng.normal(0, 0.3, (N, T))).astype(np.float32)
    (full, full_m), g_full = value_and_grad_fn(logp, old, adv, mask, ref, None,
                                               aggregation=aggregation, beta=0.05)
    norm = L.loss_normalizer(mask, aggregation=aggregation)
    total, acc, grads = 0.0, None, []
    for sl in (slice(0, 3), slice(3, 6)):      # micro-batches with different token counts
        (l, m), g = value_and_grad_fn(logp[sl], old[sl], adv[sl], mask[sl], ref[sl], norm,
                                      aggregation=aggregation, beta=0.05)
        total, acc = total + l, L.accumulate_metrics(acc, m)
        grads.append(g)
    assert mask[:3].sum() != mask[3:].sum()
    np.testing.assert_allclose(total, full, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(jnp.concatenate(grads), g_full, rtol=1e-6, atol=1e-8)
    full_r = L.reduce_metrics(full_m)
    for k, v in L.reduce_metrics(acc).items():
        np.testing.assert_allclose(v, full_r[k], rtol=1e-6, err_msg=k)


def test_bnpo_is_per_microbatch():
    logp, old, adv, mask = _batch(6)
    half = loss_fn(logp[:3], old[:3], adv[:3], mask[:3], aggregation="bnpo")[0]
    per_tok = -np.minimum(np.exp(logp - old) * adv[:, None],
                          np.clip(np.exp(logp - old), .8, 1.2) * adv[:, None])
    np.testing.assert_allclose(half, _denominator(mask[:3], "bnpo")(per_tok[:3]), rtol=1e-5)
    with pytest.raises(ValueError, match="bnpo"):
        L.policy_loss(logp, old, adv, mask, aggregation="bnpo", normalizer=3.0)
    with pytest.raises(ValueError, match="bnpo"):
        L.loss_normalizer(mask, aggregation="bnpo")


# ---------------------------------------------------------------- k3
@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-30, 5, width=32), min_size=N * T, max_size=N * T),
       st.lists(st.floats(-30, 5, width=32), min_size=N * T, max_size=N * T))
def test_k3_nonnegative_and_zero_at_ref(lp, rf):
    lp = np.array(lp, np.float32).reshape(N, T)
    rf = np.array(rf, np.float32).reshape(N, T)
    kl = np.asarray(k3(lp, rf))
    assert np.all(kl >= 0.0) and np.all(np.isfinite(kl))
    assert np.all(np.asarray(k3(lp, lp)) == 0.0)
    # with A = 0 the loss is beta * mean k3 >= 0, and exactly 0 when ref == logp
    zero = np.zeros(N, np.float32)
    ones = np.ones((N, T), bool)
    l, m = loss_fn(lp, lp, zero, ones, rf, aggregation="dapo", beta=0.1)
    np.testing.assert_allclose(l, 0.1 * kl.mean(), rtol=1e-4, atol=1e-6)
    l0, m0 = loss_fn(lp, lp, zero, ones, lp, aggregation="dapo", beta=0.1)
    assert float(l0) == 0.0 and float(L.reduce_metrics(m0)["kl"]) == 0.0


k3 = jax.jit(L.k3_kl)


def test_errors():
    logp, old, adv, mask = _batch(7)
    with pytest.raises(ValueError, match="logp must have shape"):
        L.policy_loss(logp[0], old[0], adv, mask[0])
    with pytest.raises(ValueError, match="old_logp must have the shape"):
        L.policy_loss(logp, old[:, :2], adv, mask)
    with pytest.raises(ValueError, match=r"advantages must have shape \[N\] = \(6,\)"):
        L.policy_loss(logp, old, adv.reshape(2, 3), mask)
    with pytest.raises(ValueError, match="Unknown aggregation"):
        L.policy_loss(logp, old, adv, mask, aggregation="mean")
    with pytest.raises(ValueError, match="needs ref_logp"):
        L.policy_loss(logp, old, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="logp must be a float"):
        L.policy_loss(logp.astype(np.int32), old, adv, mask)


def test_vmap_over_steps():
    b = [_batch(s) for s in (8, 9)]
    stacked = [np.stack(x) for x in zip(*b)]
    v = jax.jit(jax.vmap(lambda *a: L.policy_loss(*a)[0]))(*stacked)
    for i in range(2):
        np.testing.assert_allclose(v[i], loss_fn(*b[i])[0], rtol=1e-6)


def test_reduce_metrics_on_host_sums_equals_device_and_stays_on_the_host():
    """Sums fetched to the host reduce with numpy to the device path's values (NaN where the
    denominator is 0), and give no jax arrays (nothing queued on the device)."""
    import jax
    sums = {"a": (jnp.float32(3.0), jnp.float32(4.0)), "b": (jnp.float32(1.0), jnp.float32(0.0))}
    dev, host = L.reduce_metrics(sums), L.reduce_metrics(jax.device_get(sums))
    assert not any(isinstance(v, jax.Array) for v in host.values())
    assert all(isinstance(v, jax.Array) for v in dev.values())
    np.testing.assert_allclose(float(host["a"]), float(dev["a"]), rtol=1e-7)
    assert float(host["a"]) == 0.75 and np.isnan(float(host["b"])) and np.isnan(float(dev["b"]))
