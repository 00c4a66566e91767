"""Fused attention kernels behind one switch (`model.attention`): "xla" (einsum and a float32
softmax, the reference), "cudnn" (cuDNN flash attention through jax.nn.dot_product_attention,
GPU) and "splash" (the Pallas TPU splash kernel; `interpret=True` runs it anywhere, slowly).

They serve the attention calls that see all their keys at once: the training forward, a
prefill into an empty cache, and the vision towers. Decode steps (one query against a cache)
stay on the einsum path. A call describes its mask as segments: query i may see key j when
their segment ids are equal and non-negative (and j <= i when causal) - the decoder's padding
(id 1 real, 0 padding) and the vision tower's windows and frames (ids >= 0, -1 padding).

`resolve("auto")` picks the platform's kernel, after checking it once on this device against
the einsum path (a kernel that fails or disagrees is dropped, with a warning, for "xla").
"""
from __future__ import annotations

import functools
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["IMPLEMENTATIONS", "Segments", "resolve", "fused_attention"]

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
log = logging.getLogger(__name__)


class Segments(NamedTuple):
    """Which keys a query sees: equal ids >= 0 (and key <= query when causal)."""
    q: jax.Array          # [B, T] int32
    kv: jax.Array         # [B, S] int32
    causal: bool

    def dense(self) -> jax.Array:
        """bool [B, T, S]."""
        m = (self.q[:, :, None] == self.kv[:, None, :]) & (self.q[:, :, None] >= 0) \
            & (self.kv[:, None, :] >= 0)
        if self.causal:
            t, s = self.q.shape[1], self.kv.shape[1]
            m = m & (jnp.arange(s)[None, :] <= jnp.arange(t)[:, None])[None]
        return m


_PAD = 2 ** 30


def _cudnn(q, k, v, seg: Segments, scale):
    pad = Segments(*(jnp.where(ids >= 0, ids, _PAD) for ids in (seg.q, seg.kv)), seg.causal)
    return jax.nn.dot_product_attention(q, k, v, mask=pad.dense()[:, None], scale=scale,
                                        implementation="cudnn")


def _splash(q, k, v, seg: Segments, scale, interpret: bool = False):
    """Splash attention per example and per KV head (its query heads as one MQA call), on
    sequences padded to its 128-token blocks (the padding is a segment of its own)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sp
    t0, s0 = q.shape[1], k.shape[1]
    t, s = -(-t0 // 128) * 128, -(-s0 // 128) * 128
    pad = lambda x, n: jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
    q, k, v = pad(q, t), pad(k, s), pad(v, s)
    seg = Segments(jnp.pad(seg.q, ((0, 0), (0, t - t0)), constant_values=-1),
                   jnp.pad(seg.kv, ((0, 0), (0, s - s0)), constant_values=-1), seg.causal)
    b, _, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    sizes = sp.BlockSizes(block_q=128, block_kv=128, block_kv_compute=128, block_q_dkv=128,
                          block_kv_dkv=128, block_kv_dkv_compute=128, block_q_dq=128,
                          block_kv_dq=128)
    base = sp.CausalMask((t, s)) if seg.causal else sp.FullMask((t, s))
    kernel = sp.make_splash_mqa(sp.MultiHeadMask([base] * g), block_sizes=sizes, head_shards=1,
                                q_seq_shards=1, interpret=interpret)
    # padding (id < 0) attends padding only: a row with no key would be NaN, and a NaN value
    # poisons every query through a zero probability
    qs, ks = (jnp.where(ids >= 0, ids, _PAD) for ids in (seg.q, seg.kv))
    qh = (q * scale).reshape(b, t, kvh, g, d).transpose(0, 2, 3, 1, 4)     # [B,KV,G,T,hd]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)               # [B,KV,S,hd]

    def one(qb, kb, vb, qsb, ksb):
        ids = sp.SegmentIds(qsb, ksb)
        return jax.vmap(lambda qk, kk, vk: kernel(qk, kk, vk, segment_ids=ids))(qb, kb, vb)
    out = jax.vmap(one)(qh, kh, vh, qs, ks)                                  # [B,KV,G,T,hd]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)[:, :t0]


def fused_attention(q, k, v, seg: Segments, impl: str, scale: float | None = None):
    """q [B,T,H,hd], k/v [B,S,KV,hd] -> [B,T,H,hd] with the `impl` kernel."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if impl == "cudnn":
        return _cudnn(q, k, v, seg, scale)
    if impl in ("splash", "splash_interpret"):
        return _splash(q, k, v, seg, scale, interpret=impl == "splash_interpret")
    raise ValueError(f"attention implementation {impl!r} is not a fused kernel")


def _reference(q, k, v, seg, scale):
    return jax.nn.dot_product_attention(q, k, v, mask=seg.dense()[:, None], scale=scale,
                                        implementation="xla")


@functools.cache
def _works(impl: str, dtype: str) -> bool:
    """Whether `impl` runs on this backend and agrees with the einsum path (bf16 tolerance)."""
    rng = np.random.default_rng(0)
    shape_q, shape_kv = (2, 128, 4, 64), (2, 128, 2, 64)
    q, k, v = (jnp.asarray(rng.normal(size=s), dtype) for s in (shape_q, shape_kv, shape_kv))
    ids = jnp.asarray(np.concatenate([np.zeros((2, 16)), np.ones((2, 112))], 1), jnp.int32)
    seg = Segments(ids, ids, True)
    try:
        got = jax.jit(lambda *a: fused_attention(*a, seg, impl))(q, k, v)
        want = _reference(q, k, v, seg, 64 ** -0.5)
        err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))[:, 16:]))
    except Exception as e:  # noqa: BLE001 - any failure means: do not use this kernel here
        log.warning("attention %r is not usable on %s (%s: %s); using 'xla'", impl,
                    jax.default_backend(), type(e).__name__, str(e).split("\n")[0][:200])
        return False
    if not err < 5e-2:
        log.warning("attention %r disagrees with 'xla' on %s (max error %.3g); using 'xla'",
                    impl, jax.default_backend(), err)
        return False
    return True


def resolve(name: str, dtype="bfloat16") -> str:
    """The implementation to use: `name`, or for "auto" cudnn on GPU, splash on TPU and xla
    elsewhere; a fused kernel that fails its check on this device falls back to "xla"."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"model.attention={name!r}: use one of {IMPLEMENTATIONS}")
    if name == "auto":
        name = {"gpu": "cudnn", "cuda": "cudnn", "tpu": "splash"}.get(jax.default_backend(),
                                                                      "xla")
    if name == "xla":
        return name
    if not _works(name, str(jnp.dtype(dtype))):
        return "xla"
    return name
