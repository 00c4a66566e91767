"""Layers shared by every model: RMSNorm, LayerNorm, projections, gated MLP, GQA attention,
rotary variants.

Ported from transformers v5 (qwen2, llama, qwen2_5_vl modeling files). Every parameter carries
logical axis names in its ``out_sharding`` metadata (see balcap_jax/sharding.py); activations are
constrained with `sharding.constrain`, a no-op unless `sharding.use_sharding(mesh, rules)` is on.

Parameter layout (ours <- HF): kernels are [in..., out...] (HF Linear weights are [out, in]);
attention kernels keep heads explicit: q [D, H, hd], k/v [D, KV, hd], o [H, hd, D], fused qkv
[D, 3, H, hd] (HF `qkv.weight` [3*D, D] reshaped as (3, H, hd) on the out axis).

Rotary (cos/sin are float32, last dim = head_dim, rotate_half layout as in HF):
- `rope_inv_freq(head_dim, theta, rope_type="default", **params)`: np.float32 [head_dim/2];
  rope types "default", "linear", "llama3".
- `rope_cos_sin(positions[B,T], inv_freq) -> (cos, sin) [B,T,hd]`: 1-D RoPE.
- `mrope_cos_sin(positions[3,B,T], inv_freq, mrope_section) -> [B,T,hd]`: Qwen2.5-VL M-RoPE as
  v5 `Qwen2_5_VLRotaryEmbedding`: freqs per t/h/w, split dim/2 by section, chunk i from axis i%3,
  then duplicated (cat(f, f)). sum(mrope_section) must equal head_dim/2.
- `vision_rope_inv_freq(head_dim, theta=10000.)`,
  `vision_rope_cos_sin(hw[N,2], inv_freq) -> [N,hd]`:
  HF `Qwen2_5_VLVisionRotaryEmbedding` (axial: cat(h*f, w*f) duplicated).
- `apply_rotary(x[..., T, H, hd], cos[..., T, hd], sin)`: x*cos + rotate_half(x)*sin computed in
  float32 (as HF's vision path; for float32 models identical to the text path), cast back.

Attention: `Attention(embed_dim, num_heads, num_kv_heads, head_dim, qkv_bias, out_bias,
fused_qkv=False)`; `attn(x[B,T,D], cos, sin, mask[B,T,S] bool, cache=None, cache_index=0)`
returns (out [B,T,D], (k, v) written cache or None). cos/sin None skips rotary. `mask[b,t,s]`
True = query t may attend key s; build it with `causal_mask(kv_mask, T, cache_index)` (decoder,
left padding) or `segment_mask(segment_ids)` (vision tower: block-diagonal, non-causal). With a
cache (keys [B,KV,hd,S], values [B,KV,S,hd]: the layouts the two attention matmuls read
without a transpose) the new keys/values are written at slots cache_index..cache_index+T-1 and
queries attend over all S slots; without one, keys are this call's T tokens (S = T).
Vision towers pass packed patches as x [1, N, D] (or [rows, N, D]) with cos/sin [N, hd] and a
`segment_mask` of window/image ids; attention itself is `dot_product_attention` (k/v
[B,S,KV,hd], usable alone) or `heads_major_attention` (the cache layout).
Separate q/k/v (and gate/up) params run as one matmul through `fused_proj` (kernels concatenated
inside jit; the parameter layout and the HF key map stay per projection).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from balcap_jax.sharding import active_sharding, constrain

Array = jax.Array
NEG_INF = float(np.finfo(np.float32).min)  # finite, as HF: fully masked rows give uniform, not NaN


# LoRA dropout of the adapters' inputs, on only inside `lora_dropout` (the training loss): a
# key, the rate, and a counter that gives each adapted projection of a trace its own mask.
# Stacked layers fold their layer index into the key (models.stack), so layers differ too.
_LORA_DROPOUT: contextvars.ContextVar = contextvars.ContextVar("lora_dropout", default=None)


@contextlib.contextmanager
def lora_dropout(key, rate: float):
    """Drops each adapter input with probability `rate` (scaled by 1/(1-rate)) for the calls
    traced inside; the frozen base path never sees dropout."""
    token = _LORA_DROPOUT.set({"key": key, "rate": float(rate), "n": 0} if rate > 0 else None)
    try:
        yield
    finally:
        _LORA_DROPOUT.reset(token)


@contextlib.contextmanager
def lora_dropout_layer(index):
    """Inside a scanned layer: the active dropout key with the layer index folded in."""
    state = _LORA_DROPOUT.get()
    if state is None:
        yield
        return
    token = _LORA_DROPOUT.set(dict(state, key=jax.random.fold_in(state["key"], index), n=0))
    try:
        yield
    finally:
        _LORA_DROPOUT.reset(token)


def _param(rngs: nnx.Rngs | None, init, shape, dtype, names) -> nnx.Param:
    if len(names) != len(shape):
        raise ValueError(f"param shape {shape} needs {len(shape)} logical names, got {names}")
    key = rngs.params() if rngs is not None else jax.random.key(0)
    return nnx.Param(init(key, shape, dtype), out_sharding=tuple(names), eager_sharding=False)


_normal = jax.nn.initializers.normal(0.02)
_zeros = jax.nn.initializers.zeros
_ones = jax.nn.initializers.ones


def _rms_forward(x: Array, w: Array, eps: float):
    xf = x.astype(jnp.float32)
    r = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w * (xf * r).astype(x.dtype), r


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x: Array, w: Array, eps: float) -> Array:
    """w * (x / rms(x)) with the statistics in float32 and the normalised x cast back to x.dtype
    before the scale (HF Qwen2RMSNorm / LlamaRMSNorm).

    A hand-written backward: with n = x / rms(x) and g = dy * w (float32),
    dx = (g - n * mean(g * n)) / rms(x) and dw = sum over rows of dy * n. Autodiff of the
    forward formula takes several more passes over the activations (the update of the step
    benchmark: -12 ms of 0.27 s); dw is summed in float32 whatever the dtypes."""
    return _rms_forward(x, w, eps)[0]


def _rms_norm_fwd(x, w, eps):
    y, r = _rms_forward(x, w, eps)
    return y, (x, w, r)


def _rms_norm_bwd(eps, res, dy):
    x, w, r = res
    n = x.astype(jnp.float32) * r
    dyf = dy.astype(jnp.float32)
    g = dyf * w.astype(jnp.float32)
    dx = r * (g - n * jnp.mean(g * n, axis=-1, keepdims=True))
    dw = jnp.sum(dyf * n, axis=tuple(range(n.ndim - 1))) if n.ndim > 1 else dyf * n
    return dx.astype(x.dtype), dw.reshape(w.shape).astype(w.dtype)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


class RMSNorm(nnx.Module):
    """HF Qwen2RMSNorm/LlamaRMSNorm: normalise in float32, cast back, then scale."""

    def __init__(self, dim: int, *, eps: float = 1e-6, dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        self.eps = eps
        self.weight = _param(rngs, _ones, (dim,), dtype, ("norm",))

    def __call__(self, x: Array) -> Array:
        return rms_norm(x, self.weight[...], float(self.eps))


class LayerNorm(nnx.Module):
    """torch nn.LayerNorm (weight and bias): statistics in float32, result cast back (CLIP)."""

    def __init__(self, dim: int, *, eps: float = 1e-5, dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        self.eps = eps
        self.weight = _param(rngs, _ones, (dim,), dtype, ("norm",))
        self.bias = _param(rngs, _zeros, (dim,), dtype, ("norm",))

    def __call__(self, x: Array) -> Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class Proj(nnx.Module):
    """Dense map from the last `len(in_shape)` dims of x to `out_shape` (tensordot), opt. bias."""

    def __init__(self, in_shape: int | Sequence[int], out_shape: int | Sequence[int], *,
                 names: Sequence[str | None], bias: bool = False, dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        self.in_shape = (in_shape,) if isinstance(in_shape, int) else tuple(in_shape)
        self.out_shape = (out_shape,) if isinstance(out_shape, int) else tuple(out_shape)
        names = tuple(names)
        self.kernel = _param(rngs, _normal, self.in_shape + self.out_shape, dtype, names)
        self.bias = (_param(rngs, _zeros, self.out_shape, dtype, names[len(self.in_shape):])
                     if bias else None)
        # set by balcap_jax.models.lora: a quantised frozen kernel (QLoRA) and a low-rank adapter
        self.quant = None        # None | "int8" | "nf4": `kernel` holds codes, `kernel_scale`
        self.kernel_scale = None
        self.lora_a = None       # [in..., r] and [r, out...]: y += scale * (x A) B
        self.lora_b = None
        self.lora_scale = 0.0

    def weight(self, dtype) -> Array:
        """The dense kernel in `dtype` (dequantised on the fly when the base is quantised)."""
        if self.quant is None:
            return self.kernel[...].astype(dtype)
        from balcap_jax.models.quant import dequantize
        return dequantize(self.quant, self.kernel[...], self.kernel_scale[...], dtype)

    def dense(self, dtype=None) -> Array:
        """The whole map as one kernel (the adapter folded in, dequantised) in `dtype` (default:
        the parameter's): for callers that read the kernel themselves (the chunked lm-head
        log-probs, the merged export)."""
        if self.lora_a is None and self.quant is None:
            return self.kernel[...] if dtype is None else self.kernel[...].astype(dtype)
        if dtype is None:
            dtype = self.kernel.dtype if self.quant is None else self.kernel_scale.dtype
        w = self.weight(jnp.float32)
        if self.lora_a is not None:   # A [lead..., in..., r] B [lead..., r, out...]: per layer
            a, b = self.lora_a[...], self.lora_b[...]
            lead = a.shape[:a.ndim - len(self.in_shape) - 1]
            m = math.prod(lead)
            d = jnp.einsum("lir,lro->lio", a.reshape(m, -1, a.shape[-1]).astype(jnp.float32),
                           b.reshape(m, b.shape[len(lead)], -1).astype(jnp.float32))
            w = w + self.lora_scale * d.reshape(lead + self.in_shape + self.out_shape)
        return w.astype(dtype)

    def adapt(self, x: Array, y: Array) -> Array:
        """y plus the adapter's low-rank update of x (y unchanged without an adapter)."""
        if self.lora_a is None:
            return y
        n = len(self.in_shape)
        drop = _LORA_DROPOUT.get()
        if drop is not None:
            key = jax.random.fold_in(drop["key"], drop["n"])
            drop["n"] += 1
            keep = jax.random.bernoulli(key, 1.0 - drop["rate"], x.shape)
            x = jnp.where(keep, x / (1.0 - drop["rate"]), 0).astype(x.dtype)
        h = jnp.tensordot(x, self.lora_a[...].astype(x.dtype),
                          axes=(tuple(range(x.ndim - n, x.ndim)), tuple(range(n))))
        d = jnp.tensordot(h, self.lora_b[...].astype(x.dtype), axes=((h.ndim - 1,), (0,)))
        return y + (d * self.lora_scale).astype(y.dtype)

    def __call__(self, x: Array) -> Array:
        n = len(self.in_shape)
        if x.shape[x.ndim - n:] != self.in_shape:
            raise ValueError(f"Proj expects trailing dims {self.in_shape}, got input {x.shape}")
        y = jnp.tensordot(x, self.weight(x.dtype), axes=(tuple(range(x.ndim - n, x.ndim)),
                                                        tuple(range(n))))
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return self.adapt(x, y)


