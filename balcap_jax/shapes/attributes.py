"""What a ShapesWorld captioner gets right, attribute by attribute (a diagnostic, not a reward).

b-CapScore says how good captions are; this says why. Each object mention of a caption is
resolved to the scene object it means (`balcap_jax.shapes.scorer.resolve_mention`, the same
matching the precision reward uses) and each stated attribute is checked:

    accuracy[attr]   share of stated `attr` values that are true (shape chance: 1/4)
    stated[attr]     how many were stated
    described[row]   share of the scene's objects in grid row `row` (top / middle / bottom)
                     that some mention resolves to (the warm start leaves out the bottom row)

The demo writes this for the warm start, the RL policy and the control (summary.json,
`attributes`), which is how a low score is traced to perception (wrong shapes) or to the
systematic errors RL is meant to remove (omissions, commentary).
"""
from __future__ import annotations

from typing import Mapping, Sequence

from balcap_jax.shapes.grammar import parse_caption
from balcap_jax.shapes.scorer import resolve_mention
from balcap_jax.shapes.world import as_scene

__all__ = ["attribute_report", "ROWS"]

ROWS = ("top", "middle", "bottom")


def attribute_report(captions: Sequence[str], scenes: Sequence[Mapping]) -> dict:
    """Per-attribute accuracy and per-row coverage over (caption, scene) pairs (module doc);
    scenes as dicts or their JSON text. An attribute never stated is absent from `accuracy`
    and `stated`; a row without objects gives None in `described`."""
    if len(captions) != len(scenes):
        raise ValueError(f"{len(captions)} captions but {len(scenes)} scenes")
    right: dict[str, int] = {}
    stated: dict[str, int] = {}
    seen = [0] * len(ROWS)
    hit = [0] * len(ROWS)
    for caption, scene in zip(captions, scenes):
        objects = as_scene(scene)["objects"]
        described = set()
        for mention in parse_caption(caption).mentions:
            idx, truth = resolve_mention(mention, objects)
            if idx is not None:
                described.add(idx)
            for attr, ok in truth.items():
                stated[attr] = stated.get(attr, 0) + 1
                right[attr] = right.get(attr, 0) + bool(ok)
        for i, o in enumerate(objects):
            seen[o["row"]] += 1
            hit[o["row"]] += i in described
    return {"accuracy": {a: right[a] / stated[a] for a in sorted(stated)},
            "stated": dict(sorted(stated.items())),
            "described": {r: (hit[k] / seen[k] if seen[k] else None)
                          for k, r in enumerate(ROWS)}}
