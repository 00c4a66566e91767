"""The ShapesWorld caption grammar: caption text -> sentences -> atomic assertions.

Everything the world writes (references, warm-start captions) parses; a policy's own sentences
parse when they use the same vocabulary. Parsing is text only; checking assertions against a
scene is `balcap_jax.shapes.scorer`' job.

Sentence kinds and the assertions they make:
- count        "there are three shapes [on a gray background]"  -> count (+ background)
- background   "the background is gray"                          -> background
- object       "a large red circle is at the top left"           -> one `attr` assertion per
               stated attribute of the mention (shape, color, size, faint, position); several
               clauses may be joined by "and"; "to repeat, ..." restates one
- hedge        "there may also be a faint small blue circle at the bottom" -> as object, marked
- relation     "the red circle is to the left of the blue square" -> one `rel` assertion
- commentary   "the picture feels calm"                           -> one `commentary` assertion
               (grammatical, not pointable: false for precision)
- unparsable   anything else                                      -> one `unparsable` assertion

A parsed sentence is `well_formed` unless an article or a number disagrees ("a orange",
"there is three shapes", "two shape"); that is a fluency matter, not a precision one.

Text is lower-cased, hyphens become spaces, "grey"/"centre" are read as "gray"/"center", commas
are ignored, and sentences end at . ! ? or ;. A caption whose last sentence has no terminator is
`terminated=False` (a cut-off caption).
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

from balcap_jax.shapes.world import BACKGROUNDS, COLORS, SHAPES

__all__ = ["Assertion", "Sentence", "ParsedCaption", "parse_caption", "COMMENTARY",
           "NUMBER_WORDS", "HEDGES", "split_sentences"]

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Hedge openers the warm start uses (first one) and the grammar accepts.
HEDGES = ("there may also be", "there may be", "there might also be", "there might be",
          "perhaps there is", "possibly there is", "maybe there is")
RESTATE = ("to repeat", "again", "as noted")
# Commentary the world writes; the grammar accepts the patterns below, which are wider.
COMMENTARY = ("the picture feels calm", "the image looks very balanced",
              "the colors work well together", "it is a simple and pleasant image",
              "the scene feels playful", "this looks like a child's drawing")

_ADJ = {"faint": ("faint", True), "pale": ("faint", True),
        "small": ("size", "small"), "little": ("size", "small"), "tiny": ("size", "small"),
        "large": ("size", "large"), "big": ("size", "large"),
        **{c: ("color", c) for c in COLORS}}
_NOUNS = SHAPES + ("shape", "object")
_POS_ALIASES = {"top center": "top", "top middle": "top", "bottom center": "bottom",
                "bottom middle": "bottom", "middle left": "left", "center left": "left",
                "middle right": "right", "center right": "right", "middle": "center"}
_POS_WORDS = ("top left", "top right", "bottom left", "bottom right", "top center",
              "top middle", "bottom center", "bottom middle", "middle left", "middle right",
              "center left", "center right", "top", "bottom", "left", "right", "center",
              "middle")
_REL_ALIASES = {"to the left of": "left of", "left of": "left of",
                "to the right of": "right of", "right of": "right of", "above": "above",
                "over": "above", "below": "below", "under": "below", "beneath": "below"}


def _alt(words) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_ADJS = rf"(?:(?:{_alt(_ADJ)}) )*"
_NOUN = _alt(_NOUNS)
_BG = _alt(BACKGROUNDS)
_NUM = rf"(?:{_alt(NUMBER_WORDS)}|a single|\d+)"
_PP = (rf"(?:(?:at|in|on|near|along) )?the (?P<pos>{_alt(_POS_WORDS)})"
       r"(?: (?:corner|side|edge|of the (?:image|picture)))?")
_NP = rf"(?:a|an|the) (?P<adjs>{_ADJS})(?P<noun>{_NOUN})"
_BGP = rf"(?: on an? (?P<bg>{_BG}) background)?"
_SHAPEW = r"(?:shapes?|objects?)"


def _c(p: str) -> re.Pattern:
    return re.compile(p)


_COUNT = [_c(rf"there (?:is|are) (?P<n>{_NUM}) {_SHAPEW}(?: in the (?:image|picture))?{_BGP}"),
          _c(rf"the (?:image|picture) (?:shows|contains|has) (?P<n>{_NUM}) {_SHAPEW}{_BGP}"),
          _c(rf"(?P<n>{_NUM}) {_SHAPEW} (?:appears?|are shown|is shown|sits?){_BGP}")]
_BACKGROUND = [_c(rf"the background is (?P<bg>{_BG})"),
               _c(rf"(?:everything|they|it) (?:is|are|sits?) on an? (?P<bg>{_BG}) background")]
_VERB = r"(?:is|sits|lies|appears|is placed|is located|can be seen)"
_OBJECT = [_c(rf"{_NP}(?: {_VERB})? {_PP}"),
           _c(rf"{_PP} (?:there is|is|sits|lies|appears|we see|you can see) {_NP}"),
           _c(rf"there is {_NP}(?: {_PP})?")]
_HEDGE = _c(rf"(?:{_alt(HEDGES)}) (?P<rest>.+)")
_RESTATE = _c(rf"(?:{_alt(RESTATE)}) (?P<rest>.+)")
_RELATION = _c(rf"the (?P<adjs_a>{_ADJS})(?P<noun_a>{_NOUN}) is (?P<rel>{_alt(_REL_ALIASES)}) "
               rf"the (?P<adjs_b>{_ADJS})(?P<noun_b>{_NOUN})")
_MOOD = ("calm", "balanced", "playful", "pleasant", "simple", "cheerful", "tidy", "peaceful",
         "neat", "lovely", "harmonious", "nice", "busy", "lively")
_COMMENTARY = [
    _c(rf"(?:the|this) (?:picture|image|scene|composition|arrangement) (?:feels|looks|seems|is)"
       rf"(?: very| quite| rather| so)? (?:{_alt(_MOOD)})"),
    _c(r"the colou?rs (?:work|go|fit) (?:very )?(?:well|nicely) together"),
    _c(rf"(?:it|this) (?:is|looks like) an? (?:(?:{_alt(_MOOD)}) )?(?:and (?:{_alt(_MOOD)}) )?"
       r"(?:image|picture|drawing|composition)"),
    _c(r"(?:this|it) looks like a (?:child's|children's|kid's) drawing"),
    _c(rf"the shapes (?:look|seem|feel) (?:{_alt(_MOOD)}|happy|friendly)")]


@dataclasses.dataclass(frozen=True)
class Assertion:
    """One atomic claim. kind: count | background | attr | rel | commentary | unparsable.

    attr: `mention` indexes ParsedCaption.mentions, `attr`/`value` the claim about it.
    rel: `desc_a` `rel` `desc_b`, each desc a sorted tuple of (attr, value) pairs.
    """
    kind: str
    attr: str = ""
    value: Any = None
    mention: int = -1
    rel: str = ""
    desc_a: tuple = ()
    desc_b: tuple = ()


@dataclasses.dataclass(frozen=True)
class Sentence:
    text: str
    kind: str          # count | background | object | hedge | relation | commentary | unparsable
    assertions: tuple[Assertion, ...]
    well_formed: bool = True   # parsed, and articles and number agree ("an orange", "is one")


@dataclasses.dataclass(frozen=True)
class ParsedCaption:
    sentences: tuple[Sentence, ...]
    mentions: tuple[tuple[tuple[str, Any], ...], ...]   # sorted (attr, value) pairs per mention
    terminated: bool                                     # False: ends without . ! ? ;

    @property
    def assertions(self) -> list[Assertion]:
        return [a for s in self.sentences for a in s.assertions]


def _normalize(text: str) -> str:
    text = text.lower().replace("-", " ").replace(",", " ")
    text = re.sub(r"\bgrey\b", "gray", text)
    text = re.sub(r"\bcentre\b", "center", text)
    return text


def split_sentences(text: str) -> tuple[list[str], bool]:
    """(sentences, terminated): non-empty pieces between . ! ? ; and whether the text ends in
    one (a caption without any sentence counts as terminated)."""
    pieces = re.split(r"[.!?;]+", _normalize(text))
    sentences = [" ".join(p.split()) for p in pieces]
    terminated = not sentences[-1]
    return [s for s in sentences if s], terminated


def _number(word: str) -> int | None:
    if word in NUMBER_WORDS:
        return NUMBER_WORDS.index(word)
    if word == "a single":
        return 1
    return int(word) if word.isdigit() else None


def _desc(adjs: str, noun: str) -> tuple[tuple[str, Any], ...] | None:
    """Attributes of an adjective list + noun; None if one attribute is given twice."""
    attrs: dict[str, Any] = {}
    for w in adjs.split():
        key, value = _ADJ[w]
        if key in attrs:
            return None
        attrs[key] = value
    if noun in SHAPES:
        attrs["shape"] = noun
    return tuple(sorted(attrs.items()))


def _object_clause(text: str) -> tuple[tuple[str, Any], ...] | None:
    """The mention (attributes incl. position) of one object clause, or None."""
    for pattern in _OBJECT:
        m = pattern.fullmatch(text)
        if not m:
            continue
        desc = _desc(m.group("adjs"), m.group("noun"))
        if desc is None:
            return None
        pos = m.group("pos")
        if pos:
            desc = tuple(sorted(desc + (("position", _POS_ALIASES.get(pos, pos)),)))
        return desc or None
    return None


_PLURAL_NUM = rf"(?:{_alt(NUMBER_WORDS[2:])}|[2-9]|\d\d+)"
_DISAGREE = _c(rf"\ba [aeiou]|\ban [^aeiou]|\bthere is {_PLURAL_NUM}\b|"
               rf"\bthere are (?:one|a single)\b|\b(?:one|a single) (?:shapes|objects)\b|"
               rf"\b{_PLURAL_NUM} (?:shape|object)\b(?!s)")


def _parse_sentence(text: str, mentions: list) -> Sentence:
    sentence = _parse_words(text, mentions)
    if sentence.kind != "unparsable" and _DISAGREE.search(text):
        return dataclasses.replace(sentence, well_formed=False)
    return sentence


def _parse_words(text: str, mentions: list) -> Sentence:
    def mention_assertions(descs):
        out = []
        for desc in descs:
            mentions.append(desc)
            out += [Assertion("attr", attr=k, value=v, mention=len(mentions) - 1)
                    for k, v in desc]
        return tuple(out)

    if any(p.fullmatch(text) for p in _COMMENTARY):
        return Sentence(text, "commentary", (Assertion("commentary", value=text),))
    for p in _COUNT:
        m = p.fullmatch(text)
        if m and _number(m.group("n")) is not None:
            out = (Assertion("count", value=_number(m.group("n"))),)
            if m.group("bg"):
                out += (Assertion("background", value=m.group("bg")),)
            return Sentence(text, "count", out)
    for p in _BACKGROUND:
        m = p.fullmatch(text)
        if m:
            return Sentence(text, "background", (Assertion("background", value=m.group("bg")),))
    m = _RELATION.fullmatch(text)
    if m:
        a, b = _desc(m.group("adjs_a"), m.group("noun_a")), _desc(m.group("adjs_b"),
                                                                   m.group("noun_b"))
        if a and b:
            return Sentence(text, "relation", (Assertion(
                "rel", rel=_REL_ALIASES[m.group("rel")], desc_a=a, desc_b=b),))
    m = _HEDGE.fullmatch(text)
    if m:
        desc = _object_clause("there is " + m.group("rest"))
        if desc:
            return Sentence(text, "hedge", mention_assertions([desc]))
    m = _RESTATE.fullmatch(text)
    body = m.group("rest") if m else text
    descs = [_object_clause(part) for part in body.split(" and ")]
    if descs and all(descs):
        return Sentence(text, "object", mention_assertions(descs))
    return Sentence(text, "unparsable", (Assertion("unparsable", value=text),), False)


@functools.lru_cache(maxsize=65536)
def parse_caption(text: str) -> ParsedCaption:
    """Parses a caption (cached: references and repeated samples are parsed once)."""
    if not isinstance(text, str):
        raise TypeError(f"parse_caption needs a str caption, got {type(text).__name__}")
    pieces, terminated = split_sentences(text)
    mentions: list = []
    sentences = tuple(_parse_sentence(s, mentions) for s in pieces)
    return ParsedCaption(sentences, tuple(mentions), terminated)
