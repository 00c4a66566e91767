"""ChatClient against a local fake server: success, retries, timeouts, garbage answers, order
and bounded concurrency of map, data URLs. Only 127.0.0.1; every wait is bounded."""
import base64
import io
import math
import socket
import time

import numpy as np
import pytest
from PIL import Image

from balcap_jax.client import ChatClient, failure_counts, image_data_url, user_message
from tests._fakes.chat_server import ChatServer, Reply, completion, echo, user_text


def _client(server, **kw):
    kw = {"timeout": 5.0, "max_retries": 3, "concurrency": 4, "backoff": 0.01, **kw}
    return ChatClient(server.base_url, "fake-model", **kw)


def test_success_sends_model_params_and_key():
    with ChatServer(echo) as server:
        c = _client(server, api_key="sekrit")
        r = c.chat([{"role": "user", "content": "hello"}], temperature=0.5, max_tokens=7)
    assert r.ok and r.text == "echo: hello" and r.attempts == 1
    assert r.finish_reason == "stop" and r.usage["total_tokens"] == 2
    req = server.requests[0]
    assert (req["model"], req["temperature"], req["max_tokens"]) == ("fake-model", 0.5, 7)
    assert server.headers[0]["Authorization"] == "Bearer sekrit"


def test_retries_on_500_then_succeeds_or_gives_up():
    def flaky(req, n_seen):
        return Reply(500, {"error": "boom"}) if n_seen < 2 else Reply(body=completion("ok"))
    with ChatServer(flaky) as server:
        r = _client(server).chat([user_message("a")])
        assert (r.text, r.error, r.attempts) == ("ok", None, 3)
        r = _client(server, max_retries=1).chat([user_message("b")])
        assert (r.text, r.error, r.attempts) == (None, "http_500", 2)
        assert "boom" in r.detail


def test_429_retry_after_and_400_not_retried():
    def script(req, n_seen):
        if user_text(req) == "bad":
            return Reply(400, {"error": {"message": "invalid image"}})
        return Reply(429, {}, headers={"Retry-After": "0"}) if n_seen == 0 else \
            Reply(body=completion("fine"))
    with ChatServer(script) as server:
        slept = []
        c = _client(server, sleep=slept.append, backoff=100.0)
        assert c.chat([user_message("x")]).text == "fine"
        assert slept == [0.0]  # Retry-After, not the 100 s backoff
        r = c.chat([user_message("bad")])
        assert (r.error, r.attempts) == ("http_400", 1) and "invalid image" in r.detail


def test_backoff_is_exponential_and_capped():
    with ChatServer(lambda req, n: Reply(503, "down")) as server:
        slept = []
        c = _client(server, sleep=slept.append, backoff=1.0, max_backoff=3.0, max_retries=4)
        r = c.chat([user_message("x")])
    assert (r.error, r.attempts) == ("http_503", 5)
    bounds = [(0.5, 1.0), (1.0, 2.0), (1.5, 3.0), (1.5, 3.0)]  # jitter in [0.5, 1] x base
    assert len(slept) == 4 and all(lo <= s <= hi for s, (lo, hi) in zip(slept, bounds))


def test_timeout_on_slow_answer():
    with ChatServer(lambda req, n: Reply(body=completion("late"), delay=1.5)) as server:
        c = _client(server, timeout=0.2, max_retries=1)
        t = time.monotonic()
        r = c.chat([user_message("x")])
        elapsed = time.monotonic() - t
    assert (r.text, r.error, r.attempts) == (None, "timeout", 2)
    assert elapsed < 1.2


class _DripServer:
    """A raw HTTP server that answers every request one byte per `every` seconds: the headers
    (`what="headers"`) or a JSON body that never ends (`what="body"`). Each byte arrives well
    within a per-read timeout, so only a deadline on the whole request stops the client."""

    def __init__(self, what: str, every: float = 0.1):
        import socket as socket_lib
        import threading
        self.what, self.every, self.stop = what, every, threading.Event()
        self.sock = socket_lib.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.base_url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self):
        import threading
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn):
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        body = b'{"choices": [{"message": {"content": "' + b"a" * 100_000
        data = head + b"X-Slow: " + b"x" * 100_000 if self.what == "headers" else \
            head + b"Content-Length: 200000\r\n\r\n" + body
        try:
            conn.recv(65536)
            for i in range(len(data)):
                if self.stop.is_set():
                    break
                conn.sendall(data[i:i + 1])
                time.sleep(self.every)
        except OSError:
            pass
        finally:
            conn.close()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.sock.close()


@pytest.mark.parametrize("what", ["headers", "body"])
def test_a_dripping_server_ends_within_the_stated_bound(what):
    """timeout bounds each whole attempt: 2 attempts of 0.6 s + a 0.01 s backoff, whatever the
    server does. (With a per-read timeout alone this call would take hours.) The call runs in
    a thread so that a regression fails here instead of hanging the suite."""
    import threading
    out = {}
    with _DripServer(what) as server:
        c = ChatClient(server.base_url, "m", timeout=0.6, max_retries=1, backoff=0.01,
                       max_backoff=0.01)
        t = time.monotonic()
        worker = threading.Thread(target=lambda: out.update(r=c.chat([user_message("x")])),
                                  daemon=True)
        worker.start()
        worker.join(timeout=15)
        elapsed = time.monotonic() - t
    assert not worker.is_alive(), "the call did not end within 15 s"
    bound = 0.6 * (1 + 1) + 1 * 0.01
    assert elapsed < bound + 0.5, elapsed
    assert (out["r"].error, out["r"].attempts) == ("timeout", 2), out["r"]


