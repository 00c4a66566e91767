"""BalCapScorer's rules (SPEC.md section 2) with a scripted backend: hand-computed rewards,
caption-side zeros, judge-side NaNs counted by reason, reference-unit caching, dedup."""
import numpy as np
import pytest

from balcap_jax.rewards.balcap import Answer, BalCapScorer, Query
from balcap_jax.rewards.types import ScoreResult
from tests.rewards.fakes import FakeBackend

CAP_A = "A red car drives fast. The scene feels calm."
CAP_C = "Wow."
REF = "A red car on a road."
ASSERTS = ["A car is red.", "The car drives fast.", "The scene feels calm."]
UNITS = ["There is a car.", "The car is red.", "The car is on a road."]
IMG = object()


def backend(**over):
    decomp = {CAP_A: ASSERTS, CAP_C: [], REF: UNITS}
    yes = {("verify", "A car is red."): 0.9, ("verify", "The car drives fast."): 0.5,
           ("verify", "The scene feels calm."): 0.8,
           ("pointable", "A car is red."): 1.0, ("pointable", "The car drives fast."): 0.6,
           ("pointable", "The scene feels calm."): 0.1}
    for cap, cov in ((CAP_A, (1.0, 0.7, 0.2)), (CAP_C, (0.0, 0.0, 0.1))):
        yes.update({("coverage", (cap, u)): c for u, c in zip(UNITS, cov)})
    digits = {}
    for cap, (c, f, h) in ((CAP_A, (5.0, 4.0, 3.0)), (CAP_C, (1.0, 2.0, 1.0))):
        digits.update({("clarity", cap): c, ("fluency", cap): f, ("coherence", cap): h})
    for table, changes in (("decomp", over.pop("decomp", {})), ("yes", over.pop("yes", {})),
                           ("digits", over.pop("digits", {}))):
        {"decomp": decomp, "yes": yes, "digits": digits}[table].update(changes)
    return FakeBackend(decomp=decomp, yes=yes, digits=digits, **over)


def score(b, captions, refs=None, **kw):
    scorer = BalCapScorer(b, **kw)
    n = len(captions)
    return scorer(images=[IMG] * n, captions=captions, references=refs or [[REF]] * n)


def test_hand_computed_rewards_and_caption_side_zeros():
    b = backend()
    res = score(b, [CAP_A, "", "   ", CAP_C])
    assert isinstance(res, ScoreResult)
    r = res.rewards
    assert all(r[k].dtype == np.float32 and r[k].shape == (4,) for k in r)
    np.testing.assert_allclose(r["precision"], [(0.9 * 1.0 + 0.5 * 0.6 + 0.8 * 0.1) / 3, 0, 0, 0],
                               rtol=1e-6)
    np.testing.assert_allclose(r["recall"], [(1.0 + 0.7 + 0.2) / 3, 0, 0, 0.1 / 3], rtol=1e-6)
    np.testing.assert_allclose(r["linguistic"], [(1.0 + 0.75 + 0.5) / 3, 0, 0, (0 + .25 + 0) / 3],
                               rtol=1e-6)
    d = res.diagnostics
    assert d["caption_zero/empty_caption"] == 2          # "" and whitespace
    assert d["caption_zero/no_assertions"] == 1          # CAP_C decomposes into []
    assert d["assertions_mean"] == 1.5 and d["assertions_max"] == 3
    assert d["nan/precision"] == d["nan/recall"] == d["nan/linguistic"] == 0
    assert {"time_s/decompose", "time_s/verify_pointable", "time_s/coverage",
            "time_s/linguistic"} <= set(d)
    # the captions' and the reference's decompositions go to the judge as one batch
    assert [bt for bt in b.batches if bt[0] == "decompose"] == [("decompose", 3)]
    # empty captions never reach a judge
    assert b.calls["decompose_caption"] == 2 and b.calls["clarity"] == 2
    # verification and pointability of all assertions go to the judge in one batch
    assert ("yes_no", 6) in b.batches


def test_threshold_and_no_pointability():
    r = score(backend(), [CAP_A], threshold=True).rewards
    # verify 0.9, 0.5, 0.8 -> 1, 1, 1 (0.5 counts as yes); pointable 1, 0.6, 0.1 -> 1, 1, 0
    np.testing.assert_allclose(r["precision"], [2 / 3], rtol=1e-6)
    np.testing.assert_allclose(r["recall"], [2 / 3], rtol=1e-6)      # 1, 0.7, 0.2 -> 1, 1, 0
    b = backend()
    r = score(b, [CAP_A], pointability=False).rewards
    np.testing.assert_allclose(r["precision"], [(0.9 + 0.5 + 0.8) / 3], rtol=1e-6)
    assert b.calls["pointable"] == 0


@pytest.mark.parametrize("over,reward,reason,count", [
    ({"decomp": {CAP_A: "timeout"}}, "precision", "decompose_caption:timeout", 1),
    ({"decomp": {CAP_A: "truncated_list"}}, "precision", "decompose_caption:truncated_list", 1),
    ({"yes": {("pointable", "The car drives fast."): "http_500"}}, "precision",
     "pointable:http_500", 1),
    ({"yes": {("coverage", (CAP_A, UNITS[1])): "not_yes_no"}}, "recall", "coverage:not_yes_no",
     1),
    # both rollouts share the reference: both lose their recall
    ({"decomp": {REF: "bad_json"}}, "recall", "decompose_reference:bad_json", 2),
    ({"decomp": {REF: []}}, "recall", "reference:no_units", 2),
    ({"digits": {("fluency", CAP_A): "no_digit"}}, "linguistic", "fluency:no_digit", 1),
])
def test_judge_side_failure_is_nan_and_counted(over, reward, reason, count):
    res = score(backend(**over), [CAP_A, CAP_C])
    r, d = res.rewards, res.diagnostics
    assert np.isnan(r[reward]).sum() == count and np.isnan(r[reward][0])
    assert d[f"nan/{reward}/{reason}"] == count and d[f"nan/{reward}"] == count
    for other in {"precision", "recall", "linguistic"} - {reward}:
        assert np.isfinite(r[other]).all()           # one failure spoils only its own reward


