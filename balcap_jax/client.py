"""An OpenAI-compatible chat-completions client: bounded concurrency, retries, timeouts.

Written once for every remote caller (re-captioning data, remote judges). Standard library only.

    client = ChatClient("http://127.0.0.1:8000/v1", "Qwen/Qwen2.5-VL-7B-Instruct",
                        api_key=os.environ.get("OPENAI_API_KEY"), concurrency=8)
    result = client.chat([user_message("Describe this image.", [image])], max_tokens=512)
    results = client.map([messages_1, messages_2, ...], temperature=0.0)   # input order

With `logprobs=True, top_logprobs=k` in the request, `result.logprobs` is the answer's
`choices[0].logprobs` as the server sent it (OpenAI: {"content": [{token, logprob,
top_logprobs}, ...]}); None when the server sent none.

Failures never raise out of `chat`/`map`/`imap_unordered`: a `ChatResult` has `text=None` and
`error` set to a short reason ("http_500", "timeout", "connection", "bad_json",
"bad_response", "no_content", "http_400", ...) with the details in `detail`, so callers can count
reasons (a judge-side failure is NaN, never a made-up score).

Retried with exponential backoff and jitter (honouring Retry-After): timeouts, connection errors,
HTTP 408/409/429/5xx, and answers that are not the expected JSON (often a proxy's error page).
Not retried: other 4xx (the request itself is wrong) and a reply without content.
`timeout` bounds each whole attempt (connecting, sending, the headers and the whole body), not
each socket read: a watchdog shuts the attempt's socket at the deadline, so a server that drips
one byte at a time fails as "timeout" too. A call therefore ends within
timeout x (max_retries + 1) + max_retries x max_backoff seconds, whatever the server does.
"""
from __future__ import annotations

import base64
import collections
import concurrent.futures
import dataclasses
import http.client
import io
import json
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Iterable, Iterator, Sequence

Messages = Sequence[dict[str, Any]]
_RETRY_STATUS = {408, 409, 429}
_SNIPPET = 300


@dataclasses.dataclass(frozen=True)
class ChatResult:
    text: str | None
    error: str | None = None       # short reason, None on success
    detail: str = ""               # the message behind `error`
    attempts: int = 0
    latency_s: float = 0.0         # all attempts, backoff included
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    logprobs: Any = None           # choices[0].logprobs as sent ({"content": [...]}) or None

    @property
    def ok(self) -> bool:
        return self.error is None


class _Failure(Exception):
    def __init__(self, error: str, detail: str, retryable: bool, retry_after: float | None = None):
        super().__init__(f"{error}: {detail}")
        self.error, self.detail, self.retryable, self.retry_after = (
            error, detail, retryable, retry_after)


def _endpoint(base_url: str) -> str:
    url = base_url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def _retry_after(headers) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def _content_text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # some servers answer with content parts
        parts = [p.get("text", "") for p in content if isinstance(p, dict)]
        return "".join(parts) if parts else None
    return None


class _Deadline:
    """Shuts the sockets of one attempt when its time is up (from a timer thread), so a read
    blocked on a server that keeps sending a byte now and then fails at the deadline."""

    def __init__(self, seconds: float):
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.expired = False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def register(self, sock) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                self._shut(sock)

    @staticmethod
    def _shut(sock) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _fire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                self._shut(sock)

    def __enter__(self):
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()


def _opener(deadline: _Deadline):
    """A urllib opener (proxies and TLS as urllib's own) whose connections register their
    socket with `deadline`."""
    class Conn(http.client.HTTPConnection):
        def connect(self):
            super().connect()
            deadline.register(self.sock)

    class TLSConn(http.client.HTTPSConnection):
        def connect(self):
            super().connect()
            deadline.register(self.sock)

    class Handler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(Conn, req)

    class TLSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(TLSConn, req, context=self._context)

    return urllib.request.build_opener(Handler, TLSHandler)


