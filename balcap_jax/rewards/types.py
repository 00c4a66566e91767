"""The value types rewards pass around: what a scorer returns and what a judge answers.

A scorer takes N rollouts (images, decoded captions, the references of each rollout's image)
and returns a `ScoreResult`: one float array [N] per reward name plus diagnostics. Rewards live
in [0, 1] for the BalCapRL channels; NaN means "could not be judged" (a judge-side failure,
SPEC.md section 2) and is left out of the normalisation, never replaced by a guess.

A judge backend answers `Query`s with `Answer`s, one per query; an Answer with `error` set is a
judge-side failure with that reason. This module imports nothing from the package, so the
trainer, the scorers and the backends all depend on it and not on each other.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Protocol, Sequence

import numpy as np

__all__ = ["ScoreResult", "Scorer", "Query", "Answer", "JudgeBackend"]


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


@dataclasses.dataclass(frozen=True)
class Query:
    """One judge question: [image] shared + item (see prompts.py). Queries with the same image
    object and shared text may share an encoded prefix."""
    shared: str
    item: str
    image: Any = None

    @property
    def text(self) -> str:
        return self.shared + self.item


class Answer(NamedTuple):
    value: Any
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class JudgeBackend(Protocol):
    name: str

    def decompose(self, queries: Sequence[Query]) -> list[Answer]: ...
    def yes_no(self, queries: Sequence[Query]) -> list[Answer]: ...
    def digits(self, queries: Sequence[Query]) -> list[Answer]: ...
