"""The remote judge backend against a real HTTP server on 127.0.0.1 (port 0, a thread) that
answers well, slowly, with errors and with garbage; every wait bounded (each test < 5 s)."""
import json
import math
import time
import types

import numpy as np
import pytest

from balcap_jax.client import ChatClient
from balcap_jax.rewards.balcap import BalCapScorer, Query
from balcap_jax.rewards.remote import RemoteBackend
from tests._fakes.chat_server import ChatServer, Reply, completion, user_text

CAP = "A red car is parked by a tree. It feels nostalgic."
REF = "A red car parked next to a tree."
ASSERTS = ["A car is red.", "The car is parked by a tree.", "The scene feels nostalgic."]
UNITS = ["There is a car.", "The car is red.", "The car is next to a tree."]
IMAGE = np.full((8, 8, 3), 127, np.uint8)


def judge(req, n_seen):
    """A well-behaved judge: answers by role, recognised from the prompt text."""
    text = user_text(req)
    last = text.rsplit(": ", 1)[-1]
    if "Split the following image caption" in text:
        answer = "```json\n" + json.dumps(ASSERTS) + "\n```"
    elif "Split the following reference" in text:
        answer = "Units:\n" + json.dumps(UNITS)
    elif "Is the following assertion pointable" in text:
        answer = "No." if "nostalgic" in last else "Yes"
    elif "true of this image" in text:
        answer = "no" if "tree" in last else "yes"
    elif "Does the caption state" in text:
        answer = "No" if last.startswith("The car is next") else "Yes"
    elif "Rate the clarity" in text:
        answer = "5"
    elif "Rate the fluency" in text:
        answer = "Rating: 4/5"
    elif "Rate the coherence" in text:
        answer = "3"
    else:
        answer = "?"
    return Reply(body=completion(answer))


def _backend(server, **kw):
    kw = {"timeout": 2.0, "max_retries": 2, "concurrency": 4, "backoff": 0.01, **kw}
    return RemoteBackend(ChatClient(server.base_url, "judge-model", **kw))


def _score(backend, n=2):
    return BalCapScorer(backend)(images=[IMAGE] * n, captions=[CAP] * n, references=[[REF]] * n)


