"""A scriptable OpenAI chat-completions server on 127.0.0.1 (port 0) for client tests.

    with ChatServer(script) as server:   # script(request_json, n_seen) -> Reply
        client = ChatClient(server.base_url, "m")

A reply may carry logprobs (`completion(text, logprobs=...)`); as an OpenAI server does, they
are sent only when the request asks (`"logprobs": true`), cut to its `top_logprobs`.

`n_seen` counts earlier requests with the same first user text, so a script can fail the first
attempts of each request and succeed later. Every request is recorded in `server.requests`;
`server.max_in_flight` is the most requests handled at once.
"""
from __future__ import annotations

import dataclasses
import http.server
import json
import threading
import time
from typing import Any, Callable


@dataclasses.dataclass
class Reply:
    status: int = 200
    body: Any = None            # dict -> JSON; bytes/str sent as they are
    delay: float = 0.0          # seconds to wait before answering
    headers: dict[str, str] = dataclasses.field(default_factory=dict)


def logprob_content(tokens: list[list[tuple[str, float]]]) -> list[dict[str, Any]]:
    """OpenAI `logprobs.content` from per-token alternatives [(token, logprob), ...], the
    chosen token first."""
    return [{"token": alts[0][0], "logprob": alts[0][1],
             "top_logprobs": [{"token": t, "logprob": lp} for t, lp in alts]}
            for alts in tokens]


def completion(text: str, logprobs: list[list[tuple[str, float]]] | None = None
               ) -> dict[str, Any]:
    """A chat.completion body; `logprobs` (see logprob_content) is sent only if asked for."""
    choice = {"index": 0, "finish_reason": "stop",
              "message": {"role": "assistant", "content": text}}
    if logprobs is not None:
        choice["logprobs"] = {"content": logprob_content(logprobs)}
    return {"id": "x", "object": "chat.completion", "model": "fake", "choices": [choice],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def _honour_logprobs(req: dict[str, Any], body: Any) -> Any:
    """Drops choices' logprobs unless the request asked, else cuts them to top_logprobs."""
    if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
        return body
    body = json.loads(json.dumps(body))      # scripts may reuse one body
    k = req.get("top_logprobs") or 0
    for choice in body["choices"]:
        if not isinstance(choice, dict) or "logprobs" not in choice:
            continue
        if not req.get("logprobs"):
            choice["logprobs"] = None
            continue
        for entry in (choice["logprobs"] or {}).get("content") or []:
            entry["top_logprobs"] = entry.get("top_logprobs", [])[:k]
    return body


def user_text(req: dict[str, Any]) -> str:
    for m in req.get("messages", []):
        if m.get("role") == "user":
            c = m["content"]
            return c if isinstance(c, str) else "".join(
                p.get("text", "") for p in c if p.get("type") == "text")
    return ""


def echo(req: dict[str, Any], n_seen: int) -> Reply:
    return Reply(body=completion("echo: " + user_text(req)))


class ChatServer:
    def __init__(self, script: Callable[[dict[str, Any], int], Reply] = echo):
        self.script = script
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):  # noqa: N802 - http.server's naming
                n = int(self.headers.get("Content-Length", 0))
                req = json.loads(self.rfile.read(n))
                key = user_text(req)
                with server._lock:
                    server.requests.append(req)
                    server.headers.append(dict(self.headers))
                    seen = server._seen.get(key, 0)
                    server._seen[key] = seen + 1
                    server._in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server._in_flight)
                released = []

                def release():
                    if not released:
                        released.append(True)
                        with server._lock:
                            server._in_flight -= 1
                try:
                    reply = server.script(req, seen)
                    if reply.delay:
                        time.sleep(reply.delay)
                    body = _honour_logprobs(req, reply.body)
                    data = (json.dumps(body).encode() if isinstance(body, (dict, list))
                            else body.encode() if isinstance(body, str) else body or b"")
                    # Leave the in-flight count before any reply byte goes out: once the
                    # client has its reply it may send the next request before this thread
                    # reaches `finally`, which counted one request too many (a flaky bound).
                    release()
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)
                finally:
                    release()

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> "ChatServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
