"""Turning judge outputs into numbers: JSON lists, yes/no, digits (SPEC.md section 2).

Text parsers return `(value, None)` or `(None, reason)`: a judge output that does not parse is a
judge-side failure (NaN, counted by reason), never a guess. Reasons: "empty_output", "no_list",
"truncated_list", "bad_json", "bad_items", "not_yes_no", "no_digit", "digit_out_of_range",
"no_logprobs".

Logit readers are pure jnp functions (jittable, any leading shape):
  `yes_probability(logits [..., V], yes_ids, no_ids)`: softmax over just the yes and no token
      logits, several spellings of each summed ("yes", "Yes", " yes" ...) -> p(yes) [...];
  `digit_expectation(logits [..., V], digit_ids)`: E of the digit distribution over 1..5
      (softmax over just those ids) -> [...]; `digit_score(E) = (E - 1) / 4` in [0, 1].
The same quantities from an endpoint's top_logprobs (OpenAI format) are
`yes_probability_from_top_logprobs` and `digit_expectation_from_top_logprobs` (host, floats).
"""
from __future__ import annotations

import ast
import json
import math
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["parse_json_list", "parse_yes_no", "parse_digit", "yes_probability",
           "digit_expectation", "digit_score", "yes_probability_from_top_logprobs",
           "digit_expectation_from_top_logprobs", "single_token_ids", "YES_SPELLINGS",
           "NO_SPELLINGS"]

YES_SPELLINGS = ("yes", "Yes", "YES", " yes", " Yes", " YES")
NO_SPELLINGS = ("no", "No", "NO", " no", " No", " NO")
_YES_WORDS = {"yes", "true"}
_NO_WORDS = {"no", "false"}

