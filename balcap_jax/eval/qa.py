"""QA accuracy from captions, CaptionQA-style (arXiv 2511.21025; bronyayang/CaptionQA qa.py).

A text-only judge answers multiple-choice questions about an image from its caption alone.
Question files are CaptionQA's JSON as published, so a downloaded copy works as it is:

    {"<image key>": [{"question": "...", "choices": ["...", ...], "answer": "<a choice's text>",
                      ...other fields kept}, ...], ...}

(choices may also be {"text": ...} objects). As in CaptionQA, every question that is not a
yes/no question gets the option "Cannot answer from the caption", the options are shuffled with
a seeded generator, and a question scores 1 when the judge picks the answer, 0 for another
option or an unreadable reply, and 1/K + 0.05 for "cannot answer", K the question's own options.
Reported: score (mean of those), accuracy and the cannot-answer rate, per image and overall.
"""
from __future__ import annotations

import json
import random
from typing import Mapping, Sequence

import numpy as np

from balcap_jax.eval.judges import EvalJudge, QAItem

__all__ = ["CANNOT_ANSWER", "read_questions", "is_yes_no", "present", "question_score",
           "qa_scores", "match_keys"]

CANNOT_ANSWER = "Cannot answer from the caption"
_YES_NO_STARTS = ("is ", "are ", "was ", "were ", "do ", "does ", "did ", "have ", "has ",
                  "had ", "can ", "could ", "will ", "would ", "should ", "shall ", "may ",
                  "might ", "must ")


def _text(choice) -> str:
    return str(choice["text"] if isinstance(choice, dict) else choice)


def read_questions(path: str) -> dict[str, list[dict]]:
    """A CaptionQA question file: image key -> its questions (those without choices or with
    an answer that is not one of them are refused, naming the image and the question)."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a CaptionQA question file maps image keys to lists of "
                         f"questions; got a {type(data).__name__}")
    for key, qs in data.items():
        for n, q in enumerate(qs):
            choices = [_text(c).strip() for c in q.get("choices", [])]
            if len(choices) < 2 or str(q.get("answer", "")).strip() not in choices:
                raise ValueError(f"{path}: image {key!r} question {n}: needs 'choices' (2 or "
                                 f"more) and an 'answer' equal to one of them; got {q}")
    return data


def is_yes_no(question: Mapping) -> bool:
    """CaptionQA's test: yes and no among the choices, or a question starting like one."""
    texts = [_text(c).strip().lower() for c in question.get("choices", [])]
    if any("yes" in t for t in texts) and any("no" in t for t in texts):
        return True
    return str(question.get("question", "")).strip().lower().startswith(_YES_NO_STARTS)


def present(question: Mapping, rng: random.Random) -> tuple[dict, int, int, int | None]:
    """(the question as shown: options shuffled, "cannot answer" added unless yes/no;
    the answer's index among them; K, the question's own option count; the index of
    "cannot answer" or None)."""
    own = [_text(c) for c in question["choices"]]
    choices = own + ([] if is_yes_no(question) else [CANNOT_ANSWER])
    perm = list(range(len(choices)))
    rng.shuffle(perm)
    shown = [choices[i] for i in perm]
    answer = [c.strip() for c in own].index(str(question["answer"]).strip())
    cannot = perm.index(len(own)) if len(choices) > len(own) else None
    return dict(question, choices=shown), perm.index(answer), len(own), cannot


def question_score(picked: int | None, answer: int, k: int, cannot: int | None) -> float:
    """1 right, 1/K + 0.05 for "cannot answer", 0 otherwise (a failed reply included)."""
    if picked == answer:
        return 1.0
    if picked is not None and picked == cannot:
        return 1.0 / k + 0.05
    return 0.0


def match_keys(question_keys: Sequence[str], caption_keys: Sequence[str]) -> dict[str, str]:
    """Question key -> caption key: equal keys, else equal file names when both are unique
    (a question file keyed by file name, captions keyed by path)."""
    import os
    caps = set(caption_keys)
    by_name: dict[str, list[str]] = {}
    for c in caption_keys:
        by_name.setdefault(os.path.basename(c), []).append(c)
    out = {}
    for q in question_keys:
        if q in caps:
            out[q] = q
        elif len(by_name.get(os.path.basename(q), ())) == 1:
            out[q] = by_name[os.path.basename(q)][0]
    return out


def qa_scores(judge: EvalJudge, captions: Mapping[str, str], questions: Mapping[str, list],
              *, seed: int = 0, batch: int = 256) -> dict:
    """Each image's questions answered from its caption. Returns {"per_image": {"score",
    "accuracy", "cannot"} arrays over `captions`' order (NaN: no question), "overall": means
    over questions, "questions": count, "failed": unreadable replies}."""
    keys = list(captions)
    to_c = match_keys(list(questions), keys)
    rng = random.Random(seed)       # one stream in the question file's order, as CaptionQA's
    items, meta = [], []
    for qkey, qs in questions.items():
        if qkey not in to_c:
            continue
        c = to_c[qkey]
        for q in qs:
            shown, answer, k, cannot = present(q, rng)
            items.append(QAItem(c, captions[c], shown))
            meta.append((c, answer, k, cannot))
    picks: list[int | None] = []
    for s in range(0, len(items), batch):
        picks += judge.answer(items[s:s + batch])
    per: dict[str, list[tuple[float, bool, bool]]] = {}
    for (c, answer, k, cannot), p in zip(meta, picks):
        per.setdefault(c, []).append((question_score(p, answer, k, cannot), p == answer,
                                      p is not None and p == cannot))
    out = {name: np.full(len(keys), np.nan) for name in ("score", "accuracy", "cannot")}
    for i, c in enumerate(keys):
        if c in per:
            v = np.asarray(per[c], np.float64)
            out["score"][i], out["accuracy"][i], out["cannot"][i] = v.mean(axis=0)
    flat = np.asarray([x for v in per.values() for x in v], np.float64).reshape(-1, 3)
    overall = dict(zip(("score", "accuracy", "cannot"), flat.mean(axis=0).tolist())) \
        if len(flat) else {}
    return {"per_image": out, "overall": overall, "questions": len(items),
            "failed": sum(p is None for p in picks)}
