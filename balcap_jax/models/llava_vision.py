"""CLIP ViT vision tower of LLaVA in Flax NNX (HF `CLIPVisionModel`, v5 layout).

patch embedding (the stride-p Conv2d as one matmul over flattened patches, no bias) + class
token + learned absolute positions -> `pre_layrnorm` (HF's spelling) -> encoder layers
(pre-LayerNorm blocks: non-causal attention with q/k/v/out biases and no rotary, fc1 - act - fc2
MLP with `hidden_act`, quick_gelu for OpenAI CLIP). `post_layernorm` only feeds CLIP's pooled
output, which LLaVA never reads: it is kept as a parameter so checkpoints round-trip, as are
encoder layers past the feature layer (they are loaded and saved, never run).

`ClipVisionTower.hidden_states(pixel_values [N, C, H, W], layers=(k, ...))` returns the hidden
states HF lists as `hidden_states[k]` (0 = embeddings after pre_layrnorm, k = after layer k),
running only as many layers as the deepest one asked for.
Parameter paths mirror HF: embeddings/{class_embedding, patch_embedding/kernel,
position_embedding}, pre_layrnorm/, encoder/layers/{i}/{layer_norm1, self_attn/{q,k,v,o}_proj,
layer_norm2, mlp/{fc1, fc2}}, post_layernorm/ (HF `out_proj` is our `o_proj`).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from balcap_jax import sharding as shd
from balcap_jax.models import layers
from balcap_jax.models.attention import Segments
from balcap_jax.models.stack import StackedLayers

Array = jax.Array

# transformers' CLIPVisionConfig defaults: hub LLaVA configs list only what differs from them
CLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                            hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=512)
_CLIP_KEYS = set(CLIP_VISION_DEFAULTS) | {"model_type", "transformers_version", "dtype",
                                          "torch_dtype", "architectures"}


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    num_channels: int = 3
    image_size: int = 336
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768            # CLIP's text/image projection: unused, kept for saving
    hf_extra: str = "{}"                 # other vision_config fields, written back on save

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid ** 2 + 1        # + the class token

    @property
    def patch_dim(self) -> int:
        return self.num_channels * self.patch_size ** 2

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> "ClipVisionConfig":
        """From an HF `vision_config` dict; missing fields take CLIPVisionConfig's defaults."""
        mt = d.get("model_type", "clip_vision_model")
        if mt != "clip_vision_model":
            raise NotImplementedError(f"LLaVA vision_config.model_type {mt!r}: only "
                                      "'clip_vision_model' (LLaVA-1.5's CLIP ViT) is supported")
        c = dict(CLIP_VISION_DEFAULTS, **{k: v for k, v in d.items() if v is not None})
        if c["hidden_size"] % c["num_attention_heads"]:
            raise ValueError(f"vision hidden_size {c['hidden_size']} is not a multiple of "
                             f"num_attention_heads {c['num_attention_heads']}")
        extra = {k: v for k, v in d.items() if k not in _CLIP_KEYS}
        return cls(hidden_size=int(c["hidden_size"]), intermediate_size=int(c["intermediate_size"]),
                   num_layers=int(c["num_hidden_layers"]), num_heads=int(c["num_attention_heads"]),
                   num_channels=int(c["num_channels"]), image_size=int(c["image_size"]),
                   patch_size=int(c["patch_size"]), hidden_act=str(c["hidden_act"]),
                   layer_norm_eps=float(c["layer_norm_eps"]),
                   projection_dim=int(c["projection_dim"]),
                   hf_extra=json.dumps(extra, sort_keys=True))

    def to_hf(self) -> dict:
        out = json.loads(self.hf_extra)
        out.update(model_type="clip_vision_model", hidden_size=self.hidden_size,
                   intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
                   num_attention_heads=self.num_heads, num_channels=self.num_channels,
                   image_size=self.image_size, patch_size=self.patch_size,
                   hidden_act=self.hidden_act, layer_norm_eps=self.layer_norm_eps,
                   projection_dim=self.projection_dim)
        return out


def _param(rngs, shape, dtype, names, std=0.02) -> nnx.Param:
    key = rngs.params() if rngs is not None else jax.random.key(0)
    return nnx.Param(jax.nn.initializers.normal(std)(key, shape, dtype), out_sharding=names,
                     eager_sharding=False)


