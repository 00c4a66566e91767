"""The exact evaluation judge of ShapesWorld (the `eval.judges.EvalJudge` interface), and the
world's CaptionQA-format questions.

Each image key is a ShapesWorld image id (or a path ending in one), so the scene graph it was
rendered from answers every question exactly, as the exact scorer (scorer.py) stands in for
the reward judges:
- answer: the caption is parsed by the world's grammar and the question is answered from what
  it states alone (the question's "ask" field says what it asks); nothing stated -> "cannot
  answer", something stated that no option says -> -1 (a wrong answer, not a failure).
- facts: the caption's facts are its parsed assertions, true when the scene agrees (commentary
  and unparsable sentences are facts that are not true); the reference facts are the
  reference's units, covered as the recall reward covers them.
- compare: the caption with the higher per-image b-CapScore part (harmonic mean of precision,
  recall, linguistic against the shown reference) wins; equal is a tie. No position enters.
"""
from __future__ import annotations

import functools
import os
import random
from typing import Sequence

from balcap_jax.eval.judges import FactItem, FactResult, PairItem, QAItem
from balcap_jax.eval.qa import CANNOT_ANSWER
from balcap_jax.shapes import world
from balcap_jax.shapes.grammar import parse_caption
from balcap_jax.shapes.scorer import _covered, _facts, score_caption

__all__ = ["ShapesEvalJudge", "shapes_questions"]


@functools.lru_cache(maxsize=4096)
def _scene(key: str) -> dict:
    return world.scene_from_id(os.path.basename(key))


def _desc_words(desc) -> str:
    d = dict(desc)
    words = [d[k] for k in ("size", "color") if k in d] + [d.get("shape", "shape")]
    return " ".join(words) + (f" at {d['position']}" if "position" in d else "")


def _render(parsed, a, sentence: str) -> str:
    """One assertion as a short English fact."""
    if a.kind == "count":
        return f"there are {a.value} shapes"
    if a.kind == "background":
        return f"the background is {a.value}"
    if a.kind == "attr":
        return f"the {_desc_words(parsed.mentions[a.mention])}: {a.attr} {a.value}"
    if a.kind == "rel":
        return f"a {_desc_words(a.desc_a)} is {a.rel} a {_desc_words(a.desc_b)}"
    return sentence          # commentary or an unparsable sentence, as written


def _assertions_with_text(parsed):
    return [(a, s.text) for s in parsed.sentences for a in s.assertions]


def _hm(caption: str, reference: str, scene) -> float:
    s = score_caption(caption, [reference], scene)
    parts = (s.precision, s.recall, s.linguistic)
    if any(p != p for p in parts):
        return float("nan")
    return 0.0 if min(parts) <= 0 else 3.0 / sum(1.0 / p for p in parts)


class ShapesEvalJudge:
    """See the module docstring."""

    name = "shapesworld-exact"

    def metadata(self) -> dict:
        return {"judge": self.name, "prompt_versions": {},
                "note": "exact answers from the scene graph (no language model)"}

    def answer(self, items: Sequence[QAItem]) -> list[int | None]:
        out = []
        for it in items:
            choices = [str(c) for c in it.question["choices"]]
            ask = it.question.get("ask") or {}
            parsed = parse_caption(it.caption)
            stated = None
            if ask.get("kind") in ("count", "background"):
                vals = [a.value for a in parsed.assertions if a.kind == ask["kind"]]
                stated = vals[-1] if vals else None
            elif ask.get("kind") == "attr":
                for a in parsed.assertions:
                    m = dict(parsed.mentions[a.mention]) if a.kind == "attr" else {}
                    if m.get("position") == ask["position"] and a.attr == ask["attr"]:
                        stated = a.value
            if stated is None:
                out.append(choices.index(CANNOT_ANSWER) if CANNOT_ANSWER in choices else None)
            else:
                out.append(choices.index(str(stated)) if str(stated) in choices else -1)
        return out

    def facts(self, items: Sequence[FactItem]) -> list[FactResult]:
        out = []
        for it in items:
            scene = _scene(it.image)
            parsed = parse_caption(it.caption)
            truths, facts, _ = _facts(parsed, scene)
            cap = [_render(parsed, a, t) for a, t in _assertions_with_text(parsed)]
            ref_facts, covered = [], []
            for ref in it.references:
                rp = parse_caption(ref)
                _, _, keys = _facts(rp, scene)
                seen = []
                for (a, text), key in zip(_assertions_with_text(rp), keys):
                    if a.kind in ("commentary", "unparsable"):
                        continue
                    unit = frozenset(key) if key else frozenset({("false", a)})
                    if unit in seen:
                        continue
                    seen.append(unit)
                    ref_facts.append(_render(rp, a, text))
                    covered.append(_covered(unit, facts, scene))
            out.append(FactResult(cap, [bool(t) for t in truths], ref_facts, covered))
        return out

    def compare(self, items: Sequence[PairItem]) -> list[int | None]:
        out = []
        for it in items:
            scene = _scene(it.image)
            a, b = _hm(it.first, it.reference, scene), _hm(it.second, it.reference, scene)
            if a != a or b != b:
                out.append(None)
            else:
                out.append(0 if abs(a - b) < 1e-9 else (1 if a > b else 2))
        return out


def _options(true, pool, rng: random.Random, n: int = 4) -> list[str]:
    others = [str(p) for p in pool if str(p) != str(true)]
    rng.shuffle(others)
    return [str(true)] + others[:n - 1]


def shapes_questions(image_ids: Sequence[str], *, seed: int = 0) -> dict[str, list[dict]]:
    """CaptionQA-format questions of each scene: the count, the background, and each object's
    colour and shape by its position; options are the truth and up to 3 others. Each carries
    an "ask" field the exact judge reads (an LLM judge ignores it)."""
    out: dict[str, list[dict]] = {}
    for key in image_ids:
        scene = _scene(key)
        rng = random.Random(f"{seed}:{key}")
        n = len(scene["objects"])
        qs = [{"question": "How many shapes are in the image?",
               "choices": _options(n, range(1, 5), rng), "answer": str(n),
               "ask": {"kind": "count"}},
              {"question": "What colour is the background?",
               "choices": _options(scene["background"], world.BACKGROUNDS, rng),
               "answer": scene["background"], "ask": {"kind": "background"}}]
        for o in scene["objects"]:
            for attr, pool in (("color", world.COLORS), ("shape", world.SHAPES)):
                qs.append({"question": f"What {attr} is the object in the {o['position']}?",
                           "choices": _options(o[attr], pool, rng), "answer": o[attr],
                           "ask": {"kind": "attr", "position": o["position"], "attr": attr}})
        out[key] = qs
    return out

