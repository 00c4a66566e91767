"""A scripted reward for smoke runs and learning tests (no judge, no image)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from balcap_jax.rewards.types import ScoreResult

__all__ = ["TokenFrequencyScorer"]


class TokenFrequencyScorer:
    """Scripted reward for smoke runs and learning tests: the share of a caption's tokens that
    are target tokens (``context["token_ids"]`` [N, L] with ``context["lengths"]``).

    It is deliberately trivial so that a tiny random policy can learn it in a few dozen steps;
    it exposes the reward under every name in ``names`` so the K-channel machinery is exercised.
    """

    def __init__(self, token_ids: int | Sequence[int], names: Sequence[str] = ("frequency",)):
        self.token_ids = np.unique(np.atleast_1d(np.asarray(token_ids, np.int64)))
        self.names = tuple(names)

    def __call__(self, images, captions, references, **context) -> ScoreResult:
        ids = np.asarray(context["token_ids"])
        lengths = np.asarray(context["lengths"])
        valid = np.arange(ids.shape[1])[None, :] < lengths[:, None]
        hits = (np.isin(ids, self.token_ids) & valid).sum(1)
        freq = (hits / np.maximum(lengths, 1)).astype(np.float32)
        return ScoreResult({n: freq for n in self.names},
                           {"target_token_share": float(freq.mean())})
