"""Qwen2.5-VL vision tower in Flax NNX (HF `Qwen2_5_VisionTransformerPretrainedModel`).

patch embedding (the Conv3d as one matmul over flattened patches) -> blocks (RMSNorm, fused-qkv
attention with 2-D rotary, gated SiLU MLP with bias) -> patch merger (RMSNorm, 2-layer GELU MLP
over 2x2 merged patches). Blocks in `fullatt_block_indexes` attend within each image frame, the
others within each window; both are block-diagonal masks built from segment ids computed on the
host (`qwen2_5_vl_index.prepare_vision_inputs`), in HF's window-permuted patch order, which is
undone after the merger. Attention is computed on packed rows (whole windows / frames per row),
so its cost grows with rows x row_len^2, not with the square of all patches in the batch.
Several images of different grids go through one call; bucket padding patches carry segment -1
and never touch real patches.

The tower runs in the model dtype like HF (norms and the softmax in float32 inside the layers).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from balcap_jax.models import layers
from balcap_jax.models.attention import Segments
from balcap_jax.models.qwen2_5_vl_index import VisionInputs
from balcap_jax.models.stack import StackedLayers

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    out_hidden_size: int = 3584
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    hidden_act: str = "silu"
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> "VisionConfig":
        """From an HF `vision_config` dict, v4 (`in_chans`) or v5 (`in_channels`,
        `rope_parameters`)."""
        rope = d.get("rope_parameters") or {}
        return cls(
            depth=int(d["depth"]), hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]), num_heads=int(d["num_heads"]),
            out_hidden_size=int(d["out_hidden_size"]),
            in_channels=int(d.get("in_channels", d.get("in_chans", 3))),
            patch_size=int(d.get("patch_size", 14)),
            temporal_patch_size=int(d.get("temporal_patch_size", 2)),
            spatial_merge_size=int(d.get("spatial_merge_size", 2)),
            window_size=int(d.get("window_size", 112)),
            fullatt_block_indexes=tuple(int(i) for i in d.get("fullatt_block_indexes", ())),
            hidden_act=d.get("hidden_act", "silu"),
            rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))))

    def to_hf(self) -> dict:
        return dict(depth=self.depth, hidden_size=self.hidden_size,
                    intermediate_size=self.intermediate_size, num_heads=self.num_heads,
                    out_hidden_size=self.out_hidden_size, in_channels=self.in_channels,
                    patch_size=self.patch_size, temporal_patch_size=self.temporal_patch_size,
                    spatial_merge_size=self.spatial_merge_size, window_size=self.window_size,
                    fullatt_block_indexes=list(self.fullatt_block_indexes),
                    hidden_act=self.hidden_act, model_type="qwen2_5_vl_vision",
                    rope_parameters={"rope_type": "axial", "rope_theta": self.rope_theta})


# float32 attention scores per head computed at once in a vision block (a chunk of rows holds
# at most this many R x R entries per head, 4M: 256 MiB for 16 heads; a longer row is one chunk)
ATTN_SCORES = 1 << 22


class VisionBlock(nnx.Module):
    """x + attn(norm1(x)); x + mlp(norm2(x)). HF Qwen2_5_VLVisionBlock."""

    def __init__(self, cfg: VisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        d = cfg.hidden_size
        self.norm1 = layers.RMSNorm(d, eps=1e-6, dtype=dtype, rngs=rngs)
        self.norm2 = layers.RMSNorm(d, eps=1e-6, dtype=dtype, rngs=rngs)
        self.attn = layers.Attention(d, cfg.num_heads, cfg.num_heads, cfg.head_dim, qkv_bias=True,
                                     out_bias=True, fused_qkv=True, dtype=dtype, rngs=rngs)
        self.mlp = layers.GatedMLP(d, cfg.intermediate_size, bias=True, act=cfg.hidden_act,
                                   dtype=dtype, rngs=rngs)

    def __call__(self, x: Array, cos: Array, sin: Array, rows: Array, slots: Array,
                 segments: Array) -> Array:
        """x [N, D] (permuted patches), cos/sin [N, head_dim]; attention runs on rows [G, R]
        of slot indices (N = empty), block-diagonal by `segments` [N]; `slots` [N] maps each
        slot back to its flat row position (G*R = not in any row: output 0)."""
        g, r = rows.shape
        h = self._attend_rows(self.norm1(x), cos, sin, rows, segments)        # [G, R, D]
        h = jnp.take(h.reshape(g * r, -1), slots, axis=0, mode="fill", fill_value=0)
        x = x + h
        return x + self.mlp(self.norm2(x))

    def _attend_rows(self, xn: Array, cos: Array, sin: Array, rows: Array, segments: Array):
        """Attention over rows [G, R]. The scores are float32 [rows, heads, R, R]: for whole
        images (R = thousands of patches) all rows at once would need tens of GB, so rows go
        through in chunks of at most ATTN_SCORES // R**2 (lax.map, each chunk rematerialised
        in the backward pass). Every row's result is the same either way."""
        g, r = rows.shape
        per = max(1, ATTN_SCORES // (r * r))

        def run(attn, rws):
            take = lambda a, fill: jnp.take(a, rws, axis=0, mode="fill", fill_value=fill)
            ids = take(segments, -1)
            mask = layers.segment_mask(ids)                                  # [g', R, R]
            return attn(take(xn, 0), take(cos, 0), take(sin, 0), mask,
                        segments=Segments(ids, ids, causal=False))[0]
        if per >= g:
            return run(self.attn, rows)
        n = -(-g // per)
        padded = jnp.concatenate([rows, jnp.full((n * per - g, r), xn.shape[0], rows.dtype)])
        graph, state = nnx.split(self.attn)
        out = jax.lax.map(jax.checkpoint(lambda rws: run(nnx.merge(graph, state), rws)),
                          padded.reshape(n, per, r))
        return out.reshape(n * per, r, -1)[:g]


class PatchMerger(nnx.Module):
    """RMSNorm per patch, concatenate each merge_size**2 group, Linear-GELU-Linear."""

    def __init__(self, cfg: VisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.unit = cfg.spatial_merge_size ** 2
        wide = cfg.hidden_size * self.unit
        self.ln_q = layers.RMSNorm(cfg.hidden_size, eps=1e-6, dtype=dtype, rngs=rngs)
        self.fc1 = layers.Proj(wide, wide, names=("mlp_in", "mlp"), bias=True, dtype=dtype,
                               rngs=rngs)
        self.fc2 = layers.Proj(wide, cfg.out_hidden_size, names=("mlp", "embed"), bias=True,
                               dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        """x [N, D] -> [N / unit, out_hidden_size]."""
        h = self.ln_q(x).reshape(x.shape[0] // self.unit, -1)
        return self.fc2(jax.nn.gelu(self.fc1(h), approximate=False))


class VisionTower(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.cfg = cfg
        self.dtype = dtype
        # Conv3d with stride == kernel over pre-flattened patches is a plain matmul.
        self.patch_embed = layers.Proj(cfg.patch_dim, cfg.hidden_size, names=("patch", "embed"),
                                       dtype=dtype, rngs=rngs)
        self.blocks = StackedLayers([VisionBlock(cfg, dtype=dtype, rngs=rngs)
                                     for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, dtype=dtype, rngs=rngs)
        self.remat = False   # keep only each block's input for the backward pass (training)

    def rotary(self, rotary_pos: Array) -> tuple[Array, Array]:
        inv = layers.vision_rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta)
        return layers.vision_rope_cos_sin(rotary_pos, inv)

    def blocks_forward(self, x: Array, vi: VisionInputs) -> Array:
        """Permuted patch embeddings [Np, D] -> last block's hidden states [Np, D]."""
        cos, sin = self.rotary(vi.rotary_pos)
        window = (vi.window_rows, vi.window_slots, vi.window_segments)
        full = (vi.full_rows, vi.full_slots, vi.full_segments)
        is_full = [i in self.cfg.fullatt_block_indexes for i in range(self.cfg.depth)]

        def one(blk, h, full_here):
            if all(is_full) or not any(is_full):     # one layout: no branch
                return blk(h, cos, sin, *(full if is_full[0] else window)), None
            # the two layouts have different row shapes: one compiled branch each
            return jax.lax.cond(full_here, lambda y: blk(y, cos, sin, *full),
                                lambda y: blk(y, cos, sin, *window), h), None
        x, _ = self.blocks.scan(one, x, jnp.asarray(is_full),
                                remat="full" if self.remat else None)
        return x

    def __call__(self, vi: VisionInputs) -> Array:
        """VisionInputs (padded, bucketed) -> image embeddings [Mp, out_hidden_size] in image
        order; rows past the real token count (token_valid False) are zero."""
        if vi.pixel_values.shape[-1] != self.cfg.patch_dim:
            raise ValueError(f"pixel_values last dim {vi.pixel_values.shape[-1]} != C*kt*p*p="
                             f"{self.cfg.patch_dim}; use the Qwen2-VL image processor's output")
        x = jnp.take(jnp.asarray(vi.pixel_values), vi.patch_order, axis=0).astype(self.dtype)
        x = self.patch_embed(x)
        x = self.blocks_forward(x, vi)
        merged = jnp.take(self.merger(x), vi.merge_inverse, axis=0)
        return jnp.where(vi.token_valid[:, None], merged, jnp.zeros((), merged.dtype))