def _tensor_parallel() -> bool:
    """True when the active sharding splits heads or mlp over more than one device."""
    ctx = active_sharding()
    if ctx is None:
        return False
    mesh, rules = ctx
    axes = set()
    for name in ("heads", "kv_heads", "mlp"):
        a = rules[name]
        axes.update((a,) if isinstance(a, str) else (a or ()))
    return any(mesh.shape.get(a, 1) > 1 for a in axes)


def fused_proj(x: Array, projs: Sequence[Proj]) -> list[Array]:
    """`[p(x) for p in projs]` as one matmul over the kernels concatenated on their first output
    axis (projections sharing the input and the other output dims, e.g. q/k/v or gate/up). Fewer,
    wider matmuls make small-batch decode faster; inside jit the concatenation of loop-invariant
    weights is hoisted out of the decode loop. Under tensor parallelism the concatenation would
    reshard the weights, so there each projection runs on its own."""
    if len(projs) == 1 or _tensor_parallel():
        return [p(x) for p in projs]
    n = len(projs[0].in_shape)
    first = projs[0]
    for p in projs[1:]:
        if p.in_shape != first.in_shape or p.out_shape[1:] != first.out_shape[1:] or (
                (p.bias is None) != (first.bias is None)):
            raise ValueError(f"cannot fuse projections {first.out_shape} and {p.out_shape}")
    if x.shape[x.ndim - n:] != first.in_shape:
        raise ValueError(f"Proj expects trailing dims {first.in_shape}, got input {x.shape}")
    k = jnp.concatenate([p.weight(x.dtype) for p in projs], axis=n)
    y = jnp.tensordot(x, k, axes=(tuple(range(x.ndim - n, x.ndim)), tuple(range(n))))
    if first.bias is not None:
        y = y + jnp.concatenate([p.bias[...] for p in projs], axis=0).astype(y.dtype)
    axis = y.ndim - len(first.out_shape)
    splits = np.cumsum([p.out_shape[0] for p in projs])[:-1]
    return [p.adapt(x, part) for p, part in zip(projs, jnp.split(y, splits, axis=axis))]


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.embedding = _param(rngs, _normal, (vocab, dim), dtype, ("vocab", "embed"))

    def __call__(self, ids: Array) -> Array:
        return jnp.take(self.embedding[...], ids, axis=0)


