"""The evaluation judges: one small interface, several backends.

The harness (qa.py, facts.py, pairwise.py) asks three kinds of question, in batches:

    answer(items: [QAItem])     -> [option index in the order shown, -1 for none of them
                                    (a wrong answer), or None]                  (CaptionQA)
    facts(items: [FactItem])    -> [FactResult]                                 (DCScore)
    compare(items: [PairItem])  -> [1 | 2 | 0 (tie) | None]                     (CapArena)

None is a judge failure (unreadable answer, timeout): counted, scored as the benchmark says.
Backends: `LLMJudge` here, on any judge backend of the rewards (in-process or an
OpenAI-compatible server: `rewards.remote.RemoteBackend`), and the exact ShapesWorld judge
(`balcap_jax.shapes.eval_judge.ShapesEvalJudge`), which answers from the scene graph.
Each backend says what it is in `metadata()` (names, prompt versions), which the report records.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, Sequence

from balcap_jax.rewards.prompts import JudgePrompt, get_prompt
from balcap_jax.rewards.types import Query

__all__ = ["QAItem", "FactItem", "FactResult", "PairItem", "EvalJudge", "LLMJudge",
           "EVAL_PROMPTS", "LETTERS"]

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclasses.dataclass(frozen=True)
class QAItem:
    image: str                   # the image's key (a path or an id)
    caption: str
    question: dict               # {"question", "choices": [str] in the order shown, ...extra}


@dataclasses.dataclass(frozen=True)
class FactItem:
    image: str
    caption: str
    references: tuple[str, ...]


@dataclasses.dataclass
class FactResult:
    caption_facts: list[str]     # the caption's atomic facts
    true: list[bool | None]      # each caption fact verified against the image (None: failed)
    reference_facts: list[str]   # the references' facts
    covered: list[bool | None]   # each reference fact stated by the caption


@dataclasses.dataclass(frozen=True)
class PairItem:
    image: str
    reference: str
    first: str                   # the caption shown as "Caption 1"
    second: str


class EvalJudge(Protocol):
    def answer(self, items: Sequence[QAItem]) -> list[int | None]: ...
    def facts(self, items: Sequence[FactItem]) -> list[FactResult]: ...
    def compare(self, items: Sequence[PairItem]) -> list[int | None]: ...
    def metadata(self) -> dict: ...


_LETTER_RULE = ('Answer with a JSON list holding the letter of one option and nothing else, '
                'for example ["B"].')

EVAL_PROMPTS: dict[str, JudgePrompt] = {p.role: p for p in [
    # CaptionQA's caption-only question (bronyayang/CaptionQA qa.py), the answer as a JSON list
    # so that every judge backend (greedy lists in process, text remotely) can give it
    JudgePrompt(
        role="caption_qa", version="caption_qa-v1",
        shared=("You are given a caption describing an image, and a question about the image. "
                f"Use only the caption. {_LETTER_RULE}\n\nCaption:\n{{caption}}\n\n"),
        item="Question:\n{question}\n\nOptions:\n{options}\n\nAnswer:", answer="json_list"),
    # CapArena's pairwise comparison: the image, the human reference, two captions
    JudgePrompt(
        role="pairwise", version="pairwise-v1", needs_image=True,
        shared=("You compare two captions of this image. A human-written reference description "
                "is given for guidance. Prefer the caption that describes the image more "
                "accurately and in more useful detail; penalise every error and every "
                "hallucinated detail. Answer with a JSON list holding \"1\", \"2\" or \"tie\" "
                "and nothing else.\n\nReference:\n{reference}\n\n"),
        item="Caption 1:\n{first}\n\nCaption 2:\n{second}\n\nBetter caption:",
        answer="json_list"),
]}

# DCScore-style facts reuse the reward prompts: the same decomposition, verification and coverage
FACT_ROLES = ("decompose_caption", "verify", "decompose_reference", "coverage")


class LLMJudge:
    """The evaluation questions through a judge backend of the rewards (decompose / yes_no).

    backend: `rewards.judges` in-process or `rewards.remote.RemoteBackend`.
    load_image: image key -> image array (for verification and the pairwise comparison).
    A yes/no answer counts as yes at p(yes) >= 0.5.
    """

    def __init__(self, backend: Any, load_image: Callable[[str], Any]):
        self.backend, self.load_image = backend, load_image
        self._images: dict[str, Any] = {}

    def _image(self, key: str):
        if key not in self._images:
            self._images[key] = self.load_image(key)
        return self._images[key]

    def metadata(self) -> dict:
        versions = {r: EVAL_PROMPTS[r].version for r in EVAL_PROMPTS}
        versions.update({r: get_prompt(r).version for r in FACT_ROLES})
        return {"judge": str(getattr(self.backend, "name", type(self.backend).__name__)),
                "prompt_versions": versions}

    @staticmethod
    def _query(prompt: JudgePrompt, image=None, **fields) -> Query:
        shared, item = prompt.render(**fields)
        return Query(shared, item, image)

    def answer(self, items: Sequence[QAItem]) -> list[int | None]:
        p = EVAL_PROMPTS["caption_qa"]
        queries = [self._query(p, caption=it.caption, question=it.question["question"],
                               options="\n".join(f"{LETTERS[i]}. {c}" for i, c in
                                                 enumerate(it.question["choices"])))
                   for it in items]
        out = []
        for it, a in zip(items, self.backend.decompose(queries) if queries else []):
            n = len(it.question["choices"])
            letter = str(a.value[0]).strip().upper()[:1] if a.ok and a.value else ""
            out.append(LETTERS.index(letter) if letter and letter in LETTERS[:n] else None)
        return out

    def _yes(self, queries: list[Query]) -> list[bool | None]:
        if not queries:
            return []
        return [None if not a.ok or a.value is None else bool(a.value >= 0.5)
                for a in self.backend.yes_no(queries)]

    def facts(self, items: Sequence[FactItem]) -> list[FactResult]:
        dc, dr = get_prompt("decompose_caption"), get_prompt("decompose_reference")
        cap_facts = [a.value if a.ok else [] for a in self.backend.decompose(
            [self._query(dc, caption=it.caption) for it in items])] if items else []
        refs = [(i, r) for i, it in enumerate(items) for r in it.references]
        ref_answers = self.backend.decompose(
            [self._query(dr, reference=r) for _, r in refs]) if refs else []
        ref_facts: list[list[str]] = [[] for _ in items]
        for (i, _), a in zip(refs, ref_answers):
            ref_facts[i] += a.value if a.ok else []
        verify, coverage = get_prompt("verify"), get_prompt("coverage")
        v_idx = [(i, f) for i, fs in enumerate(cap_facts) for f in fs]
        truth = self._yes([self._query(verify, self._image(items[i].image), assertion=f)
                           for i, f in v_idx])
        c_idx = [(i, u) for i, us in enumerate(ref_facts) for u in us]
        covered = self._yes([self._query(coverage, caption=items[i].caption, unit=u)
                             for i, u in c_idx])
        out = [FactResult(list(cap_facts[i]), [], list(ref_facts[i]), [])
               for i in range(len(items))]
        for (i, _), t in zip(v_idx, truth):
            out[i].true.append(t)
        for (i, _), c in zip(c_idx, covered):
            out[i].covered.append(c)
        return out

    def compare(self, items: Sequence[PairItem]) -> list[int | None]:
        p = EVAL_PROMPTS["pairwise"]
        queries = [self._query(p, self._image(it.image), reference=it.reference,
                               first=it.first, second=it.second) for it in items]
        out = []
        for a in self.backend.decompose(queries) if queries else []:
            word = str(a.value[0]).strip().lower() if a.ok and a.value else ""
            out.append({"1": 1, "2": 2, "tie": 0}.get(word))
        return out
