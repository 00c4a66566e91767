"""Judge throughput: assertions scored per second by the in-process judge (our JAX Qwen2.5-VL,
shared image prefix in the KV cache) against the remote path (RemoteBackend -> ChatClient ->
HTTP) pointed at a local OpenAI-compatible server that runs the same tiny model through
transformers (PyTorch CPU).

    .venv/bin/python -m benchmarks.judges [--captions 8] [--group 4] [--assertions 6]
        [--repeats 2] [--decompose-tokens 8] [--image 112]
    .venv/bin/python -m benchmarks.judges --preset qwen2_5_vl_7b      # the GPU check (below)
    .venv/bin/python -m benchmarks.judges --preset qwen2_5_vl_7b --shrink   # its CPU smoke run

Setup: a server subprocess builds a tiny random Qwen2.5-VL checkpoint with transformers (tiny
BPE tokenizer trained on the judge prompts, weights and norms drawn as in
tests/models/qwen_vl_fixtures.py), saves it, and serves it on 127.0.0.1 (port 0). Our judge is
`judges.load_backend(ckpt)` (models.from_pretrained), float32.

Workload: --captions captions, --group rollouts per image (as GRPO groups share one), each with
--assertions assertions. BalCapScorer(rewards=("precision",)) scores them: verification and
pointability of every assertion (2 yes/no questions each). Decomposition is scripted (fixed
lists) so every path scores exactly captions x assertions; greedy decomposition itself is timed
separately (--decompose-tokens new tokens per caption, 0 = skip). Each path: the first call
(compilation for ours, warm-up for the server) timed on its own, then the best of --repeats.

The server (`--serve CKPT`) batches requests that arrive within --batch-wait seconds (up to
--max-batch, as vLLM would batch them), runs greedy `generate` (every request greedy; it
ignores temperature) and returns the OpenAI `logprobs.content` of every generated token when
asked, with up to top_logprobs alternatives, no cap. The remote judge asks for the whole
vocabulary (--top-logprobs 0 = vocab size) so that p(yes) is read from the same distribution as
ours: a random judge rarely puts yes/no in an API's top 20 (a trained one always does).

Printed (one JSON line each): setup; one line per path (in_process shared prefix, in_process
share_prefix=False, remote) with assertions/s, questions/s, first_call_s, timed_s; the
decomposition times; the agreement of in-process vs remote p(yes) read at the first answer
token (text-only questions: same inputs, so float error; image questions: the image goes over
HTTP as JPEG, so pixels differ a little; a question whose greedy first token is blank has no
first-token answer remotely and is left out), and of the precision rewards with the remote
judge's usual 4-token answers (its reader skips a blank first token, ours never does); a
summary with the ratios and peak RSS of this process (JAX judge + client) and of the server.

GPU check (--preset NAME): the in-process judge alone, a random-init model of the named hub
shapes (e.g. Qwen2.5-VL-7B) in --dtype (bfloat16), Qwen2.5's tokenizer, --image square images;
defaults 64 captions x 12 assertions, 8 rollouts per image. Assertions per second with the
shared image prefix against share_prefix=False, and the largest difference between the two
paths' precision rewards (bfloat16: expected below 2e-2). No transformers server: a 7B model
in PyTorch on the host would measure nothing useful. --shrink cuts the shapes to a tiny model
for a CPU smoke run.
"""
from __future__ import annotations

import argparse
import base64
import collections
import http.server
import io
import json
import os
import queue
import resource
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _k, _v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"),
               ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_k, _v)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB


# ----------------------------------------------------------------------------------------------
# The tiny judge checkpoint (transformers)
# ----------------------------------------------------------------------------------------------

WORDS = ("red blue green car tree dog cat sky street parked near under a the is are two of on "
         "in with small large old wooden building window person sitting standing").split()


def _assertion(c: int, k: int) -> str:
    r = np.random.default_rng(1000 * c + k)
    return " ".join(r.choice(WORDS, 6)).capitalize() + "."


