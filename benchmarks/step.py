"""One whole RL step, ours against TRL's GRPOTrainer, at the same shapes and initial weights.

A tiny Qwen2.5-VL (text 4 x 256, vocab 8192; vision 2 blocks x 128), one 112 px image per prompt
(16 image tokens), 2 prompts x G = 8 completions of exactly 64 tokens per step (no stop token can
be sampled on either side), one scripted reward (the share of even token ids), c-GDPO
advantages (TRL: its group normalisation), the dapo loss, one update per rollout batch, AdamW,
float32, CPU. Each side runs in its own subprocess (its peak RSS is its own); ours first, which
writes the tokenizer and the exact prompts and images it trained on for TRL to read (TRL's chat
template adds its default system prompt: its prompts are longer than ours).

    .venv/bin/python -m benchmarks.step [--steps 4] [--repeats 1] [--no-trl] [--scan-unroll K]
    .venv/bin/python -m benchmarks.step --judges      # ours only, BalCapRL's in-process judges
    .venv/bin/python -m benchmarks.step --remote-judge  # ours only, scoring beside the rollouts

Prints per side: the steady step (median of the steps after the first), its split into
rollout / scoring / update, the first step (ours: compilation included; the difference is the
compile time), tokens/s of the step, peak RSS, and the ratio TRL / ours of the steady step.
Ours also: the update's rate in GFLOP/s (6 x language parameters x the tokens it forwards)
against this CPU's float32 matmul rate measured in the same process, how close the update is
to what the cores can do.
With --repeats N the two sides alternate N times (the cores are often shared) and the ratio of
each pair is printed. Ours runs its 4 layers straight-line (model.scan_unroll=0: no per-layer
scan bookkeeping, and at this depth it compiles faster too); --scan-unroll 1 measures the
one-layer scan body that deep models use. Without trl installed (`pip install trl`; it is not
a dependency) only ours runs.

--judges: ours alone, scored by BalCapRL's three rewards with an in-process judge (a random
Qwen2.5-VL, text 2 x 64, vision 2 x 32, float32, built as benchmarks/judges.py builds it): the
decompositions run for real (greedy, --judge-tokens new tokens each, one decode batch) but
their random text is replaced by 6 fixed assertions per caption or reference, so verification,
pointability, coverage and the linguistic questions all run; the reference units are cached
after the first step, as in a run. Prints the step's split with scoring in it and the judge's
time per role.

--remote-judge: ours alone, the same three rewards from a judge served over HTTP in another
process (benchmarks/judges.py's OpenAI-compatible server on a tiny transformers Qwen2.5-VL,
decompositions replaced as above), each host's prompts sampled in two chunks
(train.rollout_chunks=2), once scored after the rollout and once with train.overlap_scoring
(a finished chunk scored while the next decodes). Prints both steps with scoring and
time/scoring_exposed, the part of scoring the step waited for. The server shares this
machine's cores with the policy, so on a 2-core CPU the overlap can hide only what the
cores leave idle.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
G, NEW, PROMPTS, IMAGE = 8, 64, 2, 112


def hf_config() -> dict:
    from balcap_jax.models.presets import tiny_qwen2_5_vl
    cfg = tiny_qwen2_5_vl(vocab_size=8192, hidden_size=256, intermediate_size=768,
                          num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6,
                          mrope_section=[8, 12, 12], vision_hidden_size=128,
                          spatial_merge_size=2, window_size=56)
    cfg.update(num_hidden_layers=4, tie_word_embeddings=False)
    return cfg


def update_flops(prompt_tokens: int) -> float:
    """6 x parameters x tokens for the update's matmuls: the layers' projections for every
    token it forwards (each prompt once per group plus every completion token), the LM head
    for the completion tokens it scores. Not counted: the embedding table (a gather), the
    attention's score and value products (a few % here) and the vision tower."""
    from balcap_jax.memory_plan import matmul_params
    layers, head = matmul_params(hf_config())
    completions = PROMPTS * G * NEW
    return 6.0 * (layers * (prompt_tokens + completions) + head * completions)


