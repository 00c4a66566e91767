"""Hugging Face checkpoints in and out: config parsers + declarative key maps per model_type.

    from_pretrained(path, *, dtype="float32", mesh=None, rules=None) -> model
    save_pretrained(model, path, *, max_shard_size=None) -> None

Loading reads config.json (v4 `rope_scaling` + top-level `rope_theta`, or v5 `rope_parameters`),
builds the model abstractly (nnx.eval_shape), checks the checkpoint's key set against the key map
(missing and unexpected keys are one error listing them), then streams tensor by tensor from
safetensors (single file or sharded with model.safetensors.index.json) straight onto each
parameter's NamedSharding (logical axes + rules, sharding.param_shardings) when a mesh is given.
With a mesh each process reads only the slices of each tensor that its own devices hold
(safetensors `get_slice`, assembled by `jax.make_array_from_callback`), so on several hosts no
host reads the whole checkpoint; `LoadStats` (`from_pretrained(..., stats=)`) counts the bytes.

Saving writes config.json in the v5 form transformers reads and safetensors with HF key names
(metadata format=pt), sharded with an index when max_shard_size (bytes) is given.

Registry: each HF `model_type` registers a `ModelSpec` (see `register`):
    parse_config(hf_config: dict) -> cfg         (cfg must have .model_type)
    build(cfg, dtype, rngs) -> nnx.Module
    key_rules(cfg) -> list[KeyRule]              HF key template <-> our param path template
    to_hf_config(cfg, dtype) -> dict             config.json (v5 form) for save_pretrained
    ignore: regexes of HF keys that may be present but are not loaded
A `KeyRule("model.layers.{i}.self_attn.q_proj.weight", "model/layers/{i}/self_attn/q_proj/kernel",
LINEAR)` is compiled to regexes both ways ({name} matches digits); `aliases` lists other HF
spellings accepted on load. Transforms (`Transform` subclasses) know both directions: LINEAR
(HF [out, in] -> ours [in..., out...], n_in trailing-in dims via LinearT(n_in)), RESHAPE, IDENTITY.
`decoder_key_rules(cfg, hf_prefix="model.", ours_prefix="model/")` gives the rules of a `Decoder`
so vision-language models (qwen2_5_vl, llava) reuse them under their own prefixes.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from balcap_jax import sharding as shd
from balcap_jax.models.decoder import CausalLM, DecoderConfig

CONFIG_NAME = "config.json"
SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"


# ----------------------------------------------------------------------------- transforms

class Transform:
    """HF tensor <-> our parameter. `to_ours` gets our target shape; `to_hf` our array."""

    def to_ours(self, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return x.reshape(shape)

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        return x


class Reshape(Transform):
    """Same data, different shape (e.g. bias [H*hd] <-> [H, hd]); HF side is flat."""

    def to_hf(self, x):
        return x.reshape(-1)


@dataclasses.dataclass(frozen=True)
class LinearT(Transform):
    """torch Linear weight [out, in] <-> kernel [in dims (n_in of them)..., out dims...]."""
    n_in: int = 1

    def to_ours(self, x, shape):
        if x.ndim != 2:
            raise ValueError(f"expected a 2-D Linear weight, got shape {x.shape}")
        return x.T.reshape(shape)

    def to_hf(self, x):
        n_in = math.prod(x.shape[:self.n_in])
        return np.ascontiguousarray(x.reshape(n_in, -1).T)


class ConvKernel(Transform):
    """Patch-embedding conv weight [D, C, (kt,) p, p] <-> our matmul kernel [C*(kt*)p*p, D]
    (a conv with stride = kernel size over flattened patches is one matmul)."""

    def __init__(self, hf_shape: tuple[int, ...]):
        self.hf_shape = tuple(hf_shape)

    def to_ours(self, x, shape):
        return x.reshape(x.shape[0], -1).T.reshape(shape)

    def to_hf(self, x):
        return np.ascontiguousarray(x.T).reshape(self.hf_shape)


IDENTITY = Transform()
RESHAPE = Reshape()
LINEAR = LinearT(1)


@dataclasses.dataclass(frozen=True)
class KeyRule:
    hf: str                      # "model.layers.{i}.self_attn.q_proj.weight"
    ours: str                    # "model/layers/{i}/self_attn/q_proj/kernel"
    transform: Transform = IDENTITY
    aliases: tuple[str, ...] = ()

    @staticmethod
    @functools.cache
    def _regex(template: str) -> re.Pattern:
        parts = re.split(r"(\{\w+\})", template)
        out = "".join(f"(?P<{p[1:-1]}>\\d+)" if p.startswith("{") else re.escape(p) for p in parts)
        return re.compile(out + "$")

    def match_hf(self, key: str) -> str | None:
        for t in (self.hf, *self.aliases):
            m = self._regex(t).match(key)
            if m:
                return self.ours.format(**m.groupdict())
        return None

    def match_ours(self, path: str) -> str | None:
        m = self._regex(self.ours).match(path)
        return self.hf.format(**m.groupdict()) if m else None


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    model_type: str
    parse_config: Callable[[dict], Any]
    build: Callable[[Any, Any, nnx.Rngs], nnx.Module]
    key_rules: Callable[[Any], list[KeyRule]]
    to_hf_config: Callable[[Any, str], dict]
    ignore: tuple[str, ...] = ()


REGISTRY: dict[str, ModelSpec] = {}
# model_type -> module that registers it on import (so from_pretrained finds it without imports)
LAZY_MODULES = {"qwen2_5_vl": "balcap_jax.models.qwen2_5_vl", "llava": "balcap_jax.models.llava"}


def register(spec: ModelSpec) -> ModelSpec:
    REGISTRY[spec.model_type] = spec
    return spec


def get_spec(model_type: str) -> ModelSpec:
    if model_type not in REGISTRY and model_type in LAZY_MODULES:
        import importlib
        importlib.import_module(LAZY_MODULES[model_type])
    if model_type not in REGISTRY:
        raise ValueError(f"model_type {model_type!r} is not registered; known: {sorted(REGISTRY)}."
                         " Import the module that registers it (e.g. balcap_jax.models.qwen2_5_vl)")
    return REGISTRY[model_type]


# ----------------------------------------------------------------------------- configs

def rope_from_hf(d: dict, default_theta: float = 10000.0) -> dict:
    """v4 (rope_scaling + rope_theta) or v5 (rope_parameters) -> DecoderConfig rope fields."""
    rp = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rp = dict(rp)
    if any(isinstance(v, dict) for v in rp.values()):
        raise NotImplementedError(f"per-layer-type rope_parameters are not supported: {rp}")
    rope_type = rp.pop("rope_type", None) or rp.pop("type", None) or "default"
    rp.pop("type", None)
    theta = rp.pop("rope_theta", None) or d.get("rope_theta") or default_theta
    section = rp.pop("mrope_section", None)
    if rope_type == "mrope":
        rope_type = "default"
    if rope_type == "llama3":
        rp.setdefault("original_max_position_embeddings", d.get("max_position_embeddings"))
    if rope_type not in ("default", "linear", "llama3"):
        raise NotImplementedError(f"rope_type {rope_type!r} not supported "
                                  "(default, linear, llama3)")
    return dict(rope_theta=float(theta), rope_type=rope_type,
                rope_params=tuple(sorted(rp.items())),
                mrope_section=None if section is None else tuple(int(s) for s in section))


_DECODER_KEYS = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                 "rope_theta", "rope_scaling", "rope_parameters", "attention_bias", "mlp_bias",
                 "hidden_act", "tie_word_embeddings", "max_position_embeddings", "model_type",
                 "architectures", "torch_dtype", "dtype", "transformers_version"}


def decoder_config_from_hf(d: dict, *, model_type: str, qkv_bias: bool | None = None,
                           o_bias: bool | None = None) -> DecoderConfig:
    """Parse a Qwen2/Llama-style (text) config dict."""
    if d.get("use_sliding_window"):
        raise NotImplementedError("Qwen2 sliding-window attention (use_sliding_window=true) is "
                                  "not implemented; set it false if the model never uses it")
    heads = int(d["num_attention_heads"])
    att_bias = bool(d.get("attention_bias", False))
    extra = {k: v for k, v in d.items() if k not in _DECODER_KEYS}
    return DecoderConfig(
        vocab_size=int(d["vocab_size"]), hidden_size=int(d["hidden_size"]),
        intermediate_size=int(d["intermediate_size"]), num_layers=int(d["num_hidden_layers"]),
        num_heads=heads, num_kv_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=d.get("head_dim"), rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        qkv_bias=att_bias if qkv_bias is None else qkv_bias,
        o_bias=att_bias if o_bias is None else o_bias,
        mlp_bias=bool(d.get("mlp_bias", False)), act=d.get("hidden_act", "silu"),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
        model_type=model_type, hf_extra=json.dumps(extra, sort_keys=True),
        **rope_from_hf(d))


def decoder_config_to_hf(cfg: DecoderConfig) -> dict:
    """Text-decoder fields of a v5 config.json (rope_parameters form)."""
    rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta, **dict(cfg.rope_params)}
    if cfg.mrope_section is not None:
        rope["mrope_section"] = list(cfg.mrope_section)
    out = json.loads(cfg.hf_extra)
    out.update(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
               intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
               num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
               head_dim=cfg.dim_per_head, rms_norm_eps=cfg.rms_norm_eps, hidden_act=cfg.act,
               tie_word_embeddings=cfg.tie_word_embeddings,
               max_position_embeddings=cfg.max_position_embeddings, rope_parameters=rope)
    return out


# ----------------------------------------------------------------------------- key maps

def decoder_key_rules(cfg: DecoderConfig, hf_prefix: str = "model.", ours_prefix: str = "model/",
                      hf_aliases: Sequence[str] = ()) -> list[KeyRule]:
    """Rules for a layers.Decoder (embed, layers, final norm). `hf_aliases`: other HF prefixes."""
    def rule(hf, ours, tr=IDENTITY):
        return KeyRule(hf_prefix + hf, ours_prefix + ours, tr,
                       tuple(a + hf for a in hf_aliases))
    lay = "layers.{i}."
    ours_lay = "layers/{i}/"
    rules = [rule("embed_tokens.weight", "embed_tokens/embedding"),
             rule("norm.weight", "norm/weight"),
             rule(lay + "input_layernorm.weight", ours_lay + "input_layernorm/weight"),
             rule(lay + "post_attention_layernorm.weight",
                  ours_lay + "post_attention_layernorm/weight")]
    for p in ("q_proj", "k_proj", "v_proj"):
        rules.append(rule(f"{lay}self_attn.{p}.weight", f"{ours_lay}self_attn/{p}/kernel", LINEAR))
        if cfg.qkv_bias:
            rules.append(rule(f"{lay}self_attn.{p}.bias", f"{ours_lay}self_attn/{p}/bias", RESHAPE))
    rules.append(rule(lay + "self_attn.o_proj.weight", ours_lay + "self_attn/o_proj/kernel",
                      LinearT(2)))
    if cfg.o_bias:
        rules.append(rule(lay + "self_attn.o_proj.bias", ours_lay + "self_attn/o_proj/bias"))
    for p in ("gate_proj", "up_proj", "down_proj"):
        rules.append(rule(f"{lay}mlp.{p}.weight", f"{ours_lay}mlp/{p}/kernel", LINEAR))
        if cfg.mlp_bias:
            rules.append(rule(f"{lay}mlp.{p}.bias", f"{ours_lay}mlp/{p}/bias"))
    return rules


def causal_lm_key_rules(cfg: DecoderConfig) -> list[KeyRule]:
    rules = decoder_key_rules(cfg)
    if not cfg.tie_word_embeddings:
        rules.append(KeyRule("lm_head.weight", "lm_head/kernel", LINEAR))
    return rules


def _causal_lm_spec(model_type: str, arch: str, qkv_bias: bool | None, o_bias: bool | None):
    def parse(d):
        return decoder_config_from_hf(d, model_type=model_type, qkv_bias=qkv_bias, o_bias=o_bias)

    def to_hf(cfg, dtype):
        out = decoder_config_to_hf(cfg)
        if model_type == "llama":
            out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
        out.update(model_type=model_type, architectures=[arch], dtype=dtype)
        return out

    return ModelSpec(model_type=model_type, parse_config=parse,
                     build=lambda cfg, dtype, rngs: CausalLM(cfg, dtype=dtype, rngs=rngs),
                     key_rules=causal_lm_key_rules, to_hf_config=to_hf,
                     # tied checkpoints may still carry lm_head.weight; old ones rotary buffers
                     ignore=(r"lm_head\.weight$", r".*rotary_emb\.inv_freq$"))


register(_causal_lm_spec("qwen2", "Qwen2ForCausalLM", qkv_bias=True, o_bias=False))
register(_causal_lm_spec("llama", "LlamaForCausalLM", qkv_bias=None, o_bias=None))


# ----------------------------------------------------------------------------- files

def _checkpoint_files(path: str) -> dict[str, list[str]]:
    """safetensors file -> its keys (index file, single file, or every *.safetensors)."""
    index = os.path.join(path, SAFE_INDEX)
    from safetensors import safe_open
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files: dict[str, list[str]] = {}
        for key, fname in weight_map.items():
            files.setdefault(os.path.join(path, fname), []).append(key)
        for fname in files:
            if not os.path.exists(fname):
                raise FileNotFoundError(f"{fname} is listed in {index} but missing")
        return files
    names = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not names:
        raise FileNotFoundError(f"no *.safetensors (or {SAFE_INDEX}) in {path}")
    files = {}
    for n in names:
        with safe_open(os.path.join(path, n), "numpy") as f:
            files[os.path.join(path, n)] = list(f.keys())
    return files


def _path_str(path: tuple) -> str:
    return "/".join(str(p) for p in path)


STACK = "stack"   # the path component of models.stack.StackedLayers' stacked parameters


def _per_layer(path: str, shape: tuple) -> list[tuple[str, int | None, tuple]]:
    """(key-map path, layer index, shape) of a parameter: a stacked one ("a/stack/b", shape
    [L, ...]) stands for L per-layer parameters "a/{i}/b" of shape [...], as the key rules and
    the checkpoints name them."""
    parts = path.split("/")
    if STACK not in parts:
        return [(path, None, tuple(shape))]
    k = parts.index(STACK)
    return [("/".join(parts[:k] + [str(i)] + parts[k + 1:]), i, tuple(shape[1:]))
            for i in range(shape[0])]


def _dtype(dtype) -> jnp.dtype:
    return jnp.dtype(dtype)


def read_hf_config(path: str) -> dict:
    fname = os.path.join(path, CONFIG_NAME)
    if not os.path.exists(fname):
        raise FileNotFoundError(f"{fname} not found: pass a Hugging Face model directory")
    with open(fname) as f:
        return json.load(f)


@dataclasses.dataclass
class LoadStats:
    """Bytes this process read from the checkpoint's tensors, against their total."""
    bytes_read: int = 0
    bytes_total: int = 0
    whole: list = dataclasses.field(default_factory=list)   # keys read whole: a device's block
                                                            # was not one slice of the tensor

    def summary(self) -> str:
        share = self.bytes_read / max(self.bytes_total, 1)
        return (f"read {self.bytes_read / 2**30:.3f} of {self.bytes_total / 2**30:.3f} GiB of "
                f"checkpoint tensors ({share:.0%})")