def build_checkpoint(path: str, vocab_size: int, seed: int = 0) -> None:
    """Tokenizer + random Qwen2.5-VL (text 2 layers x 64, vision 2 blocks x 32) saved to path."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from balcap_jax.rewards import prompts as P
    from balcap_jax.tokenizers import train_tiny_bpe
    corpus = [p.shared + p.item for p in P.PROMPTS.values()] * 3 + [
        "yes no Yes No 1 2 3 4 5 " * 20, " ".join(WORDS) * 5]
    tok = train_tiny_bpe(corpus, vocab_size=vocab_size)
    ids = {t: tok.convert_tokens_to_ids(t) for t in
           ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>",
            "<|im_end|>", "<|endoftext|>")}
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                          "mrope_section": [2, 3, 3]},
                         initializer_range=0.2, bos_token_id=ids["<|endoftext|>"],
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                         tie_word_embeddings=False),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2,
                           out_hidden_size=64, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
                           initializer_range=0.2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():    # norms and biases random too, so logits are far from flat
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump({"min_pixels": 56 * 56, "max_pixels": 448 * 448, "patch_size": 14,
                   "merge_size": 2, "temporal_patch_size": 2}, f)


# ----------------------------------------------------------------------------------------------
# The local OpenAI-compatible server (transformers)
# ----------------------------------------------------------------------------------------------

def _decode_image(url: str):
    from PIL import Image
    if not url.startswith("data:"):
        raise ValueError("only data: image URLs are served here")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


def _conversation(messages: list[dict]) -> list[dict]:
    """OpenAI messages -> our processor's conversation (images as PIL in content items)."""
    conv = []
    for m in messages:
        c = m.get("content")
        if isinstance(c, str):
            conv.append({"role": m["role"], "content": c})
            continue
        parts = []
        for p in c:
            if p.get("type") == "text":
                parts.append({"type": "text", "text": p["text"]})
            elif p.get("type") == "image_url":
                parts.append({"type": "image", "image": _decode_image(p["image_url"]["url"])})
        conv.append({"role": m["role"], "content": parts})
    return conv


