"""b-CapScore, BalCapRL's balanced caption metric (SPEC.md section 6). Host-side numpy.

Per image: the harmonic mean of precision r_P, recall r_R and the UNMASKED linguistic score r_L
(0 if any part is 0). Images with a NaN part (a judge failure) are dropped and counted, never
scored. The score is the mean over the remaining images times 100; NaN if none remain.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

_RANGE_TOL = 1e-6   # judge probabilities may overshoot [0, 1] by float rounding


class CapScoreDetails(NamedTuple):
    score: float          # mean harmonic mean x 100 over the images used; NaN if none
    n_used: int           # images with all three parts present
    n_dropped: int        # images with a NaN part (judge failures)
    per_image: np.ndarray  # harmonic mean per image in [0, 1], NaN where dropped


def _parts(precision, recall, linguistic):
    # np.asarray accepts numpy, jax arrays (device_get) and Python scalars alike.
    arrays = {}
    for name, x in (("precision", precision), ("recall", recall), ("linguistic", linguistic)):
        a = np.asarray(x)
        if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
            raise ValueError(f"{name} must be real numbers in [0, 1], got dtype {a.dtype}.")
        a = a.astype(np.float64).reshape(-1)
        bad = ~np.isnan(a) & ((a < -_RANGE_TOL) | (a > 1 + _RANGE_TOL))
        if bad.any():
            raise ValueError(f"{name} must lie in [0, 1] (NaN marks a judge failure); got "
                             f"{a[bad][:5].tolist()} at image(s) "
                             f"{np.flatnonzero(bad)[:5].tolist()}.")
        arrays[name] = np.clip(a, 0.0, 1.0)
    shapes = {k: v.shape for k, v in arrays.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"precision, recall and linguistic need one value per image each, got "
                         f"lengths {shapes}.")
    return arrays["precision"], arrays["recall"], arrays["linguistic"]


def b_capscore_details(precision, recall, linguistic) -> CapScoreDetails:
    """b-CapScore with the counts behind it; see `b_capscore`."""
    p, r, l = _parts(precision, recall, linguistic)
    dropped = np.isnan(p) | np.isnan(r) | np.isnan(l)
    any_zero = (p == 0) | (r == 0) | (l == 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        hm = 3.0 / (1.0 / p + 1.0 / r + 1.0 / l)
    per_image = np.where(dropped, np.nan, np.where(any_zero, 0.0, hm))
    n_used = int((~dropped).sum())
    score = float(per_image[~dropped].mean() * 100.0) if n_used else float("nan")
    return CapScoreDetails(score, n_used, int(dropped.sum()), per_image)


def b_capscore(precision, recall, linguistic) -> float:
    """Mean over images of the harmonic mean of (r_P, r_R, r_L), times 100.

    Scalars or per-image arrays (numpy or jax, any shape, flattened; all the same size).
    Images with a NaN part are dropped (`b_capscore_details` counts them); all NaN -> NaN.
    """
    return b_capscore_details(precision, recall, linguistic).score
