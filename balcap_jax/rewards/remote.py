"""The judge roles through any OpenAI-compatible chat endpoint (vLLM, SGLang, an API).

    backend = RemoteBackend.from_url("http://127.0.0.1:8000/v1", "Qwen/Qwen2.5-VL-7B-Instruct",
                                     timeout=60, max_retries=2, concurrency=16)
    scorer = BalCapScorer(backend, cache_dir=...)

Implements the backend protocol of balcap.py on balcap_jax/client.py's `ChatClient`:
  decompose -> the answer text parsed by parsing.parse_json_list (a list cut off by max_tokens
               is "truncated_list");
  yes_no    -> p(yes) from the first answer token's top_logprobs when the client returns them
               (softmax over the yes/no spellings, as the in-process judge reads logits), else
               a hard 1.0/0.0 from the first word;
  digits    -> E[digit] from top_logprobs likewise, else the digit in the text.
Every failure is an `Answer(None, reason)`: the client's reasons ("timeout", "http_500",
"connection", "bad_json", ...) or the parser's ("not_yes_no", "no_digit", ...). Requests are
greedy (temperature 0). Nothing here can hang the run: the client bounds each whole request
(headers and body, however slowly a server sends them) by `timeout` per attempt, so a call ends
within timeout x (max_retries + 1) plus its backoffs, and never raises; a call that misses the
deadline is a "timeout" judge-side failure (NaN).

Images go as base64 data URLs (client.image_data_url), encoded once per image per call.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

from balcap_jax import client as chat
from balcap_jax.rewards.parsing import (
    digit_expectation_from_top_logprobs,
    parse_digit,
    parse_json_list,
    parse_yes_no,
    yes_probability_from_top_logprobs,
)
from balcap_jax.rewards.types import Answer, Query

__all__ = ["RemoteBackend"]

log = logging.getLogger(__name__)


def _client_returns_logprobs(client: Any) -> bool:
    """Whether the client's results carry `logprobs` (choices[0].logprobs)."""
    cls = getattr(chat, "ChatResult", None)
    if not isinstance(client, chat.ChatClient):   # a duck-typed client says so itself
        return bool(getattr(client, "returns_logprobs", False))
    return cls is not None and "logprobs" in {f.name for f in dataclasses.fields(cls)}


class RemoteBackend:
    """See the module docstring.

    client: a `ChatClient` (or anything with `.map(list_of_messages, **params)` returning
    results with `.text`, `.error`, `.finish_reason` and optionally `.logprobs`).
    name: the judge id that keys the reference-unit cache (default: the client's model).
    top_logprobs: alternatives requested per token (0 = do not ask for logprobs).
    params: extra request fields (seed, ...) sent with every request.
    """

    def __init__(self, client: Any, *, name: str | None = None, top_logprobs: int = 10,
                 list_max_tokens: int = 1024, answer_max_tokens: int = 4,
                 params: dict[str, Any] | None = None):
        self.client = client
        self.name = name or str(getattr(client, "model", "remote-judge"))
        self.list_max_tokens = int(list_max_tokens)
        self.answer_max_tokens = int(answer_max_tokens)
        self.params = dict(params or {})
        self.top_logprobs = int(top_logprobs) if _client_returns_logprobs(client) else 0

    @classmethod
    def from_url(cls, base_url: str, model: str, *, api_key: str | None = None,
                 timeout: float = 60.0, max_retries: int = 2, concurrency: int = 8,
                 **kwargs: Any) -> "RemoteBackend":
        return cls(chat.ChatClient(base_url, model, api_key, timeout=timeout,
                                   max_retries=max_retries, concurrency=concurrency), **kwargs)

    # -- requests ---------------------------------------------------------------------------
    def _messages(self, queries: Sequence[Query]) -> list[list[dict]]:
        urls: dict[int, str] = {}
        out = []
        for q in queries:
            if q.image is None:
                out.append([{"role": "user", "content": q.text}])
                continue
            if id(q.image) not in urls:
                urls[id(q.image)] = chat.image_data_url(q.image)
            out.append([{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": urls[id(q.image)]}},
                {"type": "text", "text": q.text}]}])
        return out

    def _run(self, queries: Sequence[Query], max_tokens: int, want_logprobs: bool) -> list:
        params = {"temperature": 0.0, "max_tokens": max_tokens, **self.params}
        if want_logprobs and self.top_logprobs > 0:
            params.update(logprobs=True, top_logprobs=self.top_logprobs)
        results = self.client.map(self._messages(queries), **params)
        if ("logprobs" in params and results
                and all(getattr(r, "error", None) == "http_400" for r in results)):
            # an endpoint that rejects logprobs: stop asking, answer from the text instead
            log.warning("judge endpoint rejected logprobs requests (HTTP 400); reading answers "
                        "from the text from now on")
            self.top_logprobs = 0
            params.pop("logprobs"), params.pop("top_logprobs")
            results = self.client.map(self._messages(queries), **params)
        return results

    @staticmethod
    def _content_logprobs(result: Any) -> Any:
        lp = getattr(result, "logprobs", None)
        return lp.get("content") if isinstance(lp, dict) else lp

    # -- the backend protocol ---------------------------------------------------------------
    def decompose(self, queries: Sequence[Query]) -> list[Answer]:
        out = []
        for r in self._run(queries, self.list_max_tokens, want_logprobs=False):
            if r.error:
                out.append(Answer(None, r.error))
                continue
            items, reason = parse_json_list(r.text)
            if items is None and getattr(r, "finish_reason", None) == "length":
                reason = "truncated_list"
            out.append(Answer(items, reason))
        return out

    def _read(self, queries, from_logprobs, from_text) -> list[Answer]:
        out = []
        for r in self._run(queries, self.answer_max_tokens, want_logprobs=True):
            if r.error:
                out.append(Answer(None, r.error))
                continue
            value, reason = from_logprobs(self._content_logprobs(r))
            if value is None:
                value, reason = from_text(r.text)
            out.append(Answer(value, reason))
        return out

    def yes_no(self, queries: Sequence[Query]) -> list[Answer]:
        return self._read(queries, yes_probability_from_top_logprobs, parse_yes_no)

    def digits(self, queries: Sequence[Query]) -> list[Answer]:
        return self._read(queries, digit_expectation_from_top_logprobs, parse_digit)