class ModelServer:
    """Greedy chat completions from a transformers Qwen2.5-VL; requests batched by a worker."""

    def __init__(self, path: str, max_batch: int, batch_wait: float, threads: int = 1):
        import torch
        torch.set_num_threads(threads)
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        from balcap_jax.processing import Qwen25VLProcessor, QwenImageProcessor
        self.torch = torch
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path).eval()
        self.tok = AutoTokenizer.from_pretrained(path)     # as judges.load_backend reads it
        self.proc = Qwen25VLProcessor(self.tok, QwenImageProcessor.from_pretrained(path))
        self.eos = [i for i in (self.tok.convert_tokens_to_ids("<|im_end|>"),
                                self.tok.convert_tokens_to_ids("<|endoftext|>")) if i is not None]
        self.strings = [self.tok.decode([i]) for i in range(self.model.config.text_config
                                                             .vocab_size)]
        self.max_batch, self.batch_wait = max_batch, batch_wait
        self.queue: queue.Queue = queue.Queue()
        self.stats = collections.Counter()
        threading.Thread(target=self._worker, daemon=True).start()

    def _worker(self) -> None:
        while True:
            items = [self.queue.get()]
            deadline = time.monotonic() + self.batch_wait
            while len(items) < self.max_batch:
                try:
                    items.append(self.queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            groups = collections.defaultdict(list)
            for it in items:
                req = it["req"]
                k = int(req.get("top_logprobs") or 0) if req.get("logprobs") else -1
                groups[(int(req.get("max_tokens") or 64), k)].append(it)
            for (max_tokens, k), group in groups.items():
                try:
                    outs = self._generate([it["req"] for it in group], max_tokens, k)
                except Exception as e:  # noqa: BLE001 - answered as HTTP 500
                    outs = [e] * len(group)
                for it, out in zip(group, outs):
                    it["out"] = out
                    it["done"].set()

    def _generate(self, reqs: list[dict], max_tokens: int, k: int) -> list[dict]:
        torch = self.torch
        start = time.perf_counter()
        enc = self.proc([_conversation(r["messages"]) for r in reqs])
        inputs = {key: torch.from_numpy(v.astype(np.int64) if v.dtype.kind == "i" else v)
                  for key, v in ((key, np.asarray(v)) for key, v in enc.items())}
        with torch.no_grad():
            gen = self.model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False,
                                      eos_token_id=self.eos, pad_token_id=self.tok.pad_token_id,
                                      output_logits=k >= 0, return_dict_in_generate=True)
        new = gen.sequences[:, inputs["input_ids"].shape[1]:].tolist()
        logps = (torch.log_softmax(torch.stack(gen.logits, 1).float(), -1)
                 if k >= 0 else None)                                  # [B, steps, V]
        outs = []
        for b, row in enumerate(new):
            stop = next((j for j, t in enumerate(row) if t in self.eos), None)
            ids = row if stop is None else row[:stop]
            choice = {"index": 0, "finish_reason": "length" if stop is None else "stop",
                      "message": {"role": "assistant",
                                  "content": self.tok.decode(ids, skip_special_tokens=True)}}
            if logps is not None:
                content = []
                for j, t in enumerate(ids):
                    lp = logps[b, j]
                    top = torch.topk(lp, min(k, lp.shape[0])) if k > 0 else None
                    content.append({"token": self.strings[t], "logprob": float(lp[t]),
                                    "top_logprobs": [] if top is None else [
                                        {"token": self.strings[i], "logprob": v}
                                        for v, i in zip(top.values.tolist(),
                                                        top.indices.tolist())]})
                choice["logprobs"] = {"content": content}
            outs.append({"id": "bench", "object": "chat.completion", "model": "tiny",
                         "choices": [choice]})
        self.stats["requests"] += len(reqs)
        self.stats["batches"] += 1
        self.stats["model_s"] += time.perf_counter() - start
        return outs

    def handler(self):
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802
                self._send(200, {**server.stats, "max_rss_mb": _rss_mb()})

            def do_POST(self):  # noqa: N802
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                item = {"req": req, "done": threading.Event()}
                server.queue.put(item)
                if not item["done"].wait(300):
                    return self._send(504, {"error": "model worker did not answer"})
                out = item["out"]
                if isinstance(out, Exception):
                    return self._send(500, {"error": f"{type(out).__name__}: {out}"})
                self._send(200, out)
        return Handler


def serve(args) -> None:
    if not os.path.exists(os.path.join(args.serve, "config.json")):
        build_checkpoint(args.serve, args.vocab)
    model = ModelServer(args.serve, args.max_batch, args.batch_wait, args.server_threads)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), model.handler())
    httpd.daemon_threads = True
    print(f"READY {httpd.server_address[1]}", flush=True)

    def exit_with_parent():   # stdin is the parent's pipe: EOF = the benchmark is gone
        sys.stdin.read()
        os._exit(0)
    threading.Thread(target=exit_with_parent, daemon=True).start()
    httpd.serve_forever(poll_interval=0.1)


def _start_server(ckpt: str, args, timeout: float = 300.0):
    cmd = [sys.executable, "-m", "benchmarks.judges", "--serve", ckpt, "--vocab",
           str(args.vocab), "--max-batch", str(args.max_batch), "--batch-wait",
           str(args.batch_wait), "--server-threads", str(args.server_threads)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"judge server exited with {proc.returncode} before it was ready")
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()
            if line.startswith("READY "):
                return proc, int(line.split()[1])
    proc.kill()
    raise TimeoutError(f"judge server not ready within {timeout}s")


# ----------------------------------------------------------------------------------------------
# The workload and the timed paths
# ----------------------------------------------------------------------------------------------

