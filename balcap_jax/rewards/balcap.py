"""BalCapRL's three rewards behind the trainer's scorer interface (SPEC.md section 2).

    scorer = BalCapScorer(backend, text_backend=None, threshold=False, cache_dir=...)
    result = scorer(images, captions, references)     # ScoreResult, rewards float32 [N]

Rewards per rollout, each in [0, 1]:
  precision  r_P = mean over the caption's assertions of p_verified * p_pointable
             (`threshold=True`: each p is 0/1 at 0.5 first; `pointability=False`: p_verified
             alone, the paper's "without pointability" ablation);
  recall     r_R = mean over the reference's units of p_covered; with several references,
             the mean of their recalls (our default);
  linguistic r_L = mean of (E - 1) / 4 over clarity, fluency and coherence (E = expected 1-5
             digit).
Caption-side failures score 0 (empty caption -> 0 for all three; no assertions -> r_P = 0).
Judge-side failures (endpoint error, timeout, output that does not parse) make that reward of
that rollout NaN; each is counted in the diagnostics as `nan/<reward>/<role>:<reason>`.
A reference that is empty or has no units is NaN too ("reference:..."): it is not the
caption's fault.

Backends implement the judge roles on `Query` objects and answer with `Answer`s, one per query:
  backend.name                            judge checkpoint id (keys the reference-unit cache)
  backend.decompose(queries) -> [Answer]  value: list[str] (a parsed JSON list)
  backend.yes_no(queries)    -> [Answer]  value: p(yes) in [0, 1]
  backend.digits(queries)    -> [Answer]  value: E[digit] in [1, 5]
An Answer with `error` set is a judge-side failure with that reason. Verification and
pointability go to `backend` (multimodal, queries carry the image); decomposition, coverage
and linguistic ratings go to `text_backend` (default: `backend`). remote.RemoteBackend and
judges.InProcessBackend implement this.

Diagnostics (floats; the trainer logs them under scorer/): caption_zero/empty_caption,
caption_zero/no_assertions, nan/<reward> (rollouts), nan/<reward>/<role>:<reason>,
assertions_mean, assertions_max, verify_mean, pointable_mean, reference_units_mean,
reference_cache/hits, reference_cache/misses, time_s/<role> (decompose_caption,
verify_pointable, decompose_reference, coverage, linguistic). `metadata()` gives the prompt
versions and judge names as strings for the run's config.

Reference units are decomposed once per (reference text, text judge name, prompt version) and
kept in `<cache_dir>/reference_units.sqlite` (in memory only when cache_dir is None), so later
epochs never decompose a reference again. Judge failures are not cached.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import sqlite3
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from balcap_jax.rewards import prompts as P
from balcap_jax.rewards.parsing import digit_score
from balcap_jax.rewards.types import Answer, JudgeBackend, Query, ScoreResult

__all__ = ["BalCapScorer", "ReferenceUnitCache", "REWARDS", "Query", "Answer", "JudgeBackend"]

REWARDS = ("precision", "recall", "linguistic")


# ----------------------------------------------------------------------------------------------
# Reference-unit cache
# ----------------------------------------------------------------------------------------------

class ReferenceUnitCache:
    """reference units on disk (sqlite; safe across threads and processes) or in memory."""

    def __init__(self, cache_dir: str | None):
        self._mem: dict[str, list[str]] = {}
        self._lock = threading.Lock()
        self._db = None
        self.path = None
        if cache_dir is not None:
            os.makedirs(cache_dir, exist_ok=True)
            self.path = os.path.join(cache_dir, "reference_units.sqlite")
            self._db = sqlite3.connect(self.path, timeout=60, check_same_thread=False)
            self._db.execute("CREATE TABLE IF NOT EXISTS units (key TEXT PRIMARY KEY, "
                             "units TEXT NOT NULL, judge TEXT, version TEXT, reference TEXT)")
            self._db.commit()

    @staticmethod
    def key(reference: str, judge: str, version: str) -> str:
        return hashlib.sha256(json.dumps([reference, judge, version]).encode()).hexdigest()

    def get(self, keys: Sequence[str]) -> dict[str, list[str]]:
        with self._lock:
            found = {k: self._mem[k] for k in keys if k in self._mem}
            missing = [k for k in dict.fromkeys(keys) if k not in found]
            if self._db is not None and missing:
                for i in range(0, len(missing), 500):   # sqlite's variable limit
                    chunk = missing[i:i + 500]
                    rows = self._db.execute(
                        f"SELECT key, units FROM units WHERE key IN ({','.join('?' * len(chunk))})",
                        chunk).fetchall()
                    for k, units in rows:
                        found[k] = self._mem[k] = json.loads(units)
            return found

    def put(self, entries: Sequence[tuple[str, list[str], str, str, str]]) -> None:
        """entries: (key, units, judge, version, reference)."""
        with self._lock:
            for k, units, *_ in entries:
                self._mem[k] = list(units)
            if self._db is not None and entries:
                self._db.executemany(
                    "INSERT OR REPLACE INTO units VALUES (?, ?, ?, ?, ?)",
                    [(k, json.dumps(list(u)), j, v, r) for k, u, j, v, r in entries])
                self._db.commit()

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


# ----------------------------------------------------------------------------------------------
# The scorer
# ----------------------------------------------------------------------------------------------

def _unique(queries: Sequence[Query]) -> tuple[list[Query], list[int]]:
    """The distinct queries (same image object, same text) and each query's slot among them."""
    index: dict[tuple, int] = {}
    unique: list[Query] = []
    slots = []
    for q in queries:
        key = (id(q.image) if q.image is not None else None, q.shared, q.item)
        if key not in index:
            index[key] = len(unique)
            unique.append(q)
        slots.append(index[key])
    return unique, slots