class ClipEmbeddings(nnx.Module):
    """Patch embedding + class token + learned positions (HF CLIPVisionEmbeddings)."""

    def __init__(self, cfg: ClipVisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.cfg = cfg
        d = cfg.hidden_size
        self.class_embedding = _param(rngs, (d,), dtype, ("embed",))
        self.patch_embedding = layers.Proj(cfg.patch_dim, d, names=("patch", "embed"),
                                           dtype=dtype, rngs=rngs)
        self.position_embedding = _param(rngs, (cfg.num_positions, d), dtype,
                                         ("vision_positions", "embed"))

    def __call__(self, pixel_values: Array) -> Array:
        """pixel_values [N, C, H, W] (H = W = image_size) -> [N, 1 + grid**2, D]."""
        cfg = self.cfg
        n, c, h, w = pixel_values.shape
        if (c, h, w) != (cfg.num_channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"pixel_values must be [N, {cfg.num_channels}, {cfg.image_size}, "
                             f"{cfg.image_size}] (the CLIP image size), got {pixel_values.shape}; "
                             "use the LLaVA image processor with this model's crop size")
        p, g = cfg.patch_size, cfg.grid
        # [N, C, g, p, g, p] -> [N, g, g, C, p, p]: rows of patches, each flattened as the
        # Conv2d weight [D, C, p, p] is
        x = pixel_values.reshape(n, c, g, p, g, p).transpose(0, 2, 4, 1, 3, 5)
        x = self.patch_embedding(x.reshape(n, g * g, c * p * p).astype(self.class_embedding.dtype))
        cls = jnp.broadcast_to(self.class_embedding[...], (n, 1, x.shape[-1])).astype(x.dtype)
        x = jnp.concatenate([cls, x], axis=1)
        return x + self.position_embedding[...].astype(x.dtype)[None]


class ClipMLP(nnx.Module):
    def __init__(self, cfg: ClipVisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.act = cfg.hidden_act
        layers.activation(self.act)
        self.fc1 = layers.Proj(cfg.hidden_size, cfg.intermediate_size, names=("embed", "mlp"),
                               bias=True, dtype=dtype, rngs=rngs)
        self.fc2 = layers.Proj(cfg.intermediate_size, cfg.hidden_size, names=("mlp", "embed"),
                               bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.fc2(layers.activation(self.act)(self.fc1(x)))


class ClipEncoderLayer(nnx.Module):
    """x + attn(ln1(x)); x + mlp(ln2(x)). Full (non-causal) attention over one image's tokens."""

    def __init__(self, cfg: ClipVisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        d, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.layer_norm1 = layers.LayerNorm(d, eps=eps, dtype=dtype, rngs=rngs)
        self.self_attn = layers.Attention(d, cfg.num_heads, cfg.num_heads, cfg.head_dim,
                                          qkv_bias=True, out_bias=True, dtype=dtype, rngs=rngs)
        self.layer_norm2 = layers.LayerNorm(d, eps=eps, dtype=dtype, rngs=rngs)
        self.mlp = ClipMLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        """x [N, S, D] -> [N, S, D]; no mask: every image token sees every other."""
        ids = jnp.zeros(x.shape[:2], jnp.int32)       # one segment: full attention
        h, _ = self.self_attn(self.layer_norm1(x), None, None, None,
                              segments=Segments(ids, ids, causal=False))
        x = x + h
        return x + self.mlp(self.layer_norm2(x))


class ClipEncoder(nnx.Module):
    """Holds the layers (HF path encoder.layers.{i}); the tower decides how many run."""

    def __init__(self, cfg: ClipVisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.layers = StackedLayers([ClipEncoderLayer(cfg, dtype=dtype, rngs=rngs)
                                     for _ in range(cfg.num_layers)])


class ClipVisionTower(nnx.Module):
    def __init__(self, cfg: ClipVisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.cfg = cfg
        eps = cfg.layer_norm_eps
        self.embeddings = ClipEmbeddings(cfg, dtype=dtype, rngs=rngs)
        self.pre_layrnorm = layers.LayerNorm(cfg.hidden_size, eps=eps, dtype=dtype, rngs=rngs)
        self.encoder = ClipEncoder(cfg, dtype=dtype, rngs=rngs)
        self.post_layernorm = layers.LayerNorm(cfg.hidden_size, eps=eps, dtype=dtype, rngs=rngs)

    def resolve_layers(self, feature_layers: Sequence[int]) -> tuple[int, ...]:
        """HF hidden_states indices (negative from the end, as Python) -> 0..num_layers."""
        n = self.cfg.num_layers
        out = tuple(int(k) + (n + 1 if k < 0 else 0) for k in feature_layers)
        bad = [k for k, r in zip(feature_layers, out) if not 0 <= r <= n]
        if bad:
            raise ValueError(f"vision_feature_layer {bad} out of range for a {n}-layer tower "
                             f"(valid: {-(n + 1)} .. {n})")
        return out

    def hidden_states(self, pixel_values: Array, feature_layers: Sequence[int]) -> list[Array]:
        """HF `hidden_states[k]` for each k in feature_layers, each [N, 1 + grid**2, D]."""
        want = self.resolve_layers(feature_layers)
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        x = shd.constrain(x, ("batch", "seq", "act_embed"))
        states, done = {0: x}, 0

        def one(layer, h, _):
            return shd.constrain(layer(h), ("batch", "seq", "act_embed")), None
        for k in sorted(set(want) - {0}):   # later layers do not affect the features
            x, _ = self.encoder.layers.scan(one, x, start=done, stop=k)
            states[k], done = x, k
        return [states[k] for k in want]
