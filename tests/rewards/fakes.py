"""A scripted judge backend for scorer tests: answers looked up from the query texts."""
from __future__ import annotations

import collections

from balcap_jax.rewards.balcap import Answer


def role_of(query) -> str:
    s, i = query.shared, query.item
    if i.startswith("Caption:"):
        return "decompose_caption"
    if i.startswith("Reference:"):
        return "decompose_reference"
    if "pointable" in s:
        return "pointable"
    if "true of this image" in s:
        return "verify"
    if i.startswith("Information:"):
        return "coverage"
    if i.startswith("Rate the "):
        return i.split()[2]      # clarity / fluency / coherence
    raise AssertionError(f"unknown query {query}")


def _caption(query) -> str:
    return query.shared.split("\n\n")[1]   # "Here is a caption of an image:\n\n{caption}\n\n..."


class FakeBackend:
    """decomp: text -> list | "reason"; yes: (role, text) -> p | "reason" where text is the
    assertion for verify/pointable and (caption, unit) for coverage; digits: (criterion,
    caption) -> E | "reason". A string value is a failure with that reason."""

    def __init__(self, name="fake-judge", decomp=None, yes=None, digits=None):
        self.name = name
        self.decomp, self.yes, self.dig = decomp or {}, yes or {}, digits or {}
        self.calls = collections.Counter()       # role -> number of queries seen
        self.batches = []                        # (method, number of queries)

    @staticmethod
    def _answer(v):
        return Answer(None, v) if isinstance(v, str) else Answer(v)

    def decompose(self, queries):
        self.batches.append(("decompose", len(queries)))
        out = []
        for q in queries:
            self.calls[role_of(q)] += 1
            text = q.item.split(": ", 1)[1]
            out.append(self._answer(self.decomp[text]))
        return out

    def yes_no(self, queries):
        self.batches.append(("yes_no", len(queries)))
        out = []
        for q in queries:
            role = role_of(q)
            self.calls[role] += 1
            text = q.item.split(": ", 1)[1]
            key = (role, (_caption(q), text) if role == "coverage" else text)
            out.append(self._answer(self.yes[key]))
        return out

    def digits(self, queries):
        self.batches.append(("digits", len(queries)))
        out = []
        for q in queries:
            role = role_of(q)
            self.calls[role] += 1
            out.append(self._answer(self.dig[(role, _caption(q))]))
        return out
