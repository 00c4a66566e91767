"""balcap_jax.prepare_references: a dataset's references decomposed offline into the judges'
cache; a run over them then decomposes none; a killed preparation resumes; failures are not
cached."""
import json

import ml_collections
import pytest

from balcap_jax.prepare_references import prepare, references_of
from balcap_jax.rewards.balcap import BalCapScorer
from tests.rewards.fakes import FakeBackend
from tests.rewards.test_balcap import CAP_A, IMG, backend

REFS = [f"A red car number {i}." for i in range(5)]


def _backend(decomp=None, **kw):
    return backend(decomp={**{r: [f"unit of {r}"] for r in REFS}, **(decomp or {})},
                   yes={("coverage", (CAP_A, f"unit of {r}")): 0.5 for r in REFS}, **kw)


def test_a_prepared_dataset_is_never_decomposed_again(tmp_path):
    ann = tmp_path / "ann.jsonl"
    with open(ann, "w") as f:
        for i, r in enumerate(REFS + [REFS[0], "  "]):      # a repeat and an empty one
            f.write(json.dumps({"image": f"img{i}.png", "caption": r}) + "\n")
    cfg = ml_collections.ConfigDict({"data": {"builder": "captions", "files": str(ann),
                                              "allow_outside_root": True}})
    refs = references_of(cfg)
    assert refs == REFS
    b = _backend()
    totals = prepare(BalCapScorer(b, cache_dir=str(tmp_path / "cache")), refs, batch=2,
                     progress=False)
    assert totals == {"references": 5, "cached": 0, "decomposed": 5, "failed": 0}
    assert b.batches == [("decompose", 2), ("decompose", 2), ("decompose", 1)]
    # the run (a new process: a new scorer on the same cache) decomposes no reference
    run = _backend()
    res = BalCapScorer(run, cache_dir=str(tmp_path / "cache"))(
        images=[IMG] * 5, captions=[CAP_A] * 5, references=[[r] for r in REFS])
    assert run.calls["decompose_reference"] == 0
    assert res.diagnostics["reference_cache/misses"] == 0
    assert res.diagnostics["reference_cache/hits"] == 5
    assert list(res.rewards["recall"]) == [0.5] * 5


class _Killed(Exception):
    pass


def test_a_killed_preparation_resumes_and_failures_are_not_cached(tmp_path):
    cache = str(tmp_path / "cache")
    first = _backend()
    real = first.decompose

    def dies_on_the_second_batch(queries):
        if len(first.batches) == 1:
            raise _Killed
        return real(queries)
    first.decompose = dies_on_the_second_batch
    with pytest.raises(_Killed):
        prepare(BalCapScorer(first, cache_dir=cache), REFS, batch=2, progress=False)
    # run again: the first batch is cached, the rest is decomposed; one reference fails
    second = _backend(decomp={REFS[4]: "timeout"})
    totals = prepare(BalCapScorer(second, cache_dir=cache), REFS, batch=2, progress=False)
    assert totals == {"references": 5, "cached": 2, "decomposed": 2, "failed": 1}
    assert second.calls["decompose_reference"] == 3
    third = _backend()
    assert prepare(BalCapScorer(third, cache_dir=cache), REFS, batch=5, progress=False) == {
        "references": 5, "cached": 4, "decomposed": 1, "failed": 0}
    assert isinstance(third, FakeBackend) and third.calls["decompose_reference"] == 1