def matmul_gflops(repeats: int = 5) -> float:
    """This CPU's float32 matmul rate under XLA (best of `repeats`): [1024, 256] @ [256, 8192],
    the update's LM-head shape, with XLA's default options as the update's jit has."""
    import jax
    import jax.numpy as jnp
    a, b = jnp.ones((1024, 256), jnp.float32), jnp.ones((256, 8192), jnp.float32)
    mm = jax.jit(jnp.matmul)
    mm(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        mm(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * 1024 * 256 * 8192 / best / 1e9


def our_config(model_dir: str, steps: int, judges: bool = False, scan_unroll: int = 0):
    from balcap_jax.config import base_config
    c = base_config()
    c.workdir = ""
    c.compile_cache_dir = ""
    c.model.path = model_dir
    c.model.tokenizer = "tiny"
    c.model.tiny_vocab = 400
    c.model.scan_unroll = scan_unroll
    c.mesh.fsdp = -1
    c.data.source = "synthetic"
    c.data.image_size = IMAGE
    c.data.num_train = PROMPTS * (steps + 1)
    c.data.num_eval = 2
    c.data.max_prompt_tokens = 80
    c.data.max_image_tokens = (IMAGE // 28) ** 2
    c.data.image_processor = dict(min_pixels=IMAGE * IMAGE, max_pixels=IMAGE * IMAGE)
    c.sampling.num_samples = G
    c.sampling.max_new_tokens = NEW
    c.sampling.temperature = 1.0
    c.rl.advantage = "cgdpo"
    c.rl.aggregation = "dapo"
    c.rl.rewards = ["frequency"]
    c.rl.weights = [1.0]
    c.rl.length_control = "none"
    c.rl.length_reward = "frequency"
    c.scorer.name = "token_frequency"
    c.scorer.tokens = [" a", " red", " blue", " green", " on", " background", "."]
    c.train.steps = steps
    c.train.batch_size = PROMPTS
    c.train.micro_batch_size = PROMPTS * G
    c.train.lr = 1e-6
    if judges:
        c.rl.rewards, c.rl.weights = ["precision", "recall", "linguistic"], [1.0, 1.0, 1.0]
        c.rl.length_control, c.rl.length_reward = "mask", "linguistic"
    return c


class FixedLists:
    """The judge's decompositions run (and are timed) but answer 6 fixed assertions per text:
    a random judge rarely writes a list, and the questions after it are what is measured."""

    def __init__(self, inner):
        self.inner, self.name = inner, "bench-judge"

    def decompose(self, queries):
        import zlib

        from balcap_jax.rewards.balcap import Answer
        from benchmarks.judges import _assertion
        self.inner.decompose(queries)
        return [Answer([_assertion(zlib.crc32(q.item.encode()) % 100_000, k) for k in range(6)])
                for q in queries]

    def __getattr__(self, name):     # yes_no, digits and answer_groups where the judge has it
        return getattr(self.inner, name)


def judge_scorer(d: str, new_tokens: int):
    from balcap_jax.rewards.balcap import BalCapScorer
    from balcap_jax.rewards.judges import load_backend
    from benchmarks.judges import build_checkpoint
    path = os.path.join(d, "judge")
    if not os.path.exists(path):
        build_checkpoint(path, vocab_size=512)
    judge = load_backend(path, dtype="float32", list_max_tokens=new_tokens)
    return BalCapScorer(judge, text_backend=FixedLists(judge)), judge


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def remote_scorer(url: str, new_tokens: int):
    from balcap_jax.rewards.balcap import BalCapScorer
    from balcap_jax.rewards.remote import RemoteBackend
    remote = RemoteBackend.from_url(url, "tiny-vl-judge", timeout=300.0, max_retries=0,
                                    concurrency=16, top_logprobs=20,
                                    list_max_tokens=new_tokens)
    return BalCapScorer(remote, text_backend=FixedLists(remote))


def run_ours(d: str, steps: int, judge_tokens: int = 0, judge_url: str = "",
             overlap: bool = False, scan_unroll: int = 0) -> dict:
    import jax

    from balcap_jax import build
    cfg = our_config(os.path.join(d, "model"), steps, judges=judge_tokens > 0,
                     scan_unroll=scan_unroll)
    if judge_url:
        cfg.train.rollout_chunks, cfg.train.overlap_scoring = 2, overlap
    trainer = build.build_trainer(cfg)
    from balcap_jax.rewards.scripted import TokenFrequencyScorer
    vocab = hf_config()["vocab_size"]
    trainer.p.eos_token_ids = (vocab + 1,)      # outside the vocabulary: never sampled
    # TRL's reward: the share of even token ids (random weights rarely sample a word, so a
    # word reward would be 0 everywhere and give no gradient)
    trainer.p.scorer = TokenFrequencyScorer(range(0, vocab, 2))
    judge = None
    if judge_url:
        trainer.p.scorer = remote_scorer(judge_url, judge_tokens)
    elif judge_tokens:
        trainer.p.scorer, judge = judge_scorer(d, judge_tokens)
    trainer.p.tokenizer.save_pretrained(os.path.join(d, "tokenizer"))
    forwarded = []          # prompt tokens of each update micro-batch (prompts x bucket)
    micro_batches = trainer._micro_batches

    def counted(*a, **kw):
        for sl, mb in micro_batches(*a, **kw):
            forwarded.append(int(np.prod(np.shape(mb["prompt"].mask))))
            yield sl, mb
    trainer._micro_batches = counted
    rows, images, prompts = [], [], []
    for _ in range(steps):
        forwarded.clear()
        examples = next(trainer.p.loader)
        images += [np.asarray(e["image"], np.uint8) for e in examples]
        prompts += [e["prompt"] for e in examples]
        t = time.perf_counter()
        m = trainer.train_step(examples)
        jax.block_until_ready(trainer.state.params)
        dt = time.perf_counter() - t
        exposed = m.get("time/scoring_exposed", m["time/scoring"])
        # train_step returns once the optimiser's update is dispatched: the update is the rest
        # of the step, until the new parameters are ready
        rows.append(dict(step_s=dt, rollout_s=m["time/rollout"], score_s=m["time/scoring"],
                         update_s=dt - m["time/rollout"] - exposed, exposed_s=exposed,
                         tokens=m["length/tokens"] * PROMPTS * G))
    np.savez(os.path.join(d, "examples.npz"), images=np.stack(images), prompts=np.array(prompts))
    out = dict(side="ours", rows=rows, peak_rss_mib=peak_rss_mib(),
               update_gflop=update_flops(sum(forwarded)) / 1e9, matmul_gflops=matmul_gflops())
    if judge is not None:
        out["judge_s"] = {k: round(v, 3) for k, v in judge.times.items()}
        out["judge_rows"] = dict(judge.stats)
    return out


def child(args) -> None:
    if args.side == "ours":
        res = run_ours(args.dir, args.steps,
                       args.judge_tokens if args.judges or args.judge_url else 0,
                       args.judge_url or "", args.overlap, args.scan_unroll)
    else:
        from benchmarks.trl_step import run_trl
        data = np.load(os.path.join(args.dir, "examples.npz"))
        examples = [dict(image=im, prompt=str(p)) for im, p in zip(data["images"],
                                                                     data["prompts"])]
        r = run_trl(os.path.join(args.dir, "model"), os.path.join(args.dir, "tokenizer"),
                    examples, num_generations=G, new_tokens=NEW, steps=args.steps,
                    image_size=IMAGE)
        n = len(r["step_s"])
        res = dict(side="trl", peak_rss_mib=r["peak_rss_mib"], rows=[
            dict(step_s=r["step_s"][i], rollout_s=r["generate_s"][i],
                 score_s=r.get("score_s", [0.0] * n)[i], update_s=r["update_s"][i],
                 tokens=r["completion_tokens"][i]) for i in range(n)])
    print("RESULT " + json.dumps(res))


def _side(side: str, d: str, steps: int, extra: tuple = ()) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.step", "--side", side, "--dir", d,
                           "--steps", str(steps), *extra], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{side} side failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _summary(r: dict) -> dict:
    steady = r["rows"][1:] or r["rows"]
    med = {k: float(np.median([x[k] for x in steady]))
           for k in ("step_s", "rollout_s", "score_s", "update_s", "tokens")}
    med["exposed_s"] = float(np.median([x.get("exposed_s", x["score_s"]) for x in steady]))
    med["first_s"] = r["rows"][0]["step_s"]
    for k in ("update_gflop", "matmul_gflops"):
        if k in r:
            med[k] = r[k]
    med["peak_rss_mib"] = r["peak_rss_mib"]
    return med


def _line(name: str, s: dict) -> str:
    return (f"  {name:>5}: step {s['step_s']:.3f} s = rollout {s['rollout_s']:.3f} + scoring "
            f"{s['score_s']:.3f} + update {s['update_s']:.3f}  ({s['tokens'] / s['step_s']:.0f} "
            f"completion tokens/s; first step {s['first_s']:.2f} s; peak RSS "
            f"{s['peak_rss_mib']:.0f} MiB)")


def _remote_judge(args, d: str) -> None:
    from benchmarks import judges as JB
    server, port = JB._start_server(os.path.join(d, "judge"), argparse.Namespace(
        vocab=512, max_batch=16, batch_wait=0.005, server_threads=1))
    try:
        url = f"http://127.0.0.1:{port}/v1"
        res = {}
        for overlap in (False, True):
            extra = ("--judge-url", url, "--judge-tokens", str(args.judge_tokens))
            r = _summary(_side("ours", d, args.steps, extra + (("--overlap",) if overlap
                                                                else ())))
            res[overlap] = r
            print(_line("overlap" if overlap else "after", r), flush=True)
            print(f"         scoring {r['score_s']:.3f} s, of which the step waited for "
                  f"{r['exposed_s']:.3f} s (time/scoring_exposed)", flush=True)
        a, b = res[False], res[True]
        print(f"  overlapped step / sequential step: {b['step_s'] / a['step_s']:.2f}; scoring "
              f"hidden: {1 - b['exposed_s'] / max(b['score_s'], 1e-9):.0%}")
    finally:
        server.kill()
        server.wait(timeout=10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--no-trl", action="store_true")
    ap.add_argument("--scan-unroll", type=int, default=0,
                    help="our model.scan_unroll: layers per scan iteration (0, the default "
                         "here: all 4, straight-line; 1: one scanned layer body, the "
                         "config's default for deep models)")
    ap.add_argument("--judges", action="store_true", help="ours alone, with in-process judges")
    ap.add_argument("--judge-tokens", type=int, default=32,
                    help="new tokens of each decomposition (--judges)")
    ap.add_argument("--remote-judge", action="store_true",
                    help="ours alone, judges behind a local HTTP server: scoring after the "
                         "rollout against scoring beside it")
    ap.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--judge-url", help=argparse.SUPPRESS)
    ap.add_argument("--overlap", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be >= 2 (the first step compiles)")
    if args.side:
        return child(args)
    try:
        import trl  # noqa: F401
        with_trl = not args.no_trl
    except ImportError:
        with_trl = False
        print("trl is not installed: timing ours only (pip install trl for the peer)")

    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    load = os.getloadavg()[0]
    print(f"Qwen2.5-VL text 4x256 vocab 8192, {PROMPTS} prompts x G={G}, {NEW} tokens each, one "
          f"{IMAGE} px image per prompt, c-GDPO + dapo, fp32, CPU ({os.cpu_count()} cores, load "
          f"average {load:.2f} before); ours with model.scan_unroll={args.scan_unroll}")
    ratios = []
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**hf_config())).save_pretrained(
            os.path.join(d, "model"))
        if args.remote_judge:
            return _remote_judge(args, d)
        if args.judges:
            r = _side("ours", d, args.steps, ("--judges", "--judge-tokens",
                                              str(args.judge_tokens)))
            ours = _summary(r)
            print(_line("ours", ours), flush=True)
            print(f"  scoring {ours['score_s'] / ours['step_s']:.0%} of the steady step; judge "
                  f"seconds by role over all steps {r['judge_s']}; rows {r['judge_rows']}")
            return
        for _ in range(args.repeats):
            ours = _summary(_side("ours", d, args.steps,
                                  ("--scan-unroll", str(args.scan_unroll))))
            print(_line("ours", ours), flush=True)
            print(f"         compile ~{ours['first_s'] - ours['step_s']:.1f} s (first step - "
                  "steady step)")
            rate = ours["update_gflop"] / ours["update_s"]
            print(f"         update ~{ours['update_gflop']:.1f} GFLOP of matmuls (6 x params x "
                  f"tokens) at {rate:.0f} GFLOP/s: {rate / ours['matmul_gflops']:.0%} of this "
                  "CPU's float32 "
                  f"matmul under XLA in the same process ({ours['matmul_gflops']:.0f} GFLOP/s, "
                  "[1024, 256] @ [256, 8192])")
            if with_trl:
                peer = _summary(_side("trl", d, args.steps))
                print(_line("trl", peer), flush=True)
                ratios.append(peer["step_s"] / ours["step_s"])
                print(f"  ratio TRL / ours, steady step: {ratios[-1]:.2f}x  (rollout "
                      f"{peer['rollout_s'] / ours['rollout_s']:.2f}x, update "
                      f"{peer['update_s'] / ours['update_s']:.2f}x)", flush=True)
    if len(ratios) > 1:
        print(f"  ratios over {len(ratios)} alternated pairs: "
              + ", ".join(f"{r:.2f}x" for r in ratios) + f"; median {np.median(ratios):.2f}x")
    print(f"  load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