class ScriptedDecomposer:
    """Text backend whose decompose returns fixed assertion lists (by caption); other roles go
    to `inner`, so every path scores the same captions x assertions."""

    def __init__(self, inner, lists: dict[str, list[str]]):
        self.inner, self.lists, self.name = inner, lists, "scripted"

    def decompose(self, queries):
        from balcap_jax.rewards.balcap import Answer
        return [Answer(list(self.lists[q.item.split(": ", 1)[1]])) for q in queries]

    def yes_no(self, queries):
        return self.inner.yes_no(queries)

    def digits(self, queries):
        return self.inner.digits(queries)


def _time_scorer(backend, images, captions, lists, repeats: int) -> dict:
    from balcap_jax.rewards.balcap import BalCapScorer
    scorer = BalCapScorer(backend, text_backend=ScriptedDecomposer(backend, lists),
                          rewards=("precision",))
    refs = [[""]] * len(captions)
    t = time.perf_counter()
    res = scorer(images, captions, refs)
    first = time.perf_counter() - t
    best = float("inf")
    for _ in range(repeats):
        if hasattr(backend, "stats"):
            backend.stats.clear()           # so the printed stats are the last call's
        t = time.perf_counter()
        res = scorer(images, captions, refs)
        best = min(best, time.perf_counter() - t)
    n = sum(len(v) for v in lists.values())
    nan = int(np.isnan(res.rewards["precision"]).sum())
    return {"assertions": n, "questions": 2 * n, "first_call_s": round(first, 2),
            "timed_s": round(best, 3), "assertions_per_s": round(n / best, 1),
            "questions_per_s": round(2 * n / best, 1), "nan_rewards": nan,
            "precision": res.rewards["precision"]}


def _time_decompose(backend, queries, repeats: int) -> dict:
    t = time.perf_counter()
    backend.decompose(queries)
    first = time.perf_counter() - t
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        backend.decompose(queries)
        best = min(best, time.perf_counter() - t)
    return {"first_call_s": round(first, 2), "timed_s": round(best, 3),
            "captions_per_s": round(len(queries) / best, 1)}


def _line(obj: dict) -> None:
    print(json.dumps({k: v for k, v in obj.items() if not isinstance(v, np.ndarray)}),
          flush=True)


def run(args) -> None:
    t0 = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="judges_bench.")
    ckpt = os.path.join(tmp, "tiny-vl-judge")
    server, port = _start_server(ckpt, args)
    try:
        _bench(args, ckpt, port, t0)
    finally:
        server.kill()
        server.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