def test_reference_problems_are_nan_not_zero():
    res = score(backend(), [CAP_A, CAP_A, CAP_A], refs=[[REF], [], ["  "]])
    np.testing.assert_allclose(res.rewards["recall"][0], (1.0 + 0.7 + 0.2) / 3, rtol=1e-6)
    assert np.isnan(res.rewards["recall"][1:]).all()
    assert res.diagnostics["nan/recall/reference:none"] == 1
    assert res.diagnostics["nan/recall/reference:empty"] == 1


def test_several_references_average_their_recalls():
    ref2 = "A road."
    b = backend(decomp={ref2: ["There is a road."]},
                yes={("coverage", (CAP_A, "There is a road.")): 0.4})
    res = score(b, [CAP_A], refs=[[REF, ref2]])
    np.testing.assert_allclose(res.rewards["recall"], [((1.0 + 0.7 + 0.2) / 3 + 0.4) / 2],
                               rtol=1e-6)
    # a plain string is one reference
    res = score(backend(), [CAP_A], refs=[REF])
    np.testing.assert_allclose(res.rewards["recall"], [(1.0 + 0.7 + 0.2) / 3], rtol=1e-6)


def test_reference_units_cached_in_memory_and_on_disk(tmp_path):
    b = backend()
    scorer = BalCapScorer(b, cache_dir=str(tmp_path))
    args = dict(images=[IMG] * 2, captions=[CAP_A, CAP_C], references=[[REF]] * 2)
    first = scorer(**args)
    assert b.calls["decompose_reference"] == 1          # one reference shared by two rollouts
    assert first.diagnostics["reference_cache/misses"] == 1
    second = scorer(**args)                               # "the second epoch"
    assert b.calls["decompose_reference"] == 1
    assert second.diagnostics["reference_cache/hits"] == 1
    np.testing.assert_array_equal(first.rewards["recall"], second.rewards["recall"])
    # a new process (new scorer, same directory) reads the disk cache
    b2 = backend()
    BalCapScorer(b2, cache_dir=str(tmp_path))(**args)
    assert b2.calls["decompose_reference"] == 0
    # another judge checkpoint is another key
    b3 = backend(name="other-judge")
    BalCapScorer(b3, cache_dir=str(tmp_path))(**args)
    assert b3.calls["decompose_reference"] == 1


def test_reference_failures_are_not_cached(tmp_path):
    b = backend(decomp={REF: "timeout"})
    scorer = BalCapScorer(b, cache_dir=str(tmp_path))
    for _ in range(2):
        res = scorer(images=[IMG], captions=[CAP_A], references=[[REF]])
        assert np.isnan(res.rewards["recall"][0])
    assert b.calls["decompose_reference"] == 2
    b.decomp[REF] = UNITS                                  # the judge recovers
    res = scorer(images=[IMG], captions=[CAP_A], references=[[REF]])
    assert np.isfinite(res.rewards["recall"][0])


def test_group_rollouts_are_deduplicated():
    b = backend()
    g = 8
    res = score(b, [CAP_A] * g)
    assert b.calls["decompose_caption"] == 1 and b.calls["verify"] == 3
    assert b.calls["coverage"] == 3 and b.calls["clarity"] == 1
    assert len(set(res.rewards["precision"].tolist())) == 1
    # different image objects are different verify questions
    b = backend()
    BalCapScorer(b)(images=[object(), object()], captions=[CAP_A] * 2, references=[[REF]] * 2)
    assert b.calls["verify"] == 6 and b.calls["coverage"] == 3


def test_reward_subset_and_metadata():
    b = backend()
    scorer = BalCapScorer(b, rewards=("recall",))
    res = scorer(images=[IMG], captions=[CAP_A], references=[[REF]])
    assert set(res.rewards) == {"recall"} and b.calls["decompose_caption"] == 0
    meta = BalCapScorer(b).metadata()
    assert meta["prompt/verify"] == "verify-v1" and meta["judge/text"] == "fake-judge"
    with pytest.raises(ValueError, match="subset"):
        BalCapScorer(b, rewards=("style",))


def test_backend_contract_and_input_checks():
    class Short(FakeBackend):
        def digits(self, queries):
            return [Answer(3.0)] * (len(queries) - 1)
    b = backend()
    short = Short(decomp=b.decomp, yes=b.yes, digits=b.dig)
    with pytest.raises(RuntimeError, match="answer every query"):
        BalCapScorer(short)(images=[IMG], captions=[CAP_A], references=[[REF]])
    with pytest.raises(ValueError, match="one of each per rollout"):
        BalCapScorer(b)(images=[IMG], captions=[CAP_A, CAP_C], references=[[REF]] * 2)


def test_query_text():
    q = Query("shared ", "item")
    assert q.text == "shared item" and q.image is None
