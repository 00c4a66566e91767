"""The scorer interface the trainer calls, and the scripted scorer of the smoke configs.

A scorer takes N rollouts (images, decoded captions, the references of each rollout's image)
and returns one float array [N] per reward name plus diagnostics. Rewards live in [0, 1] for
the BalCapRL channels; NaN means "could not be judged" (a judge-side failure, SPEC.md section
2) and is left out of the normalisation, never replaced by a guess. Scorers run on the host
between the sampler and the loss; the jitted judge models inside them keep their own
parameters and shardings.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Protocol, Sequence

import numpy as np

__all__ = ["ScoreResult", "Scorer", "TokenFrequencyScorer", "make_scorer", "SCORERS"]

# Scorer names a config may use (make_scorer builds them).
SCORERS = ("token_frequency", "shapes", "judges")


@dataclasses.dataclass
class ScoreResult:
    rewards: dict[str, np.ndarray]                 # name -> float32 [N]
    diagnostics: dict[str, float] = dataclasses.field(default_factory=dict)

    def stack(self, names: Sequence[str]) -> np.ndarray:
        """Rewards [N, K] in the order of ``names``; a missing name is an error naming it."""
        missing = [n for n in names if n not in self.rewards]
        if missing:
            raise KeyError(f"scorer returned rewards {sorted(self.rewards)} but the config asks "
                           f"for {missing}; fix rl.rewards or the scorer")
        return np.stack([np.asarray(self.rewards[n], np.float32) for n in names], axis=-1)


class Scorer(Protocol):
    def __call__(self, images: Sequence[Any], captions: Sequence[str],
                 references: Sequence[Sequence[str]], **context: Any) -> ScoreResult: ...


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


def make_scorer(cfg, tokenizer, *, mesh=None, rules=None) -> Scorer:
    """Builds the scorer named by ``cfg.scorer.name`` (judges get their own mesh/rules)."""
    name = cfg.scorer.name
    if name == "token_frequency":
        ids = []
        for tok in cfg.scorer.tokens:
            enc = tokenizer.encode(tok, add_special_tokens=False)
            if len(enc) != 1:
                raise ValueError(f"scorer.tokens entry {tok!r} is {len(enc)} tokens for this "
                                 "tokenizer; use strings that are exactly one token each")
            ids += enc
        return TokenFrequencyScorer(ids, names=tuple(cfg.rl.rewards))
    if name == "shapes":
        from balcap_jax.rewards.shapes import ShapesScorer
        return ShapesScorer()
    if name == "judges":
        from balcap_jax.rewards.balcap import from_config
        return from_config(cfg, mesh=mesh, rules=rules)
    raise ValueError(f"unknown scorer.name={name!r}; known: {SCORERS}")