_ANSWER_LABEL = re.compile(r"^\W*(?:final\s+)?answer\W*?[:\-]", re.I)   # "Answer: yes"
_MAX_STARTS = 8   # candidate list openings tried before giving up
_FENCE = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\n?(.*?)(?:```|\Z)", re.S)


# ----------------------------------------------------------------------------------------------
# JSON lists
# ----------------------------------------------------------------------------------------------

def _items(value: Any) -> tuple[list[str] | None, str | None]:
    if isinstance(value, dict):   # {"assertions": [...]} from structured-output endpoints
        lists = [v for v in value.values() if isinstance(v, list)]
        if len(lists) != 1:
            return None, "bad_items"
        value = lists[0]
    if not isinstance(value, list):
        return None, "no_list"
    out = []
    for v in value:
        if isinstance(v, bool) or v is None or isinstance(v, (list, dict)):
            return None, "bad_items"
        s = str(v).strip()
        if s:
            out.append(s)
    return out, None


def _match_end(text: str) -> int:
    """Index of the bracket closing the one at text[0] (a quote-aware scan), or -1 if it is
    never closed: the mark of a list cut off by max_tokens."""
    depth, quote, esc = 0, None, False
    for i, ch in enumerate(text):
        if quote:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == quote:
                quote = None
        elif ch in "\"'" and depth > 0:
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def parse_json_list(text: str | None) -> tuple[list[str] | None, str | None]:
    """A judge's JSON list of strings -> (items, None) or (None, reason).

    Accepts a bare list, a ```json fenced block, text before or after the list, an object with
    exactly one list value, and Python-style single-quoted lists. Items are stripped; empty
    items dropped; an empty list is a valid answer (the caller decides what n = 0 means). A list
    that is never closed (the judge ran out of tokens) is a failure, "truncated_list": its
    complete items are not a decomposition of the whole text, so no partial credit.
    """
    if text is None or not text.strip():
        return None, "empty_output"
    fenced = _FENCE.search(text)
    body = fenced.group(1) if fenced else text
    starts = [m.start() for m in re.finditer(r"[\[{]", body)][:_MAX_STARTS]
    if not starts:
        return None, "no_list"
    decoder = json.JSONDecoder()
    first_reason = None
    for start in starts:   # the first '[' or '{' that opens a list (or a list-holding object)
        try:
            value, _ = decoder.raw_decode(body[start:])   # ignores trailing text
        except json.JSONDecodeError:
            value = _python_literal(body[start:])
        if value is None:
            continue
        items, reason = _items(value)
        if items is not None:
            return items, None
        first_reason = first_reason or reason
    if first_reason:
        return None, first_reason
    list_start = body.find("[")
    if list_start >= 0 and _match_end(body[list_start:]) < 0:
        return None, "truncated_list"
    return None, "bad_json"


def _python_literal(text: str) -> Any:
    """['a', 'b'] and other Python literals some models write; None if it is not one."""
    end = _match_end(text)
    if end < 0:
        return None
    try:
        return ast.literal_eval(text[:end + 1])
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        return None


# ----------------------------------------------------------------------------------------------
# yes/no and digits from text
# ----------------------------------------------------------------------------------------------

def parse_yes_no(text: str | None) -> tuple[float | None, str | None]:
    """First word of the answer (markdown, punctuation and an "Answer:" label ignored):
    yes/true -> 1.0, no/false -> 0.0; anything else -> (None, "not_yes_no")."""
    if text is None or not text.strip():
        return None, "empty_output"
    text = _ANSWER_LABEL.sub("", text, count=1)
    m = re.search(r"[A-Za-z]+", text)
    word = m.group(0).lower() if m else ""
    if word in _YES_WORDS:
        return 1.0, None
    if word in _NO_WORDS:
        return 0.0, None
    return None, "not_yes_no"


def parse_digit(text: str | None, low: int = 1, high: int = 5) -> tuple[float | None, str | None]:
    """The first number in the answer, which must be an integer in [low, high] ("4", "4/5",
    "Rating: 4") -> (float, None); otherwise (None, reason)."""
    if text is None or not text.strip():
        return None, "empty_output"
    m = re.search(r"(?<![\d.])\d+(?:\.\d+)?", text)
    if not m:
        return None, "no_digit"
    value = float(m.group(0))
    if value != int(value) or not low <= value <= high:
        return None, "digit_out_of_range"
    return value, None


# ----------------------------------------------------------------------------------------------
# Readers on logits (jittable)
# ----------------------------------------------------------------------------------------------

def _ids(ids, name: str, vocab: int) -> jnp.ndarray:
    arr = jnp.asarray(ids, jnp.int32).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name} is empty; give at least one token id")
    if isinstance(ids, (np.ndarray, list, tuple)) and (np.asarray(ids) >= vocab).any():
        raise ValueError(f"{name}={np.asarray(ids).tolist()} has ids >= vocabulary size {vocab}")
    return arr


def yes_probability(logits: jax.Array, yes_ids, no_ids) -> jax.Array:
    """p(yes) = sum_y e^l_y / (sum_y e^l_y + sum_n e^l_n) over the yes/no spellings' ids.

    logits [..., V] (any float dtype; computed in float32) -> float32 [...]."""
    logits = jnp.asarray(logits).astype(jnp.float32)
    v = logits.shape[-1]
    y = jax.nn.logsumexp(logits[..., _ids(yes_ids, "yes_ids", v)], axis=-1)
    n = jax.nn.logsumexp(logits[..., _ids(no_ids, "no_ids", v)], axis=-1)
    return jax.nn.sigmoid(y - n)


def digit_expectation(logits: jax.Array, digit_ids, values: Sequence[float] | None = None
                      ) -> jax.Array:
    """E[digit] under a softmax over just the digits' ids.

    digit_ids: [K] (one id per digit) or [K, S] (up to S spellings per digit, summed; pad with
    -1, since a repeated id would count twice); values default to 1..K. logits [..., V] -> float32
    [...] in [values[0], values[-1]]."""
    logits = jnp.asarray(logits).astype(jnp.float32)
    ids = np.asarray(digit_ids)
    if ids.ndim not in (1, 2) or ids.shape[0] < 2 or (ids.ndim == 1 and (ids < 0).any()):
        raise ValueError(f"digit_ids must be [K] ids or [K, S] (-1 padded) with K >= 2, got "
                         f"{ids.tolist()}")
    if (ids >= logits.shape[-1]).any():
        raise ValueError(f"digit_ids has ids >= vocabulary size {logits.shape[-1]}")
    vals = jnp.arange(1, ids.shape[0] + 1, dtype=jnp.float32) if values is None else \
        jnp.asarray(values, jnp.float32)
    if vals.shape != (ids.shape[0],):
        raise ValueError(f"values must have one entry per digit ({ids.shape[0]}), got {vals.shape}")
    sel = logits[..., jnp.asarray(np.maximum(ids, 0), jnp.int32)]     # [..., K] or [..., K, S]
    if ids.ndim == 2:   # -1 pads ragged spellings; a padded slot has no mass
        sel = jax.nn.logsumexp(jnp.where(jnp.asarray(ids >= 0), sel, -jnp.inf), axis=-1)
    return jnp.sum(jax.nn.softmax(sel, axis=-1) * vals, axis=-1)


def digit_score(expectation, low: float = 1.0, high: float = 5.0):
    """(E - low) / (high - low): the 1-5 scale mapped to [0, 1] (works on floats and arrays)."""
    return (expectation - low) / (high - low)


# ----------------------------------------------------------------------------------------------
# Readers on an endpoint's top_logprobs (OpenAI chat format)
# ----------------------------------------------------------------------------------------------

def _first_answer_token(content: Any) -> list[dict] | None:
    """top_logprobs of the first generated token that is not whitespace/markdown."""
    if not isinstance(content, list):
        return None
    for entry in content:
        if not isinstance(entry, dict):
            return None
        tok = str(entry.get("token", ""))
        if tok.strip(" \n\t*`\"'") == "":
            continue
        tops = entry.get("top_logprobs")
        if isinstance(tops, list) and tops:
            return [t for t in tops if isinstance(t, dict)]
        return [entry]   # no alternatives given: the chosen token alone
    return None


def _mass(tops: list[dict], match) -> dict[Any, float]:
    out: dict[Any, float] = {}
    for t in tops:
        key = match(str(t.get("token", "")).strip(" \n\t*`\"'.").lower())
        lp = t.get("logprob")
        if key is not None and isinstance(lp, (int, float)) and math.isfinite(lp):
            out[key] = out.get(key, 0.0) + math.exp(lp)
    return out


def yes_probability_from_top_logprobs(content: Any) -> tuple[float | None, str | None]:
    """p(yes) from `choices[0].logprobs.content` (list of {token, logprob, top_logprobs}).

    Uses the first non-blank token's alternatives; spellings of yes and no summed, then
    normalised over yes + no. A spelling absent from the top-k counts as 0 mass (its true mass
    is below the smallest listed). Neither present -> (None, "no_logprobs")."""
    tops = _first_answer_token(content)
    if not tops:
        return None, "no_logprobs"
    mass = _mass(tops, lambda w: "yes" if w in _YES_WORDS else "no" if w in _NO_WORDS else None)
    total = mass.get("yes", 0.0) + mass.get("no", 0.0)
    if total <= 0:
        return None, "no_logprobs"
    return mass.get("yes", 0.0) / total, None


def digit_expectation_from_top_logprobs(content: Any, low: int = 1, high: int = 5
                                        ) -> tuple[float | None, str | None]:
    """E[digit] over the digits low..high among the first non-blank token's alternatives."""
    tops = _first_answer_token(content)
    if not tops:
        return None, "no_logprobs"
    digits = {str(d) for d in range(low, high + 1)}
    mass = _mass(tops, lambda w: int(w) if w in digits else None)
    total = sum(mass.values())
    if total <= 0:
        return None, "no_logprobs"
    return sum(k * p for k, p in mass.items()) / total, None


# ----------------------------------------------------------------------------------------------
# Token ids of answer words
# ----------------------------------------------------------------------------------------------

def single_token_ids(tokenizer, spellings: Sequence[str]) -> list[int]:
    """Ids of the spellings that the tokenizer encodes as exactly one token (deduplicated, in
    order). Raises if none is a single token, naming them: the reader would have nothing to
    read."""
    ids: list[int] = []
    for s in spellings:
        enc = tokenizer.encode(s, add_special_tokens=False)
        if len(enc) == 1 and enc[0] not in ids:
            ids.append(int(enc[0]))
    if not ids:
        raise ValueError(f"none of {list(spellings)} is a single token for this tokenizer; "
                         "the yes/no and digit readers need single-token answers")
    return ids
