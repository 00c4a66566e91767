"""GPU checks on random-init Qwen2.5-VL-3B shapes, bfloat16, one process, within 8 minutes.

    python -m benchmarks.gpu_checks [--tiny] [--deadline 450] [--only decode,train]

Steady-state figures first: every check compiles once, then times a second call.
1. decode: 64 prompts x G=8 = 512 rollouts of exactly 512 new tokens (a random 3B policy
   practically never samples the stop id), one 224 px image per prompt. Milliseconds per token
   step (the steady generate call over its steps, prefill included) and the share of the HBM
   roofline: the bytes a step must read (language-model weights + the valid part of the KV
   cache: each prompt's shared prefix once, each rollout's tokens so far) over the bandwidth,
   against the measured step. Also the bytes our kernel actually reads (the whole
   preallocated generation cache, valid or not).
2. train: 16 prompts x G=8 = 128 rollouts x 512 tokens, scripted scorer, bf16 parameters with a
   float32 master copy and AdamW state, remat on, micro-batch 32. Two steps; the second is
   steady: its whole time and phase split, and the update's MFU: 6 x the decoder layers'
   projection weights x the tokens the update forwards (each prompt once per group plus every
   completion) + 6 x the LM head x the completion tokens it scores (the embedding table is a
   gather; attention's score and value products and the remat recompute are not counted).
3. compiles: the backend compiles of each jitted function over the whole run (jax.monitoring),
   and how many happened during the steady calls (should be 0).
4. memory: peak device memory against balcap_jax.build.memory_plan for the train check.
Peaks: H100/H200 dense bf16 989 TFLOP/s (datasheet); HBM 4.8 TB/s (H200) / 3.35 TB/s (H100).
`--tiny` runs the same code on a tiny config (a CPU smoke test of this script). Lines are JSON,
also appended to $OUT/gpu_checks.jsonl when OUT is set.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

import jax
import numpy as np
from flax import nnx

from balcap_jax.memory_plan import matmul_params

T0 = time.time()
COMPILES: collections.Counter = collections.Counter()


def _on_event(event, secs, **kw):
    if event == "/jax/core/compile/backend_compile_duration":
        COMPILES[kw.get("fun_name", "?")] += 1


jax.monitoring.register_event_duration_secs_listener(_on_event)


def log(**kw):
    kw["t"] = round(time.time() - T0, 1)
    print(json.dumps(kw), flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gpu_checks.jsonl"), "a") as f:
            f.write(json.dumps(kw) + "\n")


def peaks():
    kind = jax.devices()[0].device_kind
    bw = 4.8e12 if "H200" in kind else 3.35e12 if "H100" in kind else float("nan")
    flops = 989e12 if ("H100" in kind or "H200" in kind) else float("nan")
    return kind, flops, bw


def peak_mem_gib():
    try:
        s = jax.devices()[0].memory_stats() or {}
        return round(s.get("peak_bytes_in_use", float("nan")) / 2**30, 1)
    except Exception:
        return float("nan")


def hf_config(tiny: bool) -> dict:
    from balcap_jax.models.presets import preset
    if tiny:
        import importlib.util
        spec = importlib.util.spec_from_file_location("t", "configs/tiny.py")
        m = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(m)
        return m.tiny_qwen_vl_config()
    c = preset("qwen2_5_vl_3b")
    # special ids of the tiny BPE the processor uses (ids 0..6); the shapes stay the 3B's
    c.update(bos_token_id=0, eos_token_id=2, image_token_id=5, video_token_id=6,
             vision_start_token_id=3, vision_end_token_id=4, vision_token_id=5)
    return c


def text_dims(cfgd: dict) -> dict:
    t = cfgd.get("text_config") or cfgd
    d, h = t["hidden_size"], t["num_attention_heads"]
    return dict(layers=t["num_hidden_layers"], kv=t["num_key_value_heads"],
                hd=t.get("head_dim") or d // h)


def pieces(side: int):
    """The tiny BPE, our processor and a synthetic loader of side x side images."""
    from balcap_jax.config import base_config
    from balcap_jax.data.synthetic import SyntheticCaptions, synthetic_example
    from balcap_jax.processing import Qwen25VLProcessor, QwenImageProcessor
    from balcap_jax.tokenizers import train_tiny_bpe
    prompt = base_config().data.prompt
    corpus = [synthetic_example(0, i, 56)["references"][0] for i in range(200)] + [prompt]
    tok = train_tiny_bpe(corpus, vocab_size=400)
    proc = Qwen25VLProcessor(tok, QwenImageProcessor(min_pixels=side * side,
                                                     max_pixels=side * side))
    return tok, proc, prompt, SyntheticCaptions


def check_decode(model, counts, cfgd, tiny):
    from balcap_jax import sampling
    b, g, new, side = (2, 2, 16, 56) if tiny else (64, 8, 512, 224)
    tok, proc, prompt, loader_cls = pieces(side)
    examples = next(loader_cls(num_examples=b, batch_size=b, seed=0, image_size=side,
                               prompt=prompt))
    from balcap_jax.processing import build_caption_prompt
    inputs = proc([build_caption_prompt(e["prompt"], tok) for e in examples],
                  images=[[e["image"]] for e in examples])
    kw = dict(max_new_tokens=new, num_samples=g, temperature=1.0, eos_token_ids=[2], pad_id=0)
    t0 = time.time()
    s = sampling.generate(model, inputs, rng=jax.random.key(0), **kw)
    jax.block_until_ready(s.tokens)
    first = time.time() - t0
    before = sum(COMPILES.values())
    t0 = time.time()
    s = sampling.generate(model, inputs, rng=jax.random.key(1), **kw)
    jax.block_until_ready(s.tokens)
    wall = time.time() - t0
    steps = int(np.asarray(s.lengths).max())
    prompt_len = int(sampling.prepare_prompt(model, inputs).mask.shape[1])
    dims = text_dims(cfgd)
    slot = dims["layers"] * 2 * dims["kv"] * dims["hd"] * 2          # bytes per token, bf16
    layers, head = matmul_params(cfgd)
    weights = (layers + head) * 2                     # bf16 weights a step reads
    mean_valid = b * prompt_len + b * g * (steps + 1) / 2             # prefix once per prompt
    need = weights + mean_valid * slot
    # the generation cache a step reads: its cache window's slots (sampling.cache_windows)
    windows = sampling._step_windows(sampling._Config(new, g, 1.0, 0, 1.0, 0, 4))
    read = sum((e - a) * slots for a, e, slots in windows) / max(1, sum(e - a for a, e, _ in
                                                                     windows))
    ours = weights + (b * prompt_len + b * g * read) * slot
    kind, _, bw = peaks()
    ms = wall / steps * 1e3
    log(check="decode", rollouts=b * g, new_tokens=steps, prompt_len=prompt_len,
        first_call_s=round(first, 1), steady_s=round(wall, 2), ms_per_step=round(ms, 2),
        roofline_ms=round(need / bw * 1e3, 2), roofline_fraction=round(need / bw / (ms / 1e3), 3),
        bytes_needed_gb=round(need / 1e9, 2), bytes_read_gb=round(ours / 1e9, 2),
        tokens_per_s=round(b * g * steps / wall), compiles_in_steady=sum(COMPILES.values())
        - before, peak_mem_gib=peak_mem_gib(), device=kind)


def check_train(model, counts, cfgd, tiny, deadline):
    from balcap_jax import build
    from balcap_jax.config import base_config
    from balcap_jax.rewards.scripted import TokenFrequencyScorer
    from balcap_jax.train import RunParts, Trainer
    b, g, new, micro, side = (2, 2, 16, 4, 56) if tiny else (16, 8, 512, 32, 224)
    c = base_config()
    c.model.hf_config = cfgd
    c.model.dtype = "bfloat16"
    c.sampling.num_samples, c.sampling.max_new_tokens = g, new
    c.train.batch_size, c.train.micro_batch_size, c.train.lr = b, micro, 1e-6
    c.train.remat = True
    c.data.max_image_tokens = (side // 28) ** 2
    c.rl.rewards, c.rl.weights, c.rl.length_control = ["frequency"], [1.0], "none"
    c.rl.length_reward = "frequency"
    tok, proc, prompt, loader_cls = pieces(side)
    loader = loader_cls(num_examples=4 * b, batch_size=b, seed=0, image_size=side, prompt=prompt)
    model.set_remat(True)
    # eos: <|im_end|> of the tiny BPE; a random 3B policy emits it ~1/150k of the time
    parts = RunParts(model=model, tokenizer=tok, processor=proc,
                     scorer=TokenFrequencyScorer(range(7, 47)), loader=loader, eval_examples=[],
                     eos_token_ids=(2,), pad_id=0)
    tr = Trainer(c, parts)
    kind, peak, _ = peaks()
    from balcap_jax import sampling
    probe = loader.get_state()
    prompt_len = sampling.prepare_prompt(model, tr._inputs(next(loader))).mask.shape[1]
    loader.set_state(probe)
    plan = build.memory_plan(c, {"data": 1, "fsdp": 1, "tensor": 1}, query_device=False)
    for i in range(2):
        if time.time() - T0 > deadline:
            log(check="train", skipped=f"deadline reached before step {i}")
            return
        before = sum(COMPILES.values())
        t0 = time.time()
        m = tr.train_step(next(loader))
        wall = time.time() - t0
        tokens = m["length/tokens"] * b * g                   # completion tokens
        layers, head = matmul_params(cfgd)
        upd_flops = 6 * (layers * (b * prompt_len + tokens) + head * tokens)
        log(check="train_step", step=i, steady=(i == 1), wall_s=round(wall, 2),
            rollout_s=round(m["time/rollout"], 2), scoring_s=round(m["time/scoring"], 3),
            update_s=round(m["time/update"], 2), rollouts=b * g,
            new_tokens_mean=round(m["length/tokens"], 1), prompt_len=prompt_len,
            update_tflops=round(upd_flops / m["time/update"] / 1e12, 1),
            update_mfu=round(upd_flops / m["time/update"] / peak, 3),
            compiles_in_step=sum(COMPILES.values()) - before, loss=m["loss"],
            grad_norm=m["grad_norm"], peak_mem_gib=peak_mem_gib(),
            plan_gib=round(plan.total / 2**30, 1), device=kind)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--deadline", type=float, default=450)
    ap.add_argument("--only", default="decode,train")
    a = ap.parse_args()
    import flax
    log(jax=jax.__version__, flax=flax.__version__, devices=str(jax.devices()))
    from balcap_jax.memory_plan import count_params
    from balcap_jax.models.random_init import from_config
    from balcap_jax.sharding import make_mesh
    cfgd = hf_config(a.tiny)
    counts = count_params(cfgd)
    t0 = time.time()
    model = from_config(cfgd, dtype="bfloat16", seed=0,
                        mesh=make_mesh((1, 1, 1), jax.devices()[:1]))
    jax.block_until_ready(nnx.state(model))
    log(check="init", params=counts, seconds=round(time.time() - t0, 1),
        peak_mem_gib=peak_mem_gib())
    if "decode" in a.only:
        check_decode(model, counts, cfgd, a.tiny)
    if "train" in a.only and time.time() - T0 < a.deadline:
        check_train(model, counts, cfgd, a.tiny, a.deadline)
    log(check="compiles", per_function=dict(COMPILES.most_common()))
    log(done=True)


if __name__ == "__main__":
    sys.exit(main())
