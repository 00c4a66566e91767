"""LLaVA-1.5 (HF `LlavaForConditionalGeneration`) in Flax NNX.

= the shared Llama decoder (`decoder.CausalLM`, 1-D RoPE) + the CLIP ViT
(`llava_vision.ClipVisionTower`) read at `vision_feature_layer` (-2 for LLaVA-1.5), the class
token dropped (strategy "default"; "full" keeps it) + the two-layer projector
(linear_1 - `projector_hidden_act` - linear_2), whose rows are scattered into the text
embeddings at the `<image>` tokens (each image: grid**2 tokens, 576 at 336 px / patch 14, as the
processor expands them). Parameter paths: model/..., lm_head/... (CausalLM), vision_tower/...,
multi_modal_projector/{linear_1, linear_2}.

Host side (numpy):
  `model.prepare_prompt(inputs) -> (embed_inputs, positions [B,T], deltas [B])`: the sampler's
      hook; positions are HF's for left padding (cumsum(mask) - 1), the images are padded to a
      power-of-two count so the jitted tower sees a bounded set of shapes.
Jit-friendly (call inside your own jit):
  `model.encode_images(pixel_values [N,C,H,W]) -> [N * tokens_per_image, D]` projected features
  `model.embed_multimodal(input_ids [B,T], image_embeds [M, D] | None) -> [B,T,D]`
  `model.embed_prompt(embed_inputs) -> [B,T,D]`
  and, inherited from CausalLM: `embed`, `forward_embeds(x, positions [B,T], kv_mask, cache,
  cache_index)`, `logits`, `token_logprobs`, `init_cache`, `lm_head_weight`.
Eager: `model(input_ids=, attention_mask=, pixel_values=None, position_ids=None)` -> float32
  logits [B,T,V] (left padding and text-only rows allowed; extra keys ignored).

Checkpoints: loads the hub layout (`language_model.model.*`, `language_model.lm_head.weight`,
`vision_tower.vision_model.*`, `multi_modal_projector.*`), the layout transformers v5 saves
(`vision_tower.*` without `vision_model.`) and v5's module names (`model.language_model.*`,
`model.vision_tower.*`, `lm_head.weight`); saves the v5 layout. CLIP layers past the feature
layer and `post_layernorm` are loaded and saved unchanged but never run.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from balcap_jax import sharding as shd
from balcap_jax.models import hf, layers
from balcap_jax.models.decoder import CausalLM, DecoderConfig, default_positions
from balcap_jax.models.llava_vision import ClipVisionConfig, ClipVisionTower
from balcap_jax.models.multimodal import scatter_image_embeds
from balcap_jax.padding import next_pow2

Array = jax.Array
MODEL_TYPE = "llava"

# transformers' LlamaConfig defaults: hub LLaVA text_configs list only what differs from them
LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, hidden_act="silu",
                      max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
                      tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
_TOP_KEYS = {"text_config", "vision_config", "image_token_index", "image_token_id",
             "projector_hidden_act", "vision_feature_layer", "vision_feature_select_strategy",
             "multimodal_projector_bias", "tie_word_embeddings", "architectures", "model_type",
             "transformers_version", "dtype", "torch_dtype"}


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    text: DecoderConfig
    vision: ClipVisionConfig
    image_token_id: int = 32000
    vision_feature_layer: tuple[int, ...] = (-2,)   # one int in HF configs, or a list (concat)
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    hf_extra: str = "{}"          # other top-level config.json fields, written back on save
    model_type: str = MODEL_TYPE

    def __getattr__(self, name):
        # DecoderConfig fields read through, so the inherited CausalLM methods work with this
        # config as `model.cfg`.
        if name.startswith("__") or name == "text":
            raise AttributeError(name)
        return getattr(self.text, name)

    @property
    def tokens_per_image(self) -> int:
        return self.vision.grid ** 2 + (self.vision_feature_select_strategy == "full")

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> "LlavaConfig":
        """From a config.json dict (v4 hub form with partial sub-configs, or v5)."""
        if d.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise ValueError(f"config model_type {d.get('model_type')!r} is not {MODEL_TYPE!r}")
        t = dict(LLAMA_DEFAULTS, **{k: v for k, v in (d.get("text_config") or {}).items()
                                    if v is not None})
        text_type = t.pop("model_type", "llama")
        if text_type not in ("llama", "vicuna"):
            raise NotImplementedError(f"LLaVA text_config.model_type {text_type!r}: only Llama "
                                      "decoders (LLaVA-1.5) are supported")
        if "tie_word_embeddings" in d:
            t["tie_word_embeddings"] = bool(d["tie_word_embeddings"])
        text = hf.decoder_config_from_hf(t, model_type="llama")
        layer = d.get("vision_feature_layer", -2)
        layer = (int(layer),) if np.ndim(layer) == 0 else tuple(int(x) for x in layer)
        strategy = d.get("vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy {strategy!r}: use 'default' "
                             "(drop the class token) or 'full'")
        image_token = d.get("image_token_index", d.get("image_token_id", 32000))
        extra = {k: v for k, v in d.items() if k not in _TOP_KEYS}
        return cls(text=text, vision=ClipVisionConfig.from_hf(d.get("vision_config") or {}),
                   image_token_id=int(image_token), vision_feature_layer=layer,
                   vision_feature_select_strategy=strategy,
                   projector_hidden_act=d.get("projector_hidden_act", "gelu"),
                   projector_bias=bool(d.get("multimodal_projector_bias", True)),
                   hf_extra=json.dumps(extra, sort_keys=True))

    def to_hf(self, dtype: str = "float32") -> dict:
        """A transformers v5 config.json dict."""
        text = hf.decoder_config_to_hf(self.text)
        text.update(model_type="llama", attention_bias=self.text.qkv_bias,
                    mlp_bias=self.text.mlp_bias)
        layer = self.vision_feature_layer
        out = json.loads(self.hf_extra)
        out.update(architectures=["LlavaForConditionalGeneration"], model_type=MODEL_TYPE,
                   dtype=dtype, text_config=text, vision_config=self.vision.to_hf(),
                   image_token_index=self.image_token_id,
                   vision_feature_layer=layer[0] if len(layer) == 1 else list(layer),
                   vision_feature_select_strategy=self.vision_feature_select_strategy,
                   projector_hidden_act=self.projector_hidden_act,
                   multimodal_projector_bias=self.projector_bias,
                   tie_word_embeddings=self.text.tie_word_embeddings)
        return out


class LlavaProjector(nnx.Module):
    """linear_1 (vision features -> text hidden) - act - linear_2 (HF LlavaMultiModalProjector)."""

    def __init__(self, in_dim: int, out_dim: int, *, act: str = "gelu", bias: bool = True,
                 dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.act = act
        layers.activation(act)
        self.linear_1 = layers.Proj(in_dim, out_dim, names=("mlp_in", "mlp"), bias=bias,
                                    dtype=dtype, rngs=rngs)
        self.linear_2 = layers.Proj(out_dim, out_dim, names=("mlp", "embed"), bias=bias,
                                    dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.linear_2(layers.activation(self.act)(self.linear_1(x)))


@functools.partial(jax.jit, static_argnums=0)
def prompt_logits_jit(graphdef, state, input_ids, attention_mask, positions, pixel_values):
    """Full-prompt float32 logits [B,T,V]; pixel_values None for text-only batches."""
    model = nnx.merge(graphdef, state)
    image_embeds = None if pixel_values is None else model.encode_images(pixel_values)
    hidden, _ = model.forward_embeds(model.embed_multimodal(input_ids, image_embeds), positions,
                                     attention_mask)
    return model.logits(hidden)


def _image_bucket(n: int) -> int:
    return next_pow2(n)


class Llava(CausalLM):
    """CausalLM (model/, lm_head/) + vision_tower/ + multi_modal_projector/. See the module
    docstring for the API."""

    def __init__(self, cfg: LlavaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None,
                 mesh=None, rules: shd.Rules | None = None):
        super().__init__(cfg.text, dtype=dtype, rngs=rngs, mesh=mesh, rules=rules)
        self.llava_cfg = cfg
        self.cfg = cfg    # hf.save_pretrained dispatches on model.cfg.model_type
        self.vision_tower = ClipVisionTower(cfg.vision, dtype=dtype, rngs=rngs)
        self.vision_tower.resolve_layers(cfg.vision_feature_layer)   # fail early on a bad index
        self.multi_modal_projector = LlavaProjector(
            cfg.vision.hidden_size * len(cfg.vision_feature_layer), cfg.text.hidden_size,
            act=cfg.projector_hidden_act, bias=cfg.projector_bias, dtype=dtype, rngs=rngs)

    @property
    def vision_token_ids(self) -> tuple[int, ...]:
        """<image>: part of the vision input, never of a caption (never sampled)."""
        return (self.llava_cfg.image_token_id,)

    # --- host side ------------------------------------------------------------------------
    def check_image_tokens(self, input_ids, num_images: int) -> None:
        c = self.llava_cfg
        n_tok = int((np.asarray(input_ids) == c.image_token_id).sum())
        if n_tok != num_images * c.tokens_per_image:
            raise ValueError(
                f"input_ids hold {n_tok} image tokens (id {c.image_token_id}) but {num_images} "
                f"images need {num_images} x {c.tokens_per_image}; build prompts with the LLaVA "
                f"processor (one <image> expanded to {c.tokens_per_image} tokens per image)")

    def prepare_prompt(self, inputs: Mapping[str, Any]):
        """Sampler hook: processor dict (left-aligned) -> (embed_inputs, positions, deltas)."""
        ids = np.asarray(inputs["input_ids"])
        mask = np.asarray(inputs.get("attention_mask", np.ones_like(ids)))
        pv = inputs.get("pixel_values")
        pv = None if pv is None or len(np.asarray(pv)) == 0 else np.asarray(pv, np.float32)
        self.check_image_tokens(ids, 0 if pv is None else len(pv))
        positions = np.where(mask > 0, np.cumsum(mask, 1) - 1, 0).astype(np.int32)
        deltas = (mask.sum(1) - mask.shape[1]).astype(np.int32)
        embed_inputs = {"input_ids": ids.astype(np.int32)}
        if pv is not None:   # pad the image count: the extra images' rows are never gathered
            n = _image_bucket(len(pv))
            embed_inputs["vision"] = {"pixel_values": np.pad(
                pv, ((0, n - len(pv)),) + ((0, 0),) * (pv.ndim - 1))}
        return embed_inputs, positions, deltas

    # --- jit-friendly ---------------------------------------------------------------------
    def image_features(self, pixel_values: Array) -> Array:
        """CLIP features at vision_feature_layer(s) (class token dropped for "default"),
        concatenated over the layers: [N, tokens_per_image, vision_hidden * n_layers]."""
        c = self.llava_cfg
        states = self.vision_tower.hidden_states(pixel_values, c.vision_feature_layer)
        if c.vision_feature_select_strategy == "default":
            states = [s[:, 1:] for s in states]
        return jnp.concatenate(states, axis=-1) if len(states) > 1 else states[0]

    def encode_images(self, pixel_values: Array) -> Array:
        """pixel_values [N, C, H, W] -> projected image embeddings [N * tokens_per_image, D]."""
        with shd.use_sharding(self.mesh, self.rules):
            x = self.multi_modal_projector(self.image_features(pixel_values))
            return x.reshape(-1, x.shape[-1])

    def embed_multimodal(self, input_ids: Array, image_embeds: Array | None) -> Array:
        """Text embeddings with image_embeds rows written, in order, at the image tokens
        (row-major over the batch, as HF masked_scatter). A fixed-size gather: the caller must
        supply at least as many rows as there are image tokens (`check_image_tokens`)."""
        return scatter_image_embeds(self.embed(input_ids), input_ids,
                                    self.llava_cfg.image_token_id, image_embeds)

    def embed_prompt(self, embed_inputs: Mapping[str, Any]) -> Array:
        vi = embed_inputs.get("vision")
        image_embeds = None if vi is None else self.encode_images(vi["pixel_values"])
        return self.embed_multimodal(embed_inputs["input_ids"], image_embeds)

    # --- eager convenience ----------------------------------------------------------------
    def __call__(self, input_ids=None, attention_mask=None, pixel_values=None, position_ids=None,
                 **ignored: Any) -> Array:
        """HF-style keyword call -> float32 logits [B, T, V]. Positions default to HF's for
        left padding (cumsum(mask) - 1, as generate computes them)."""
        if input_ids is None:
            raise ValueError("pass input_ids=[B, T] token ids")
        ids = np.asarray(input_ids)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {ids.shape}")
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask {mask.shape} must match input_ids {ids.shape}")
        pv = None if pixel_values is None else np.asarray(pixel_values, np.float32)
        self.check_image_tokens(ids, 0 if pv is None else len(pv))
        pos = (np.asarray(default_positions(jnp.asarray(mask))) if position_ids is None
               else np.asarray(position_ids))
        if pv is not None:
            pv = np.pad(pv, ((0, _image_bucket(len(pv)) - len(pv)),) + ((0, 0),) * 3)
        b, t = ids.shape
        tb = next_pow2(t, 16)   # right padding is invisible to a causal model
        pad = ((0, 0), (0, tb - t))
        graphdef, state = nnx.split(self)
        out = prompt_logits_jit(graphdef, state, jnp.asarray(np.pad(ids, pad), jnp.int32),
                                jnp.asarray(np.pad(mask, pad), jnp.int32),
                                jnp.asarray(np.pad(pos, pad), jnp.int32),
                                None if pv is None else jnp.asarray(pv))
        return out[:, :t]


# ----------------------------------------------------------------------------- HF key map

def vision_key_rules(v: ClipVisionConfig) -> list[hf.KeyRule]:
    """CLIP tower rules: saved as `vision_tower.*` (v5); the hub's `vision_tower.vision_model.*`
    and v5's module names `model.vision_tower.*` accepted on load."""
    aliases = ("vision_tower.vision_model.", "model.vision_tower.",
               "model.vision_tower.vision_model.")

    def rule(h, o, tr=hf.IDENTITY):
        return hf.KeyRule("vision_tower." + h, "vision_tower/" + o, tr,
                          tuple(a + h for a in aliases))
    e, lay, o = "embeddings.", "encoder.layers.{i}.", "encoder/layers/{i}/"
    conv = hf.ConvKernel((v.hidden_size, v.num_channels, v.patch_size, v.patch_size))
    rules = [rule(e + "class_embedding", "embeddings/class_embedding"),
             rule(e + "patch_embedding.weight", "embeddings/patch_embedding/kernel", conv),
             rule(e + "position_embedding.weight", "embeddings/position_embedding")]
    for ln in ("pre_layrnorm", "post_layernorm"):
        rules += [rule(f"{ln}.weight", f"{ln}/weight"), rule(f"{ln}.bias", f"{ln}/bias")]
    for ln in ("layer_norm1", "layer_norm2"):
        rules += [rule(f"{lay}{ln}.weight", f"{o}{ln}/weight"),
                  rule(f"{lay}{ln}.bias", f"{o}{ln}/bias")]
    for p in ("q_proj", "k_proj", "v_proj"):
        rules += [rule(f"{lay}self_attn.{p}.weight", f"{o}self_attn/{p}/kernel", hf.LINEAR),
                  rule(f"{lay}self_attn.{p}.bias", f"{o}self_attn/{p}/bias", hf.RESHAPE)]
    rules += [rule(lay + "self_attn.out_proj.weight", o + "self_attn/o_proj/kernel",
                   hf.LinearT(2)),
              rule(lay + "self_attn.out_proj.bias", o + "self_attn/o_proj/bias")]
    for p in ("fc1", "fc2"):
        rules += [rule(f"{lay}mlp.{p}.weight", f"{o}mlp/{p}/kernel", hf.LINEAR),
                  rule(f"{lay}mlp.{p}.bias", f"{o}mlp/{p}/bias")]
    return rules