def _ranges(idx: tuple, shape: tuple) -> list[tuple[int, int]]:
    """(start, stop) per dimension of a device's index (slices with step 1) into `shape`."""
    out = []
    for sl, n in zip(tuple(idx) + (slice(None),) * (len(shape) - len(idx)), shape):
        start, stop, step = sl.indices(n)
        if step != 1:
            raise ValueError(f"strided shard index {sl}")
        out.append((start, stop))
    return out


def _contiguous(ranges, shape) -> tuple[int, int] | None:
    """The flat (start, stop) of a block whose first dimension is cut and the rest are whole
    (the row-major elements it covers are one run), or None."""
    if any(r != (0, n) for r, n in zip(ranges[1:], shape[1:])):
        return None
    inner = math.prod(shape[1:])
    return ranges[0][0] * inner, ranges[0][1] * inner


def _hf_slice(transform: Transform, ranges, want: tuple, hf_shape: tuple):
    """The slice of the HF tensor that holds our block `ranges` of a `want`-shaped parameter,
    such that transform.to_ours(hf[slice], block shape) is the block; None when it is not one
    rectangular slice (the caller reads the whole tensor)."""
    kind = type(transform)
    if kind is Transform and tuple(hf_shape) == tuple(want):
        return tuple(slice(a, b) for a, b in ranges)
    if kind in (Transform, Reshape) and len(hf_shape) == 1:       # a flat HF vector
        flat = _contiguous(ranges, want)
        return None if flat is None else (slice(*flat),)
    if kind is LinearT and len(hf_shape) == 2:   # ours [in dims..., out dims...], HF [out, in]
        n_in = transform.n_in
        rows = _contiguous(ranges[n_in:], want[n_in:])
        cols = _contiguous(ranges[:n_in], want[:n_in])
        if rows is None or cols is None:
            return None
        return slice(*rows), slice(*cols)
    return None