def test_remote_scorer_answers_well():
    with ChatServer(judge) as server:
        backend = _backend(server)
        res = _score(backend)
    r = res.rewards
    # verify: yes, no, yes; pointable: yes, yes, no -> (1*1 + 0*1 + 1*0) / 3
    np.testing.assert_allclose(r["precision"], [1 / 3] * 2, rtol=1e-6)
    np.testing.assert_allclose(r["recall"], [2 / 3] * 2, rtol=1e-6)
    np.testing.assert_allclose(r["linguistic"], [(1 + 0.75 + 0.5) / 3] * 2, rtol=1e-6)
    assert res.diagnostics["nan/precision"] == 0
    # greedy requests; images only for the multimodal roles, as data URLs
    assert all(req["temperature"] == 0.0 for req in server.requests)
    with_image = [req for req in server.requests if isinstance(req["messages"][0]["content"], list)]
    assert len(with_image) == 6                                    # 3 verify + 3 pointable
    url = with_image[0]["messages"][0]["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    # 1 caption + 1 reference decomposition, 6 yes/no, 3 coverage, 3 digits (rollouts deduped)
    assert len(server.requests) == 14
    assert backend.name == "judge-model"


def test_slow_judge_times_out_to_nan_without_hanging():
    def slow(req, n_seen):
        return Reply(body=completion("yes"), delay=1.0)
    with ChatServer(slow) as server:
        start = time.monotonic()
        res = _score(_backend(server, timeout=0.2, max_retries=1), n=1)
        elapsed = time.monotonic() - start
    assert elapsed < 3.0
    for name in ("precision", "recall", "linguistic"):
        assert np.isnan(res.rewards[name]).all()
    d = res.diagnostics
    assert d["nan/precision/decompose_caption:timeout"] == 1
    assert d["nan/recall/decompose_reference:timeout"] == 1
    assert d["nan/linguistic/clarity:timeout"] == 1


def test_server_errors_are_retried_then_succeed():
    def flaky(req, n_seen):
        return Reply(500, {"error": "overloaded"}) if n_seen == 0 else judge(req, n_seen)
    with ChatServer(flaky) as server:
        res = _score(_backend(server))
        n_requests = len(server.requests)
    np.testing.assert_allclose(res.rewards["precision"], [1 / 3] * 2, rtol=1e-6)
    np.testing.assert_allclose(res.rewards["recall"], [2 / 3] * 2, rtol=1e-6)
    assert n_requests == 2 * 14                                     # each failed once


def test_persistent_errors_are_nan_with_reasons():
    def broken(req, n_seen):
        return Reply(503, {"error": "down"})
    with ChatServer(broken) as server:
        res = _score(_backend(server, max_retries=1), n=1)
    assert res.diagnostics["nan/precision/decompose_caption:http_503"] == 1
    assert res.diagnostics["nan/linguistic/clarity:http_503"] == 1


@pytest.mark.parametrize("body,reasons", [
    (completion("I would rather not say."),
     {"precision": "decompose_caption:no_list", "recall": "decompose_reference:no_list",
      "linguistic": "clarity:no_digit"}),
    (b"<html>proxy error</html>",
     {"precision": "decompose_caption:bad_json", "linguistic": "clarity:bad_json"}),
])
def test_garbage_answers_are_nan_with_reasons(body, reasons):
    with ChatServer(lambda req, n: Reply(body=body)) as server:
        res = _score(_backend(server, max_retries=0), n=1)
    for reward, reason in reasons.items():
        assert np.isnan(res.rewards[reward][0])
        assert res.diagnostics[f"nan/{reward}/{reason}"] == 1


def test_garbage_yes_no_and_truncated_lists():
    def odd(req, n_seen):
        text = user_text(req)
        if "Split the following image caption" in text:
            return Reply(body=completion(json.dumps(ASSERTS)))
        if "Split the following reference" in text:
            body = completion('["There is a car.", "The car')
            body["choices"][0]["finish_reason"] = "length"
            return Reply(body=body)
        return Reply(body=completion("Perhaps."))
    with ChatServer(odd) as server:
        res = _score(_backend(server, max_retries=0), n=1)
    d = res.diagnostics
    assert d["nan/precision/verify:not_yes_no"] == 1
    assert d["nan/recall/decompose_reference:truncated_list"] == 1
    assert d["nan/linguistic/clarity:no_digit"] == 1


class _LogprobClient:
    """A duck-typed client that returns top_logprobs (what ChatClient gives once it exposes
    choices[0].logprobs); records the request params."""
    returns_logprobs = True
    model = "lp-judge"

    def __init__(self, tops, reject_logprobs=False):
        self.tops, self.reject, self.params = tops, reject_logprobs, []

    def map(self, many, **params):
        self.params.append(params)
        out = []
        for _ in many:
            if self.reject and "logprobs" in params:
                out.append(types.SimpleNamespace(text=None, error="http_400", logprobs=None,
                                                 finish_reason=None))
                continue
            content = [{"token": self.tops[0][0], "logprob": self.tops[0][1],
                        "top_logprobs": [{"token": t, "logprob": lp} for t, lp in self.tops]}]
            out.append(types.SimpleNamespace(text=self.tops[0][0], error=None,
                                             logprobs={"content": content}, finish_reason="stop"))
        return out


def test_logprobs_give_soft_answers():
    c = _LogprobClient([("Yes", math.log(0.6)), ("No", math.log(0.2)), ("4", math.log(0.2))])
    b = RemoteBackend(c, top_logprobs=5)
    [a] = b.yes_no([Query("Is it? ", "x")])
    assert a.error is None and a.value == pytest.approx(0.75)
    assert c.params[-1]["logprobs"] is True and c.params[-1]["top_logprobs"] == 5
    c = _LogprobClient([("4", math.log(0.5)), ("2", math.log(0.5)), ("yes", -1.0)])
    [a] = RemoteBackend(c).digits([Query("Rate ", "x")])
    assert a.value == pytest.approx(3.0)


def test_endpoint_rejecting_logprobs_falls_back_to_text():
    c = _LogprobClient([("No", -0.1)], reject_logprobs=True)
    b = RemoteBackend(c)
    assert [a.value for a in b.yes_no([Query("q", "1"), Query("q", "2")])] == [0.0, 0.0]
    assert b.top_logprobs == 0 and "logprobs" not in c.params[-1]


def test_plain_client_without_logprobs_does_not_ask_for_them():
    with ChatServer(judge) as server:
        b = _backend(server)
        b.yes_no([Query("Is the following assertion true of this image? ", "Assertion: x",
                        IMAGE)])
        req = server.requests[0]
    import dataclasses

    from balcap_jax.client import ChatResult
    has = "logprobs" in {f.name for f in dataclasses.fields(ChatResult)}
    assert ("logprobs" in req) == has


def _judges_config(tmp_path, **judges):
    from balcap_jax.config import base_config
    cfg = base_config()
    cfg.workdir = str(tmp_path)
    cfg.scorer.name = "judges"
    cfg.rl.rewards = ["precision", "recall", "linguistic"]
    cfg.judges.update(judges)
    return cfg


def test_scorer_from_config_remote(tmp_path, monkeypatch):
    from balcap_jax.build import build_scorer
    monkeypatch.setenv("JUDGE_KEY", "k123")
    with ChatServer(judge) as server:
        cfg = _judges_config(tmp_path, backend="remote", base_url=server.base_url, model="jm",
                             api_key_env="JUDGE_KEY", timeout=2.0, max_retries=0, threshold=True)
        scorer = build_scorer(cfg, None)
        res = scorer(images=[IMAGE], captions=[CAP], references=[[REF]])
        auth = server.headers[0]["Authorization"]
    assert auth == "Bearer k123"
    np.testing.assert_allclose(res.rewards["precision"], [1 / 3], rtol=1e-6)
    assert scorer.threshold and scorer.backend.name == "jm"
    assert (tmp_path / "judge_cache" / "reference_units.sqlite").exists()


@pytest.mark.parametrize("judges,match", [
    ({"backend": "cloud"}, "use 'in_process' or 'remote'"),
    ({"backend": "remote", "model": "m"}, "needs judges.base_url"),
    ({"backend": "in_process"}, "needs judges.multimodal_path"),
])
def test_scorer_from_config_errors(tmp_path, judges, match):
    from balcap_jax.build import build_scorer
    with pytest.raises(ValueError, match=match):
        build_scorer(_judges_config(tmp_path, **judges), None)
