"""Frozen kernels stored in 8 or 4 bits and dequantised on the fly (QLoRA's base).

- "int8": symmetric, one float32 scale per output channel (absmax over the input dims / 127).
- "nf4": QLoRA's 4-bit NormalFloat levels, one float32 absmax per block of the last (output)
  axis, two codes packed per uint8 byte along that axis.

Both keep every leading axis, so a kernel stacked over layers (models.stack) quantises per
layer and `jax.lax.scan` slices codes and scales like any parameter. Codes and scales never
receive gradients: only the adapters beside them train.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["NF4_LEVELS", "quantize", "dequantize", "storage_bytes"]

# Dettmers et al. 2023, appendix E: quantiles of N(0, 1) rescaled to [-1, 1], exact zero
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)


def nf4_block(last: int, block: int = 64) -> int:
    """Block size along the last axis: the largest divisor of `last` up to `block`."""
    return math.gcd(last, block)


def quantize(kind: str, w: jax.Array, in_axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """(codes, scale) of kernel `w`; `in_axes` are its input (contracted) axes (int8 scales
    are per output channel)."""
    wf = w.astype(jnp.float32)
    if kind == "int8":
        scale = jnp.max(jnp.abs(wf), axis=in_axes, keepdims=True) / 127.0
        scale = jnp.where(scale > 0, scale, 1.0)
        return jnp.clip(jnp.round(wf / scale), -127, 127).astype(jnp.int8), scale
    if kind == "nf4":
        last = w.shape[-1]
        if last % 2:
            raise ValueError(f"nf4 packs pairs along the last axis; it has odd size {last}")
        bs = nf4_block(last)
        blocks = wf.reshape(*w.shape[:-1], last // bs, bs)
        scale = jnp.max(jnp.abs(blocks), axis=-1)
        scale = jnp.where(scale > 0, scale, 1.0)
        norm = blocks / scale[..., None]
        codes = jnp.argmin(jnp.abs(norm[..., None] - jnp.asarray(NF4_LEVELS)), axis=-1)
        codes = codes.reshape(*w.shape[:-1], last // 2, 2).astype(jnp.uint8)
        return (codes[..., 0] << 4) | codes[..., 1], scale
    raise ValueError(f"model.lora.quantize={kind!r}: use '', 'int8' or 'nf4'")


def dequantize(kind: str, codes: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    if kind == "int8":
        return (codes.astype(jnp.float32) * scale).astype(dtype)
    if kind == "nf4":
        pairs = jnp.stack([codes >> 4, codes & 15], axis=-1)
        idx = pairs.reshape(*codes.shape[:-1], codes.shape[-1] * 2)
        vals = jnp.take(jnp.asarray(NF4_LEVELS), idx.astype(jnp.int32))
        nb = scale.shape[-1]
        vals = vals.reshape(*idx.shape[:-1], nb, idx.shape[-1] // nb) * scale[..., None]
        return vals.reshape(idx.shape).astype(dtype)
    raise ValueError(f"unknown quantisation {kind!r}")


def storage_bytes(kind: str, n: int) -> float:
    """Bytes per `n` weights stored as `kind` ('' = not quantised: None), scales included."""
    if kind == "int8":
        return n * 1.0          # per-channel scales: negligible
    if kind == "nf4":
        return n * (0.5 + 4 / 64)   # float32 absmax per 64 weights
    raise ValueError(f"unknown quantisation {kind!r}")
