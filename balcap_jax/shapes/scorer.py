"""Exact BalCapRL rewards for ShapesWorld: the judges of SPEC.md section 2 replaced by code.

A caption is parsed by the world's grammar (`balcap_jax.shapes.grammar`) into atomic
assertions, which are checked against the scene graph:

- precision = true assertions / all assertions. Commentary is grammatical but not pointable, so
  each commentary sentence is one false assertion; a sentence the grammar cannot parse is one
  false assertion. No assertion at all (empty caption) -> 0, a caption-side failure.
- recall = reference units covered / reference units, where the units are the assertions of the
  reference caption, resolved to scene facts (count, background, (object, attribute, value),
  relation). A caption covers a unit when it truthfully states the same fact; a relation is also
  covered when the caption states both objects' positions (it follows from them). With several
  references, the mean over them. A reference without units gives NaN (a data-side failure that
  is counted, never guessed).
- linguistic = mean of fluency (share of sentences that parse and are well formed), clarity
  (share of assertions that parse and do not repeat an earlier one of the same caption) and
  coherence (1, minus 0.5 if the caption stops mid-sentence, minus 0.5 if it contradicts
  itself: two counts, two backgrounds, or two different objects placed in one cell); 0 when no
  sentence parses (noise, or an empty caption). Text only, like the paper's text judge.

An object mention is matched to the scene object it most plausibly means: among the objects
sharing its shape or its position (all objects if it states neither), the one agreeing on the
most stated attributes (ties: the one at the stated position, then reading order). Each stated
attribute is then true or false of that object; with no candidate, all are false.

The scene of each rollout comes from the context: `scenes=` (scene dicts or their JSON text, as
in the dataset's `scene` feature), or `image_ids=` (ShapesWorld ids, regenerated).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Sequence

import numpy as np

from balcap_jax.rewards.types import ScoreResult
from balcap_jax.shapes.grammar import ParsedCaption, parse_caption
from balcap_jax.shapes.world import as_scene, relation_holds, scene_from_id

__all__ = ["ShapesScorer", "CaptionScore", "score_caption", "resolve_mention", "linguistic"]

NAMES = ("precision", "recall", "linguistic")


@dataclasses.dataclass
class CaptionScore:
    precision: float
    recall: float
    linguistic: float
    assertions: int = 0
    true_assertions: int = 0
    unparsable: int = 0
    commentary: int = 0
    hedged: int = 0
    repeated: int = 0
    contradictions: int = 0
    terminated: bool = True
    reference_units: float = 0.0


def resolve_mention(desc: Sequence[tuple[str, Any]], objects: Sequence[Mapping[str, Any]]
                    ) -> tuple[int | None, dict[str, bool]]:
    """(index of the object a mention means or None, {attribute: true?}); see the module doc."""
    attrs = dict(desc)
    anchors = {k: attrs[k] for k in ("shape", "position") if k in attrs}
    cands = [i for i, o in enumerate(objects)
             if not anchors or any(o[k] == v for k, v in anchors.items())]
    if not cands:
        return None, {k: False for k in attrs}
    pos = attrs.get("position")

    def rank(i):
        o = objects[i]
        return (sum(o[k] == v for k, v in attrs.items()), pos is not None and o["position"] == pos,
                -i)
    best = max(cands, key=rank)
    return best, {k: objects[best][k] == v for k, v in attrs.items()}


def _rel_keys(a: Mapping, rel: str, b: Mapping, objects) -> set[tuple]:
    """Canonical facts ("h", left, right) / ("v", upper, lower) of every object pair matching
    the two descriptions for which the relation holds."""
    da, db = dict(a), dict(b)
    keys = set()
    for i, oi in enumerate(objects):
        if not all(oi[k] == v for k, v in da.items()):
            continue
        for j, oj in enumerate(objects):
            if i == j or not all(oj[k] == v for k, v in db.items()):
                continue
            if relation_holds(oi, rel, oj):
                keys.add({"left of": ("h", i, j), "right of": ("h", j, i),
                          "above": ("v", i, j), "below": ("v", j, i)}[rel])
    return keys


def _facts(parsed: ParsedCaption, scene: Mapping) -> tuple[list[bool], set, list]:
    """(truth of each assertion, the true facts stated, per-assertion fact keys)."""
    objects = scene["objects"]
    resolved = [resolve_mention(m, objects) for m in parsed.mentions]
    truths, facts, keys = [], set(), []
    for a in parsed.assertions:
        if a.kind == "count":
            ok, key = a.value == len(objects), {("count", a.value)}
        elif a.kind == "background":
            ok, key = a.value == scene["background"], {("background", a.value)}
        elif a.kind == "attr":
            idx, attr_truth = resolved[a.mention]
            ok = bool(attr_truth[a.attr])
            key = {("attr", idx, a.attr, a.value)} if idx is not None else set()
        elif a.kind == "rel":
            key = _rel_keys(a.desc_a, a.rel, a.desc_b, objects)
            ok = bool(key)
        else:  # commentary, unparsable: not pointable / not understood
            ok, key = False, set()
        truths.append(ok)
        keys.append(key)
        if ok:
            facts |= key
    return truths, facts, keys


def _units(reference: str, scene: Mapping) -> list[frozenset]:
    """The reference's units: one set of equivalent fact keys per distinct assertion."""
    parsed = parse_caption(reference)
    _, _, keys = _facts(parsed, scene)
    units = []
    for a, key in zip(parsed.assertions, keys):
        if a.kind in ("commentary", "unparsable"):
            continue
        unit = frozenset(key) if key else frozenset({("false", a)})
        if unit not in units:
            units.append(unit)
    return units


