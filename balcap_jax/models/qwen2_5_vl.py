"""Qwen2.5-VL (HF `Qwen2_5_VLForConditionalGeneration`) in Flax NNX.

= the shared text decoder (`decoder.CausalLM` with M-RoPE) + the vision tower
(`qwen2_5_vl_vision.VisionTower`) + image embeddings scattered into the text embeddings at the
image-pad tokens. Parameter paths mirror the hub keys: model/..., lm_head/..., visual/....

Host side (numpy; everything that depends on image sizes, so jitted code sees bucketed shapes):
  `model.prepare_vision_inputs(pixel_values, image_grid_thw, bucket="default") -> VisionInputs`
      (patch bucket and attention-row layout from model.vision_slot (patches per image: every
      image padded to its own slot, fixed shapes) or model.vision_bucket / vision_window_row /
      vision_full_row; see qwen2_5_vl_index.prepare_vision_inputs)
  `model.rope_index(input_ids, attention_mask, image_grid_thw, mm_token_type_ids=None)
      -> positions [3,B,T] int32 (= HF get_rope_index), deltas [B] int32`
      (decoding: the token at cache slot i after the prompt has position i + delta on all axes)
  `model.prepare_prompt(inputs) -> (embed_inputs, positions, deltas)`: the sampler's hook.
Jit-friendly (call inside your own jit; `encode_images_jit` / `prompt_logits_jit` are jitted
wrappers with the graphdef static):
  `model.encode_images(vi) -> [Mp, D]` image embeddings, image by image, zero rows past the end
  `model.embed_multimodal(input_ids [B,T], image_embeds [Mp, D] | None) -> [B,T,D]`
  `model.embed_prompt(embed_inputs) -> [B,T,D]`
  and, inherited from CausalLM: `embed`, `forward_embeds(x, positions[3,B,T], kv_mask, cache,
  cache_index)`, `logits`, `token_logprobs`, `init_cache`, `lm_head_weight`.
Eager: `model(input_ids=, attention_mask=, pixel_values=, image_grid_thw=,
  mm_token_type_ids=None) -> float32 logits [B,T,V]` (left padding, text-only rows allowed).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from balcap_jax import sharding as shd
from balcap_jax.models import hf
from balcap_jax.models import qwen2_5_vl_index as qi
from balcap_jax.models.decoder import CausalLM, DecoderConfig
from balcap_jax.models.multimodal import scatter_image_embeds
from balcap_jax.models.qwen2_5_vl_vision import VisionConfig, VisionTower
from balcap_jax.padding import next_pow2

Array = jax.Array
MODEL_TYPE = "qwen2_5_vl"


_VL_KEYS = {"text_config", "vision_config", "image_token_id", "video_token_id",
            "vision_start_token_id", "vision_end_token_id", "vision_token_id", "architectures",
            "model_type", "transformers_version", "dtype", "torch_dtype"}


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLConfig:
    text: DecoderConfig
    vision: VisionConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    model_type: str = MODEL_TYPE

    def __getattr__(self, name):
        # DecoderConfig fields (num_layers, num_kv_heads, ...) read through, so the inherited
        # CausalLM methods work with this config as `model.cfg`.
        if name.startswith("__") or name == "text":
            raise AttributeError(name)
        return getattr(self.text, name)

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> "Qwen2_5_VLConfig":
        """From a config.json dict: v5 (`text_config.rope_parameters`) or v4 (text keys at the
        top level, `rope_scaling: {"type": "mrope", "mrope_section": [...]}`, `rope_theta`)."""
        if d.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise ValueError(f"config model_type {d.get('model_type')!r} is not {MODEL_TYPE!r}")
        if "vision_config" not in d:
            raise ValueError("Qwen2.5-VL config.json has no vision_config")
        t = dict(d.get("text_config") or {})
        for k, v in d.items():          # v4: text keys live at the top level
            if k not in _VL_KEYS and k not in t:
                t[k] = v
        t.pop("model_type", None)
        t["tie_word_embeddings"] = bool(d.get("tie_word_embeddings", False)
                                        or t.get("tie_word_embeddings", False))
        text = hf.decoder_config_from_hf(t, model_type="qwen2_5_vl_text", qkv_bias=True,
                                         o_bias=False)
        if text.mrope_section is None:
            raise ValueError("Qwen2.5-VL config lacks mrope_section (text_config.rope_parameters "
                             "or rope_scaling); is this a Qwen2.5-VL config.json?")
        if text.rope_type != "default":
            raise NotImplementedError(f"Qwen2.5-VL rope_type {text.rope_type!r} is not supported")
        return cls(text=text, vision=VisionConfig.from_hf(d["vision_config"]),
                   image_token_id=int(d.get("image_token_id", 151655)),
                   video_token_id=int(d.get("video_token_id", 151656)),
                   vision_start_token_id=int(d.get("vision_start_token_id", 151652)),
                   vision_end_token_id=int(d.get("vision_end_token_id", 151653)))

    def to_hf(self, dtype: str = "float32") -> dict:
        """A transformers v5 config.json dict."""
        text = hf.decoder_config_to_hf(self.text)
        text.update(model_type="qwen2_5_vl_text", use_sliding_window=False)
        text["rope_parameters"]["rope_type"] = "default"
        return dict(architectures=["Qwen2_5_VLForConditionalGeneration"], model_type=MODEL_TYPE,
                    dtype=dtype, text_config=text, vision_config=self.vision.to_hf(),
                    image_token_id=self.image_token_id, video_token_id=self.video_token_id,
                    vision_start_token_id=self.vision_start_token_id,
                    vision_end_token_id=self.vision_end_token_id,
                    tie_word_embeddings=self.text.tie_word_embeddings)


@functools.partial(jax.jit, static_argnums=0)
def encode_images_jit(graphdef, state, vi: qi.VisionInputs) -> Array:
    return nnx.merge(graphdef, state).encode_images(vi)


@functools.partial(jax.jit, static_argnums=0)
def prompt_logits_jit(graphdef, state, input_ids, attention_mask, positions, image_embeds):
    """Full-prompt float32 logits [B,T,V] from host-prepared positions and image embeddings."""
    model = nnx.merge(graphdef, state)
    x = model.embed_multimodal(input_ids, image_embeds)
    hidden, _ = model.forward_embeds(x, positions, attention_mask)
    return model.logits(hidden)


class Qwen2_5_VL(CausalLM):
    """CausalLM (model/, lm_head/) + visual/ tower. See the module docstring for the API."""

    def __init__(self, cfg: Qwen2_5_VLConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None,
                 mesh=None, rules: shd.Rules | None = None, vision_bucket=256,
                 vision_window_row: int = 256, vision_full_row="auto",
                 vision_slot: int | None = None):
        if cfg.vision.out_hidden_size != cfg.text.hidden_size:
            raise ValueError(f"vision out_hidden_size {cfg.vision.out_hidden_size} must equal the "
                             f"text hidden_size {cfg.text.hidden_size}")
        super().__init__(cfg.text, dtype=dtype, rngs=rngs, mesh=mesh, rules=rules)
        self.vl_cfg = cfg
        self.cfg = cfg    # hf.save_pretrained dispatches on model.cfg.model_type
        self.visual = VisionTower(cfg.vision, dtype=dtype, rngs=rngs)
        # host-side layout knobs of the eager/sampler paths (see prepare_vision_inputs)
        self.vision_bucket = vision_bucket
        self.vision_window_row = vision_window_row
        self.vision_full_row = vision_full_row
        # patches per image (training sets it from data.max_image_tokens): every image padded
        # to its own slot, so the vision shapes depend on the image count only
        self.vision_slot = vision_slot

    @property
    def vision_token_ids(self) -> tuple[int, ...]:
        """Special tokens that belong to the vision input, never to a caption (the sampler
        never samples them)."""
        c = self.vl_cfg
        return (c.image_token_id, c.video_token_id, c.vision_start_token_id,
                c.vision_end_token_id)

    def set_remat(self, on: bool = True) -> None:
        """Rematerialise the decoder layers and the vision blocks in the training loss."""
        super().set_remat(on)
        self.visual.remat = bool(on)

    # --- host side ------------------------------------------------------------------------
    def prepare_vision_inputs(self, pixel_values, image_grid_thw,
                              bucket="default") -> qi.VisionInputs:
        v = self.vl_cfg.vision
        return qi.prepare_vision_inputs(
            pixel_values, image_grid_thw, spatial_merge_size=v.spatial_merge_size,
            window_size=v.window_size, patch_size=v.patch_size,
            bucket=self.vision_bucket if bucket == "default" else bucket,
            window_row=self.vision_window_row, full_row=self.vision_full_row,
            slot=self.vision_slot if bucket == "default" else None)

    def rope_index(self, input_ids, attention_mask=None, image_grid_thw=None,
                   mm_token_type_ids=None) -> tuple[np.ndarray, np.ndarray]:
        return qi.rope_index(input_ids, attention_mask, image_grid_thw,
                             image_token_id=self.vl_cfg.image_token_id,
                             spatial_merge_size=self.vl_cfg.vision.spatial_merge_size,
                             mm_token_type_ids=mm_token_type_ids)

    def check_image_tokens(self, input_ids, image_grid_thw) -> None:
        n_tok = int((np.asarray(input_ids) == self.vl_cfg.image_token_id).sum())
        n_img = (sum(qi.image_token_counts(image_grid_thw, self.vl_cfg.vision.spatial_merge_size))
                 if image_grid_thw is not None else 0)
        if n_tok != n_img:
            raise ValueError(f"input_ids hold {n_tok} image tokens "
                             f"(id {self.vl_cfg.image_token_id}) "
                             f"but image_grid_thw gives {n_img} image embeddings; build prompts "
                             "with the Qwen2.5-VL processor (one <|image_pad|> per merged patch)")

    def prepare_prompt(self, inputs: Mapping[str, Any]):
        """Sampler hook: processor dict (left-aligned) -> (embed_inputs, positions, deltas)."""
        ids = np.asarray(inputs["input_ids"])
        mask = np.asarray(inputs.get("attention_mask", np.ones_like(ids)))
        grid = inputs.get("image_grid_thw")
        grid = None if grid is None or len(np.asarray(grid)) == 0 else np.asarray(grid)
        self.check_image_tokens(ids, grid)
        mm = inputs.get("mm_token_type_ids")
        if mm is not None and np.asarray(mm).shape != ids.shape:
            mm = None   # not aligned with the (re-padded) input_ids: derive it from the ids
        positions, deltas = self.rope_index(ids, mask, grid, mm)
        embed_inputs = {"input_ids": ids.astype(np.int32)}
        if grid is not None:
            embed_inputs["vision"] = self.prepare_vision_inputs(
                np.asarray(inputs["pixel_values"]), grid)
        return embed_inputs, positions, deltas

    # --- jit-friendly ---------------------------------------------------------------------
    def encode_images(self, vi: qi.VisionInputs) -> Array:
        with shd.use_sharding(self.mesh, self.rules):
            return self.visual(vi)

    def embed_multimodal(self, input_ids: Array, image_embeds: Array | None) -> Array:
        """Text embeddings with image_embeds rows written, in order, at the image-pad tokens
        (row-major over the batch, as HF masked_scatter). A fixed-size gather: the caller must
        supply as many real image rows as there are image tokens (`check_image_tokens`)."""
        return scatter_image_embeds(self.embed(input_ids), input_ids, self.vl_cfg.image_token_id,
                                    image_embeds)

    def embed_prompt(self, embed_inputs: Mapping[str, Any]) -> Array:
        vi = embed_inputs.get("vision")
        image_embeds = None if vi is None else self.encode_images(vi)
        return self.embed_multimodal(embed_inputs["input_ids"], image_embeds)

    # --- eager convenience ----------------------------------------------------------------
    def __call__(self, input_ids=None, attention_mask=None, pixel_values=None, image_grid_thw=None,
                 mm_token_type_ids=None, **ignored: Any) -> Array:
        """HF-style keyword call -> float32 logits [B, T, V]."""
        if input_ids is None:
            raise ValueError("pass input_ids=[B, T] token ids")
        if ignored.get("pixel_values_videos") is not None:
            raise NotImplementedError("Qwen2.5-VL video inputs are not supported (images only)")
        ids = np.asarray(input_ids)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {ids.shape}")
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask {mask.shape} must match input_ids {ids.shape}")
        if (pixel_values is None) != (image_grid_thw is None):
            raise ValueError("pass pixel_values and image_grid_thw together (or neither)")
        grid = None if image_grid_thw is None else np.asarray(image_grid_thw)
        self.check_image_tokens(ids, grid)
        positions, _ = self.rope_index(ids, mask, grid, mm_token_type_ids)
        graphdef, state = nnx.split(self)
        image_embeds = None
        if grid is not None:
            vi = self.prepare_vision_inputs(np.asarray(pixel_values, np.float32), grid)
            image_embeds = encode_images_jit(graphdef, state, vi)
        b, t = ids.shape
        tb = next_pow2(t, 16)   # right padding is invisible to a causal model
        ids_p = np.pad(ids, ((0, 0), (0, tb - t)))
        mask_p = np.pad(mask, ((0, 0), (0, tb - t)))
        pos_p = np.pad(positions, ((0, 0), (0, 0), (0, tb - t)))
        out = prompt_logits_jit(graphdef, state, jnp.asarray(ids_p, jnp.int32),
                                jnp.asarray(mask_p, jnp.int32), jnp.asarray(pos_p, jnp.int32),
                                image_embeds)
        return out[:, :t]


# ----------------------------------------------------------------------------- HF key map

def vision_key_rules(v: VisionConfig, hf_prefix: str = "visual.", ours_prefix: str = "visual/",
                     hf_aliases=("model.visual.",)) -> list[hf.KeyRule]:
    def rule(h, o, tr=hf.IDENTITY):
        return hf.KeyRule(hf_prefix + h, ours_prefix + o, tr, tuple(a + h for a in hf_aliases))
    patch = hf.ConvKernel((v.hidden_size, v.in_channels, v.temporal_patch_size,
                           v.patch_size, v.patch_size))
    b, o = "blocks.{i}.", "blocks/{i}/"
    rules = [rule("patch_embed.proj.weight", "patch_embed/kernel", patch),
             rule(b + "norm1.weight", o + "norm1/weight"),
             rule(b + "norm2.weight", o + "norm2/weight"),
             rule(b + "attn.qkv.weight", o + "attn/qkv/kernel", hf.LINEAR),     # -> [D,3,H,hd]
             rule(b + "attn.qkv.bias", o + "attn/qkv/bias", hf.RESHAPE),
             rule(b + "attn.proj.weight", o + "attn/o_proj/kernel", hf.LinearT(2)),
             rule(b + "attn.proj.bias", o + "attn/o_proj/bias"),
             rule("merger.ln_q.weight", "merger/ln_q/weight"),
             rule("merger.mlp.0.weight", "merger/fc1/kernel", hf.LINEAR),
             rule("merger.mlp.0.bias", "merger/fc1/bias"),
             rule("merger.mlp.2.weight", "merger/fc2/kernel", hf.LINEAR),
             rule("merger.mlp.2.bias", "merger/fc2/bias")]
    for p in ("gate_proj", "up_proj", "down_proj"):
        rules += [rule(f"{b}mlp.{p}.weight", f"{o}mlp/{p}/kernel", hf.LINEAR),
                  rule(f"{b}mlp.{p}.bias", f"{o}mlp/{p}/bias")]
    return rules


def key_rules(cfg: Qwen2_5_VLConfig) -> list[hf.KeyRule]:
    """Hub key names (v4 and v5 save them alike); v5's internal `model.language_model.*` /
    `model.visual.*` spellings are accepted on load."""
    rules = hf.decoder_key_rules(cfg.text, hf_aliases=("model.language_model.",))
    if not cfg.text.tie_word_embeddings:
        rules.append(hf.KeyRule("lm_head.weight", "lm_head/kernel", hf.LINEAR))
    return rules + vision_key_rules(cfg.vision)


hf.register(hf.ModelSpec(
    model_type=MODEL_TYPE, parse_config=Qwen2_5_VLConfig.from_hf,
    build=lambda cfg, dtype, rngs: Qwen2_5_VL(cfg, dtype=dtype, rngs=rngs),
    key_rules=key_rules, to_hf_config=lambda cfg, dtype: cfg.to_hf(dtype),
    ignore=(r"lm_head\.weight$", r".*rotary_emb\.inv_freq$", r".*rotary_pos_emb\.inv_freq$")))