_ACTS = {"silu": jax.nn.silu, "swish": jax.nn.silu,
         "gelu": lambda x: jax.nn.gelu(x, approximate=False),
         "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
         "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x)}


def activation(name: str):
    if name not in _ACTS:
        raise ValueError(f"unsupported activation {name!r}; known: {sorted(_ACTS)}")
    return _ACTS[name]


class GatedMLP(nnx.Module):
    """down(act(gate(x)) * up(x)); HF Qwen2MLP / LlamaMLP / Qwen2_5_VLMLP(bias=True)."""

    def __init__(self, dim: int, hidden: int, *, bias: bool = False, act: str = "silu",
                 dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.act = act
        activation(act)
        self.gate_proj = Proj(dim, hidden, names=("embed", "mlp"), bias=bias, dtype=dtype,
                              rngs=rngs)
        self.up_proj = Proj(dim, hidden, names=("embed", "mlp"), bias=bias, dtype=dtype, rngs=rngs)
        self.down_proj = Proj(hidden, dim, names=("mlp", "embed"), bias=bias, dtype=dtype,
                              rngs=rngs)

    def __call__(self, x: Array) -> Array:
        gate, up = fused_proj(x, (self.gate_proj, self.up_proj))
        h = activation(self.act)(gate) * up
        h = constrain(h, ("batch", "seq", "act_mlp")) if h.ndim == 3 else h
        return self.down_proj(h)


# ----------------------------------------------------------------------------- rotary

def rope_inv_freq(head_dim: int, theta: float, rope_type: str = "default", *,
                  factor: float | None = None, low_freq_factor: float | None = None,
                  high_freq_factor: float | None = None,
                  original_max_position_embeddings: int | None = None,
                  partial_rotary_factor: float = 1.0, **unused) -> np.ndarray:
    """Inverse frequencies as HF modeling_rope_utils (float32, computed like torch)."""
    dim = int(head_dim * partial_rotary_factor)
    inv = (1.0 / (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))))
    inv = inv.astype(np.float32)
    if rope_type in ("default", "mrope"):
        return inv
    if rope_type == "linear":
        return (inv / np.float32(factor)).astype(np.float32)
    if rope_type == "llama3":
        low_wl = original_max_position_embeddings / low_freq_factor
        high_wl = original_max_position_embeddings / high_freq_factor
        wavelen = 2 * math.pi / inv
        out = np.where(wavelen > low_wl, inv / factor, inv)
        smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (
            high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        return np.where(medium, smoothed, out).astype(np.float32)
    raise NotImplementedError(f"rope_type {rope_type!r} is not supported (default, linear, llama3)")


def rope_cos_sin(positions: Array, inv_freq: np.ndarray | Array) -> tuple[Array, Array]:
    """1-D RoPE: positions [..., T] int -> cos, sin [..., T, head_dim] float32."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def mrope_cos_sin(positions: Array, inv_freq: np.ndarray | Array,
                  mrope_section: Sequence[int]) -> tuple[Array, Array]:
    """M-RoPE: positions [3, B, T] (t, h, w) -> cos, sin [B, T, head_dim] float32."""
    inv_freq = jnp.asarray(inv_freq, jnp.float32)
    if positions.ndim != 3 or positions.shape[0] != 3:
        raise ValueError(f"M-RoPE positions must be [3, B, T], got {positions.shape}")
    if sum(mrope_section) != inv_freq.shape[0]:
        raise ValueError(f"sum(mrope_section)={sum(mrope_section)} must equal head_dim/2="
                         f"{inv_freq.shape[0]}")
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [3, B, T, hd/2]
    bounds = np.cumsum([0, *mrope_section])
    freqs = jnp.concatenate([freqs[i % 3, ..., bounds[i]:bounds[i + 1]]
                             for i in range(len(mrope_section))], axis=-1)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def vision_rope_inv_freq(head_dim: int, theta: float = 10000.0) -> np.ndarray:
    """HF Qwen2_5_VLVisionRotaryEmbedding.compute_axial_rope_parameters: dim = head_dim // 2."""
    return rope_inv_freq(head_dim // 2, theta)


def vision_rope_cos_sin(hw_positions: Array, inv_freq: np.ndarray | Array) -> tuple[Array, Array]:
    """Axial 2-D RoPE: hw_positions [N, 2] (row h, col w) -> cos, sin [N, head_dim] float32."""
    if hw_positions.ndim != 2 or hw_positions.shape[-1] != 2:
        raise ValueError(f"vision positions must be [N, 2] (h, w), got {hw_positions.shape}")
    freqs = hw_positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    fhw = jnp.concatenate([freqs[:, 0], freqs[:, 1]], axis=-1)  # [N, hd/2]
    emb = jnp.concatenate([fhw, fhw], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def rotate_half(x: Array) -> Array:
    h = x.shape[-1] // 2
    return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
    """x [..., T, H, hd], cos/sin [..., T, hd] (broadcast over heads) -> x rotated, x.dtype."""
    if cos.shape[-1] != x.shape[-1]:
        raise ValueError(f"rotary cos last dim {cos.shape[-1]} != head_dim {x.shape[-1]}")
    xf = x.astype(jnp.float32)
    c = cos[..., None, :].astype(jnp.float32)
    s = sin[..., None, :].astype(jnp.float32)
    return (xf * c + rotate_half(xf) * s).astype(x.dtype)


# ----------------------------------------------------------------------------- masks

def causal_mask(kv_mask: Array, q_len: int, cache_index: Array | int = 0) -> Array:
    """bool [B, T, S]: query t (slot cache_index+t) sees slots s <= its slot with kv_mask[b,s]."""
    if kv_mask.ndim != 2:
        raise ValueError(f"kv_mask must be [B, S] (1 = valid key slot), got {kv_mask.shape}")
    s = kv_mask.shape[1]
    q_slot = jnp.asarray(cache_index, jnp.int32) + jnp.arange(q_len, dtype=jnp.int32)
    allowed = jnp.arange(s, dtype=jnp.int32)[None, :] <= q_slot[:, None]  # [T, S]
    return allowed[None] & (kv_mask[:, None, :] != 0)


def segment_mask(segment_ids: Array, kv_segment_ids: Array | None = None) -> Array:
    """bool [B, T, S]: block-diagonal, non-causal; equal ids attend, ids < 0 are padding."""
    kv = segment_ids if kv_segment_ids is None else kv_segment_ids
    m = segment_ids[..., :, None] == kv[..., None, :]
    return m & (segment_ids[..., :, None] >= 0) & (kv[..., None, :] >= 0)


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array | None,
                          scale: float | None = None) -> Array:
    """GQA attention. q [B,T,H,hd], k/v [B,S,KV,hd], mask bool [B,T,S] -> [B,T,H,hd].

    Softmax in float32, probabilities cast to the value dtype (as HF eager attention)."""
    if k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"k and v must both be [B,S,KV,hd], got {k.shape} and {v.shape}")
    return heads_major_attention(q, k.transpose(0, 2, 3, 1), v.swapaxes(1, 2), mask, scale)


def heads_major_attention(q: Array, kt: Array, v: Array, mask: Array | None,
                          scale: float | None = None) -> Array:
    """`dot_product_attention` with the KV cache's layout: keys kt [B,KV,hd,S], values
    v [B,KV,S,hd]. Both matmuls then read their operands as stored (batch dims (B, KV) leading,
    contraction on rows: q @ kt and p @ v), so XLA never copies or transposes the cache; at
    decode time (T = 1) that is a whole-cache copy per layer saved, and the [hd, S] keys make
    the batched q.k dot ~35% faster on CPU than [S, hd] keys."""
    b, t, h, d = q.shape
    kvh, s = kt.shape[1], kt.shape[3]
    if h % kvh:
        raise ValueError(f"num_heads {h} must be a multiple of num_kv_heads {kvh}")
    if kt.shape != (b, kvh, d, s) or v.shape != (b, kvh, s, d):
        raise ValueError(f"keys must be [B,KV,hd,S] and values [B,KV,S,hd] for q {q.shape}, got "
                         f"{kt.shape} and {v.shape}")
    scale = d ** -0.5 if scale is None else scale
    qg = q.reshape(b, t, kvh, h // kvh, d).transpose(0, 2, 3, 1, 4)     # [B,KV,G,T,hd]
    logits = jnp.einsum("bkgtd,bkds->bkgts", qg, kt, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        if mask.shape != (b, t, s):
            raise ValueError(f"attention mask must be [B,T,S]={(b, t, s)}, got {mask.shape}")
        logits = jnp.where(mask[:, None, None], logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, v)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def prefix_attention(q: Array, kt: Array, v: Array, mask: Array | None, prefix,
                     scale: float | None = None) -> Array:
    """Attention of rows grouped per prompt over one softmax of [their prompt's keys; their own
    keys]. Each prompt's keys and values are stored once, never copied G times in a cache.

    q [N,T,H,hd] with N = B*G, rows prompt-major (row n belongs to prompt n // G); own keys
    kt [N,KV,hd,S], values v [N,KV,S,hd], mask bool [N,T,S]; prefix = (pkt [B,KV,hd,P],
    pv [B,KV,P,hd], pmask [B,P]): every query of a group sees its prompt's valid keys (the
    prompt precedes all of them). The two parts share one max and one normaliser, so this is
    softmax attention over the concatenated keys, up to float rounding.

    A decode step (T = 1) reads each prompt's keys once for its G rows, as one matmul of the
    G queries against them: the prompt cache is what a step reads most. With many queries per
    row (the update) the prompt's keys are broadcast to the G rows inside the dot instead, so
    the queries and scores keep the rows' layout (no transposes to and from prompt-major
    order; -6 to -9 ms of the step benchmark's update). That copy is G x one layer's prompt
    keys and values, small next to the float32 scores the update holds anyway.
    """
    pkt, pv, pmask = prefix
    n, t, h, d = q.shape
    b, kvh, _, p = pkt.shape
    if n % b:
        raise ValueError(f"{n} query rows do not split into groups over {b} prompts")
    g, hg = n // b, h // kvh
    scale = d ** -0.5 if scale is None else scale
    qg = q.reshape(n, t, kvh, hg, d).transpose(0, 2, 3, 1, 4)               # [N,KV,Hg,T,hd]
    own = jnp.einsum("nkgtd,nkds->nkgts", qg, kt, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        own = jnp.where(mask[:, None, None], own, NEG_INF)
    if t > 1:
        pkt, pv, pmask = (jnp.repeat(x, g, axis=0) for x in (pkt, pv, pmask))
        pre = jnp.einsum("nkgtd,nkdp->nkgtp", qg, pkt, preferred_element_type=jnp.float32)
        pre = jnp.where(pmask[:, None, None, None, :] != 0, pre * scale, NEG_INF)
    else:
        qp = qg.reshape(b, g, kvh, hg, t, d).transpose(0, 2, 3, 1, 4, 5).reshape(
            b, kvh, hg, g * t, d)
        pre = jnp.einsum("bkhqd,bkdp->bkhqp", qp, pkt, preferred_element_type=jnp.float32)
        pre = jnp.where(pmask[:, None, None, None, :] != 0, pre * scale, NEG_INF)
        pre = pre.reshape(b, kvh, hg, g, t, p).transpose(0, 3, 1, 2, 4, 5).reshape(
            n, kvh, hg, t, p)
    # the shift cancels in the softmax: no gradient through it (autodiff would route a zero
    # cotangent back through both maxima, a compare-and-select over every score)
    m = jax.lax.stop_gradient(jnp.maximum(own.max(-1, keepdims=True),
                                          pre.max(-1, keepdims=True)))
    e_own, e_pre = jnp.exp(own - m), jnp.exp(pre - m)
    z = e_own.sum(-1, keepdims=True) + e_pre.sum(-1, keepdims=True)
    p_own, p_pre = (e_own / z).astype(v.dtype), (e_pre / z).astype(pv.dtype)
    out = jnp.einsum("nkgts,nksd->nkgtd", p_own, v, preferred_element_type=jnp.float32)
    if t > 1:
        out = out + jnp.einsum("nkgtp,nkpd->nkgtd", p_pre, pv,
                               preferred_element_type=jnp.float32)
    else:
        p_pre = p_pre.reshape(b, g, kvh, hg, t, p).transpose(0, 2, 3, 1, 4, 5).reshape(
            b, kvh, hg, g * t, p)
        out_pre = jnp.einsum("bkhqp,bkpd->bkhqd", p_pre, pv, preferred_element_type=jnp.float32)
        out = out + out_pre.reshape(b, kvh, hg, g, t, d).transpose(0, 3, 1, 2, 4, 5).reshape(
            n, kvh, hg, t, d)
    return out.astype(v.dtype).transpose(0, 3, 1, 2, 4).reshape(n, t, h, d)


class Attention(nnx.Module):
    """Multi-head / grouped-query attention with rotary, optional KV cache, any boolean mask.

    Text decoders: separate q/k/v (`qkv_bias` for Qwen2), `out_bias=False`, causal mask.
    Qwen2.5-VL vision: `fused_qkv=True, qkv_bias=True, out_bias=True`, num_kv_heads=num_heads,
    `segment_mask` for (window) blocks, vision cos/sin. Submodule names follow HF: q_proj,
    k_proj, v_proj (or qkv), o_proj.
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 qkv_bias: bool = False, out_bias: bool = False, fused_qkv: bool = False,
                 dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} not a multiple of num_kv_heads {num_kv_heads}")
        if fused_qkv and num_kv_heads != num_heads:
            raise ValueError("fused_qkv needs num_kv_heads == num_heads")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.fused_qkv = fused_qkv
        kw = dict(bias=qkv_bias, dtype=dtype, rngs=rngs)
        if fused_qkv:
            self.qkv = Proj(embed_dim, (3, num_heads, head_dim),
                            names=("embed", "qkv", "heads", "head_dim"), **kw)
        else:
            self.q_proj = Proj(embed_dim, (num_heads, head_dim),
                               names=("embed", "heads", "head_dim"), **kw)
            self.k_proj = Proj(embed_dim, (num_kv_heads, head_dim),
                               names=("embed", "kv_heads", "head_dim"), **kw)
            self.v_proj = Proj(embed_dim, (num_kv_heads, head_dim),
                               names=("embed", "kv_heads", "head_dim"), **kw)
        self.o_proj = Proj((num_heads, head_dim), embed_dim, names=("heads", "head_dim", "embed"),
                           bias=out_bias, dtype=dtype, rngs=rngs)
        self.implementation = "xla"   # models.attention: "xla", "cudnn" or "splash"

    def __call__(self, x: Array, cos: Array | None, sin: Array | None, mask: Array | None,
                 cache: tuple[Array, Array] | None = None, cache_index: Array | int = 0,
                 prefix=None, segments=None) -> tuple[Array, tuple[Array, Array] | None]:
        """`prefix` (pkt, pv, pmask): a shared prompt's keys and values, read by the rows of
        its group before their own keys (`prefix_attention`). `segments`: the same mask as
        models.attention.Segments, for a fused kernel (self.implementation); a call whose
        queries see all of their keys (no cache, or an empty cache it fills) uses it."""
        if self.fused_qkv:
            qkv = self.qkv(x)
            q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        else:
            q, k, v = fused_proj(x, (self.q_proj, self.k_proj, self.v_proj))
        if cos is not None:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if q.ndim == 4:
            q = constrain(q, ("batch", "seq", "act_heads", None))
            k = constrain(k, ("batch", "seq", "act_kv_heads", None))
        fused = self.implementation != "xla" and segments is not None and prefix is None
        if fused and (cache is None or cache[1].shape[2] == q.shape[1]):
            from balcap_jax.models.attention import fused_attention
            out = self.o_proj(fused_attention(q, k, v, segments, self.implementation))
            if cache is None:
                return out, None
            # an empty cache filled from slot 0: the keys are all this call's
            ck = k.transpose(0, 2, 3, 1).astype(cache[0].dtype)
            cv = v.swapaxes(1, 2).astype(cache[1].dtype)
            ck = constrain(ck, ("batch", "act_kv_heads", None, "cache_seq"))
            cv = constrain(cv, ("batch", "act_kv_heads", "cache_seq", None))
            return out, (ck, cv)
        if cache is None:
            if prefix is not None:
                out = prefix_attention(q, k.transpose(0, 2, 3, 1), v.swapaxes(1, 2), mask, prefix)
                return self.o_proj(out), None
            return self.o_proj(dot_product_attention(q, k, v, mask)), None
        ck, cv = cache                                                  # [B,KV,hd,S], [B,KV,S,hd]
        k, v = k.transpose(0, 2, 3, 1), v.swapaxes(1, 2)                # [B,KV,hd,T], [B,KV,T,hd]
        if ck.shape[:3] != k.shape[:3] or cv.shape[:2] != v.shape[:2] or cv.shape[3] != v.shape[3]:
            raise ValueError(f"KV cache k {ck.shape} ([B,KV,hd,S]) / v {cv.shape} ([B,KV,S,hd]) "
                             f"does not fit keys {k.shape}")
        idx = jnp.asarray(cache_index, jnp.int32)
        zero = jnp.zeros((), jnp.int32)
        ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (zero, zero, zero, idx))
        cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (zero, zero, idx, zero))
        ck = constrain(ck, ("batch", "act_kv_heads", None, "cache_seq"))
        cv = constrain(cv, ("batch", "act_kv_heads", "cache_seq", None))
        if prefix is not None:
            pkt, pv, pmask = prefix
            out = prefix_attention(q, ck.astype(q.dtype), cv.astype(q.dtype), mask,
                                   (pkt.astype(q.dtype), pv.astype(q.dtype), pmask))
        else:
            out = heads_major_attention(q, ck.astype(q.dtype), cv.astype(q.dtype), mask)
        return self.o_proj(out), (ck, cv)
