"""GRPO and c-GDPO advantages against hand-computed values, a float64 loop reference, invariants."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from balcap_jax.rl import advantages as adv

EPS = 1e-4
grpo = jax.jit(adv.grpo_advantages, static_argnames=("ddof",))
cgdpo = jax.jit(adv.cgdpo_advantages, static_argnames=("ddof", "batch_norm"))
NAN = float("nan")


# ---------------------------------------------------------------- float64 loop reference (SPEC 4)
def _group_z(vals, eps=EPS):
    """vals: list of (index, value) of valid entries -> {index: z}; degenerate groups -> 0."""
    xs = np.array([v for _, v in vals], np.float64)
    if len(xs) < 2 or np.all(xs == xs[0]):
        return {i: 0.0 for i, _ in vals}
    m, s = xs.mean(), xs.std(ddof=1)
    return {i: (v - m) / (s + eps) for i, v in vals}


def ref_grpo(r, w):
    b, g, k = r.shape
    out = np.zeros((b, g))
    for i in range(b):
        vals = [(j, sum(w[c] * r[i, j, c] for c in range(k) if not np.isnan(r[i, j, c])))
                for j in range(g) if not np.all(np.isnan(r[i, j]))]
        for j, z in _group_z(vals).items():
            out[i, j] = z
    return out


def ref_cgdpo(r, w, batch_norm=True):
    b, g, k = r.shape
    a = np.zeros((b, g))
    for i in range(b):
        for c in range(k):
            vals = [(j, r[i, j, c]) for j in range(g) if not np.isnan(r[i, j, c])]
            for j, z in _group_z(vals).items():
                a[i, j] += w[c] * z
    valid = ~np.all(np.isnan(r), axis=-1)
    if not batch_norm:
        return np.where(valid, a, 0.0)
    v = a[valid]
    if len(v) < 2 or v.std(ddof=1) < 1e-6:
        return np.zeros((b, g))
    return np.where(valid, (a - v.mean()) / (v.std(ddof=1) + EPS), 0.0)


# ---------------------------------------------------------------- hand-computed cases
def test_grpo_hand_computed_weighted_sum():
    r = jnp.array([[[1., 0.], [0., 1.], [1., 1.], [0., 0.]]])       # [1, 4, 2]
    w = jnp.array([2., 1.])
    s = np.array([2., 1., 3., 0.])                                   # sum_k w_k R
    std = math.sqrt(((s - 1.5) ** 2).sum() / 3)                      # ddof 1 = sqrt(5/3)
    np.testing.assert_allclose(grpo(r, w)[0], (s - 1.5) / (std + EPS), rtol=1e-6)


def test_cgdpo_hand_computed_and_separates_equal_sums():
    # rollouts 0 and 1 both sum to 1 but differ in profile: GRPO ties them, c-GDPO does not.
    r = jnp.array([[[1., 0.], [0., 1.], [0., 1.], [0., 0.]]])
    w = jnp.ones(2)
    # channel 0: [1,0,0,0] mean .25, std .5; channel 1: [0,1,1,0] mean .5, std sqrt(1/3)
    s1 = math.sqrt(1 / 3)
    expect = np.array([.75 / (.5 + EPS) - .5 / (s1 + EPS),
                       -.25 / (.5 + EPS) + .5 / (s1 + EPS),
                       -.25 / (.5 + EPS) + .5 / (s1 + EPS),
                       -.25 / (.5 + EPS) - .5 / (s1 + EPS)])
    a = cgdpo(r, w, batch_norm=False)[0]
    np.testing.assert_allclose(a, expect, rtol=1e-5)
    assert abs(float(a[0] - a[1])) > 0.2
    g = grpo(r, w)[0]
    assert g[0] == g[1] == g[2]
    # batch norm of the same: (a - mean) / (std_ddof1 + eps)
    bn = (expect - expect.mean()) / (expect.std(ddof=1) + EPS)
    np.testing.assert_allclose(cgdpo(r, w)[0], bn, rtol=1e-5, atol=1e-6)


def test_constant_group_is_exactly_zero():
    # 0.1 repeated: float32 mean of seven 0.1s is not exactly 0.1, noise / eps would not be 0.
    r = jnp.full((1, 7, 1), 0.1, jnp.float32)
    r = jnp.concatenate([r, jnp.array([[[0.3]] * 7], jnp.float32)], axis=0)   # 2 prompts
    w = jnp.ones(1)
    assert np.all(np.asarray(grpo(r, w)) == 0.0)
    assert np.all(np.asarray(cgdpo(r, w, batch_norm=False)) == 0.0)
    assert np.all(np.asarray(cgdpo(r, w)) == 0.0)          # batch std 0 < 1e-6 -> 0


def test_constant_channel_contributes_exactly_zero():
    # channel 1 is constant in the group, so c-GDPO equals channel 0 alone.
    r = jnp.array([[[0., .7], [1., .7], [.5, .7]]])
    both = cgdpo(r, jnp.array([1., 3.]), batch_norm=False)
    alone = cgdpo(r[..., :1], jnp.array([1.]), batch_norm=False)
    np.testing.assert_array_equal(both, alone)


def test_single_valid_value_contributes_zero():
    r = jnp.array([[[0.2, 1.], [NAN, 0.], [NAN, .5]]])      # channel 0 has 1 valid value
    a = cgdpo(r, jnp.array([5., 1.]), batch_norm=False)
    alone = cgdpo(r[..., 1:], jnp.array([1.]), batch_norm=False)
    np.testing.assert_allclose(a, alone, rtol=0, atol=0)
    # GRPO: only one rollout of the group valid -> 0
    r2 = jnp.array([[[0.2], [NAN], [NAN]]])
    assert np.all(np.asarray(grpo(r2, jnp.ones(1))) == 0.0)


def test_nan_reward_left_out_of_its_channel_stats():
    r = jnp.array([[[0., 0.], [1., NAN], [.5, 1.], [.25, 0.]]])
    a = np.asarray(cgdpo(r, jnp.ones(2), batch_norm=False))[0]
    c0 = np.array([0., 1., .5, .25]); c1 = np.array([0., 1., 0.])   # channel 1 without rollout 1
    z0 = (c0 - c0.mean()) / (c0.std(ddof=1) + EPS)
    z1 = (c1 - c1.mean()) / (c1.std(ddof=1) + EPS)
    expect = z0 + np.array([z1[0], 0., z1[1], z1[2]])                # NaN adds 0
    np.testing.assert_allclose(a, expect, rtol=1e-5)
    # GRPO: the NaN adds 0 to that rollout's sum
    s = np.array([0., 1., 1.5, .25])
    np.testing.assert_allclose(grpo(r, jnp.ones(2))[0], (s - s.mean()) / (s.std(ddof=1) + EPS),
                               rtol=1e-5)


def test_all_nan_rollout_is_zero_and_left_out_of_stats():
    r = np.array([[[0., 1.], [1., 0.], [.5, .25], [NAN, NAN]],
                  [[.1, .2], [.3, .9], [.6, .0], [.8, .5]]], np.float32)
    w = jnp.array([1., 2.])
    for fn in (lambda x: grpo(x, w), lambda x: cgdpo(x, w, batch_norm=False),
               lambda x: cgdpo(x, w)):
        a = np.asarray(fn(jnp.asarray(r)))
        assert a[0, 3] == 0.0
    # group stats: prompt 0 equals the same group without the dead rollout
    np.testing.assert_allclose(grpo(r, w)[0, :3], grpo(r[:1, :3], w)[0], rtol=1e-6)
    np.testing.assert_allclose(cgdpo(r, w, batch_norm=False)[0, :3],
                               cgdpo(r[:1, :3], w, batch_norm=False)[0], rtol=1e-6)
    # batch stats: the dead rollout does not enter mean/std (compare to the loop reference)
    np.testing.assert_allclose(cgdpo(r, w), ref_cgdpo(r.astype(np.float64), np.asarray(w)),
                               rtol=1e-5, atol=1e-5)


def test_tiny_batch_std_gives_zero():
    # every group degenerate (constant, or a channel with no valid value): batch std 0 -> all 0
    r = jnp.array([[[1., NAN], [1., NAN]], [[0., 3.], [0., 3.]]])
    assert np.all(np.asarray(cgdpo(r, jnp.ones(2))) == 0.0)


def test_shape_and_dtype_errors():
    with pytest.raises(ValueError, match="rewards must have shape"):
        adv.cgdpo_advantages(jnp.ones((4, 3)), jnp.ones(3))
    with pytest.raises(ValueError, match=r"weights must have shape \[K\] = \(3,\)"):
        adv.grpo_advantages(jnp.ones((2, 4, 3)), jnp.ones(2))
    with pytest.raises(ValueError, match="rewards must be a real"):
        adv.grpo_advantages(jnp.ones((2, 4, 1), jnp.complex64), jnp.ones(1))
    with pytest.raises(ValueError, match="valid must be a bool"):
        adv.group_normalize(jnp.ones((2, 3)), jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="Unknown advantage estimator"):
        adv.get_advantage_estimator("ppo")
    assert adv.get_advantage_estimator("cgdpo") is adv.cgdpo_advantages


def test_vmap_over_steps_matches_loop():
    rng = np.random.default_rng(0)
    r = rng.uniform(size=(3, 2, 4, 3)).astype(np.float32)          # 3 steps
    w = jnp.array([1., .5, 2.])
    v = jax.jit(jax.vmap(lambda x: adv.cgdpo_advantages(x, w)))(jnp.asarray(r))
    for t in range(3):
        np.testing.assert_allclose(v[t], cgdpo(r[t], w), rtol=1e-6, atol=1e-6)


def test_sharded_equals_unsharded_on_8_devices():
    assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    rng = np.random.default_rng(1)
    r = rng.uniform(size=(16, 4, 3)).astype(np.float32)
    r[3, 1] = NAN                        # a dead rollout and a NaN reward on different shards
    r[10, 2, 0] = NAN
    r[12] = .5                           # a constant group
    w = jnp.array([1., 1., .5])
    rs = jax.device_put(r, NamedSharding(mesh, P("data")))
    assert len(rs.sharding.device_set) == 8
    for bn in (True, False):
        np.testing.assert_allclose(cgdpo(rs, w, batch_norm=bn),
                                   cgdpo(jnp.asarray(r), w, batch_norm=bn), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grpo(rs, w), grpo(jnp.asarray(r), w), rtol=1e-6, atol=1e-6)
    # and both equal the global-statistics reference
    np.testing.assert_allclose(cgdpo(rs, w), ref_cgdpo(r.astype(np.float64), np.asarray(w)),
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- properties
B, G, K = 3, 4, 3
GRID = [i / 8 for i in range(9)]          # dyadic: weighted sums are exact in float32


def _rewards(elements):
    return st.lists(elements, min_size=B * G * K, max_size=B * G * K).map(
        lambda v: np.array(v, np.float32).reshape(B, G, K))


grid_or_nan = st.sampled_from(GRID + [NAN])
weights_st = st.lists(st.sampled_from([0.5, 1.0, 2.0]), min_size=K, max_size=K).map(
    lambda v: np.array(v, np.float32))


@settings(max_examples=40, deadline=None)
@given(_rewards(grid_or_nan), weights_st)
def test_matches_loop_reference(r, w):
    r64 = r.astype(np.float64)
    np.testing.assert_allclose(grpo(r, w), ref_grpo(r64, w), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cgdpo(r, w, batch_norm=False), ref_cgdpo(r64, w, False),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cgdpo(r, w), ref_cgdpo(r64, w), rtol=1e-4, atol=1e-4)


@settings(max_examples=30, deadline=None)
@given(_rewards(st.sampled_from(GRID)),
       st.lists(st.floats(0.5, 20.0, width=32), min_size=B * K, max_size=B * K),
       st.lists(st.floats(-5.0, 5.0, width=32), min_size=B * K, max_size=B * K),
       weights_st)
def test_cgdpo_per_group_affine_invariance(r, scale, shift, w):
    a = np.array(scale, np.float32).reshape(B, 1, K)
    b = np.array(shift, np.float32).reshape(B, 1, K)
    r2 = a * r + b                          # a different affine map per (prompt, reward)
    # z = (dev/std) * std/(std + eps) with |dev/std| <= (G-1)/sqrt(G): an affine map moves the
    # factor by at most eps/min_std, min over the non-constant groups (grid: std >= .0625 before
    # scaling, scale >= .5, so scale * std >= 1e-2 and eps cannot dominate).
    std = r.std(axis=1, ddof=1)
    min_std = float(np.min((np.minimum(a[:, 0], 1.0) * std)[std > 0], initial=1.0))
    tol = float(np.sum(w)) * (G - 1) / math.sqrt(G) * EPS / min_std + 1e-5
    np.testing.assert_allclose(cgdpo(r2, w, batch_norm=False), cgdpo(r, w, batch_norm=False),
                               atol=tol, rtol=0)
    # Batch norm divides by the batch std: only compare where it is well away from 0 (weights
    # can cancel mirrored channels, leaving float noise whose std the 1e-6 floor may or may not
    # cut).
    pre = np.asarray(cgdpo(r, w, batch_norm=False))
    if pre.std(ddof=1) > 0.1:
        tol_bn = 2 * tol / pre.std(ddof=1) + 1e-4
        np.testing.assert_allclose(cgdpo(r2, w), cgdpo(r, w), atol=tol_bn, rtol=0)


@settings(max_examples=30, deadline=None)
@given(_rewards(st.sampled_from(GRID)), weights_st,
       st.lists(st.permutations(list(range(K))), min_size=B, max_size=B))
def test_grpo_ties_equal_weighted_sums(r, w, perms):
    # rollout 1 carries rollout 0's rewards permuted among equally weighted channels
    w = np.ones(K, np.float32) * w[0]
    for i, p in enumerate(perms):
        r[i, 1] = r[i, 0][list(p)]
    a = np.asarray(grpo(r, w))
    np.testing.assert_array_equal(a[:, 0], a[:, 1])


@settings(max_examples=40, deadline=None)
@given(_rewards(st.one_of(st.floats(0.0, 1.0, width=32), st.just(NAN))), weights_st)
def test_batch_normalised_moments(r, w):
    pre = np.asarray(cgdpo(r, w, batch_norm=False), np.float64)
    post = np.asarray(cgdpo(r, w), np.float64)
    valid = ~np.all(np.isnan(r), axis=-1)
    assert np.all(post[~valid] == 0.0) and np.all(pre[~valid] == 0.0)
    if valid.sum() < 2:
        assert np.all(post == 0.0)
        return
    s = pre[valid].std(ddof=1)
    if s < 1e-6:
        assert np.all(post == 0.0)
        return
    assert abs(post[valid].mean()) < 1e-5
    np.testing.assert_allclose(post[valid].std(ddof=1), s / (s + EPS), rtol=1e-4)
