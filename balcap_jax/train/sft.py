"""Supervised warm start: cross-entropy on (prompt, caption) pairs with the RL policy's own
model, processor and sharding.

The loss is the mean negative log-probability of the caption tokens and the stop token, teacher
forced through the same `sampling.token_logprobs_fn` the policy loss differentiates, so the
warm start and RL see exactly the same prompt layout (chat template, image tokens, M-RoPE).

    sft = SFT(cfg.sft, parts, params, rest, graphdef)   # parts: balcap_jax.train.RunParts
    loss = sft.step(examples, captions)                 # one AdamW step
    sft.params                                           # the current parameters

Captions longer than `max_len - 1` tokens are cut at the last whole sentence that fits, so the
model never learns to stop mid-sentence.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from balcap_jax import precision, sampling
from balcap_jax.tokenizers import stop_token_ids
from balcap_jax.train.optim import freeze_vision_tower, is_vision_path

__all__ = ["SFT", "caption_tokens", "sft_batch", "make_sft_optimizer"]


def make_sft_optimizer(sc, params=None) -> optax.GradientTransformation:
    """AdamW with a linear warm-up to `sc.lr`, then constant; global-norm clipping at 1. With
    `sc.freeze_vision` the vision tower is not updated (needs `params` to find it)."""
    warm = max(int(sc.warmup_steps), 1)
    lr = optax.join_schedules([optax.linear_schedule(0.0, sc.lr, warm),
                               optax.constant_schedule(sc.lr)], [warm])
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(lr, weight_decay=sc.weight_decay))
    if sc.freeze_vision:
        if params is None:
            raise ValueError("make_sft_optimizer with sft.freeze_vision=True needs params")
        opt = freeze_vision_tower(opt, params)
    return opt


def caption_tokens(tokenizer, caption: str, max_len: int, eos_id: int) -> list[int]:
    """Token ids of `caption` plus the stop token, at most `max_len`; an over-long caption is
    cut at its last whole sentence that fits (one sentence is cut hard)."""
    if max_len < 2:
        raise ValueError(f"max_len={max_len} must leave room for a token and the stop token")
    ids = tokenizer(caption, add_special_tokens=False)["input_ids"]
    if len(ids) > max_len - 1:
        sentences = [s.strip() + "." for s in caption.split(".") if s.strip()]
        while len(sentences) > 1 and len(ids) > max_len - 1:
            sentences.pop()
            ids = tokenizer(" ".join(sentences), add_special_tokens=False)["input_ids"]
        ids = ids[:max_len - 1]
    return list(ids) + [int(eos_id)]


def sft_batch(model, processor, tokenizer, examples: Sequence[dict], captions: Sequence[str], *,
              max_len: int, eos_id: int, pad_id: int, prompt_buckets=None) -> dict:
    """The teacher-forced batch for `token_logprobs_fn`: prompts from the processor (the same
    caption prompt RL uses), completions [B, max_len] = caption + stop, mask 1 on them."""
    from balcap_jax.processing import build_caption_prompt
    if len(examples) != len(captions):
        raise ValueError(f"{len(examples)} examples but {len(captions)} captions")
    texts = [build_caption_prompt(e["prompt"], tokenizer) for e in examples]
    inputs = processor(texts, images=[[e["image"]] for e in examples])
    comp = np.full((len(captions), max_len), pad_id, np.int32)
    mask = np.zeros((len(captions), max_len), np.float32)
    for i, c in enumerate(captions):
        ids = caption_tokens(tokenizer, c, max_len, eos_id)
        comp[i, :len(ids)] = ids
        mask[i, :len(ids)] = 1.0
    return sampling.prepare_logprob_batch(model, inputs, comp, mask, pad_id=pad_id,
                                          prompt_buckets=prompt_buckets)


def _nll(params, graphdef, rest, batch):
    model = nnx.merge(graphdef, params, rest)
    logp = sampling.token_logprobs_fn(model, batch, temperature=1.0)
    mask = batch["mask"]
    return -(logp * mask).sum() / jnp.maximum(mask.sum(), 1.0)


class SFT:
    """AdamW on the caption NLL; one jitted step (graphdef static, params, master weights and
    optimiser state donated). `params` may come from a Trainer (nnx.split(model, nnx.Param,
    ...)); low-precision params train through a float32 master copy (balcap_jax.precision)."""

    def __init__(self, sc, parts, params, rest, graphdef):
        self.sc, self.p = sc, parts
        self.graphdef, self.rest = graphdef, rest
        self.opt = make_sft_optimizer(sc, params)
        self.params = params
        frozen = is_vision_path if sc.freeze_vision else None
        self.master = precision.init_master(params, frozen)
        self.opt_state = jax.jit(lambda p, m: self.opt.init(precision.optimizer_view(p, m)))(
            params, self.master)
        self.steps = 0
        gd, opt = graphdef, self.opt

        # Parameters keep their shardings, so the second call reuses the first compile.
        shardings = jax.tree.map(lambda x: x.sharding, self.params)

        @functools.partial(jax.jit, donate_argnums=(0, 1, 2),
                           out_shardings=(shardings, None, None, None))
        def step(params, master, opt_state, rest, batch):
            loss, grads = jax.value_and_grad(_nll)(params, gd, rest, batch)
            updates, opt_state = opt.update(jax.tree.map(lambda g: g.astype(jnp.float32), grads),
                                            opt_state, precision.optimizer_view(params, master))
            params, master = precision.apply_updates(params, master, updates)
            return params, master, opt_state, loss

        self._step = step

    def model(self):
        return nnx.merge(self.graphdef, self.params, self.rest)

    def batch(self, examples, captions) -> dict:
        eos = stop_token_ids(self.p.tokenizer)[0]    # <|im_end|> for Qwen, </s> for LLaVA
        return sft_batch(self.model(), self.p.processor, self.p.tokenizer, examples, captions,
                         max_len=int(self.sc.max_len), eos_id=eos, pad_id=self.p.pad_id,
                         prompt_buckets=getattr(self.p, "prompt_buckets", None))

    def step(self, examples, captions) -> float:
        """One update on (examples' prompts and images, captions); returns the loss."""
        batch = self.batch(examples, captions)
        self.params, self.master, self.opt_state, loss = self._step(
            self.params, self.master, self.opt_state, self.rest, batch)
        self.steps += 1
        return float(loss)