def key_rules(cfg: LlavaConfig) -> list[hf.KeyRule]:
    """Saved as transformers v5 writes LLaVA (the hub layout, tower without `vision_model.`)."""
    rules = hf.decoder_key_rules(cfg.text, hf_prefix="language_model.model.",
                                 hf_aliases=("model.language_model.",))
    if not cfg.text.tie_word_embeddings:
        rules.append(hf.KeyRule("language_model.lm_head.weight", "lm_head/kernel", hf.LINEAR,
                                ("lm_head.weight",)))
    for name in ("linear_1", "linear_2"):
        mp = "multi_modal_projector."
        rules.append(hf.KeyRule(f"{mp}{name}.weight", f"multi_modal_projector/{name}/kernel",
                                hf.LINEAR, (f"model.{mp}{name}.weight",)))
        if cfg.projector_bias:
            rules.append(hf.KeyRule(f"{mp}{name}.bias", f"multi_modal_projector/{name}/bias",
                                    hf.IDENTITY, (f"model.{mp}{name}.bias",)))
    return rules + vision_key_rules(cfg.vision)


# tied checkpoints may still carry an lm_head; old CLIP/Llama checkpoints carry buffers
_IGNORE = (r"(language_model\.)?lm_head\.weight$", r".*position_ids$", r".*rotary_emb\.inv_freq$")


hf.register(hf.ModelSpec(
    model_type=MODEL_TYPE, parse_config=LlavaConfig.from_hf,
    build=lambda cfg, dtype, rngs: Llava(cfg, dtype=dtype, rngs=rngs),
    key_rules=key_rules, to_hf_config=lambda cfg, dtype: cfg.to_hf(dtype), ignore=_IGNORE))
