"""Pairwise win rate, CapArena-style (CapArena-Auto, arXiv 2503.12329).

For each image the judge sees the image, a human reference and two captions, the policy's and a
baseline's, and answers which is better or a tie. Every pair is judged twice with the positions
swapped. Per image, each order gives +1 (policy preferred), -1 (baseline preferred) or 0 (tie or
no answer), and the image scores their mean, so the score, CapArena's (wins - losses) / 2 per
comparison, lies in [-1, 1], and an order-biased judge cancels out instead of deciding.
Reported beside it: how often the two orders agree (`consistency`) and how often the first
position won (`first_position_rate`); a judge that always picks "Caption 1" has consistency 0
and a first-position rate of 1.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from balcap_jax.eval.judges import EvalJudge, PairItem

__all__ = ["pairwise_scores"]


def pairwise_scores(judge: EvalJudge, policy: Mapping[str, str], baseline: Mapping[str, str],
                    references: Mapping[str, list], *, batch: int = 64) -> dict:
    """{"per_image": {"pairwise": [N] in policy's order}, "wins", "losses", "ties", "failed",
    "consistency", "first_position_rate"}; images both caption and have a reference."""
    keys = list(policy)
    items = []
    for k in keys:
        ref = references[k][0] if references.get(k) else ""
        items.append(PairItem(k, ref, policy[k], baseline[k]))      # policy first
        items.append(PairItem(k, ref, baseline[k], policy[k]))      # swapped
    verdicts: list[int | None] = []
    for s in range(0, len(items), batch):
        verdicts += judge.compare(items[s:s + batch])
    a, b = verdicts[0::2], verdicts[1::2]
    signed_a = np.asarray([{1: 1, 2: -1}.get(v, 0) for v in a], np.float64)
    signed_b = np.asarray([{2: 1, 1: -1}.get(v, 0) for v in b], np.float64)
    decided = [v for v in verdicts if v in (1, 2)]
    both = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    agree = [(x == 0 and y == 0) or (x, y) in ((1, 2), (2, 1)) for x, y in both]
    signed = np.concatenate([signed_a, signed_b])
    return {"per_image": {"pairwise": (signed_a + signed_b) / 2},
            "wins": int((signed > 0).sum()), "losses": int((signed < 0).sum()),
            "ties": int(sum(v == 0 for v in verdicts)),
            "failed": int(sum(v is None for v in verdicts)),
            "consistency": float(np.mean(agree)) if agree else float("nan"),
            "first_position_rate": float(np.mean([v == 1 for v in decided])) if decided
            else float("nan")}
