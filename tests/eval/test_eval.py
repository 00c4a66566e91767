"""b-CapScore (SPEC.md section 6) against hand-computed harmonic means."""
import jax.numpy as jnp
import numpy as np
import pytest

import balcap_jax.eval
from balcap_jax.eval import b_capscore, b_capscore_details

NAN = float("nan")


def test_scalar_hand_computed():
    # harmonic mean of (.5, .25, 1): 3 / (2 + 4 + 1) = 3/7
    assert b_capscore(.5, .25, 1.) == pytest.approx(300 / 7, rel=1e-12)
    assert b_capscore(1, 1, 1) == 100.0
    assert balcap_jax.eval.b_capscore is b_capscore


def test_per_image_mean_zero_part_and_nan_dropped():
    p = np.array([.5, .8, 0., .6, NAN])
    r = np.array([.25, .8, .9, NAN, .5])
    l = np.array([1., .8, .7, .5, .5])
    d = b_capscore_details(p, r, l)
    # images: 3/7, .8, 0 (a zero part), dropped, dropped
    assert d.n_used == 3 and d.n_dropped == 2
    assert d.score == pytest.approx((3 / 7 + .8 + 0.) / 3 * 100, rel=1e-12)
    np.testing.assert_allclose(d.per_image[:3], [3 / 7, .8, 0.])
    assert np.isnan(d.per_image[3:]).all()
    assert b_capscore(p, r, l) == d.score


def test_two_zero_parts_is_zero_not_nan():
    assert b_capscore([0.], [0.], [.5]) == 0.0


def test_all_nan_and_empty_give_nan():
    d = b_capscore_details([NAN, .5], [.5, NAN], [.5, .5])
    assert np.isnan(d.score) and d.n_used == 0 and d.n_dropped == 2
    assert np.isnan(b_capscore([], [], []))


def test_accepts_jax_arrays_float32():
    p = jnp.array([.5, 1.], jnp.float32)
    r = jnp.array([.25, 1.], jnp.float32)
    l = jnp.array([1., 1.], jnp.float32)
    assert b_capscore(p, r, l) == pytest.approx((3 / 7 + 1) / 2 * 100, rel=1e-6)


def test_harmonic_mean_bounded_by_min_and_mean():
    rng = np.random.default_rng(0)
    p, r, l = rng.uniform(0.01, 1, (3, 50))
    per = b_capscore_details(p, r, l).per_image
    stacked = np.stack([p, r, l])
    assert np.all(per <= stacked.mean(0) + 1e-12) and np.all(per >= stacked.min(0) - 1e-12)


def test_errors():
    with pytest.raises(ValueError, match="one value per image"):
        b_capscore([.1, .2], [.1], [.1, .2])
    with pytest.raises(ValueError, match=r"recall must lie in \[0, 1\]"):
        b_capscore([.1], [1.5], [.1])
    with pytest.raises(ValueError, match="linguistic must be real"):
        b_capscore([.1], [.1], ["a"])