def _covered(unit: frozenset, facts: set, scene: Mapping) -> bool:
    if unit & facts:
        return True
    objects = scene["objects"]
    for key in unit:  # a relation follows from both objects' stated positions
        if key[0] in ("h", "v"):
            i, j = key[1], key[2]
            if ("attr", i, "position", objects[i]["position"]) in facts and \
                    ("attr", j, "position", objects[j]["position"]) in facts:
                return True
    return False


def _text_key(parsed: ParsedCaption, a) -> tuple | None:
    """What an assertion says, from the text alone (for repeats and contradictions)."""
    if a.kind == "attr":
        m = dict(parsed.mentions[a.mention])
        who = ("pos", m["position"]) if "position" in m else ("desc", m.get("color"),
                                                              m.get("shape"))
        return ("attr", who, a.attr, a.value)
    if a.kind == "rel":
        flip = a.rel in ("right of", "below")
        axis = "h" if a.rel in ("left of", "right of") else "v"
        return ("rel", axis) + ((a.desc_b, a.desc_a) if flip else (a.desc_a, a.desc_b))
    if a.kind in ("count", "background", "commentary"):
        return (a.kind, a.value)
    return None


def linguistic(parsed: ParsedCaption) -> tuple[float, int, int]:
    """(score, repeated assertions, contradictions) of a parsed caption; see the module doc."""
    if all(s.kind == "unparsable" for s in parsed.sentences):  # also: no sentence at all
        return 0.0, 0, 0
    fluency = sum(s.well_formed for s in parsed.sentences) / len(parsed.sentences)
    seen, repeated, unclear = set(), 0, 0
    values: dict[tuple, set] = {}
    for a in parsed.assertions:
        key = _text_key(parsed, a)
        if key is None:  # an unparsable sentence says nothing clearly
            unclear += 1
            continue
        repeated += key in seen
        seen.add(key)
        if a.kind in ("count", "background"):
            values.setdefault((a.kind,), set()).add(a.value)
        elif a.kind == "attr" and key[1][0] == "pos" and a.attr in ("shape", "color"):
            values.setdefault((key[1], a.attr), set()).add(a.value)
    clarity = 1.0 - (repeated + unclear) / len(parsed.assertions)
    contradictions = sum(len(v) > 1 for v in values.values())
    coherence = 1.0 - 0.5 * (not parsed.terminated) - 0.5 * (contradictions > 0)
    return (fluency + clarity + coherence) / 3.0, repeated, contradictions


