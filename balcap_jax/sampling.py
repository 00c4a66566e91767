"""Jitted KV-cache sampler and exact per-token log-probabilities.

`generate` runs two jitted functions: a prefill over the padded prompt batch (images included,
the vision tower runs once per prompt) that also samples the first token, and the decode
`lax.while_loop`s that stop as soon as every row is done. The prompt's cache is filled by the
prefill, once per prompt. A model that `shares_prefix` keeps it once for its G rows (read-only,
never copied), and each row's generation cache is decoded in `cache_windows` windows of steps,
each on a cache grown to the slots that window can reach (attention reads the whole cache it
is given: the first quarter of a long generation reads about a quarter of the slots). That
holds at G = 1 too. Otherwise one cache holds prompt and generation, its prompt repeated G
times (never recomputed), and is donated to one decode loop.

Model protocol (duck-typed; the text decoder and Qwen2.5-VL provide it):
  model.embed(input_ids [B,T]) -> [B,T,D]
  model.forward_embeds(x, positions, kv_mask, cache, cache_index) -> (hidden [B,T,D], cache)
      positions [B,T] (1-D RoPE) or [3,B,T] (M-RoPE); kv_mask [B,S] (1 = valid key slot);
      query t sits at cache slot cache_index + t and sees slots <= its own with kv_mask == 1.
  model.logits(hidden) -> float32 [B,T,V];  model.init_cache(batch, max_len, dtype) -> pytree
  optional: model.decode_cache(cache) -> the cache in the layout the decode step wants;
  model.for_decode() -> the model (merged inside the decode jit) prepared for the loop;
  model.token_logprobs(hidden, targets, temperature=) (chunked over the vocabulary),
  model.mesh / model.rules (prompt arrays are then placed batch-sharded on that mesh; with
  several processes the inputs must be the global batch, equal on every host: see
  `balcap_jax.distributed`).
Prompt preparation (host side, numpy) is dispatched on the model: a model may define
`prepare_prompt(inputs) -> (embed_inputs pytree, positions, deltas)` and
`embed_prompt(embed_inputs) -> [B,T,D]` (Qwen2.5-VL does: vision tower + image tokens);
otherwise it is a text decoder (positions from the attention mask). The token at cache slot
i >= T has position i + delta[row] on every rotary axis, so text and M-RoPE models share one
decode loop.

Conventions
- Rows are prompt-major: row i*G + j is sample j of prompt i. Row r draws its randomness from
  `fold_in(rng, r)`, step s from `fold_in(fold_in(rng, r), s)`: a row's samples do not depend on
  the batch it sits in, so G samples from one prefill equal G copies of the prompt.
- `lengths` INCLUDE the stop token (TRL's completion mask covers generated tokens up to and
  including EOS); a truncated row (no stop within max_new_tokens) has length max_new_tokens.
  Tokens after the stop are `pad_id`, their log-probabilities 0.
- Log-probabilities are log_softmax(logits / T) at the chosen token (T = 1 for greedy), i.e.
  under the temperature-scaled distribution before top-k/top-p filtering: the same quantity
  `token_logprobs` recomputes and the loss uses.
- A policy's vision special tokens (`model.vision_token_ids`: Qwen2.5-VL's image pad, video pad,
  vision start and end; LLaVA's <image>) are never sampled, in rollouts, evaluation or a
  judge's decompositions: a caption holding one would be trained on and then silently dropped
  from the text the judges see. Their logits are set to -inf before sampling (the
  log-probabilities above are over the rest of the vocabulary).
- Prompt lengths are left-padded to a bucket (next power of two, or the smallest of a given list),
  so a training run compiles a bounded number of times; `compile_count()` counts traces. New
  compilations come only from a new prompt bucket, batch size, vision patch bucket, number of
  stop ids, or a new (max_new_tokens, num_samples, temperature, top_k, top_p, pad_id,
  cache_windows); each cache window compiles its own loop body. New parameters (a re-merged
  model) and other stop ids reuse the executables.

Public: generate, Samples, token_logprobs, token_logprobs_fn (pure, for jax.grad),
prepare_logprob_batch / prepare_prompt (host side), place_batch, sample_logits, row_keys,
bucket_length, left_align, compile_count.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
import os
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from balcap_jax.padding import bucket_length, to_numpy

_TRACES: collections.Counter = collections.Counter()


def compile_count(name: str | None = None) -> int:
    """Number of times the jitted sampler functions were traced (= compiled): `name` in
    {"prefill", "decode", "token_logprobs"} or None for the total."""
    return sum(_TRACES.values()) if name is None else _TRACES[name]


class Samples(NamedTuple):
    tokens: jax.Array     # [N, max_new_tokens] int32, pad_id after the stop token
    logprobs: jax.Array   # [N, max_new_tokens] float32, 0 after the stop token
    lengths: jax.Array    # [N] int32, generated tokens including the stop token
    truncated: jax.Array  # [N] bool, no stop token within max_new_tokens

    @property
    def mask(self) -> jax.Array:
        """[N, max_new_tokens] float32: 1 on generated tokens up to and including the stop."""
        steps = jnp.arange(self.tokens.shape[1])[None, :]
        return (steps < self.lengths[:, None]).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Sampling filters (pure, per step)
# ----------------------------------------------------------------------------------------------

def _inverse_cdf(w: jax.Array, u: jax.Array, block: int = 128) -> jax.Array:
    """Index drawn with probability proportional to the weights w [N,V] >= 0, one uniform u [N]
    per row.

    Two-level inverse CDF (block sums, then one block): one random number per row instead of V
    Gumbel draws, and cumulative sums over V/block + block entries instead of V. Zero-weight
    entries are never chosen: float rounding can push a count past the support, so the block is
    capped at the last block with weight and the entry at its block's last nonzero one (two
    small searches, instead of one more pass over the whole row).
    """
    n, v = w.shape
    if v % block or v <= block:
        c = jnp.cumsum(w, axis=-1)
        idx = jnp.sum(c <= (u * c[:, -1])[:, None], axis=-1)
        last_nonzero = v - 1 - jnp.argmax((w > 0)[:, ::-1], axis=-1)
        return jnp.minimum(idx, last_nonzero).astype(jnp.int32)
    nb = v // block
    wb = w.reshape(n, nb, block)
    sums = jnp.sum(wb, axis=-1)                                              # [N, V/block]
    cb = jnp.cumsum(sums, axis=-1)
    target = u * cb[:, -1]
    last_block = nb - 1 - jnp.argmax((sums > 0)[:, ::-1], axis=-1)
    bi = jnp.minimum(jnp.sum(cb <= target[:, None], axis=-1), last_block)
    before = jnp.where(bi > 0,
                       jnp.take_along_axis(cb, jnp.maximum(bi - 1, 0)[:, None], 1)[:, 0], 0.)
    inner = jnp.take_along_axis(wb, bi[:, None, None], axis=1)[:, 0]         # [N, block]
    ci = jnp.cumsum(inner, axis=-1)
    k = jnp.sum(ci <= (target - before)[:, None], axis=-1)
    last_in = block - 1 - jnp.argmax((inner > 0)[:, ::-1], axis=-1)
    return (bi * block + jnp.minimum(k, last_in)).astype(jnp.int32)


def _nucleus(p: jax.Array, top_p: float) -> jax.Array:
    """bool [N,V]: token i is kept iff the probability mass strictly above p_i is < top_p (the
    sort-based rule of transformers' TopPLogitsWarper; tied tokens are kept or dropped together).

    Found without a sort (XLA's CPU sort of [16, 8192] takes ~100 ms): bisection over the bit
    patterns of the non-negative float32 probabilities (monotone as int32) for the smallest c with
    mass(p > c) < top_p; then kept = p >= c. 32 masked sums over V, exact.
    """
    bits = jax.lax.bitcast_convert_type(p, jnp.int32)
    n = p.shape[0]

    def body(_, lohi):
        lo, hi = lohi
        mid = lo + (hi - lo) // 2
        mass = jnp.sum(jnp.where(bits > mid[:, None], p, 0.0), axis=-1)
        ok = mass < top_p
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    lo = jnp.full((n,), -1, jnp.int32)
    hi = jnp.max(bits, axis=-1)                       # mass above the max is 0 < top_p
    _, hi = jax.lax.fori_loop(0, 32, body, (lo, hi))
    return bits >= hi[:, None]


def sample_logits(logits: jax.Array, keys: jax.Array | None, *, temperature: float,
                  top_k: int = 0, top_p: float = 1.0, uniform: jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array]:
    """One token per row from float logits [N,V] with per-row keys [N] (or the per-row
    uniform draws [N] themselves, `uniform=`; keys then unused).

    Returns (tokens [N] int32, logprobs [N] float32) where logprobs = log_softmax(logits / T) at
    the token (T = 1 for greedy, temperature == 0). top_k (0 = off) is applied before top_p over
    the renormalised top-k distribution, as transformers' logits processors do. With both off
    nothing is sorted; top_p alone needs no sort either (`_nucleus`).
    """
    logits = logits.astype(jnp.float32)
    v = logits.shape[-1]
    if temperature == 0:
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        lp = jnp.take_along_axis(logits, tok[:, None], -1)[:, 0] - jax.nn.logsumexp(logits, -1)
        return tok, lp
    scaled = logits / temperature
    m = jnp.max(scaled, axis=-1, keepdims=True)
    e = jnp.exp(scaled - m)                                # one exp pass serves sampling and lp
    z = jnp.sum(e, axis=-1, keepdims=True)
    u = _uniform(keys) if uniform is None else uniform
    if top_k <= 0 or top_k >= v:
        w = e if top_p >= 1.0 else jnp.where(_nucleus(e / z, top_p), e, 0.0)
        tok = _inverse_cdf(w, u)
    else:
        vals, idx = jax.lax.top_k(scaled, top_k)                              # sorted, descending
        w = jnp.exp(vals - m)
        if top_p < 1.0:
            probs = w / jnp.sum(w, axis=-1, keepdims=True)
            above = jnp.cumsum(probs, axis=-1) - probs
            w = jnp.where(above < top_p, w, 0.0)                              # the top one stays
        tok = jnp.take_along_axis(idx, _inverse_cdf(w, u)[:, None], -1)[:, 0].astype(jnp.int32)
    lp = jnp.take_along_axis(scaled - m, tok[:, None], -1)[:, 0] - jnp.log(z[:, 0])
    return tok, lp


def row_keys(rng: jax.Array, num_rows: int) -> jax.Array:
    """Per-row keys fold_in(rng, row) [N] (typed or raw uint32 keys both work)."""
    return jax.vmap(lambda r: jax.random.fold_in(rng, r))(jnp.arange(num_rows, dtype=jnp.uint32))


def _step_keys(keys: jax.Array, step) -> jax.Array:
    return jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)


def _uniform(keys: jax.Array) -> jax.Array:
    return jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys)


def _step_uniforms(keys: jax.Array, steps: int) -> jax.Array:
    """float32 [N, steps]: row r's draw at step s, uniform(fold_in(keys[r], s)), all drawn at
    once before the decode loop (the same numbers as drawing them step by step)."""
    return jax.vmap(lambda s: _uniform(_step_keys(keys, s)), out_axes=1)(
        jnp.arange(steps, dtype=jnp.uint32))


# ----------------------------------------------------------------------------------------------
# Host-side prompt preparation: left-align, bucket, positions
# ----------------------------------------------------------------------------------------------

def left_align(inputs: dict, length: int, pad_id: int = 0) -> dict:
    """input_ids / attention_mask / mm_token_type_ids re-packed to [B, length], every row's valid
    tokens (attention_mask == 1) at the right end. Accepts left or right padded inputs."""
    if "input_ids" not in inputs:
        raise ValueError(f"inputs needs 'input_ids' (got keys {sorted(inputs)})")
    ids = to_numpy(inputs["input_ids"])
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {ids.shape}")
    mask = to_numpy(inputs.get("attention_mask", np.ones_like(ids))).astype(bool)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
    per_token = {"input_ids": (ids, pad_id), "attention_mask": (mask, 0)}
    if inputs.get("mm_token_type_ids") is not None:
        per_token["mm_token_type_ids"] = (to_numpy(inputs["mm_token_type_ids"]), 0)
    n_valid = mask.sum(1)
    if n_valid.max(initial=0) > length:
        raise ValueError(f"prompt of {n_valid.max()} tokens does not fit length {length}")
    if (n_valid == 0).any():
        raise ValueError(f"rows {np.nonzero(n_valid == 0)[0].tolist()} have no prompt tokens")
    out = {}
    for name, (arr, fill) in per_token.items():
        res = np.full((ids.shape[0], length), fill, dtype=np.int32)
        for r in range(ids.shape[0]):
            vals = arr[r][mask[r]]
            res[r, length - len(vals):] = vals
        out[name] = res
    return out


class Prompt(NamedTuple):
    """A bucketed prompt batch: what the jitted functions take (all arrays, a pytree)."""
    embed_inputs: Any     # pytree consumed by the adapter's embed (input_ids, vision inputs ...)
    positions: Any        # [B,T] or [3,B,T] int32 rotary positions of the prompt tokens
    mask: Any             # [B,T] int32, 1 = real prompt token (left padded)
    deltas: Any           # [B] int32: token at cache slot i >= T has position i + delta


class _TextAdapter:
    """Plain decoders: positions = number of valid tokens before (HF: cumsum(mask) - 1)."""

    @staticmethod
    def prepare(model, aligned: dict, inputs: dict) -> Prompt:
        mask = aligned["attention_mask"]
        pos = np.where(mask > 0, np.cumsum(mask, 1) - 1, 0).astype(np.int32)
        deltas = (mask.sum(1) - mask.shape[1]).astype(np.int32)
        return Prompt({"input_ids": aligned["input_ids"]}, pos, mask, deltas)

    @staticmethod
    def embed(model, embed_inputs):
        return model.embed(embed_inputs["input_ids"])


class _CustomAdapter:
    """Models that prepare their own prompts: prepare_prompt(inputs) -> (embed_inputs,
    positions, deltas) on the aligned, bucketed inputs; embed_prompt(embed_inputs) -> [B,T,D]."""

    @staticmethod
    def prepare(model, aligned: dict, inputs: dict) -> Prompt:
        merged = dict(inputs)
        merged.update(aligned)
        embed_inputs, positions, deltas = model.prepare_prompt(merged)
        return Prompt(embed_inputs, np.asarray(positions, np.int32), aligned["attention_mask"],
                      np.asarray(deltas, np.int32).reshape(-1))

    @staticmethod
    def embed(model, embed_inputs):
        return model.embed_prompt(embed_inputs)


def _adapter(model):
    if hasattr(model, "prepare_prompt") and hasattr(model, "embed_prompt"):
        return _CustomAdapter   # Qwen2.5-VL (images), LLaVA, ...
    return _TextAdapter


def _place(model, tree, batch_axis_of):
    """On a model with a mesh (model.mesh), put arrays with a batch axis on the mesh, batch
    sharded by the model's rules ("batch" logical axis); others replicated. No-op otherwise.

    The host values must be the whole (global) batch, equal on every process: with several
    processes each fills its own devices' shards (`distributed.global_array`)."""
    mesh = getattr(model, "mesh", None)
    if mesh is None:
        return tree
    from balcap_jax import distributed
    from balcap_jax import sharding as shd
    rules = getattr(model, "rules", None)

    def put(path, x):
        x = np.asarray(x)
        names = [None] * x.ndim
        axis = batch_axis_of(path, x)
        if axis is not None:
            names[axis] = "batch"
        return distributed.global_array(x, shd.named_sharding(names, x.shape, mesh, rules))
    return jax.tree_util.tree_map_with_path(put, tree)


def place_batch(model, tree):
    """A prompt or log-prob batch (numpy, `prepare_prompt` / `prepare_logprob_batch`), or any
    tree of arrays with a leading batch axis, placed batch-sharded on the model's mesh."""
    return _place(model, tree, _prompt_batch_axis)


def _prompt_batch_axis(path, x):
    keys = [getattr(k, "name", getattr(k, "key", None)) for k in path]
    if "vision" in keys:             # patches of all images concatenated: no batch axis
        return None
    if "positions" in keys:
        return x.ndim - 2            # [B,T] or [3,B,T]
    return 0


def prepare_prompt(model, inputs: dict, *, prompt_buckets: Sequence[int] | None = None,
                   pad_id: int = 0) -> Prompt:
    """Host side: left-align and bucket the prompt, then let the model's adapter build the
    embedding inputs and positions. Returns numpy arrays."""
    mask = to_numpy(inputs.get("attention_mask", np.ones_like(to_numpy(inputs["input_ids"]))))
    length = bucket_length(int(mask.sum(1).max()), prompt_buckets)
    aligned = left_align(inputs, length, pad_id)
    return _adapter(model).prepare(model, aligned, inputs)


# ----------------------------------------------------------------------------------------------
# Jitted prefill + decode
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Config:
    max_new_tokens: int
    num_samples: int
    temperature: float
    top_k: int
    top_p: float
    pad_id: int
    cache_windows: int
    done_every: int = 1      # steps between the loop's "every row done?" tests


def _done_every(model) -> int:
    """Steps between the decode loop's early-exit tests: 8 on a CPU whose rows are split over
    several devices, else 1 (every step). The test is an all-reduce over the rows' devices; on
    XLA:CPU that rendezvous (the devices wait for each other at every token) cost 6% of a
    sampler call on 2 devices (benchmarks/sampler.py --devices 2). Testing every 8 steps lets
    the devices run apart between tests; a batch whose rows all stopped runs at most 7 steps
    more, writing pad tokens (the outputs are the same). Accelerators keep the per-step test:
    their steps are long next to a one-bit all-reduce."""
    mesh = getattr(model, "mesh", None)
    if jax.default_backend() != "cpu" or mesh is None or mesh.size == 1:
        return 1
    from balcap_jax import sharding as shd
    batch = shd.logical_to_spec(("batch",), getattr(model, "rules", None), mesh=mesh)[0]
    split = math.prod(mesh.shape[a] for a in shd._axes_tuple(batch))   # devices over the rows
    return 8 if split > 1 else 1


def _step_windows(cfg: _Config) -> list[tuple[int, int, int]]:
    """Static (start, end, slots) per window of decode steps: `cfg.cache_windows` near-equal
    ranges [start, end) of steps 1 .. max_new_tokens - 1 (step 0 is the prefill's), none
    shorter than 8 steps, each with the generation-cache slots its last step can reach (step s
    writes slot s - 1). The decode loop grows the cache to that size per window, so a step
    early in a long generation reads a fraction of the slots the last one reads."""
    steps = cfg.max_new_tokens - 1
    if steps < 1:
        return []
    n = max(1, min(cfg.cache_windows, steps // 8))
    cuts = [1 + round(i * steps / n) for i in range(n + 1)]
    return [(a, e, e - 1) for a, e in zip(cuts[:-1], cuts[1:])]


def _grow_cache(cache, model, n: int, slots: int):
    """Zero-pad every cache leaf along its slot axis (where init_cache(n, 1) and (n, 2)
    differ, so the layout stays the model's business) to `slots` slots."""
    dtype = jax.tree.leaves(cache)[0].dtype

    def shapes(s):
        c = model.init_cache(n, s, dtype)
        return model.decode_cache(c) if hasattr(model, "decode_cache") else c
    one, two = jax.eval_shape(lambda: shapes(1)), jax.eval_shape(lambda: shapes(2))

    def grow(x, a, b):
        axis = next(i for i, (p, q) in enumerate(zip(a.shape, b.shape)) if p != q)
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, slots - x.shape[axis])
        return jnp.pad(x, pad)
    return jax.tree.map(grow, cache, one, two)


class _Carry(NamedTuple):
    step: jax.Array       # int32: tokens generated so far (column of the next one)
    tokens: jax.Array     # [N, M] int32
    logprobs: jax.Array   # [N, M] float32
    done: jax.Array       # [N] bool: a stop token was generated
    last: jax.Array       # [N] int32: the latest token (input of the next step)
    cache: Any


def _repeat_batch(cache, model, b: int, g: int, max_len: int, dtype):
    """Repeat every cache leaf g times along its batch axis (found by comparing the shapes of
    init_cache(b) and init_cache(b*g), so the cache layout stays the model's business)."""
    if g == 1:
        return cache
    small = jax.eval_shape(lambda: model.init_cache(b, max_len, dtype))
    big = jax.eval_shape(lambda: model.init_cache(b * g, max_len, dtype))

    def rep(x, s, l):
        axes = [i for i, (p, q) in enumerate(zip(s.shape, l.shape)) if p != q]
        return jnp.repeat(x, g, axis=axes[0]) if axes else x
    return jax.tree.map(rep, cache, small, big)


def _decode_positions(slot, deltas, mrope: bool):
    pos = (slot + deltas)[:, None].astype(jnp.int32)                    # [N, 1]
    return jnp.broadcast_to(pos[None], (3,) + pos.shape) if mrope else pos


def _emit(carry: _Carry, tok, lp, eos, cfg: _Config) -> _Carry:
    tok = jnp.where(carry.done, cfg.pad_id, tok)
    lp = jnp.where(carry.done, 0.0, lp)
    done = carry.done | jnp.isin(tok, eos)
    tokens = jax.lax.dynamic_update_slice(carry.tokens, tok[:, None], (0, carry.step))
    logprobs = jax.lax.dynamic_update_slice(carry.logprobs, lp[:, None], (0, carry.step))
    return carry._replace(step=carry.step + 1, tokens=tokens, logprobs=logprobs, done=done,
                          last=jnp.where(done, 0, tok).astype(jnp.int32))  # stays a valid id


def _sample(logits, uniforms, step, cfg: _Config, suppress):
    # never sampled: a [V] bias of 0 / -inf (not a scatter into [N, V]) so it fuses into the
    # reductions. An add, not a select: XLA:CPU does not vectorise a max reduction over
    # where(mask, -inf, x) (145 against 9 us for [16, 8192]), but does over x + bias
    bias = jnp.zeros(logits.shape[-1], jnp.float32).at[suppress].set(-jnp.inf)
    logits = logits.astype(jnp.float32) + bias
    u = jax.lax.dynamic_index_in_dim(uniforms, step, axis=1, keepdims=False)
    return sample_logits(logits, None, temperature=cfg.temperature, top_k=cfg.top_k,
                         top_p=cfg.top_p, uniform=u)


def suppressed_ids(model) -> np.ndarray:
    """int32 [k]: the model's vision special tokens (model.vision_token_ids), never sampled."""
    return np.asarray(tuple(getattr(model, "vision_token_ids", ()) or ()), np.int32)


def shares_prefix(model) -> bool:
    """Whether the model's forward_embeds reads a shared prompt's keys (`prefix=`): then the G
    rollouts of a prompt decode against one copy of its prefill cache."""
    import inspect
    return "prefix" in inspect.signature(model.forward_embeds).parameters


def _prefill(graphdef, state, prompt: Prompt, rng, eos, suppress, cfg: _Config):
    """Prompt forward + first token. Returns (carry without its cache, cache, kv_mask,
    deltas, uniforms, prefix). With a model that `shares_prefix`, the prompt cache [B, .., T]
    is kept once (`prefix`, the keys every sample of the prompt reads) and the cache is None:
    `_decode` gives each of the N = B*G rows a generation cache of its own, grown window by
    window (also at G = 1, where nothing is shared: the windows are the gain). Otherwise one
    cache of T + max_new_tokens slots is filled and repeated G times."""
    _TRACES["prefill"] += 1
    model = nnx.merge(graphdef, state)
    b, t = prompt.mask.shape
    g, n, m = cfg.num_samples, prompt.mask.shape[0] * cfg.num_samples, cfg.max_new_tokens
    x = _adapter(model).embed(model, prompt.embed_inputs)
    mask = prompt.mask.astype(jnp.int32)
    if shares_prefix(model):
        hidden, cache = model.forward_embeds(x, prompt.positions, mask,
                                             model.init_cache(b, t, x.dtype), jnp.int32(0))
        # per layer where the decode loop runs its layers as a Python loop: a slice of the
        # stacked cache inside the loop would be a copy of the prompt's keys at every token
        # (XLA does not hoist it), here it is made once
        if hasattr(model, "decode_cache"):
            cache = model.decode_cache(cache)
        prefix, cache = (cache, mask), None
        kv_mask = jnp.ones((n, m), jnp.int32)   # causal: a row reads its slots up to the latest
    else:
        s = t + m
        kv_mask = jnp.concatenate([mask, jnp.ones((b, m), jnp.int32)], axis=1)
        hidden, cache = model.forward_embeds(x, prompt.positions, kv_mask,
                                             model.init_cache(b, s, x.dtype), jnp.int32(0))
        cache = _repeat_batch(cache, model, b, g, s, x.dtype)    # prompt-major copies
        if hasattr(model, "decode_cache"):
            cache = model.decode_cache(cache)
        kv_mask = jnp.repeat(kv_mask, g, axis=0)
        prefix = None
    logits = jnp.repeat(model.logits(hidden[:, -1:])[:, 0], g, axis=0)    # [N, V]
    deltas = jnp.repeat(prompt.deltas.astype(jnp.int32), g, axis=0)
    uniforms = _step_uniforms(row_keys(rng, n), cfg.max_new_tokens)      # [N, max_new]
    carry = _Carry(step=jnp.int32(0),
                   tokens=jnp.full((n, cfg.max_new_tokens), cfg.pad_id, jnp.int32),
                   logprobs=jnp.zeros((n, cfg.max_new_tokens), jnp.float32),
                   done=jnp.zeros((n,), bool), last=jnp.zeros((n,), jnp.int32), cache=None)
    tok, lp = _sample(logits, uniforms, 0, cfg, suppress)
    return _emit(carry, tok, lp, eos, cfg), cache, kv_mask, deltas, uniforms, prefix


def _decode(graphdef, state, carry: _Carry, cache, kv_mask, deltas, uniforms, eos, suppress,
            prefix, cfg: _Config, mrope: bool, prompt_len: int):
    """The decode loops; returns (Samples, final carry). The carry and the cache are donated
    and returned, so the samples and the cache are written in place. `cache`: the prefill's,
    holding the prompt; or None with `prefix` (the shared prompt cache and mask, read-only):
    then each row's generation cache starts empty and grows window by window."""
    _TRACES["decode"] += 1
    model = nnx.merge(graphdef, state)
    if hasattr(model, "for_decode"):
        model = model.for_decode()
    extra = {} if prefix is None else {"prefix": prefix[0], "prefix_mask": prefix[1]}
    base = 0 if prefix is not None else prompt_len    # the cache slot of generated token 0

    def body(slots: int, c: _Carry):
        gen = c.step - 1                                   # the latest token's generated index
        x = model.embed(c.last[:, None])
        hidden, cache = model.forward_embeds(
            x, _decode_positions(prompt_len + gen, deltas, mrope), kv_mask[:, :slots], c.cache,
            base + gen, **extra)
        tok, lp = _sample(model.logits(hidden)[:, 0], uniforms, c.step, cfg, suppress)
        return _emit(c._replace(cache=cache), tok, lp, eos, cfg)

    def loop(carry: _Carry, end: int, slots: int) -> _Carry:
        step = functools.partial(body, slots)
        if cfg.done_every == 1:
            return jax.lax.while_loop(lambda c: (c.step < end) & ~jnp.all(c.done), step, carry)

        def chunk(c: _Carry) -> _Carry:     # up to done_every steps with no test of the rows
            stop = jnp.minimum(end, c.step + cfg.done_every)
            return jax.lax.while_loop(lambda d: d.step < stop, step, c)
        return jax.lax.while_loop(lambda c: (c.step < end) & ~jnp.all(c.done), chunk, carry)

    if prefix is None:
        # The cache holds the prompt: one loop over all of it. Growing it per window would
        # copy the prompt's slots, and the prefill's cache, an argument here, would stay alive
        # beside the grown one (up to twice the prompt's memory). Donated and returned.
        carry = carry._replace(cache=cache)
        if cfg.max_new_tokens > 1:
            carry = loop(carry, cfg.max_new_tokens, kv_mask.shape[1])
    else:
        # One loop per window of steps, on a generation cache grown to the slots that window
        # can reach. The attention reads every slot of the cache it is given, and in place (a
        # slice of a larger cache would be a copy per step), so early steps read a fraction
        # of the slots. The grown cache is not returned: that would only hold its memory.
        n = kv_mask.shape[0]
        for i, (_, end, slots) in enumerate(_step_windows(cfg)):
            if i == 0:
                dtype = jax.eval_shape(model.embed, carry.last[:, None]).dtype
                cache = model.init_cache(n, slots, dtype)
                cache = model.decode_cache(cache) if hasattr(model, "decode_cache") else cache
            else:
                cache = _grow_cache(carry.cache, model, n, slots)
            carry = loop(carry._replace(cache=cache), end, slots)
        carry = carry._replace(cache=None)
    is_stop = jnp.isin(carry.tokens, eos)
    stopped = jnp.any(is_stop, axis=1)
    lengths = jnp.where(stopped, jnp.argmax(is_stop, axis=1) + 1, cfg.max_new_tokens)
    # the final carry is returned so that every donated buffer is reused
    return Samples(carry.tokens, carry.logprobs, lengths.astype(jnp.int32), ~stopped), carry


def generate(model, inputs: dict, *, max_new_tokens: int, num_samples: int = 1,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             eos_token_ids: int | Sequence[int], rng: jax.Array, pad_id: int = 0,
             prompt_buckets: Sequence[int] | None = None, cache_windows: int = 4) -> Samples:
    """Sample `num_samples` completions per prompt (rows prompt-major); see the module docstring.

    inputs: the processor's dict (input_ids, attention_mask; optionally pixel_values,
    image_grid_thw, mm_token_type_ids), numpy, jax or torch arrays, left or right padded.
    temperature 0 is greedy. eos_token_ids: one id or several; ids outside the vocabulary never
    stop. cache_windows: with a model that `shares_prefix` (any num_samples), the number of
    decode loops, each on a generation cache grown to the slots it can reach (1 = one loop;
    each compiles its own body). Returns Samples on device.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if cache_windows < 1:
        raise ValueError(f"cache_windows must be >= 1, got {cache_windows}")
    eos = ((int(eos_token_ids),) if np.ndim(eos_token_ids) == 0
           else tuple(int(e) for e in eos_token_ids))
    cfg = _Config(int(max_new_tokens), int(num_samples), float(temperature), int(top_k),
                  float(top_p), int(pad_id), int(cache_windows), _done_every(model))
    eos = np.asarray(eos, np.int32)  # traced: changing the stop ids does not recompile
    prompt = prepare_prompt(model, inputs, prompt_buckets=prompt_buckets, pad_id=pad_id)
    prompt = _place(model, prompt, _prompt_batch_axis)
    suppress = suppressed_ids(model)
    graphdef, state = nnx.split(model)
    carry, cache, kv_mask, deltas, draws, prefix = _jit("prefill")(graphdef, state, prompt, rng,
                                                                  eos, suppress, cfg)
    samples, _ = _jit("decode")(graphdef, state, carry, cache, kv_mask, deltas, draws, eos,
                                suppress, prefix, cfg, np.ndim(prompt.positions) == 3,
                                int(np.shape(prompt.mask)[1]))
    return samples


# ----------------------------------------------------------------------------------------------
# Recomputed log-probabilities (what the loss differentiates)
# ----------------------------------------------------------------------------------------------

def prepare_logprob_batch(model, inputs: dict, completions, mask, *,
                          prompt_buckets: Sequence[int] | None = None, pad_id: int = 0,
                          group_size: int = 1) -> dict:
    """Host side: the bucketed prompt plus completions [N,L] int and mask [N,L] (1 = scored),
    as a dict of numpy arrays for `token_logprobs_fn`. `inputs` holds one prompt per
    completion, or (group_size > 1) one per group of group_size consecutive completions."""
    completions = to_numpy(completions).astype(np.int32)
    mask = to_numpy(mask)
    if completions.ndim != 2 or mask.shape != completions.shape:
        raise ValueError(f"completions [B, L] and mask [B, L] must agree, got {completions.shape} "
                         f"and {mask.shape}")
    prompt = prepare_prompt(model, inputs, prompt_buckets=prompt_buckets, pad_id=pad_id)
    if prompt.mask.shape[0] * group_size != completions.shape[0]:
        raise ValueError(f"{prompt.mask.shape[0]} prompts in groups of {group_size} but "
                         f"{completions.shape[0]} completions; give one prompt per group of "
                         "group_size completions (prompt-major)")
    if group_size > 1 and not shares_prefix(model):
        raise ValueError(f"{type(model).__name__} cannot read a shared prompt (forward_embeds "
                         "takes no prefix=); repeat each prompt per completion (group_size=1)")
    return {"prompt": prompt,
            "completions": np.where(mask > 0, completions, pad_id).astype(np.int32),
            "mask": mask.astype(np.float32)}


def token_logprobs_fn(model, batch: dict, *, temperature: float = 1.0) -> jax.Array:
    """Pure: per-token log-probabilities [B, L] of batch["completions"] under
    log_softmax(logits / T) (T = 1 when temperature == 0), 0 where batch["mask"] == 0.

    One causal forward over prompt + completion without a cache; differentiable w.r.t. the
    model's parameters (use inside nnx.grad / jax.grad on nnx.merge(graphdef, params)). The
    softmax leaves out the model's vision special tokens, as the sampler does, so these are
    the log-probabilities of the distribution the rollouts were drawn from.

    With fewer prompts B than completions N (N = B*G, prompt-major: `prepare_logprob_batch`
    with group_size=G), each prompt is forwarded once and its G completions attend to it as a
    shared prefix (needs a model that `shares_prefix`); the values equal the repeated-prompt
    computation up to float rounding.
    """
    prompt: Prompt = batch["prompt"]
    comp, mask = batch["completions"], batch["mask"]
    b, t = prompt.mask.shape
    n, length = comp.shape
    temp = 1.0 if temperature == 0 else temperature
    x = _adapter(model).embed(model, prompt.embed_inputs)
    g = n // b
    comp_pos = t + jnp.arange(length, dtype=jnp.int32)[None, :] + jnp.repeat(
        prompt.deltas, g, axis=0)[:, None]                                       # [N, L]
    positions = prompt.positions
    if jnp.ndim(positions) == 3:
        comp_pos = jnp.broadcast_to(comp_pos[None], (3, n, length))
    comp_pos = comp_pos.astype(positions.dtype)
    if g > 1:
        # Grouped: each prompt (and its image) is forwarded once; its G completions read its
        # keys and values as a shared prefix (the same attention, without G copies of the
        # prompt's work). The prompt's last state predicts every completion's first token.
        pmask = prompt.mask.astype(jnp.int32)
        last, prefix = model.forward_embeds(x, positions, pmask,
                                            model.init_cache(b, t, x.dtype), jnp.int32(0))
        own, _ = model.forward_embeds(model.embed(comp), comp_pos, (mask > 0).astype(jnp.int32),
                                      None, jnp.int32(0), prefix=prefix, prefix_mask=pmask)
        hidden = jnp.concatenate([jnp.repeat(last[:, -1:], g, axis=0), own[:, :length - 1]], 1)
    else:
        x = jnp.concatenate([x, model.embed(comp)], 1)
        positions = jnp.concatenate([positions, comp_pos], axis=-1)
        kv_mask = jnp.concatenate([prompt.mask, (mask > 0)], axis=1).astype(jnp.int32)
        hidden, _ = model.forward_embeds(x, positions, kv_mask, None, jnp.int32(0))
        hidden = hidden[:, t - 1:t + length - 1]           # the states that predict the completion
    suppress = tuple(int(i) for i in suppressed_ids(model))
    if hasattr(model, "token_logprobs"):   # chunked: never float32 [B, L, V] logits at once
        logp = model.token_logprobs(hidden, comp, temperature=temp, suppress=suppress)
    else:
        logits = model.logits(hidden).astype(jnp.float32) / temp
        if suppress:
            logits = logits.at[..., np.asarray(suppress)].set(-jnp.inf)
        logp = (jnp.take_along_axis(logits, comp[..., None], axis=-1)[..., 0]
                - jax.nn.logsumexp(logits, -1))
    return jnp.where(mask > 0, logp, 0.0)


def _token_logprobs_jit(graphdef, state, batch, temperature):
    _TRACES["token_logprobs"] += 1
    return token_logprobs_fn(nnx.merge(graphdef, state), batch, temperature=temperature)


def token_logprobs(model, inputs: dict, completions, mask, *, temperature: float = 1.0,
                   prompt_buckets: Sequence[int] | None = None, pad_id: int = 0,
                   group_size: int = 1) -> jax.Array:
    """Eager wrapper: per-token log-probabilities [B, L] of `completions` after the prompts in
    `inputs` (the processor's dict), 0 where mask == 0. Jitted, bucketed like `generate`."""
    batch = prepare_logprob_batch(model, inputs, completions, mask, prompt_buckets=prompt_buckets,
                                  pad_id=pad_id, group_size=group_size)
    batch = _place(model, batch, _prompt_batch_axis)
    graphdef, state = nnx.split(model)
    return _jit("token_logprobs")(graphdef, state, batch, float(temperature))


_JIT_SPECS = {  # name -> (function, static argnames, donated argnames)
    "prefill": (_prefill, ("graphdef", "cfg"), ()),
    "decode": (_decode, ("graphdef", "cfg", "mrope", "prompt_len"), ("carry", "cache")),
    "token_logprobs": (_token_logprobs_jit, ("graphdef", "temperature"), ()),
}


def _cpu_cores() -> int:
    """CPU cores this process may run on (its affinity, where the OS reports one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _compiler_options(name: str, backend: str, cores: int) -> dict | None:
    """XLA options for one of the jitted functions; None = the backend's defaults.

    On CPU, XLA's experimental YNNPACK fusions (default on in jax 0.10) make the small float32
    matmuls of a decode step ~35% slower (measured with benchmarks/sampler.py: 6.4 vs 9.9 ms
    per step), so these executables are compiled without them. On a CPU of at most 2 cores
    (this project's CI machines, Colab's CPU runtime) the decode's matmuls also run on one
    thread: handing each of a step's small matmuls to Eigen's thread pool cost more than the
    second core gave (in-process A/Bs on 2 cores, 96 tokens, identical tokens and log-probs; a
    sampler call at benchmarks/sampler.py's shapes: -10% at G = 1, -8% at G = 8 in medians of 12
    pairs; -5% at 16 rows of a 4 x 1024 model, whose fastest calls were equal). The prefill's
    larger matmuls keep the pool.

    XLA:CPU's tree-reduction rewriter splits every reduction over more than 32 elements into a
    reduce-window and a reduce, for the accuracy of long float sums. A reduce-window fuses with
    nothing and runs as a scalar loop: a decode step's max and sums over the vocabulary then
    materialise the [N, V] logits and take ~70 us each at 16 x 8192 (a plain fused max: 9 us).
    The decode is compiled without it (-3.5% a sampler call at benchmarks/sampler.py's shapes,
    in-process paired medians; same tokens, log-probs within 4e-6: the sums over V are then a
    vectorised loop instead of a tree).

    XLA:CPU vectorises its own loops (everything but the matmuls) for 256-bit registers unless
    told otherwise; on an AVX-512 CPU (this project's Xeons) 512-bit vectors take 4.5% off a
    sampler call (12 in-process pairs, same tokens, log-probs within 4e-6). A CPU without
    AVX-512 ignores the preference.
    """
    if backend != "cpu":
        return None
    opts: dict = {"xla_cpu_experimental_ynn_fusion_type": "", "xla_cpu_prefer_vector_width": 512}
    if name == "decode":
        opts["xla_disable_hlo_passes"] = "tree_reduction_rewriter"
        if cores <= 2:
            opts["xla_cpu_multi_thread_eigen"] = False
    return opts


@functools.cache
def _jit(name: str):
    """The jitted function, built on first use (so importing this module starts no backend),
    with `_compiler_options`."""
    fn, static, donate = _JIT_SPECS[name]
    opts = _compiler_options(name, jax.default_backend(), _cpu_cores())
    return jax.jit(fn, static_argnames=static, donate_argnames=donate, compiler_options=opts)
