"""ShapesWorld captions: references, the deliberately imperfect warm-start captions, the corpus.

`reference_caption(scene, rng)` states every fact of the scene once: the object count, the
background, each object's size, colour, shape and position (and "faint" for faint objects), in
varied templates, sometimes with one spatial relation. Every sentence parses with
`shapes_grammar` and every assertion is true.

`sft_caption(scene, rng, errors)` is what the supervised warm start imitates. Its errors are
systematic (the *mode* is wrong), because greedy decoding keeps a caption's mode and drops
anything it carries with probability below 0.5 (rates are `SftErrors` fields):
- a commentary sentence ("the picture feels calm.") on most captions (precision);
- objects in the bottom row usually left out (recall);
- orange usually called red (precision and recall);
- faint objects never described plainly; an optional hedged sentence ("there may also be a faint
  small blue circle at the bottom.") guesses at one, more often when there is one, and is right
  about half the time, so it raises recall when right and costs precision when wrong: the
  reward conflict (a policy that sees faint objects can learn when to say it);
- terse captions (count and one object) and verbose ones (up to three relations and each
  object restated twice) around the normal length, so sampled groups straddle the length
  window rho in [0.5, 2] of SPEC.md section 3.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from balcap_jax.shapes.grammar import COMMENTARY, HEDGES, NUMBER_WORDS
from balcap_jax.shapes.world import (
    COLORS,
    POSITION_CELLS,
    POSITIONS,
    SHAPES,
    SPLIT_IDS,
    as_scene,
    make_scene,
    relation_holds,
)

__all__ = ["SftErrors", "reference_caption", "sft_caption", "tokenizer_corpus",
           "SHAPES_PROMPT", "caption_rng", "words"]

SHAPES_PROMPT = "Describe this image."

_CORNER_PP = ("at the {p}", "in the {p} corner", "in the {p}")
_PP = {"top": ("at the top", "at the top center"), "bottom": ("at the bottom",
                                                             "at the bottom center"),
       "left": ("on the left", "on the left side", "at the left"),
       "right": ("on the right", "on the right side", "at the right"),
       "center": ("in the center", "in the middle")}
_OBJECT_TEMPLATES = ("{np} is {pp}", "{pp} there is {np}", "there is {np} {pp}",
                     "{np} sits {pp}")
_REL_TEXT = {"left of": "to the left of", "right of": "to the right of", "above": "above",
             "below": "below"}


@dataclasses.dataclass(frozen=True)
class SftErrors:
    """Rates of the warm start's systematic errors (see the module doc)."""
    commentary: float = 0.8        # P(a commentary sentence is appended)
    omit_row: int = 2              # objects in this grid row ...
    omit: float = 0.8              # ... are left out with this probability (per caption)
    confuse_from: str = "orange"   # this colour ...
    confuse_to: str = "red"        # ... is called this one
    confuse: float = 0.8           # with this probability (per caption)
    speculate_faint: float = 0.45  # P(a hedged sentence | the scene has a faint object)
    speculate_none: float = 0.25   # P(a hedged sentence | it has none): always a wrong guess
    speculate_right: float = 0.8   # P(the hedge names a real faint object | there is one)
    terse: float = 0.2             # P(count + first object only)
    verbose: float = 0.15          # P(+ up to 3 relations + each object restated twice)


def caption_rng(seed: int, split: str, index: int, draw: int = 0) -> np.random.Generator:
    """The rng for captions of example `index` of `split`. The dataset's reference uses draw 0;
    warm-start captions use draw 1 + epoch, so each epoch sees a fresh sample of the same
    systematic distribution."""
    return np.random.default_rng([seed, SPLIT_IDS[split], index, draw, 0x5CA9])


def words(text: str) -> int:
    """Whitespace words, the length unit of SPEC.md section 3."""
    return len(text.split())


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _np(obj: Mapping[str, Any], rng, *, color: str | None = None, faint: bool = True) -> str:
    parts = (["faint"] if faint and obj["faint"] else []) + [
        obj["size"], color or obj["color"], obj["shape"]]
    article = "an" if parts[0][0] in "aeiou" else "a"
    return " ".join([article] + parts)


def _pp(position: str, rng) -> str:
    if position in _PP:
        return _pick(rng, _PP[position])
    return _pick(rng, _CORNER_PP).format(p=position)


def _object_clause(obj, rng, **kw) -> str:
    return _pick(rng, _OBJECT_TEMPLATES).format(np=_np(obj, rng, **kw), pp=_pp(obj["position"],
                                                                               rng))


def _count(n: int, rng, bg: str | None) -> str:
    num = NUMBER_WORDS[n]
    if n == 1:
        text = _pick(rng, ("there is one shape", "the image shows one shape", "one shape appears"))
    else:
        text = _pick(rng, (f"there are {num} shapes", f"the image shows {num} shapes",
                           f"{num} shapes appear"))
    return text + (f" on a {bg} background" if bg else "")


