"""Low-rank adapters (LoRA) and a quantised frozen base (QLoRA) on our own projections.

Why not flax's `nnx.LoRA` or qwix: `nnx.LoRA` wraps a 2-D `nnx.Linear` as a new module, which
would change our parameter paths (and the HF key maps built on them) and cannot hold our
multi-axis kernels ([D, H, hd] attention projections). qwix adds adapters by intercepting the
matmuls of modules matched by a path regex while it runs the model once on example inputs; our
layers are one module with stacked parameters run under `lax.scan` (and q/k/v fused into one
matmul), so its adapters would not be per layer without rework. Adapters as variables of
`Proj` itself are stacked with their layer for free and keep every key map.

An adapted `layers.Proj` computes ``x W + (alpha / r) (x A) B`` with A [in..., r] drawn as
PEFT does (uniform, bound 1/sqrt(fan_in)) and B [r, out...] zero, so a fresh adapter leaves
the model's logits exactly unchanged. A and B are `LoRAParam`s, a subclass of nnx.Param: the
trainer splits the model on that type, so the optimiser, the gradient accumulator and the
checkpoint hold the adapters alone while the base weights ride along as constants (no
gradient is computed for them, no moments are kept). Stacked layers (models.stack) get
stacked adapters, so scan and the unrolled decode slice them with their layer.

With `quantize` the adapted kernels are stored as int8 or NF4 codes (models.quant) and
dequantised inside each matmul.

Exports: `merged(model)` is a plain model with W + (alpha / r) A B folded in (save it with
models.save_pretrained); `save_peft(model, path, base)` writes the adapters in PEFT's layout
(adapter_config.json, adapter_model.safetensors) for `peft.PeftModel.from_pretrained`.
"""
from __future__ import annotations

import json
import math
import os
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from balcap_jax import sharding as shd
from balcap_jax.models import hf, quant
from balcap_jax.models.layers import Proj

__all__ = ["LoRAParam", "DEFAULT_MODULES", "PARTS", "is_vision_path", "apply_lora", "adapted",
           "has_lora", "trainable", "without_adapters", "merged", "save_peft", "peft_settings",
           "load_peft"]

DEFAULT_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PARTS = ("language", "projector", "vision")
_PROJECTORS = ("merger", "multi_modal_projector")


class LoRAParam(nnx.LoRAParam):
    """An adapter matrix: the only trainable parameters of a LoRA run (a flax nnx.LoRAParam,
    so nnx filters written for flax's own LoRA select ours too)."""


def is_vision_path(path) -> bool:
    """A parameter path inside the vision tower (Qwen2.5-VL `visual`, LLaVA `vision_tower`;
    the projector of Qwen2.5-VL, `visual/merger`, included)."""
    return any(str(getattr(p, "key", p)).startswith(("visual", "vision")) for p in path)


def _part(path: tuple) -> str:
    projector = any(str(p) in _PROJECTORS for p in path)
    if is_vision_path(path):
        return "projector" if projector else "vision"
    return "projector" if projector else "language"


def _targets(model, modules: Sequence[str], parts: Sequence[str]) -> list[tuple[tuple, Proj]]:
    bad = sorted(set(parts) - set(PARTS))
    if bad:
        raise ValueError(f"model.lora.parts {bad}: choose from {PARTS}")
    out = []
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Proj) and path and str(path[-1]) in modules \
                and _part(path) in parts:
            out.append((tuple(path), node))
    return out


def adapted(model) -> list[tuple[tuple, Proj]]:
    """(path, projection) of every adapted projection."""
    return [(tuple(p), n) for p, n in nnx.iter_graph(model)
            if isinstance(n, Proj) and n.lora_a is not None]


def has_lora(model) -> bool:
    return bool(adapted(model))


def _split_names(node: Proj):
    k = node.kernel
    lead = k.ndim - len(node.in_shape) - len(node.out_shape)
    names = tuple(k.get_metadata().get("out_sharding") or (None,) * k.ndim)
    n_in = len(node.in_shape)
    return lead, names[:lead], names[lead:lead + n_in], names[lead + n_in:]


def _build(fn, names, shapes, mesh, rules, *args):
    """fn(*args) computed by one jit whose outputs land on `mesh` by their logical `names`
    (a tuple of name tuples for several outputs): every process runs the same program, so
    this works on several hosts, and no array is gathered on one device first."""
    if mesh is None:
        return jax.jit(fn)(*args)
    single = isinstance(names[0], (str, type(None)))
    shard = [shd.named_sharding(n, s, mesh, rules) for n, s in
             (zip([names], [shapes]) if single else zip(names, shapes))]
    return jax.jit(fn, out_shardings=shard[0] if single else tuple(shard))(*args)


