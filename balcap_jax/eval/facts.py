"""Fact-level precision, recall and F1, DCScore-style (DeCapBench, arXiv 2503.07906).

The judge splits the caption and the references into atomic facts, verifies each caption fact
against the image (precision: the share that is true) and checks each reference fact against
the caption (recall: the share the caption states); F1 is their harmonic mean, per image.
A caption without facts has precision 0; references without facts give NaN recall (a data-side
gap, counted, not scored). Judge failures on single facts are left out of that image's shares.
DeCapBench's published DCScore adds a relevance flag and human oracle facts; this is the same
measurement with the references as the oracle, on whatever judge is configured.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from balcap_jax.eval.judges import EvalJudge, FactItem, FactResult

__all__ = ["fact_scores", "prf"]


def _share(flags: Sequence[bool | None]) -> float:
    known = [f for f in flags if f is not None]
    return float(np.mean(known)) if known else float("nan")


def prf(r: FactResult) -> tuple[float, float, float]:
    """(precision, recall, F1) of one image."""
    p = _share(r.true) if r.caption_facts else 0.0
    rec = _share(r.covered) if r.reference_facts else float("nan")
    if np.isnan(p) or np.isnan(rec):
        return p, rec, float("nan")
    return p, rec, (2 * p * rec / (p + rec) if p + rec > 0 else 0.0)


def fact_scores(judge: EvalJudge, captions: Mapping[str, str],
                references: Mapping[str, Sequence[str]], *, batch: int = 64) -> dict:
    """{"per_image": {"fact_precision", "fact_recall", "fact_f1"} arrays in `captions`' order,
    "details": [FactResult] (the gallery highlights the false facts)}."""
    keys = list(captions)
    items = [FactItem(k, captions[k], tuple(references[k])) for k in keys]
    results: list[FactResult] = []
    for s in range(0, len(items), batch):
        results += judge.facts(items[s:s + batch])
    arr = np.asarray([prf(r) for r in results], np.float64).reshape(-1, 3)
    return {"per_image": {"fact_precision": arr[:, 0], "fact_recall": arr[:, 1],
                          "fact_f1": arr[:, 2]}, "details": results}