def _relation(a, b, rng, colors=None) -> str | None:
    """A true relation sentence "the <a> is REL the <b>", or None if they share a cell line."""
    rels = [r for r in ("left of", "right of", "above", "below") if relation_holds(a, r, b)]
    if not rels:
        return None
    colors = colors or {}
    da = f"{colors.get(id(a), a['color'])} {a['shape']}"
    db = f"{colors.get(id(b), b['color'])} {b['shape']}"
    return f"the {da} is {_REL_TEXT[_pick(rng, rels)]} the {db}"


def _join(sentences: list[str]) -> str:
    return " ".join(s + "." for s in sentences)


def reference_caption(scene, rng: np.random.Generator) -> str:
    """A reference caption stating every fact of the scene (see the module doc)."""
    scene = as_scene(scene)
    objs = list(scene["objects"])
    bg = scene["background"]
    inline_bg = rng.random() < 0.7
    out = [_count(len(objs), rng, bg if inline_bg else None)]
    if not inline_bg and rng.random() < 0.5:
        out.append(f"the background is {bg}")
    if rng.random() < 0.3:
        objs = [objs[i] for i in rng.permutation(len(objs))]
    i = 0
    while i < len(objs):
        if i + 1 < len(objs) and rng.random() < 0.2:
            out.append(f"{_object_clause(objs[i], rng)} and {_object_clause(objs[i + 1], rng)}")
            i += 2
        else:
            out.append(_object_clause(objs[i], rng))
            i += 1
    if len(objs) >= 2 and rng.random() < 0.5:
        pairs = [(a, b) for a in objs for b in objs if a is not b]
        a, b = pairs[int(rng.integers(len(pairs)))]
        rel = _relation(a, b, rng)
        if rel:
            out.append(rel)
    if not inline_bg and f"the background is {bg}" not in out:
        out.append(f"the background is {bg}")
    return _join(out)


def _speculation(scene, rng, errors: SftErrors) -> str:
    faint = [o for o in scene["objects"] if o["faint"]]
    if faint and rng.random() < errors.speculate_right:
        obj = faint[int(rng.integers(len(faint)))]
    else:  # a made-up faint object in an empty cell (a guess, not a contradiction)
        taken = {o["position"] for o in scene["objects"]}
        cells = [p for p in POSITION_CELLS if p not in taken]
        obj = {"shape": _pick(rng, SHAPES), "color": _pick(rng, list(COLORS)), "size": "small",
               "faint": True, "position": _pick(rng, cells)}
    return f"{HEDGES[0]} {_np(obj, rng)} {_pp(obj['position'], rng)}"


def sft_caption(scene, rng: np.random.Generator, errors: SftErrors = SftErrors()) -> str:
    """A warm-start caption with the systematic errors of `errors` (see the module doc)."""
    scene = as_scene(scene)
    # All draws up front, so each error's rate does not depend on the others.
    u_omit, u_conf, u_mode, u_spec, u_comm = rng.random(5)
    objs = [o for o in scene["objects"] if not o["faint"]]
    if u_omit < errors.omit:
        objs = [o for o in objs if o["row"] != errors.omit_row]
    colors = {id(o): errors.confuse_to for o in objs
              if u_conf < errors.confuse and o["color"] == errors.confuse_from}
    terse = u_mode < errors.terse
    verbose = not terse and u_mode < errors.terse + errors.verbose
    bg = scene["background"]
    out = [_count(len(scene["objects"]), rng, None if terse else bg)]
    described = objs[:1] if terse else objs
    for o in described:
        out.append(_object_clause(o, rng, color=colors.get(id(o))))
    if verbose:
        rels = [_relation(a, b, rng, colors) for i, a in enumerate(objs) for b in objs[i + 1:]]
        out += [r for r in rels if r][:3]  # at most 3, so verbose captions stay < ~130 words
        for opener in ("to repeat", "again"):
            for o in objs:
                out.append(f"{opener} {_object_clause(o, rng, color=colors.get(id(o)))}")
    has_faint = any(o["faint"] for o in scene["objects"])
    if u_spec < (errors.speculate_faint if has_faint else errors.speculate_none):
        out.append(_speculation(scene, rng, errors))
    if u_comm < errors.commentary:
        out.append(_pick(rng, COMMENTARY))
    return _join(out)


def tokenizer_corpus(seed: int = 0, num_scenes: int = 1000, image_size: int = 112) -> list[str]:
    """Deterministic text for `balcap_jax.tokenizers.train_tiny_bpe`: the prompt, every fixed
    phrase (commentary, hedges), and a reference and a warm-start caption of the first
    `num_scenes` training scenes."""
    out = [SHAPES_PROMPT, *COMMENTARY, *HEDGES]
    out += [f"the background is {bg}" for bg in ("white", "gray", "black")]
    out += [f"{p}" for p in POSITIONS.values()]
    for i in range(num_scenes):
        scene = make_scene(seed, "train", i, image_size)
        out.append(reference_caption(scene, caption_rng(seed, "train", i)))
        out.append(sft_caption(scene, caption_rng(seed, "train", i, draw=1)))
    return out