def apply_lora(model, *, rank: int, alpha: float, modules: Iterable[str] = DEFAULT_MODULES,
               parts: Iterable[str] = ("language",), quantize: str = "", seed: int = 0,
               mesh=None, rules=None) -> list[str]:
    """Adds float32 adapters of `rank` to the projections named `modules` in `parts` of
    `model` (in place; placed on `mesh` by their logical axes) and, with `quantize` ("int8" or
    "nf4"), stores those projections' kernels quantised. Returns the adapted paths."""
    modules, parts = tuple(modules), tuple(parts)
    if rank < 1:
        raise ValueError(f"model.lora.rank must be >= 1, got {rank}")
    targets = _targets(model, modules, parts)
    if not targets:
        raise ValueError(f"model.lora.modules {list(modules)} match no projection in the parts "
                         f"{list(parts)} of this {type(model).__name__}; names are the HF module "
                         "names, e.g. q_proj, o_proj, gate_proj (qkv in a Qwen vision tower)")
    rules = rules or (shd.Rules() if mesh is not None else None)
    key = jax.random.key(seed)
    for _, node in targets:
        lead, lead_names, in_names, out_names = _split_names(node)
        lead_shape = tuple(node.kernel.shape[:lead])
        fan_in = math.prod(node.in_shape)
        key, sub = jax.random.split(key)
        bound = 1.0 / math.sqrt(fan_in)
        a_shape = lead_shape + node.in_shape + (rank,)
        b_shape = lead_shape + (rank,) + node.out_shape
        a_names, b_names = lead_names + in_names + (None,), lead_names + (None,) + out_names
        a = _build(lambda k, s=a_shape, lim=bound: jax.random.uniform(
            k, s, jnp.float32, -lim, lim), a_names, a_shape, mesh, rules, sub)
        b = _build(lambda s=b_shape: jnp.zeros(s, jnp.float32), b_names, b_shape, mesh, rules)
        node.lora_a = nnx.data(LoRAParam(a, out_sharding=a_names, eager_sharding=False))
        node.lora_b = nnx.data(LoRAParam(b, out_sharding=b_names, eager_sharding=False))
        node.lora_scale = float(alpha) / rank
        if quantize:
            names = lead_names + in_names + out_names
            in_axes = tuple(range(lead, lead + len(node.in_shape)))
            shapes = jax.eval_shape(lambda w, ax=in_axes: quant.quantize(quantize, w, ax),
                                    node.kernel[...])
            s_names = (tuple(None if i in in_axes else n for i, n in enumerate(names))
                       if quantize == "int8" else names[:-1] + (None,))
            codes, scale = _build(lambda w, ax=in_axes: quant.quantize(quantize, w, ax),
                                  (names, s_names), tuple(x.shape for x in shapes), mesh, rules,
                                  node.kernel[...])
            node.kernel = nnx.data(nnx.Param(codes, out_sharding=names, eager_sharding=False))
            node.kernel_scale = nnx.data(nnx.Param(scale, out_sharding=s_names,
                                                   eager_sharding=False))
            node.quant = quantize
    return ["/".join(map(str, p)) for p, _ in targets]


def trainable(model):
    """The nnx filter of what trains: the adapters of a LoRA model, else every nnx.Param."""
    return LoRAParam if has_lora(model) else nnx.Param


def without_adapters(model):
    """The model with its adapters off: a new module over the same base arrays (no copy; a
    quantised base stays quantised). For a judge that shares the policy's frozen base."""
    graphdef, state = nnx.split(model)
    view = nnx.merge(graphdef, state)
    for _, node in adapted(view):
        node.lora_a = node.lora_b = None
        node.lora_scale = 0.0
    return view


def merged(model, dtype=None):
    """A plain model (no adapters, no quantisation) with the adapters folded into the kernels,
    in `dtype` (default: the dtype of the unadapted parameters)."""
    view = without_adapters(model)
    pairs = dict(adapted(model))
    if dtype is None:   # the policy's dtype: that of its unadapted floating parameters
        dtype = next(v.get_value().dtype for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
                     if not isinstance(v, LoRAParam) and str(p[-1]) != "kernel_scale"
                     and jnp.issubdtype(v.get_value().dtype, jnp.floating))
    for path, node in nnx.iter_graph(view):
        path = tuple(path)
        if path not in pairs:
            continue
        src = pairs[path]
        names = src.kernel.get_metadata().get("out_sharding")
        node.kernel = nnx.data(nnx.Param(src.dense(jnp.float32).astype(dtype),
                                         out_sharding=names, eager_sharding=False))
        node.kernel_scale = None
        node.quant = None
    return view


def _module_name(rule: hf.KeyRule, ours_path: str) -> str:
    """The projection's module name in transformers v5 (its first alias spelling, else the
    hub key) without `.weight`: the name peft targets."""
    fields = rule._regex(rule.ours).match(ours_path).groupdict()
    return (rule.aliases[0] if rule.aliases else rule.hf).format(**fields)[:-len(".weight")]