def score_caption(caption: str, references: Sequence[str], scene) -> CaptionScore:
    """The three rewards of one caption, with the counts behind them."""
    scene = as_scene(scene)
    if isinstance(references, str):
        raise TypeError("references must be a list of strings, not one string")
    if not references:
        raise ValueError("a ShapesWorld rollout has no reference caption; every example "
                         "needs at least one")
    parsed = parse_caption(caption)
    truths, facts, _ = _facts(parsed, scene)
    n = len(truths)
    precision = sum(truths) / n if n else 0.0
    recalls, n_units = [], []
    for ref in references:
        units = _units(ref, scene)
        n_units.append(len(units))
        if units:
            recalls.append(sum(_covered(u, facts, scene) for u in units) / len(units))
    recall = float(np.mean(recalls)) if recalls else math.nan
    ling, repeated, contradictions = linguistic(parsed)
    kinds = [s.kind for s in parsed.sentences]
    return CaptionScore(
        precision=precision, recall=recall, linguistic=ling, assertions=n,
        true_assertions=int(sum(truths)), unparsable=kinds.count("unparsable"),
        commentary=kinds.count("commentary"), hedged=kinds.count("hedge"), repeated=repeated,
        contradictions=contradictions, terminated=parsed.terminated,
        reference_units=float(np.mean(n_units)))


@functools.lru_cache(maxsize=4096)
def _scene_from_id(ident: str) -> dict:
    """scene_from_id, cached: a step scores G rollouts of each image, and evaluation the same
    held-out images every time, so each scene is rebuilt from its id once."""
    return scene_from_id(ident)


class ShapesScorer:
    """The scorer interface of `balcap_jax.rewards.types` for ShapesWorld (module doc).

    Context: `scenes=` [N] scene dicts or JSON strings (the examples' `scene` feature, repeated
    per rollout like the references), or `image_ids=` [N] ShapesWorld ids. Images are unused:
    the scene graph is the ground truth they were rendered from.
    """

    names = NAMES

    def __call__(self, images, captions: Sequence[str], references: Sequence[Sequence[str]],
                 **context) -> ScoreResult:
        n = len(captions)
        if len(references) != n:
            raise ValueError(f"{n} captions but {len(references)} reference lists")
        if context.get("scenes") is not None:
            scenes = [as_scene(s) for s in context["scenes"]]
        elif context.get("image_ids") is not None:
            scenes = [_scene_from_id(str(i)) for i in context["image_ids"]]
        else:
            raise ValueError("ShapesScorer needs the scene of each rollout: pass scenes=[...] "
                             "(the examples' `scene` feature, one per rollout) or image_ids=")
        if len(scenes) != n:
            raise ValueError(f"{n} captions but {len(scenes)} scenes in the context; repeat "
                             "each example's scene for each of its rollouts")
        scores = [score_caption(c, r, s) for c, r, s in zip(captions, references, scenes)]
        rewards = {name: np.array([getattr(s, name) for s in scores], np.float32)
                   for name in NAMES}

        def mean(field):
            return float(np.mean([float(getattr(s, field)) for s in scores])) if scores else 0.0
        diagnostics = {
            "assertions": mean("assertions"), "true_assertions": mean("true_assertions"),
            "unparsable_sentences": mean("unparsable"), "commentary_sentences": mean("commentary"),
            "hedged_sentences": mean("hedged"), "repeated_assertions": mean("repeated"),
            "contradictions": mean("contradictions"),
            "unterminated": float(np.mean([not s.terminated for s in scores])) if scores else 0.0,
            "empty_captions": float(sum(s.assertions == 0 for s in scores)),
            "reference_units": mean("reference_units"),
            "recall_nan": float(np.isnan(rewards["recall"]).sum())}
        return ScoreResult(rewards, diagnostics)