@pytest.mark.parametrize("body,reason", [
    (b"<html>502 Bad Gateway</html>", "bad_json"),
    ({"object": "error", "message": "overloaded"}, "bad_response"),
    ({"choices": []}, "bad_response"),
    ({"choices": [{"message": {"role": "assistant", "content": None}}]}, "no_content"),
])
def test_garbage_answers_are_reasons(body, reason):
    with ChatServer(lambda req, n: Reply(body=body)) as server:
        r = _client(server, max_retries=2).chat([user_message("x")])
    assert (r.text, r.error) == (None, reason)
    assert r.attempts == (1 if reason == "no_content" else 3)


def test_connection_refused_is_a_reason():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    c = ChatClient(f"http://127.0.0.1:{port}/v1", "m", timeout=1.0, max_retries=1,
                   backoff=0.01)
    r = c.chat([user_message("x")])
    assert (r.error, r.attempts) == ("connection", 2)


def test_map_keeps_order_bounds_concurrency_and_never_raises():
    def script(req, n_seen):
        t = user_text(req)
        if t.startswith("fail"):
            return Reply(400, "no")
        return Reply(body=completion(t.upper()), delay=0.05 * (int(t[-1]) % 3))
    texts = [f"msg{i}" if i % 4 else f"fail{i}" for i in range(12)]
    with ChatServer(script) as server:
        c = _client(server, concurrency=3)
        results = c.map([[user_message(t)] for t in texts], progress=False)
    assert [r.text for r in results] == [None if t.startswith("fail") else t.upper()
                                         for t in texts]
    assert failure_counts(results) == {"http_400": 3}
    assert 1 <= server.max_in_flight <= 3


def test_data_url_and_user_message():
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    url = image_data_url(arr, fmt="PNG")
    assert url.startswith("data:image/png;base64,")
    back = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
    np.testing.assert_array_equal(back, arr)
    jpeg = io.BytesIO()
    Image.fromarray(arr).save(jpeg, format="JPEG")
    assert image_data_url(jpeg.getvalue()).startswith("data:image/jpeg;base64,")
    with pytest.raises(ValueError, match="not PNG, JPEG"):
        image_data_url(b"plain text")
    msg = user_message("Describe.", [arr])
    assert [p["type"] for p in msg["content"]] == ["image_url", "text"]
    assert user_message("hi") == {"role": "user", "content": "hi"}


def _lp_script(req, n_seen):
    """Answers with logprobs: yes/no questions "Yes" at p 0.6 (no 0.3), ratings "4" at 0.5
    (2: 0.3, 5: 0.2), after a blank first token; lists as plain text."""
    text = user_text(req)
    if "JSON list" in text:
        return Reply(body=completion('["A car.", "A tree."]'))
    if "digit" in text:
        return Reply(body=completion("\n4", [[("\n", 0.0)], [("4", math.log(0.5)),
                                                            ("2", math.log(0.3)),
                                                            ("5", math.log(0.2))]]))
    return Reply(body=completion("Yes", [[("Yes", math.log(0.6)), (" no", math.log(0.3)),
                                          ("Maybe", math.log(0.1))]]))


def test_logprobs_come_back_only_when_asked():
    with ChatServer(_lp_script) as server:
        c = _client(server)
        plain = c.chat([user_message("Answer yes or no.")])
        asked = c.chat([user_message("Answer yes or no.")], logprobs=True, top_logprobs=2)
    assert plain.ok and plain.logprobs is None
    [entry] = asked.logprobs["content"]
    assert entry["token"] == "Yes" and entry["logprob"] == pytest.approx(math.log(0.6))
    assert [t["token"] for t in entry["top_logprobs"]] == ["Yes", " no"]   # cut to 2


def test_remote_judge_reads_soft_answers_from_client_logprobs():
    """RemoteBackend on the real ChatClient asks for top_logprobs and reads p(yes) and E[digit]
    from them, not the hard answer in the text (which would give 1.0 and 4)."""
    from balcap_jax.rewards import prompts as P
    from balcap_jax.rewards.balcap import BalCapScorer, Query
    from balcap_jax.rewards.remote import RemoteBackend
    with ChatServer(_lp_script) as server:
        backend = RemoteBackend(_client(server), top_logprobs=5)
        assert backend.top_logprobs == 5                 # ChatResult has logprobs now
        [yes] = backend.yes_no([Query(*P.render("verify", assertion="A car."))])
        [digit] = backend.digits([Query(*P.render("clarity", caption="A car."))])
        req = server.requests[-1]
        two = RemoteBackend(_client(server), top_logprobs=2)
        [digit2] = two.digits([Query(*P.render("clarity", caption="A car."))])
        res = BalCapScorer(backend)(images=[np.zeros((8, 8, 3), np.uint8)],
                                    captions=["A car by a tree."], references=[["A car."]])
    assert (req["logprobs"], req["top_logprobs"]) == (True, 5)
    assert yes.error is None and yes.value == pytest.approx(0.6 / 0.9)
    assert digit.error is None and digit.value == pytest.approx(4 * .5 + 2 * .3 + 5 * .2)
    assert digit2.value == pytest.approx((4 * .5 + 2 * .3) / .8)     # only the top 2 sent
    r = res.rewards
    np.testing.assert_allclose(r["precision"], [(0.6 / 0.9) ** 2], rtol=1e-6)
    np.testing.assert_allclose(r["recall"], [0.6 / 0.9], rtol=1e-6)
    np.testing.assert_allclose(r["linguistic"], [(3.6 - 1) / 4], rtol=1e-6)