def save_peft(model, path: str, *, base_model: str = "") -> list[str]:
    """Writes the adapters as a PEFT LoRA adapter directory; returns the adapted module
    names. `base_model` goes to adapter_config.json's base_model_name_or_path."""
    from safetensors.numpy import save_file
    pairs = adapted(model)
    if not pairs:
        raise ValueError("the model has no adapters to save (model.lora.rank is 0)")
    rules = hf.get_spec(model.cfg.model_type).key_rules(model.cfg)
    tensors, names, rank, scale = {}, [], None, None
    for mpath, node in pairs:
        a = np.asarray(jax.device_get(node.lora_a[...]), np.float32)
        b = np.asarray(jax.device_get(node.lora_b[...]), np.float32)
        rank, scale = a.shape[-1], node.lora_scale
        kpath = "/".join(map(str, mpath)) + "/kernel"
        kshape = tuple(node.kernel.shape)
        for ps, i, _ in hf._per_layer(kpath, kshape):
            key = rule = None
            for rule in rules:
                key = rule.match_ours(ps)
                if key is not None:
                    break
            if key is None:
                raise ValueError(f"no HF key rule for adapted projection {ps}")
            ai, bi = (a, b) if i is None else (a[i], b[i])
            module = _module_name(rule, ps)
            names.append(module)
            prefix = f"base_model.model.{module}"
            tensors[prefix + ".lora_A.weight"] = np.ascontiguousarray(ai.reshape(-1, rank).T)
            tensors[prefix + ".lora_B.weight"] = np.ascontiguousarray(bi.reshape(rank, -1).T)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": None, "r": int(rank),
              "lora_alpha": float(scale * rank), "lora_dropout": 0.0, "bias": "none",
              "target_modules": sorted(names), "base_model_name_or_path": base_model,
              "fan_in_fan_out": False, "init_lora_weights": True, "use_rslora": False,
              "use_dora": False, "modules_to_save": None, "inference_mode": True}
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return sorted(names)


def peft_settings(path: str) -> dict:
    """rank, alpha, modules and parts of a PEFT LoRA adapter directory (its
    adapter_config.json), as `apply_lora` takes them."""
    with open(os.path.join(path, "adapter_config.json")) as f:
        c = json.load(f)
    if c.get("peft_type") != "LORA" or c.get("use_dora") or c.get("use_rslora"):
        raise ValueError(f"{path}: a plain LoRA adapter is needed (peft_type LORA, no DoRA or "
                         f"rsLoRA); got {c.get('peft_type')}")
    targets = c["target_modules"]
    targets = [targets] if isinstance(targets, str) else list(targets)
    return {"rank": int(c["r"]), "alpha": float(c["lora_alpha"]),
            "modules": tuple(sorted({t.rsplit(".", 1)[-1] for t in targets})),
            "parts": tuple(sorted({_part(tuple(t.split("."))) for t in targets}))}


def load_peft(model, path: str) -> int:
    """Reads a PEFT LoRA adapter directory (`save_peft`'s, or peft's for the same base) into
    the model's adapters (`apply_lora` with `peft_settings(path)` first); returns the number
    of projections read. The inverse of save_peft's layout: lora_A [r, in], lora_B [out, r]."""
    from safetensors.numpy import load_file
    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    pairs = adapted(model)
    if not pairs:
        raise ValueError("the model has no adapters to load into: apply_lora first")
    rules = hf.get_spec(model.cfg.model_type).key_rules(model.cfg)
    n = 0
    for mpath, node in pairs:
        a = np.array(jax.device_get(node.lora_a[...]), np.float32)
        b = np.array(jax.device_get(node.lora_b[...]), np.float32)
        rank = a.shape[-1]
        kpath = "/".join(map(str, mpath)) + "/kernel"
        for ps, i, _ in hf._per_layer(kpath, tuple(node.kernel.shape)):
            rule = next((r for r in rules if r.match_ours(ps) is not None), None)
            if rule is None:
                raise ValueError(f"no HF key rule for adapted projection {ps}")
            fields = rule._regex(rule.ours).match(ps).groupdict()
            names = [t.format(**fields)[:-len(".weight")] for t in (*rule.aliases, rule.hf)]
            key = next((f"base_model.model.{m}" for m in names
                        if f"base_model.model.{m}.lora_A.weight" in tensors), None)
            if key is None:
                raise ValueError(f"{path}: no adapter for {names[0]} (looked for "
                                 f"base_model.model.<{' | '.join(names)}>.lora_A.weight)")
            la, lb = tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"]
            if la.shape[0] != rank or lb.shape[1] != rank:
                raise ValueError(f"{path}: {key} has rank {la.shape[0]}, the model {rank}")
            at, bt = (a, b) if i is None else (a[i], b[i])
            at[...] = la.T.reshape(at.shape)
            bt[...] = lb.T.reshape(bt.shape)
            n += 1
        node.lora_a[...] = jax.device_put(a, node.lora_a[...].sharding)
        node.lora_b[...] = jax.device_put(b, node.lora_b[...].sharding)
    return n
