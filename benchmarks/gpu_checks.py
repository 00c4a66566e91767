"""GPU checks of issues 4-6 on random-init Qwen2.5-VL-3B shapes, bfloat16, in one process.

    python -m benchmarks.gpu_checks [--tiny] [--deadline 480]

1. forward (issue 4): batch 8 x 1024 tokens, one 448x448 image each (256 image tokens):
   steady-state time, tokens/s and MFU (model FLOPs: 2 * params * tokens for the language model
   and the vision tower, plus causal attention 2 * 2 * L * T^2 * H * hd / 2 per row).
2. train step (issues 5 and 6): 64 prompts x G=8 rollouts of exactly 512 new tokens (the
   random policy practically never emits the stop id), scripted scorer, bf16 params with fp32
   AdamW state, remat on, micro-batch 32. Phase times of a steady-state step; decode tokens/s
   and achieved memory bandwidth (bytes per decode step = language-model weights + the whole
   preallocated KV cache, which every step reads); the update's MFU (6 * params * tokens for
   the gradient, which also yields old_logp; remat recompute not counted); peak memory.
Peaks: H100/H200 dense bf16 989 TFLOP/s (datasheet); HBM 4.8 TB/s (H200) / 3.35 TB/s (H100).
`--tiny` runs the same code on a tiny config (CPU smoke test of this script).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

T0 = time.time()


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


def peak_mem():
    try:
        s = jax.devices()[0].memory_stats() or {}
        return s.get("peak_bytes_in_use", float("nan")) / 2**30
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


def check_forward(model, counts, cfgd, tiny):
    b, t, side = (2, 64, 56) if tiny else (8, 1024, 448)
    grid = side // 14
    n_img = grid * grid // 4
    rng = np.random.default_rng(0)
    ids = rng.integers(10, 150000 if not tiny else 400, size=(b, t)).astype(np.int32)
    ids[:, 20:21] = 3
    ids[:, 21:21 + n_img] = 5
    ids[:, 21 + n_img] = 4
    mask = np.ones_like(ids)
    pv = rng.standard_normal((b * grid * grid, 3 * 2 * 14 * 14)).astype(np.float32)
    thw = np.tile([[1, grid, grid]], (b, 1))
    positions, _ = model.rope_index(ids, mask, thw)
    vi = model.prepare_vision_inputs(pv, thw)
    graphdef, state = nnx.split(model)

    @jax.jit
    def fwd(state, ids, mask, positions, vi):
        m = nnx.merge(graphdef, state)
        x = m.embed_multimodal(ids, m.encode_images(vi))
        h, _ = m.forward_embeds(x, positions, mask)
        return m.logits(h[:, -1:])

    args = (state, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(positions, jnp.int32), vi)
    t0 = time.time()
    jax.block_until_ready(fwd(*args))
    compile_s = time.time() - t0
    times = []
    for _ in range(3):
        t0 = time.time()
        jax.block_until_ready(fwd(*args))
        times.append(time.time() - t0)
    best = min(times)
    text = cfgd.get("text_config") or cfgd
    layers, d, heads = text["num_hidden_layers"], text["hidden_size"], text["num_attention_heads"]
    hd = d // heads
    flops = (2 * counts["language"] * b * t + 2 * counts["vision"] * b * grid * grid
             + 2 * layers * b * t * t * heads * hd)  # causal: half of 4*T^2*H*hd per layer
    _, peak, _ = peaks()
    log(check="forward", batch=b, tokens=t, image=f"{side}x{side}", compile_s=round(compile_s, 1),
        seconds=round(best, 4), tokens_per_s=round(b * t / best),
        tflops=round(flops / best / 1e12, 1), mfu=round(flops / best / peak, 3),
        peak_mem_gib=round(peak_mem(), 1))


def check_train(model, counts, cfgd, tiny, deadline):
    from balcap_jax.config import base_config
    from balcap_jax.data.synthetic import SyntheticCaptions, synthetic_example
    from balcap_jax.processing import Qwen25VLProcessor, QwenImageProcessor
    from balcap_jax.rewards.scripted import TokenFrequencyScorer
    from balcap_jax.tokenizers import train_tiny_bpe
    from balcap_jax.train import RunParts, Trainer
    b, g, new, micro, side = (4, 2, 16, 4, 56) if tiny else (64, 8, 512, 32, 224)
    c = base_config()
    c.sampling.num_samples, c.sampling.max_new_tokens = g, new
    c.train.batch_size, c.train.micro_batch_size, c.train.lr = b, micro, 1e-6
    c.train.remat = True
    c.rl.rewards, c.rl.weights, c.rl.length_control = ["frequency"], [1.0], "none"
    c.rl.length_reward = "frequency"
    corpus = [synthetic_example(0, i, 56)["references"][0] for i in range(200)] + [c.data.prompt]
    tok = train_tiny_bpe(corpus, vocab_size=400)
    proc = Qwen25VLProcessor(tok, QwenImageProcessor(min_pixels=side * side,
                                                     max_pixels=side * side))
    loader = SyntheticCaptions(num_examples=4 * b, batch_size=b, seed=0, image_size=side,
                               prompt=c.data.prompt)
    model.set_remat(True)
    # eos: <|im_end|> of the tiny BPE; a random 3B policy emits it ~1/150k of the time
    parts = RunParts(model=model, tokenizer=tok, processor=proc,
                     scorer=TokenFrequencyScorer(range(7, 47)), loader=loader, eval_examples=[],
                     eos_token_ids=(2,), pad_id=0)
    tr = Trainer(c, parts)
    kind, peak, bw = peaks()
    from balcap_jax import sampling
    probe = loader.get_state()
    prompt_len = sampling.prepare_prompt(model, tr._inputs(next(loader))).mask.shape[1]
    loader.set_state(probe)
    for i in range(2):
        if time.time() - T0 > deadline:
            log(check="train", skipped=f"deadline reached before step {i}")
            return
        t0 = time.time()
        m = tr.train_step(next(loader))
        wall = time.time() - t0
        n_tok = m["length/tokens"] * b * g
        text = cfgd.get("text_config") or cfgd
        layers, d = text["num_hidden_layers"], text["hidden_size"]
        kv, hd = text["num_key_value_heads"], d // text["num_attention_heads"]
        seq = prompt_len + new
        lm_bytes = counts["language"] * 2
        kv_bytes = b * g * seq * layers * 2 * kv * hd * 2
        steps = m["length/tokens"]
        rollout = m["time/rollout"]
        upd_tokens = b * g * seq
        upd_flops = 6 * counts["language"] * upd_tokens
        log(check="train_step", step=i, first_call=(i == 0), wall_s=round(wall, 2),
            rollout_s=round(rollout, 2), scoring_s=round(m["time/scoring"], 3),
            update_s=round(m["time/update"], 2), rollouts=b * g, new_tokens_mean=round(steps, 1),
            decode_tokens_per_s=round(n_tok / rollout),
            decode_bw_tb_s=round(steps * (lm_bytes + kv_bytes) / rollout / 1e12, 2),
            bw_fraction=round(steps * (lm_bytes + kv_bytes) / rollout / bw, 3),
            update_tflops=round(upd_flops / m["time/update"] / 1e12, 1),
            update_mfu=round(upd_flops / m["time/update"] / peak, 3),
            loss=m["loss"], grad_norm=m["grad_norm"], peak_mem_gib=round(peak_mem(), 1),
            device=kind)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--deadline", type=float, default=480)
    ap.add_argument("--only", default="forward,train")
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
        peak_mem_gib=round(peak_mem(), 1))
    if "forward" in a.only:
        check_forward(model, counts, cfgd, a.tiny)
    if "train" in a.only:
        check_train(model, counts, cfgd, a.tiny, a.deadline)
    log(done=True)


if __name__ == "__main__":
    sys.exit(main())