def _shard_reader(handle, key: str, rule: KeyRule, want: tuple, dt, stats: LoadStats):
    """read(ranges) -> our block of this tensor (converted to dt), reading only its slice."""
    view = handle.get_slice(key)
    hf_shape = tuple(view.get_shape())
    if math.prod(hf_shape) != math.prod(want):
        raise ValueError(f"{key}: shape {hf_shape} does not hold our {want}")
    itemsize = view[tuple(slice(0, 1) for _ in hf_shape)].dtype.itemsize   # one element
    stats.bytes_total += math.prod(hf_shape) * itemsize
    whole = {}

    def read(ranges) -> np.ndarray:
        block = tuple(b - a for a, b in ranges)
        sl = _hf_slice(rule.transform, ranges, want, hf_shape)
        if sl is None:                     # not one rectangle of the HF tensor: read it all
            if "x" not in whole:
                x = handle.get_tensor(key)
                stats.bytes_read += x.nbytes
                whole["x"] = rule.transform.to_ours(x, want)
                stats.whole.append(key)
            return np.asarray(whole["x"][tuple(slice(a, b) for a, b in ranges)]).astype(dt)
        part = view[sl]
        stats.bytes_read += part.nbytes
        return np.asarray(rule.transform.to_ours(part, block)).astype(dt)
    return read


