"""Length-conditional masking and the linear length penalty (SPEC.md section 3)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from balcap_jax.rl import length

mask = jax.jit(length.length_conditional_mask, static_argnames=("tau_low", "tau_high"))
NAN = float("nan")


def test_bounds_inclusive_and_just_outside_zeroed():
    ref = jnp.full(6, 100, jnp.int32)
    gen = jnp.array([50, 200, 49, 201, 100, 0], jnp.int32)       # rho .5, 2, .49, 2.01, 1, 0
    r = jnp.array([.9, .8, .7, .6, .5, .4], jnp.float32)
    np.testing.assert_array_equal(mask(r, gen, ref), np.float32([.9, .8, 0., 0., .5, 0.]))


def test_float_lengths_at_exact_bounds_and_next_float():
    ref = jnp.array([10., 10., 10., 10.], jnp.float32)
    gen = jnp.array([5., 20., np.nextafter(np.float32(5.), np.float32(0.)),
                     np.nextafter(np.float32(20.), np.float32(30.))], jnp.float32)
    np.testing.assert_array_equal(mask(jnp.ones(4), gen, ref), [1., 1., 0., 0.])


def test_custom_window():
    ref = jnp.full(3, 10)
    gen = jnp.array([7, 30, 31])
    out = length.length_conditional_mask(jnp.ones(3), gen, ref, tau_low=0.7, tau_high=3.0)
    np.testing.assert_array_equal(out, [1., 1., 0.])


def test_nan_reward_stays_nan_and_bad_reference_is_outside():
    r = jnp.array([NAN, NAN, .5, .5], jnp.float32)
    gen = jnp.array([10, 100, 10, 10])
    ref = jnp.array([10, 10, 0, -3])
    out = np.asarray(mask(r, gen, ref))
    assert np.isnan(out[0]) and np.isnan(out[1])           # in and out of window: still NaN
    np.testing.assert_array_equal(out[2:], [0., 0.])       # ref_len <= 0 -> rho NaN -> outside
    assert np.isnan(length.length_ratio(3, 0))


def test_linear_penalty_hand_computed():
    gen = jnp.array([100, 150, 50, 300, 0])
    ref = jnp.array([100, 100, 100, 100, 100])
    np.testing.assert_allclose(length.linear_length_penalty(gen, ref),
                               [0., -.5, -.5, -2., -1.], rtol=1e-7)
    np.testing.assert_allclose(length.linear_length_penalty(gen, ref, coef=0.5),
                               [0., -.25, -.25, -1., -.5], rtol=1e-7)
    assert np.isnan(length.linear_length_penalty(jnp.array([5]), jnp.array([0]))[0])


def test_mean_reference_length_and_broadcasting_and_vmap():
    # several references: the caller passes their mean length, fractional is fine
    out = length.length_conditional_mask(jnp.ones((2, 3)), jnp.array([[4, 6, 21]] * 2),
                                         jnp.array([[10.5], [2.5]]))
    np.testing.assert_array_equal(out, [[0., 1., 1.], [1., 0., 0.]])  # rho .38 .57 2 | 1.6 2.4 8.4
    v = jax.vmap(lambda r, g, f: length.linear_length_penalty(g, f))(
        jnp.ones((2, 3)), jnp.array([[10, 20, 5]] * 2), jnp.array([10., 20.]))
    np.testing.assert_allclose(v, [[0., -1., -.5], [-.5, 0., -.75]])


def test_errors():
    with pytest.raises(ValueError, match="broadcastable shapes"):
        length.length_conditional_mask(jnp.ones(3), jnp.ones(4), jnp.ones(3))
    with pytest.raises(ValueError, match="tau_low <= tau_high"):
        length.length_conditional_mask(jnp.ones(3), jnp.ones(3), jnp.ones(3), tau_low=2.,
                                       tau_high=1.)
    with pytest.raises(ValueError, match="gen_len must be a float or integer"):
        length.length_ratio(jnp.ones(3, bool), jnp.ones(3))
