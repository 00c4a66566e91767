"""Decoder-only causal LMs (Qwen2/Qwen2.5, Llama) built from models/layers.py.

Config: `DecoderConfig` (frozen dataclass; Qwen2 = q/k/v bias, Llama = no bias; tied or untied
embeddings; `mrope_section` turns on Qwen2.5-VL M-RoPE with positions [3, B, T]).

Modules (parameter paths mirror HF names: model/layers/0/self_attn/q_proj/kernel, lm_head/kernel):
  `Decoder` = embed_tokens + layers + final norm;  `CausalLM` = model (a Decoder) + lm_head or tied.

Eager call (users, parity tests):
  `lm(input_ids=..., attention_mask=None, position_ids=None, **ignored)` -> float32 logits
  [B, T, V]; numpy or jax inputs; left padding allowed (positions = clip(cumsum(mask) - 1, 0));
  the sequence is right-padded to a bucket and run through one jitted function.

Low-level API (sampler, trainer; all jit-friendly, call inside your own jit):
  `lm.embed(input_ids[B,T]) -> [B,T,D]`
  `lm.forward_embeds(x[B,T,D], positions, kv_mask[B,S], cache=None, cache_index=0,
      prefix=None, prefix_mask=None, segment_ids=None)` -> (hidden [B,T,D] after the final
      norm, new KVCache or None); `prefix`: a prefill's KVCache of B/G shared prompts that the
      rows read first; `segment_ids`: sequences packed in a row (the judges' items).
      positions: int [B,T] (1-D RoPE) or [3,B,T] (M-RoPE). kv_mask: 1 = valid key slot; without
      a cache S = T; with a cache S = cache length and query token t sits at slot cache_index+t
      and attends to slots s <= cache_index+t with kv_mask[b,s] == 1. The new keys/values are
      written at slots cache_index .. cache_index+T-1 (one int32 scalar for the whole batch).
  `lm.logits(hidden) -> float32 [B,T,V]`;  `lm.lm_head_weight() -> [D,V]` (tied: embedding.T)
  `lm.init_cache(batch, max_len, dtype=None) -> KVCache` (zeros, stacked over layers: k
      [L, B, kv_heads, head_dim, max_len], v [L, B, kv_heads, max_len, head_dim]; the layouts
      the attention matmuls read untransposed; the batch axis is 1 in both).
The layers are one `models.stack.StackedLayers` run under lax.scan (`lm.model.layers.layer(i)`
is layer i as a module); a per-layer cache (`KVCache.per_layer()`, what `lm.decode_cache` gives
the sampler under `set_decode_layers("unroll")`, the default) runs them as a Python loop.
  `lm.token_logprobs(hidden, targets, temperature=1.0, chunk_size=256) -> float32 [B,T]`
  `token_logprobs_from_hidden(hidden[B,T,D], lm_head_weight[D,V], targets[B,T], *,
      temperature=1.0, chunk_size=256)`: log_softmax(hidden @ W / temperature)[targets] computed
      chunk by chunk over the sequence (lax.map of a custom VJP), so neither the forward nor the
      backward pass holds float32 [B, T, V] logits at once.
Sharding: a model built by hf.from_pretrained(mesh=..., rules=...) remembers (mesh, rules) and
its forward functions apply activation constraints under `sharding.use_sharding`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from balcap_jax import sharding as shd
from balcap_jax.models import layers as L
from balcap_jax.models.stack import StackedLayers
from balcap_jax.padding import next_pow2

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None          # default hidden_size // num_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_params: tuple[tuple[str, Any], ...] = ()   # extra HF rope_parameters (factor, ...)
    mrope_section: tuple[int, ...] | None = None     # Qwen2.5-VL: positions [3, B, T]
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    act: str = "silu"
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    model_type: str = "qwen2"            # hf.py registry key used by save_pretrained
    hf_extra: str = "{}"                 # JSON of other config.json fields kept for saving

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def inv_freq(self) -> np.ndarray:
        return L.rope_inv_freq(self.dim_per_head, self.rope_theta, self.rope_type,
                               **dict(self.rope_params))


@struct.dataclass
class KVCache:
    """Key/value buffers of all layers, stacked: k [L, B, kv_heads, head_dim, S], v [L, B,
    kv_heads, S, head_dim] (layers.heads_major_attention's layouts per layer; batch axis 1);
    or, `per_layer()`, tuples of L such buffers without the layer axis."""
    k: Array | tuple[Array, ...]
    v: Array | tuple[Array, ...]

    @property
    def max_len(self) -> int:
        return self.v[0].shape[2] if self.is_per_layer else self.v.shape[3]

    @property
    def is_per_layer(self) -> bool:
        return isinstance(self.v, tuple)

    def per_layer(self) -> KVCache:
        """The same buffers as one array per layer: a decode step that runs its layers as a
        Python loop updates each in place, with no restacking."""
        if self.is_per_layer:
            return self
        return KVCache(tuple(self.k), tuple(self.v))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype, rngs: nnx.Rngs | None):
        d = cfg.hidden_size
        self.input_layernorm = L.RMSNorm(d, eps=cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.self_attn = L.Attention(d, cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head,
                                     qkv_bias=cfg.qkv_bias, out_bias=cfg.o_bias, dtype=dtype,
                                     rngs=rngs)
        self.post_attention_layernorm = L.RMSNorm(d, eps=cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = L.GatedMLP(d, cfg.intermediate_size, bias=cfg.mlp_bias, act=cfg.act,
                              dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask, cache=None, cache_index=0, prefix=None,
                 segments=None):
        h, new_cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_index,
                                      prefix, segments)
        x = shd.constrain(x + h, ("batch", "seq", "act_embed"))
        x = x + self.mlp(self.post_attention_layernorm(x))
        return shd.constrain(x, ("batch", "seq", "act_embed")), new_cache


class Decoder(nnx.Module):
    """embed_tokens + DecoderLayers + final RMSNorm (HF Qwen2Model / LlamaModel)."""

    def __init__(self, cfg: DecoderConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.cfg = cfg
        self.embed_tokens = L.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        # one stacked module run under scan: compile time does not grow with depth
        self.layers = StackedLayers([DecoderLayer(cfg, dtype=dtype, rngs=rngs)
                                     for _ in range(cfg.num_layers)])
        self.norm = L.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.remat = None    # a stack.REMAT_POLICIES name: what the training backward keeps
        # how a decode step (a per-layer cache) runs the layers: "unroll" or "scan"
        self.decode_layers = "unroll"

    def rotary(self, positions: Array) -> tuple[Array, Array]:
        cfg = self.cfg
        if cfg.mrope_section is not None:
            if positions.ndim == 2:       # text-only input: the three axes coincide (as HF)
                positions = jnp.broadcast_to(positions[None], (3, *positions.shape))
            return L.mrope_cos_sin(positions, cfg.inv_freq(), cfg.mrope_section)
        if positions.ndim != 2:
            raise ValueError(f"positions must be [B, T] for 1-D RoPE, got {positions.shape}")
        return L.rope_cos_sin(positions, cfg.inv_freq())

    def __call__(self, x: Array, positions: Array, kv_mask: Array, cache: KVCache | None = None,
                 cache_index: Array | int = 0, prefix: KVCache | None = None,
                 prefix_mask: Array | None = None, segment_ids: Array | None = None
                 ) -> tuple[Array, KVCache | None]:
        b, t, _ = x.shape
        if cache is not None and kv_mask.shape != (b, cache.max_len):
            raise ValueError(f"with a cache kv_mask must be [B, S]={(b, cache.max_len)}, "
                             f"got {kv_mask.shape}")
        if cache is None and kv_mask.shape != (b, t):
            raise ValueError(f"without a cache kv_mask must be [B, T]={(b, t)}, "
                             f"got {kv_mask.shape}")
        cos, sin = self.rotary(positions)
        mask = L.causal_mask(kv_mask, t, cache_index)
        if segment_ids is not None:     # several sequences packed in a row: each sees its own
            if cache is not None or segment_ids.shape != (b, t):
                raise ValueError(f"segment_ids must be [B, T]={(b, t)} and come without a "
                                 f"cache, got {segment_ids.shape}")
            mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
        segments = None
        if prefix is None and (cache is None or cache.max_len == t):
            # every key is this call's: a fused kernel may take the mask as segments
            from balcap_jax.models.attention import Segments
            ids = (kv_mask != 0).astype(jnp.int32) if segment_ids is None else \
                jnp.where(kv_mask != 0, segment_ids, -1)
            segments = Segments(ids, ids, causal=True)
        x = shd.constrain(x, ("batch", "seq", "act_embed"))

        def one_layer(layer, x, xs):
            layer_cache, layer_prefix = xs
            if layer_prefix is not None:
                layer_prefix = (*layer_prefix, prefix_mask)
            return layer(x, cos, sin, mask, layer_cache, cache_index, layer_prefix, segments)
        if cache is not None and cache.is_per_layer:
            # a Python loop: each layer's weights are a static slice (hoisted out of the
            # sampler's while loop) and its cache is updated in place. Under scan, XLA on CPU
            # and GPU copies each layer's weights and cache out of the stacks on every token.
            ks, vs = [], []
            for i in range(self.layers.num):
                xs = ((cache.k[i], cache.v[i]),
                      None if prefix is None else (prefix.k[i], prefix.v[i]))
                x, (k, v) = one_layer(self.layers.layer(i), x, xs)
                ks.append(k)
                vs.append(v)
            return self.norm(x), KVCache(tuple(ks), tuple(vs))
        xs = (None if cache is None else (cache.k, cache.v),
              None if prefix is None else (prefix.k, prefix.v))
        remat = self.remat if cache is None else None     # training forwards only
        x, new = self.layers.scan(one_layer, x, xs, remat=remat)
        new_cache = KVCache(*new) if cache is not None else None
        return self.norm(x), new_cache


def token_logprobs_from_hidden(hidden: Array, lm_head_weight: Array, targets: Array, *,
                               temperature: float = 1.0, chunk_size: int = 256,
                               suppress: tuple[int, ...] = ()) -> Array:
    """log p(targets) under softmax(hidden @ W / temperature), float32 [B, T], chunked over T;
    the `suppress` ids are left out of the softmax (ids the sampler never draws).

    Each chunk is a custom VJP (`_chunk_logprobs`) that keeps only its log-normaliser for the
    backward pass, which recomputes the chunk's logits once and forms both gradients from
    d logits = g * (onehot(target) - softmax) / temperature."""
    b, t, d = hidden.shape
    if lm_head_weight.shape[0] != d:
        raise ValueError(f"lm_head_weight must be [D={d}, V], got {lm_head_weight.shape}")
    if targets.shape != (b, t):
        raise ValueError(f"targets must be [B, T]={(b, t)}, got {targets.shape}")
    c = max(1, min(chunk_size, t))
    n = -(-t // c)
    pad = n * c - t
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, n, c, d).swapaxes(0, 1)
    tg = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, n, c).swapaxes(0, 1).astype(jnp.int32)
    w = lm_head_weight.astype(hidden.dtype)
    fn = functools.partial(_chunk_logprobs, float(temperature), tuple(int(i) for i in suppress))
    out = jax.lax.map(lambda args: fn(args[0], w, args[1]), (h, tg))            # [n, B, c]
    return out.swapaxes(0, 1).reshape(b, n * c)[:, :t]


def _chunk_scores(temperature, suppress, h, w):
    """float32 logits / temperature [B, c, V], suppressed ids at -inf (a constant [V] mask,
    which fuses into the matmul's consumer rather than scattering into [B, c, V])."""
    logits = jnp.einsum("bcd,dv->bcv", h, w, preferred_element_type=jnp.float32) / temperature
    if suppress:
        banned = np.zeros(w.shape[1], bool)
        banned[np.asarray(suppress)] = True
        logits = jnp.where(banned, -jnp.inf, logits)
    return logits


def _target_logprobs(temperature, suppress, h, w, tgt):
    scores = _chunk_scores(temperature, suppress, h, w)
    lse = jax.nn.logsumexp(scores, axis=-1)
    picked = jnp.take_along_axis(scores, tgt[..., None], axis=-1)[..., 0]
    return picked - lse, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chunk_logprobs(temperature, suppress, h, w, tgt):
    return _target_logprobs(temperature, suppress, h, w, tgt)[0]


def _chunk_logprobs_fwd(temperature, suppress, h, w, tgt):
    logp, lse = _target_logprobs(temperature, suppress, h, w, tgt)
    return logp, (h, w, tgt, lse)      # no [B, c, V] residual: the backward recomputes it


def _chunk_logprobs_bwd(temperature, suppress, res, g):
    h, w, tgt, lse = res
    p = jnp.exp(_chunk_scores(temperature, suppress, h, w) - lse[..., None])    # 0 where banned
    onehot = jnp.arange(w.shape[1], dtype=jnp.int32) == tgt[..., None]
    dscores = ((onehot.astype(jnp.float32) - p) * (g / temperature)[..., None]).astype(w.dtype)
    dh = jnp.einsum("bcv,dv->bcd", dscores, w, preferred_element_type=jnp.float32)
    dw = jnp.einsum("bcd,bcv->dv", h, dscores, preferred_element_type=jnp.float32)
    return dh.astype(h.dtype), dw.astype(w.dtype), np.zeros(tgt.shape, jax.dtypes.float0)


_chunk_logprobs.defvjp(_chunk_logprobs_fwd, _chunk_logprobs_bwd)


def default_positions(attention_mask: Array) -> Array:
    """HF-style positions for left padding: clip(cumsum(mask) - 1, 0)."""
    return jnp.clip(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def _bucket(n: int, minimum: int = 16) -> int:
    return next_pow2(n, minimum)


@functools.partial(jax.jit, static_argnums=0)
def _eager_logits(graphdef, state, input_ids, attention_mask, positions):
    model = nnx.merge(graphdef, state)
    hidden, _ = model.forward_embeds(model.embed(input_ids), positions, attention_mask)
    return model.logits(hidden)


class CausalLM(nnx.Module):
    """Decoder + lm_head (or tied embeddings): HF Qwen2ForCausalLM / LlamaForCausalLM."""

    def __init__(self, cfg: DecoderConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None,
                 mesh=None, rules: shd.Rules | None = None):
        self.cfg = cfg
        self.dtype = jnp.dtype(dtype)
        self.model = Decoder(cfg, dtype=dtype, rngs=rngs)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        L.Proj(cfg.hidden_size, cfg.vocab_size, names=("embed", "vocab"),
                               dtype=dtype, rngs=rngs))
        self.set_sharding(mesh, rules)

    def set_sharding(self, mesh, rules: shd.Rules | None = None) -> None:
        """Remember (mesh, rules) so forward passes constrain activations on that mesh."""
        self.mesh = mesh
        self.rules = rules if rules is not None or mesh is None else shd.Rules()

    def set_attention(self, implementation: str) -> None:
        """The attention kernel of every Attention module in the model (models.attention:
        "xla", "cudnn", "splash"), for the calls that see all of their keys."""
        for _, module in nnx.iter_modules(self):
            if isinstance(module, L.Attention):
                module.implementation = implementation

    def set_decode_layers(self, mode: str) -> None:
        """How the sampler's decode step runs the layers: "unroll" (a Python loop over
        per-layer caches; fastest per token on CPU and GPU, compile time grows with depth) or
        "scan" (lax.scan over the stacked cache; compile time independent of depth)."""
        if mode not in ("unroll", "scan"):
            raise ValueError(f"decode_layers must be 'unroll' or 'scan', got {mode!r}")
        self.model.decode_layers = mode

    def decode_cache(self, cache: KVCache) -> KVCache:
        """The cache in the layout the decode loop wants (see set_decode_layers)."""
        return cache.per_layer() if self.model.decode_layers == "unroll" else cache

    def for_decode(self) -> CausalLM:
        """Prepare this module, merged inside a jitted decode function, for a loop of decode
        steps: under "unroll" each layer's weights are sliced out of the stack once, before
        the loop. Returns self."""
        if self.model.decode_layers == "unroll":
            self.model.layers.unstack()
        return self

    def set_remat(self, on: bool = True, policy: str = "full") -> None:
        """Rematerialise decoder layers in cache-free forwards (the training loss) with a
        models.stack.REMAT_POLICIES policy: "full" keeps one input per layer (a second
        forward in the backward pass), "dots" also keeps the matmul outputs."""
        self.model.remat = policy if on else None

    # --- low-level API --------------------------------------------------------------------
    def embed(self, input_ids: Array) -> Array:
        with shd.use_sharding(self.mesh, self.rules):
            return shd.constrain(self.model.embed_tokens(input_ids), ("batch", "seq", "act_embed"))

    def forward_embeds(self, x: Array, positions: Array, kv_mask: Array,
                       cache: KVCache | None = None, cache_index: Array | int = 0,
                       prefix: KVCache | None = None, prefix_mask: Array | None = None,
                       segment_ids: Array | None = None) -> tuple[Array, KVCache | None]:
        """`prefix` / `prefix_mask` [B, P]: the per-layer keys and values of B shared prompts
        (a prefill's cache), read by the N = B*G rows of x, prompt-major, before their own.
        `segment_ids` [B, T] (no cache): sequences packed one after another in a row; a token
        sees only its own sequence's earlier tokens (and the prefix)."""
        with shd.use_sharding(self.mesh, self.rules):
            return self.model(x, positions, kv_mask, cache, cache_index, prefix, prefix_mask,
                              segment_ids)

    def lm_head_weight(self) -> Array:
        if self.lm_head is None:
            return self.model.embed_tokens.embedding[...].T
        return self.lm_head.dense()

    def logits(self, hidden: Array) -> Array:
        with shd.use_sharding(self.mesh, self.rules):
            w = self.lm_head_weight()
            out = jnp.einsum("btd,dv->btv", hidden, w.astype(hidden.dtype),
                             preferred_element_type=jnp.float32)
            return shd.constrain(out, ("batch", "seq", "act_vocab"))

    def token_logprobs(self, hidden: Array, targets: Array, *, temperature: float = 1.0,
                       chunk_size: int = 256, suppress: tuple[int, ...] = ()) -> Array:
        with shd.use_sharding(self.mesh, self.rules):
            return token_logprobs_from_hidden(hidden, self.lm_head_weight(), targets,
                                              temperature=temperature, chunk_size=chunk_size,
                                              suppress=tuple(suppress))

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        cfg = self.cfg
        kshape = (batch, cfg.num_kv_heads, cfg.dim_per_head, max_len)
        vshape = (batch, cfg.num_kv_heads, max_len, cfg.dim_per_head)
        dt = self.dtype if dtype is None else jnp.dtype(dtype)

        def zeros(shape, names):
            shape = (cfg.num_layers,) + shape
            if self.mesh is None:
                return jnp.zeros(shape, dt)
            s = shd.named_sharding((None,) + names, shape, self.mesh, self.rules)
            return jax.device_put(jnp.zeros(shape, dt), s)
        return KVCache(zeros(kshape, ("batch", "act_kv_heads", None, "cache_seq")),
                       zeros(vshape, ("batch", "act_kv_heads", "cache_seq", None)))

    # --- eager convenience ----------------------------------------------------------------
    def __call__(self, input_ids=None, attention_mask=None, position_ids=None,
                 **ignored: Any) -> Array:
        """HF-style keyword call -> float32 logits [B, T, V]; extra keys are ignored."""
        if input_ids is None:
            raise ValueError("pass input_ids=[B, T] token ids")
        ids = np.asarray(input_ids)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {ids.shape}")
        b, t = ids.shape
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask {mask.shape} must match input_ids {ids.shape}")
        pos = (np.asarray(default_positions(jnp.asarray(mask))) if position_ids is None
               else np.asarray(position_ids))
        tb = _bucket(t)   # right padding never changes earlier tokens under a causal mask
        pad = [(0, 0)] * (pos.ndim - 1) + [(0, tb - t)]
        ids = np.pad(ids, ((0, 0), (0, tb - t)))
        mask = np.pad(mask, ((0, 0), (0, tb - t)))
        pos = np.pad(pos, pad)
        graphdef, state = nnx.split(self)
        out = _eager_logits(graphdef, state, jnp.asarray(ids, jnp.int32),
                            jnp.asarray(mask, jnp.int32), jnp.asarray(pos, jnp.int32))
        return out[:, :t]