def _assemble(readers: dict, shape: tuple, dt, sharding) -> jax.Array:
    """One parameter from its tensors' readers: the whole of it without a sharding, else each
    device's block (a stacked parameter's block spans layers: only those layers are read);
    blocks shared by several devices (replicated axes) are read once."""
    def block(idx) -> np.ndarray:
        ranges = _ranges(idx, shape)
        if None in readers:
            return readers[None](ranges)
        (l0, l1), rest = ranges[0], ranges[1:]
        return np.stack([readers[i](rest) for i in range(l0, l1)]).astype(dt, copy=False)

    if sharding is None:
        return jnp.asarray(block(tuple(slice(None) for _ in shape)))
    cache: dict = {}

    def cb(idx):
        k = tuple(_ranges(idx, shape))
        if k not in cache:
            cache[k] = block(idx)
        return cache[k]
    return jax.make_array_from_callback(shape, sharding, cb)


def from_pretrained(path: str, *, dtype: Any = "float32", mesh=None,
                    rules: shd.Rules | None = None, stats: LoadStats | None = None) -> nnx.Module:
    """Load an HF directory into the registered model for its config's model_type. With a
    mesh, each process reads only the slices its devices hold; `stats` (a LoadStats) receives
    the bytes this process read."""
    hf_cfg = read_hf_config(path)
    mtype = hf_cfg.get("model_type")
    spec = get_spec(mtype)
    cfg = spec.parse_config(hf_cfg)
    dt = _dtype(dtype)
    abstract = nnx.eval_shape(lambda: spec.build(cfg, dt, nnx.Rngs(0)))
    graphdef, abs_state = nnx.split(abstract)
    flat = {_path_str(p): v for p, v in nnx.to_flat_state(abs_state)}
    shardings = None
    if mesh is not None:
        rules = rules or shd.Rules()
        shardings = {_path_str(p): s for p, s in
                     nnx.to_flat_state(shd.param_shardings(abs_state, mesh, rules))}

    # the key maps name per-layer paths; a stacked parameter holds all its layers
    targets = {v: (real, i, shape) for real, var in flat.items()
               for v, i, shape in _per_layer(real, var.get_value().shape)}
    key_rules = spec.key_rules(cfg)
    ignore = [re.compile(r) for r in spec.ignore]
    files = _checkpoint_files(path)
    plan: dict[str, tuple[str, KeyRule]] = {}   # hf key -> (our per-layer path, rule)
    unexpected = []
    for keys in files.values():
        for key in keys:
            target = None
            for r in key_rules:
                target = r.match_hf(key)
                if target is not None:
                    break
            if target is not None and target in targets:
                plan[key] = (target, r)
            elif not any(p.match(key) for p in ignore):
                unexpected.append(key)
    missing = sorted(set(targets) - {t for t, _ in plan.values()})
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match model_type {mtype!r}: "
                         f"missing keys (our params) {missing}; unexpected HF keys "
                         f"{sorted(unexpected)}")

    from safetensors import safe_open
    file_of = {key: fname for fname, keys in files.items() for key in keys}
    by_real: dict[str, list[tuple[str, int | None, KeyRule]]] = {}
    for key, (target, rule) in plan.items():
        real, i, _ = targets[target]
        by_real.setdefault(real, []).append((key, i, rule))
    values: dict[str, jax.Array] = {}
    handles: dict[str, Any] = {}
    stats = stats if stats is not None else LoadStats()
    try:
        for real, parts in by_real.items():   # one (stacked) parameter at a time
            shape = tuple(flat[real].get_value().shape)
            readers = {}     # layer index (None: not stacked) -> read(ranges)
            for key, i, rule in parts:
                if file_of[key] not in handles:
                    handles[file_of[key]] = safe_open(file_of[key], "numpy").__enter__()
                want = shape if i is None else shape[1:]
                readers[i] = _shard_reader(handles[file_of[key]], key, rule, want, dt, stats)
            values[real] = _assemble(readers, shape, dt,
                                     shardings[real] if shardings else None)
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    state = nnx.from_flat_state([(p, v.replace(values[_path_str(p)]))
                                 for p, v in nnx.to_flat_state(abs_state)])
    model = nnx.merge(graphdef, state)
    if hasattr(model, "set_sharding"):
        model.set_sharding(mesh, rules)
    return model