class ChatClient:
    """See the module docstring. Thread-safe; one instance can serve many threads."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *,
                 timeout: float = 60.0, max_retries: int = 4, concurrency: int = 8,
                 backoff: float = 1.0, max_backoff: float = 30.0,
                 headers: dict[str, str] | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url={base_url!r} must start with http:// or https://")
        if timeout <= 0 or max_retries < 0 or concurrency < 1:
            raise ValueError(f"need timeout > 0, max_retries >= 0, concurrency >= 1; got "
                             f"{timeout}, {max_retries}, {concurrency}")
        self.url = _endpoint(base_url)
        self.model = model
        self.timeout, self.max_retries, self.concurrency = timeout, max_retries, concurrency
        self.backoff, self.max_backoff = backoff, max_backoff
        self._headers = {"Content-Type": "application/json", **(headers or {})}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._sleep = sleep
        self._rng = random.Random()
        self._rng_lock = threading.Lock()

    # --- one request ------------------------------------------------------------------------
    def _post(self, body: bytes) -> dict[str, Any]:
        req = urllib.request.Request(self.url, data=body, headers=self._headers, method="POST")
        with _Deadline(self.timeout) as deadline:
            try:
                return self._attempt(req, deadline)
            except _Failure as f:
                if deadline.expired and f.error != "timeout" and f.retryable:
                    raise _Failure("timeout", f"no complete answer within {self.timeout}s "
                                   f"({f.error}: {f.detail})", True) from None
                raise

    def _attempt(self, req, deadline: _Deadline) -> dict[str, Any]:
        try:
            with _opener(deadline).open(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            try:
                text = e.read().decode("utf-8", "replace")[:_SNIPPET]
            except Exception:  # noqa: BLE001 - the body is only for the message
                text = ""
            retry = e.code in _RETRY_STATUS or e.code >= 500
            raise _Failure(f"http_{e.code}", text or str(e.reason), retry,
                           _retry_after(e.headers)) from None
        except (socket.timeout, TimeoutError) as e:
            raise _Failure("timeout", f"no answer within {self.timeout}s ({e})", True) from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (socket.timeout, TimeoutError)):
                raise _Failure("timeout", f"no answer within {self.timeout}s", True) from None
            raise _Failure("connection", f"{self.url}: {e.reason}", True) from None
        except (http.client.HTTPException, ConnectionError, OSError) as e:
            raise _Failure("connection", f"{self.url}: {type(e).__name__}: {e}", True) from None
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            snippet = raw[:_SNIPPET].decode("utf-8", "replace")
            raise _Failure("bad_json", f"{e}; answer began {snippet!r}", True) from None

    def _parse(self, data: Any) -> tuple[str, str | None, dict | None, Any]:
        try:
            choice = data["choices"][0]
            message = choice["message"]
        except (KeyError, IndexError, TypeError):
            snippet = json.dumps(data)[:_SNIPPET]
            raise _Failure("bad_response", f"no choices[0].message in {snippet}", True) from None
        text = _content_text(message.get("content") if isinstance(message, dict) else None)
        if text is None:
            raise _Failure("no_content", f"message without text content: "
                           f"{json.dumps(message)[:_SNIPPET]}", False)
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else None
        logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
        return text, choice.get("finish_reason"), usage, logprobs

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_backoff)
        with self._rng_lock:
            jitter = 0.5 + 0.5 * self._rng.random()
        return min(self.max_backoff, self.backoff * 2 ** (attempt - 1)) * jitter

    def chat(self, messages: Messages, **params: Any) -> ChatResult:
        """One chat completion; `params` go into the request body (max_tokens, temperature,
        top_p, seed, ...). Never raises for server or network trouble."""
        start = time.monotonic()
        try:
            body = json.dumps({"model": self.model, "messages": list(messages),
                               **params}).encode()
        except (TypeError, ValueError) as e:
            return ChatResult(None, "bad_request", f"messages/params are not JSON: {e}", 0)
        attempt, failure = 0, None
        while attempt <= self.max_retries:
            attempt += 1
            try:
                text, finish, usage, logprobs = self._parse(self._post(body))
                return ChatResult(text, None, "", attempt, time.monotonic() - start, finish,
                                  usage, logprobs)
            except _Failure as f:
                failure = f
                if not f.retryable or attempt > self.max_retries:
                    break
                self._sleep(self._delay(attempt, f.retry_after))
        return ChatResult(None, failure.error, failure.detail, attempt,
                          time.monotonic() - start)

    # --- many requests ----------------------------------------------------------------------
    def imap_unordered(self, many: Iterable[Messages], **params: Any
                       ) -> Iterator[tuple[int, ChatResult]]:
        """(index, result) as each finishes. `many` is consumed lazily with at most
        2 * concurrency requests built and in flight, so it may be a generator that loads images.
        Closing the iterator early cancels what has not started."""
        ex = concurrent.futures.ThreadPoolExecutor(self.concurrency,
                                                   thread_name_prefix="chat")
        pending: dict[concurrent.futures.Future, int] = {}
        source = iter(enumerate(many))
        try:
            exhausted = False
            while True:
                while not exhausted and len(pending) < 2 * self.concurrency:
                    try:
                        i, messages = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    pending[ex.submit(self.chat, messages, **params)] = i
                if not pending:
                    return
                done, _ = concurrent.futures.wait(
                    pending, return_when=concurrent.futures.FIRST_COMPLETED)
                for fut in done:
                    yield pending.pop(fut), fut.result()
        finally:
            ex.shutdown(wait=False, cancel_futures=True)

    def map(self, many: Iterable[Messages], *, progress: bool = False,
            **params: Any) -> list[ChatResult]:
        """Results in input order; failures are results with `error` set, never raised."""
        many = list(many)
        out: list[ChatResult | None] = [None] * len(many)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(many), desc="chat", unit="req")
        try:
            for i, r in self.imap_unordered(many, **params):
                out[i] = r
                if bar is not None:
                    bar.update()
        finally:
            if bar is not None:
                bar.close()
        return out  # type: ignore[return-value]


def failure_counts(results: Iterable[ChatResult]) -> dict[str, int]:
    """{reason: count} over failed results."""
    return dict(collections.Counter(r.error for r in results if r.error))


def image_data_url(image: Any, *, fmt: str = "JPEG", quality: int = 90) -> str:
    """A base64 data URL for an image: encoded bytes (sent as they are), a path, a PIL image or
    a uint8 [H, W, 3] array (encoded as `fmt`)."""
    from PIL import Image  # deferred: text-only callers need no PIL

    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            image = f.read()
    if isinstance(image, (bytes, bytearray)):
        data = bytes(image)
        mime = ("image/png" if data.startswith(b"\x89PNG") else
                "image/jpeg" if data.startswith(b"\xff\xd8") else
                "image/webp" if data[8:12] == b"WEBP" else
                "image/gif" if data.startswith(b"GIF8") else None)
        if mime is None:
            raise ValueError("image bytes are not PNG, JPEG, WebP or GIF; pass an array or a "
                             "PIL image to re-encode it")
    else:
        if not isinstance(image, Image.Image):
            image = Image.fromarray(image)
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format=fmt, **({"quality": quality}
                                                      if fmt.upper() == "JPEG" else {}))
        data, mime = buf.getvalue(), f"image/{fmt.lower()}"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def user_message(text: str, images: Sequence[Any] = ()) -> dict[str, Any]:
    """An OpenAI user turn: images (as data URLs) first, then the text."""
    if not images:
        return {"role": "user", "content": text}
    parts = [{"type": "image_url", "image_url": {"url": image_data_url(im)}} for im in images]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}