def _bench(args, ckpt: str, port: int, t0: float) -> None:
    import jax
    from PIL import Image

    from balcap_jax.client import image_data_url
    from balcap_jax.rewards import prompts as P
    from balcap_jax.rewards.balcap import Query
    from balcap_jax.rewards.judges import InProcessBackend, load_backend
    from balcap_jax.rewards.remote import RemoteBackend
    rss_before = _rss_mb()
    judge = load_backend(ckpt, dtype="float32", prefix_batch=args.prefix_batch,
                         item_tokens=args.item_tokens,
                         list_max_tokens=args.decompose_tokens or 1)
    with open(os.path.join(ckpt, "config.json")) as f:
        vocab = int(json.load(f)["text_config"]["vocab_size"])
    remote = RemoteBackend.from_url(f"http://127.0.0.1:{port}/v1", "tiny-vl-judge",
                                    timeout=120.0, max_retries=0, concurrency=args.max_batch,
                                    top_logprobs=args.top_logprobs or vocab,
                                    list_max_tokens=args.decompose_tokens or 1)
    rng = np.random.default_rng(0)
    side = args.image
    n_img = max(1, -(-args.captions // args.group))
    # smooth random images (4x4 colours, bilinear) passed once through the client's JPEG
    # encoding, so the copy the server decodes is nearly the array our judge sees (random noise
    # would change by up to 40 levels per JPEG pass)
    distinct = [np.asarray(_decode_image(image_data_url(np.asarray(
        Image.fromarray(rng.integers(0, 255, (4, 4, 3), np.uint8)).resize(
            (side, side), Image.BILINEAR))))) for _ in range(n_img)]
    images = [distinct[c // args.group] for c in range(args.captions)]
    captions = [f"Caption number {c} of a street scene." for c in range(args.captions)]
    lists = {cap: [_assertion(c, k) for k in range(args.assertions)]
             for c, cap in enumerate(captions)}
    _line({"setup_s": round(time.perf_counter() - t0, 1), "device": str(jax.devices()[0]),
           "captions": args.captions, "images": n_img, "assertions_per_caption":
           args.assertions, "image_side": side, "vocab": vocab, "cpu_count": os.cpu_count(),
           "load_avg_1m": round(os.getloadavg()[0], 2)})

    results = {}
    for label, backend in (
            ("in_process_shared_prefix", judge),
            ("in_process_no_prefix", InProcessBackend(
                judge.model, judge.tokenizer, name=judge.name, processor=judge.processor,
                item_batch=args.item_batch, share_prefix=False)),
            ("remote_transformers", remote)):
        results[label] = _time_scorer(backend, images, captions, lists, args.repeats)
        _line({"path": label, **results[label]})
    rss_in_process = _rss_mb()

    agree = {}
    text_qs = [Query(*P.render("coverage", caption=cap, unit=a))
               for cap in captions[:2] for a in lists[cap][:4]]
    image_qs = [Query(*P.render("verify", assertion=a), image=images[0])
                for a in lists[captions[0]][:4]]
    # one answer token: the remote reader then uses the first token's distribution, as ours
    # does (with more tokens it skips a blank first token, which a random judge often emits)
    first_token = RemoteBackend(remote.client, top_logprobs=remote.top_logprobs,
                                answer_max_tokens=1)
    for name, qs in (("text", text_qs), ("image", image_qs)):
        ours = np.asarray([a.value if a.ok else np.nan for a in judge.yes_no(qs)], float)
        theirs = np.asarray([a.value if a.ok else np.nan for a in first_token.yes_no(qs)],
                            float)
        both = np.isfinite(ours) & np.isfinite(theirs)
        agree[name] = {"questions": len(qs), "both_answered": int(both.sum()),
                       "max_abs_diff_p_yes": (round(float(np.max(np.abs(ours - theirs)[both])), 6)
                                              if both.any() else None)}
    p_in = results["in_process_shared_prefix"]["precision"]
    p_rm = results["remote_transformers"]["precision"]
    ok = np.isfinite(p_in) & np.isfinite(p_rm)
    agree["precision_max_abs_diff_4_token_answers"] = (
        round(float(np.max(np.abs(p_in - p_rm)[ok])), 6) if ok.any() else None)
    _line({"agreement_in_process_vs_remote": agree})

    if args.decompose_tokens:
        dq = [Query(*P.render("decompose_caption", caption=c)) for c in captions]
        for label, backend in (("in_process", judge), ("remote_transformers", remote)):
            _line({"decompose": label, "new_tokens": args.decompose_tokens,
                   **_time_decompose(backend, dq, args.repeats)})
        # a step's decompositions: chunks of 16 rows (before issue 23) against one batch
        many = [Query(*P.render("decompose_caption", caption=f"{c} ({k})"))
                for k in range(max(1, 64 // len(captions))) for c in captions][:64]
        rates = {}
        for label, rows in (("chunks_of_16", 16), ("one_batch", 64)):
            judge.decode_batch = rows
            rates[label] = _time_decompose(judge, many, args.repeats)
            _line({"decompose_batch": label, "captions": len(many),
                   "new_tokens": args.decompose_tokens, **rates[label]})
        _line({"decompose_one_batch_over_chunks": round(
            rates["one_batch"]["captions_per_s"] / rates["chunks_of_16"]["captions_per_s"], 2)})

    # coverage (yes/no) and linguistic (digits) of the same captions: one prefix tree, where
    # each caption's two prompts share its node (answer_groups), against one call per role
    # (captions of about 150 words, as a policy writes them: the node shared is the caption)
    long = {c: c + " " + " ".join(["The street has a red car parked near a tall tree."] * 14)
            for c in captions}
    cov = [Query(*P.render("coverage", caption=long[c], unit=a)) for c in captions
           for a in lists[c]]
    lin = [Query(*P.render(k, caption=long[c])) for c in captions
           for k in P.LINGUISTIC_CRITERIA]
    timings = {}
    for label, run_once in (
            ("one_call_per_role", lambda: (judge.yes_no(cov), judge.digits(lin))),
            ("one_tree", lambda: judge.answer_groups([("yes_no", cov), ("digits", lin)]))):
        run_once()                       # compile
        best = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            run_once()
            best = min(best, time.perf_counter() - t)
        timings[label] = best
        _line({"coverage_linguistic": label, "questions": len(cov) + len(lin),
               "timed_s": round(best, 3),
               "questions_per_s": round((len(cov) + len(lin)) / best, 1)})
    _line({"coverage_linguistic_one_tree_over_per_role": round(
        timings["one_call_per_role"] / timings["one_tree"], 2)})

    with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/stats", timeout=10) as r:
        server_stats = json.loads(r.read())
    rate = {k: v["assertions_per_s"] for k, v in results.items()}
    _line({"summary": True,
           "assertions_per_s": rate,
           "in_process_over_remote": round(rate["in_process_shared_prefix"]
                                           / rate["remote_transformers"], 2),
           "shared_prefix_over_no_prefix": round(rate["in_process_shared_prefix"]
                                                 / rate["in_process_no_prefix"], 2),
           "first_call_s": {k: v["first_call_s"] for k, v in results.items()},
           "peak_rss_mb": {"this_process_before_judge": round(rss_before),
                           "this_process_after_in_process": round(rss_in_process),
                           "this_process_end": round(_rss_mb()),
                           "server": round(server_stats["max_rss_mb"])},
           "server": {k: (round(v, 2) if isinstance(v, float) else v)
                      for k, v in server_stats.items() if k != "max_rss_mb"},
           "total_s": round(time.perf_counter() - t0, 1)})


def gpu_check(args) -> None:
    """--preset: shared prefix vs none on a random-init model of hub shapes (see docstring)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from PIL import Image

    from balcap_jax.models.presets import preset
    from balcap_jax.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig
    from balcap_jax.processing import Qwen25VLProcessor, QwenImageProcessor
    from balcap_jax.rewards.judges import InProcessBackend
    from balcap_jax.tokenizers import qwen25_tokenizer
    t0 = time.perf_counter()
    d = preset(args.preset)
    if args.shrink:
        d.update(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, num_hidden_layers=2,
                 rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
        d["vision_config"].update(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                  out_hidden_size=64, fullatt_block_indexes=[1])
    cfg = Qwen2_5_VLConfig.from_hf(d)
    dtype = jnp.dtype(args.dtype)
    # one jitted init instead of one small program per parameter
    model = nnx.jit(lambda: Qwen2_5_VL(cfg, dtype=dtype, rngs=nnx.Rngs(0)))()
    jax.block_until_ready(nnx.state(model))
    tok = qwen25_tokenizer()
    side = args.image
    proc = Qwen25VLProcessor(tok, QwenImageProcessor(min_pixels=side * side,
                                                     max_pixels=side * side))
    rng = np.random.default_rng(0)
    n_img = max(1, -(-args.captions // args.group))
    distinct = [np.asarray(Image.fromarray(rng.integers(0, 255, (4, 4, 3), np.uint8)).resize(
        (side, side), Image.BILINEAR)) for _ in range(n_img)]
    images = [distinct[c // args.group] for c in range(args.captions)]
    captions = [f"Caption number {c} of a street scene." for c in range(args.captions)]
    lists = {cap: [_assertion(c, k) for k in range(args.assertions)]
             for c, cap in enumerate(captions)}
    _line({"setup_s": round(time.perf_counter() - t0, 1), "preset": args.preset,
           "shrink": args.shrink, "dtype": args.dtype, "device": str(jax.devices()[0]),
           "captions": args.captions, "images": n_img, "assertions_per_caption":
           args.assertions, "image_side": side})
    results = {}
    for share in (True, False):
        judge = InProcessBackend(model, tok, name=args.preset, processor=proc,
                                 item_batch=args.item_batch, item_tokens=args.item_tokens,
                                 prefix_batch=args.prefix_batch, share_prefix=share)
        label = "in_process_shared_prefix" if share else "in_process_no_prefix"
        results[label] = _time_scorer(judge, images, captions, lists, args.repeats)
        _line({"path": label, **results[label], "stats": dict(judge.stats)})
    a, b = (results[k]["precision"] for k in ("in_process_shared_prefix", "in_process_no_prefix"))
    diff = float(np.nanmax(np.abs(a - b)))
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-4
    mem = getattr(jax.devices()[0], "memory_stats", lambda: None)() or {}
    rate = {k: v["assertions_per_s"] for k, v in results.items()}
    _line({"summary": True, "assertions_per_s": rate,
           "shared_prefix_over_no_prefix": round(rate["in_process_shared_prefix"]
                                                 / rate["in_process_no_prefix"], 2),
           "first_call_s": {k: v["first_call_s"] for k, v in results.items()},
           "precision_max_abs_diff": round(diff, 6), "tol": tol, "ok": diff <= tol,
           "peak_rss_mb": round(_rss_mb()),
           "device_peak_gib": round(mem.get("peak_bytes_in_use", 0) / 2 ** 30, 2),
           "total_s": round(time.perf_counter() - t0, 1)})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--captions", type=int, help="default 8 (--preset: 64)")
    ap.add_argument("--group", type=int, help="rollouts sharing one image; default 4 "
                                              "(--preset: 8)")
    ap.add_argument("--assertions", type=int, help="assertions per caption; default 6 "
                                                   "(--preset: 12)")
    ap.add_argument("--image", type=int, help="square image side in pixels; default 112 "
                                              "(--preset: 448)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--decompose-tokens", type=int, default=8,
                    help="greedy tokens per caption for the decomposition timing (0 = skip)")
    ap.add_argument("--item-batch", type=int, help="queries per pass of the no-prefix "
                                                   "baseline; default 32 (--preset: 64)")
    ap.add_argument("--item-tokens", type=int, default=256,
                    help="tokens of items packed into a row (the prefix-tree judge)")
    ap.add_argument("--prefix-batch", type=int, help="default 8 (--preset: 16)")
    ap.add_argument("--preset", help="GPU check: a hub shape preset, e.g. qwen2_5_vl_7b")
    ap.add_argument("--shrink", action="store_true", help="--preset at tiny sizes (CPU smoke)")
    ap.add_argument("--dtype", default="bfloat16", help="--preset parameter dtype")
    ap.add_argument("--top-logprobs", type=int, default=0,
                    help="alternatives the remote judge asks for (0 = the whole vocabulary)")
    ap.add_argument("--vocab", type=int, default=512, help="tiny BPE vocabulary size")
    ap.add_argument("--max-batch", type=int, default=16, help="server batch (and client "
                                                              "concurrency)")
    ap.add_argument("--batch-wait", type=float, default=0.005,
                    help="seconds the server waits to fill a batch")
    ap.add_argument("--server-threads", type=int, default=1,
                    help="torch threads in the server (on a busy 2-core machine 2 threads ran "
                         "this tiny model ~10x slower than 1)")
    ap.add_argument("--serve", metavar="CKPT", help=argparse.SUPPRESS)   # the server process
    args = ap.parse_args(argv)
    sizes = dict(captions=(8, 64), group=(4, 8), assertions=(6, 12), image=(112, 448),
                 item_batch=(32, 64), prefix_batch=(8, 16))
    for key, (cpu, gpu) in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, gpu if args.preset else cpu)
    if args.serve:
        serve(args)
    elif args.preset:
        gpu_check(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