def _dtype_name(dt) -> str:
    return jnp.dtype(dt).name


def save_pretrained(model: nnx.Module, path: str, *, max_shard_size: int | None = None) -> None:
    """Write config.json (v5) + safetensors with HF key names; sharded + index if max_shard_size."""
    from safetensors.numpy import save_file
    cfg = model.cfg
    spec = get_spec(cfg.model_type)
    rules = spec.key_rules(cfg)
    os.makedirs(path, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    dtype = None
    for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        full = np.asarray(jax.device_get(var.get_value()))
        dtype = dtype or full.dtype
        for ps, i, _ in _per_layer(_path_str(p), full.shape):
            for r in rules:
                key = r.match_ours(ps)
                if key is not None:
                    break
            if key is None:
                raise ValueError(f"no HF key rule for parameter {ps} (model_type "
                                 f"{cfg.model_type})")
            arr = full if i is None else full[i]
            tensors[key] = np.ascontiguousarray(r.transform.to_hf(arr))
    hf_cfg = spec.to_hf_config(cfg, _dtype_name(dtype or np.float32))
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(hf_cfg, f, indent=2, sort_keys=True)
    meta = {"format": "pt"}
    if max_shard_size is None:
        save_file(tensors, os.path.join(path, SAFE_SINGLE), metadata=meta)
        return
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for k in sorted(tensors):
        nbytes = tensors[k].nbytes
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][k] = tensors[k]
        size += nbytes
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(shard, os.path.join(path, fname), metadata=meta)
        weight_map.update({k: fname for k in shard})
    total = sum(t.nbytes for t in tensors.values())
    with open(os.path.join(path, SAFE_INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