def _ask(fn: Callable[[list[Query]], list[Answer]], queries: Sequence[Query], role: str,
         times: dict[str, float]) -> list[Answer]:
    """Calls a backend role once on the distinct queries (same image object, same text) and
    fans the answers back out; checks the backend answered once per query."""
    if not queries:
        return []
    unique, slots = _unique(queries)
    start = time.perf_counter()
    answers = list(fn(unique))
    times[role] = times.get(role, 0.0) + time.perf_counter() - start
    if len(answers) != len(unique):
        raise RuntimeError(f"judge role {role!r} returned {len(answers)} answers for "
                           f"{len(unique)} queries; a backend must answer every query")
    return [answers[s] for s in slots]


class BalCapScorer:
    """See the module docstring. Call signature: the trainer's `Scorer`."""

    def __init__(self, backend: JudgeBackend, *, text_backend: JudgeBackend | None = None,
                 threshold: bool = False, pointability: bool = True,
                 rewards: Sequence[str] = REWARDS, cache_dir: str | None = None):
        unknown = [r for r in rewards if r not in REWARDS]
        if unknown or not rewards:
            raise ValueError(f"rewards={list(rewards)}: choose a non-empty subset of {REWARDS}")
        self.backend = backend
        self.text_backend = text_backend if text_backend is not None else backend
        self.threshold = bool(threshold)
        self.pointability = bool(pointability)
        self.rewards = tuple(rewards)
        self.cache = ReferenceUnitCache(cache_dir)

    def metadata(self) -> dict[str, str]:
        """Strings for the run's config/metrics: prompt versions, judges, reading rules."""
        meta = {f"prompt/{k}": v for k, v in P.prompt_versions(self.rewards).items()}
        meta.update({"judge/multimodal": str(getattr(self.backend, "name", "?")),
                     "judge/text": str(getattr(self.text_backend, "name", "?")),
                     "threshold": str(self.threshold), "pointability": str(self.pointability)})
        return meta

    def _p(self, value: float) -> float:
        return float(value >= 0.5) if self.threshold else float(value)

    # -- rewards ---------------------------------------------------------------------------
    def _cached_units(self, refs: Sequence[str]) -> tuple[dict, dict, list]:
        """(cache key per reference, units of those cached, those not cached)."""
        judge = str(getattr(self.text_backend, "name", "?"))
        version = P.get_prompt("decompose_reference").version
        keys = {r: ReferenceUnitCache.key(r, judge, version) for r in refs}
        cached = self.cache.get(list(keys.values()))
        units = {r: cached[k] for r, k in keys.items() if k in cached}
        return keys, units, [r for r in refs if r not in units]

    def _store_units(self, todo, answers, keys, units) -> dict[str, str]:
        """Decomposed references into `units` and the cache; returns the failures' reasons."""
        judge = str(getattr(self.text_backend, "name", "?"))
        version = P.get_prompt("decompose_reference").version
        nan_refs: dict[str, str] = {}
        new = []
        for r, ans in zip(todo, answers):
            if ans.ok:
                units[r] = list(ans.value)
                new.append((keys[r], units[r], judge, version, r))
            else:
                nan_refs[r] = f"decompose_reference:{ans.error}"
        self.cache.put(new)
        return nan_refs

    def _decompose(self, captions, references, live, diag, times):
        """Every decomposition of a call in ONE backend call (an in-process judge decodes
        them as one batch, up to judges.decode_batch rows): the live captions' (precision)
        and the references not in the cache (recall). Returns (caption answers, reference
        units, reference failures)."""
        cap_q = [Query(*P.render("decompose_caption", caption=captions[i])) for i in live] \
            if "precision" in self.rewards else []
        keys, units, todo = {}, {}, []
        if "recall" in self.rewards:
            refs = list(dict.fromkeys(r for i in live for r in references[i] if r.strip()))
            keys, units, todo = self._cached_units(refs)
            diag["reference_cache/hits"] = float(len(units))
            diag["reference_cache/misses"] = float(len(todo))
        ref_q = [Query(*P.render("decompose_reference", reference=r)) for r in todo]
        answers = _ask(self.text_backend.decompose, cap_q + ref_q, "decompose", times)
        nan_refs = self._store_units(todo, answers[len(cap_q):], keys, units)
        return answers[:len(cap_q)], units, nan_refs

    def prepare_references(self, references: Sequence[str]) -> dict[str, int]:
        """Decomposes the references not yet in the cache (one backend call) and caches them,
        so that a run over them never decomposes a reference; returns counts (cached before,
        decomposed now, failed: not cached, tried again by the run)."""
        refs = list(dict.fromkeys(r for r in references if r.strip()))
        keys, units, todo = self._cached_units(refs)
        answers = _ask(self.text_backend.decompose,
                       [Query(*P.render("decompose_reference", reference=r)) for r in todo],
                       "decompose", {})
        failed = self._store_units(todo, answers, keys, units)
        return {"cached": len(refs) - len(todo), "decomposed": len(todo) - len(failed),
                "failed": len(failed)}

    def _precision(self, images, captions, live, out, diag, nan, times, decomp):
        counts, queries, owners = [], [], []
        for i, ans in zip(live, decomp):
            if not ans.ok:
                out[i] = np.nan
                nan[f"nan/precision/decompose_caption:{ans.error}"] += 1
            elif not ans.value:
                out[i] = 0.0                                  # caption-side: no assertions
                diag["caption_zero/no_assertions"] += 1
                counts.append(0)
            else:
                counts.append(len(ans.value))
                for a in ans.value:
                    queries.append(a)
                    owners.append(i)
        roles = ("verify", "pointable") if self.pointability else ("verify",)
        # one call for both questions, so an in-process judge encodes each image once
        qs = [Query(*P.render(role, assertion=a), image=images[i])
              for role in roles for a, i in zip(queries, owners)]
        answers = _ask(self.backend.yes_no, qs, "_".join(roles), times)
        probs = {role: answers[k * len(owners):(k + 1) * len(owners)]
                 for k, role in enumerate(roles)}
        per_rollout: dict[int, list[float]] = collections.defaultdict(list)
        failed: dict[int, str] = {}
        for k, i in enumerate(owners):
            parts = [probs[role][k] for role in roles]
            bad = next(((role, a) for role, a in zip(roles, parts) if not a.ok), None)
            if bad is not None:
                failed.setdefault(i, f"{bad[0]}:{bad[1].error}")
                continue
            score = 1.0
            for a in parts:
                score *= self._p(a.value)
            per_rollout[i].append(score)
        for i in set(owners):
            if i in failed:
                out[i] = np.nan
                nan[f"nan/precision/{failed[i]}"] += 1
            else:
                out[i] = float(np.mean(per_rollout[i]))
        if counts:
            diag["assertions_mean"] = float(np.mean(counts))
            diag["assertions_max"] = float(np.max(counts))
        for role in roles:
            vals = [a.value for a in probs[role] if a.ok]
            if vals:
                diag[f"{role}_mean"] = float(np.mean(vals))

    def _coverage_queries(self, captions, references, live, units):
        queries, owners = [], []
        for i in live:
            for j, r in enumerate(references[i]):
                for u in units.get(r, ()):
                    queries.append(Query(*P.render("coverage", caption=captions[i], unit=u)))
                    owners.append((i, j))
        return queries, owners

    def _text_answers(self, cov_q, lin_q, times):
        """Coverage (yes/no) and linguistic (digits) answers. A backend with
        `answer_groups` (the in-process judge) gets both in one call, so each caption's two
        prompts share one prefix node; others get one call per role."""
        both = hasattr(self.text_backend, "answer_groups") and cov_q and lin_q
        if not both:
            return (_ask(self.text_backend.yes_no, cov_q, "coverage", times),
                    _ask(self.text_backend.digits, lin_q, "linguistic", times))
        (cu, cs), (lu, ls) = _unique(cov_q), _unique(lin_q)
        start = time.perf_counter()
        ca, la = self.text_backend.answer_groups([("yes_no", cu), ("digits", lu)])
        times["coverage_linguistic"] = times.get("coverage_linguistic", 0.0) + \
            time.perf_counter() - start
        if len(ca) != len(cu) or len(la) != len(lu):
            raise RuntimeError("the judge backend's answer_groups did not answer every query")
        return [ca[k] for k in cs], [la[k] for k in ls]

    def _recall(self, references, live, out, diag, nan, units, nan_refs, owners, answers):
        covered: dict[tuple, list] = collections.defaultdict(list)
        for (i, j), ans in zip(owners, answers):
            covered[(i, j)].append(ans)
        n_units = []
        for i in live:
            reason, recalls = None, []
            if not references[i]:
                reason = "reference:none"
            for j, r in enumerate(references[i]):
                if not r.strip():
                    reason = reason or "reference:empty"
                elif r in nan_refs:
                    reason = reason or nan_refs[r]
                elif not units[r]:
                    reason = reason or "reference:no_units"
                else:
                    ans = covered[(i, j)]
                    bad = next((a for a in ans if not a.ok), None)
                    if bad is not None:
                        reason = reason or f"coverage:{bad.error}"
                    else:
                        recalls.append(float(np.mean([self._p(a.value) for a in ans])))
                        n_units.append(len(ans))
            if reason is not None:
                out[i] = np.nan
                nan[f"nan/recall/{reason}"] += 1
            else:
                out[i] = float(np.mean(recalls))
        if n_units:
            diag["reference_units_mean"] = float(np.mean(n_units))

    @staticmethod
    def _linguistic_queries(captions, live):
        return [Query(*P.render(c, caption=captions[i])) for i in live
                for c in P.LINGUISTIC_CRITERIA]

    def _linguistic(self, live, out, nan, answers):
        criteria = tuple(P.LINGUISTIC_CRITERIA)
        k = len(criteria)
        for n, i in enumerate(live):
            ans = answers[n * k:(n + 1) * k]
            bad = next(((c, a) for c, a in zip(criteria, ans) if not a.ok), None)
            if bad is not None:
                out[i] = np.nan
                nan[f"nan/linguistic/{bad[0]}:{bad[1].error}"] += 1
            else:
                out[i] = float(np.mean([np.clip(digit_score(a.value), 0.0, 1.0) for a in ans]))

    # -- the scorer interface --------------------------------------------------------------
    def __call__(self, images: Sequence[Any], captions: Sequence[str],
                 references: Sequence[Sequence[str]], **context: Any) -> ScoreResult:
        n = len(captions)
        if len(images) != n or len(references) != n:
            raise ValueError(f"got {len(images)} images, {n} captions and {len(references)} "
                             "reference lists; give one of each per rollout")
        references = [[r] if isinstance(r, str) else list(r) for r in references]
        captions = [c if isinstance(c, str) else "" for c in captions]
        live = [i for i in range(n) if captions[i].strip()]
        diag: dict[str, float] = collections.defaultdict(float)
        nan: dict[str, float] = collections.defaultdict(float)
        times: dict[str, float] = {}
        diag["caption_zero/empty_caption"] = float(n - len(live))
        rewards = {}
        decomp, units, nan_refs = self._decompose(captions, references, live, diag, times)
        cov_q, owners = self._coverage_queries(captions, references, live, units) \
            if "recall" in self.rewards else ([], [])
        lin_q = self._linguistic_queries(captions, live) if "linguistic" in self.rewards else []
        cov_a, lin_a = self._text_answers(cov_q, lin_q, times)
        for name in self.rewards:
            out = np.zeros(n, np.float32)          # empty captions stay 0 (caption-side)
            if name == "precision":
                self._precision(images, captions, live, out, diag, nan, times, decomp)
            elif name == "recall":
                self._recall(references, live, out, diag, nan, units, nan_refs, owners, cov_a)
            else:
                self._linguistic(live, out, nan, lin_a)
            rewards[name] = out
            diag[f"nan/{name}"] = float(np.isnan(out).sum())
        diag.update(nan)
        diag.update({f"time_s/{role}": t for role, t in times.items()})
        return ScoreResult(rewards, dict(diag))
