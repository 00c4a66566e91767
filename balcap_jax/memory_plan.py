"""Per-device memory plan, printed and checked before anything compiles.

Counts come from the checkpoint's config.json (or a preset), never from building the model, so
a plan for a 7B policy costs nothing. Estimates are deliberately simple and a little pessimistic:
parameters, gradients and optimiser moments are exact; the KV cache is exact for the sampler's
preallocated cache; activations are an estimate (stated in the item's note).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

__all__ = ["count_params", "MemoryPlan", "plan_memory", "device_memory_bytes"]

GiB = 1024 ** 3
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _text_cfg(c: dict) -> dict:
    return c.get("text_config") or c


def _decoder_params(t: dict, *, qkv_bias: bool, tied: bool) -> int:
    d, inter, v = t["hidden_size"], t["intermediate_size"], t["vocab_size"]
    h = t["num_attention_heads"]
    kv = t.get("num_key_value_heads", h)
    hd = t.get("head_dim") or d // h
    attn = d * h * hd + 2 * d * kv * hd + h * hd * d + (h * hd + 2 * kv * hd if qkv_bias else 0)
    layer = attn + 3 * d * inter + 2 * d
    return v * d * (1 if tied else 2) + t["num_hidden_layers"] * layer + d


def _qwen_vision_params(v: dict) -> int:
    dv, iv, out = v["hidden_size"], v["intermediate_size"], v["out_hidden_size"]
    patch = v.get("in_chans", 3) * v["temporal_patch_size"] * v["patch_size"] ** 2 * dv
    block = 2 * dv + (3 * dv * dv + 3 * dv) + (dv * dv + dv) + 2 * (dv * iv + iv) + (iv * dv + dv)
    m = v["spatial_merge_size"] ** 2 * dv
    merger = dv + (m * m + m) + (m * out + out)
    return patch + v["depth"] * block + merger


def _clip_params(v: dict, d_text: int) -> int:
    dv, iv, p = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    n = (v["image_size"] // p) ** 2 + 1
    emb = 3 * p * p * dv + dv + n * dv
    layer = 4 * dv + 4 * (dv * dv + dv) + (dv * iv + iv) + (iv * dv + dv)
    proj = dv * d_text + d_text + d_text * d_text + d_text
    return emb + 2 * dv + v["num_hidden_layers"] * layer + 2 * dv + proj


def count_params(hf_config: dict) -> dict:
    """Parameter counts by part: {"language": n, "vision": n} from an HF config dict."""
    mt = hf_config.get("model_type")
    t = _text_cfg(hf_config)
    tied = bool(hf_config.get("tie_word_embeddings", t.get("tie_word_embeddings", False)))
    if mt in ("qwen2_5_vl", "qwen2"):
        lang = _decoder_params(t, qkv_bias=True, tied=tied)
    elif mt in ("llava", "llama"):
        lang = _decoder_params(t, qkv_bias=False, tied=tied)
    else:
        raise ValueError(f"count_params: unsupported model_type {mt!r}")
    vision = 0
    if mt == "qwen2_5_vl":
        vision = _qwen_vision_params(hf_config["vision_config"])
    elif mt == "llava":
        vision = _clip_params(hf_config["vision_config"], t["hidden_size"])
    return {"language": lang, "vision": vision}


@dataclasses.dataclass
class MemoryPlan:
    items: list[tuple[str, float, str, str]]  # (name, bytes per device, knob, note)
    device_bytes: float | None

    @property
    def total(self) -> float:
        return sum(b for _, b, _, _ in self.items)

    def table(self) -> str:
        lines = [f"{'item':<22}{'GiB/device':>12}  note"]
        for name, b, _, note in self.items:
            lines.append(f"{name:<22}{b / GiB:>12.2f}  {note}")
        cap = "unknown (no limit reported by this backend)" if self.device_bytes is None else \
            f"{self.device_bytes / GiB:.2f}"
        lines.append(f"{'total':<22}{self.total / GiB:>12.2f}  device memory: {cap} GiB")
        return "\n".join(lines)

    def check(self, headroom: float = 0.9) -> None:
        """Raises MemoryError naming the largest item and the knob that shrinks it."""
        if self.device_bytes is None or self.total <= headroom * self.device_bytes:
            return
        name, b, knob, _ = max(self.items, key=lambda it: it[1])
        raise MemoryError(
            f"memory plan needs {self.total / GiB:.1f} GiB per device but only "
            f"{headroom * self.device_bytes / GiB:.1f} GiB ({headroom:.0%} of "
            f"{self.device_bytes / GiB:.1f}) is usable. Largest item: {name} "
            f"({b / GiB:.1f} GiB); to shrink it: {knob}.\n{self.table()}")


def plan_memory(hf_config: dict, *, mesh_shape: dict, param_dtype: str = "bfloat16",
                opt_dtype: str = "float32", rollouts_per_step: int, prompt_len: int,
                max_new_tokens: int, micro_batch: int, remat: bool, freeze_vision: bool,
                reference_model: bool, image_tokens: int = 1024,
                device_bytes: float | None = None, logprob_chunk: int = 256) -> MemoryPlan:
    """The plan for one device of a mesh {"data": d, "fsdp": f, "tensor": t}.

    Parameters and optimiser state are sharded over fsdp x tensor; rollouts and micro-batches
    over data x fsdp; the KV cache's heads over tensor.
    """
    counts = count_params(hf_config)
    n_all = counts["language"] + counts["vision"]
    n_train = counts["language"] + (0 if freeze_vision else counts["vision"])
    d_, f_, t_ = (int(mesh_shape.get(k, 1)) for k in ("data", "fsdp", "tensor"))
    shard = f_ * t_
    pb, ob = _BYTES[param_dtype], _BYTES[opt_dtype]
    t = _text_cfg(hf_config)
    d, layers, inter = t["hidden_size"], t["num_hidden_layers"], t["intermediate_size"]
    h = t["num_attention_heads"]
    kv, hd = t.get("num_key_value_heads", h), t.get("head_dim") or d // h
    batch_shards = d_ * f_
    rows = math.ceil(rollouts_per_step / batch_shards)
    seq = prompt_len + max_new_tokens
    kv_div = t_ if kv % t_ == 0 else 1
    shrink_state = "raise mesh.fsdp" + ("" if freeze_vision or not counts["vision"] else
                                        ", or train.freeze_vision=True")
    items = [
        ("parameters", n_all * pb / shard, "raise mesh.fsdp (shards parameters)",
         f"{n_all / 1e9:.2f}B params in {param_dtype}"),
        ("gradients", n_train * ob / shard, shrink_state,
         f"{n_train / 1e9:.2f}B trainable, {opt_dtype} accumulation"),
        ("optimizer state", 2 * n_train * ob / shard, shrink_state, "AdamW mu + nu"),
        ("optimizer update", n_train * ob / shard, "raise mesh.fsdp",
         "transient fp32 updates while the step is applied"),
    ]
    if reference_model:
        items.append(("reference model", n_all * pb / shard, "rl.beta=0 drops it, or raise "
                      "mesh.fsdp", "frozen copy for the KL term"))
    items.append(("rollout KV cache", rows * seq * layers * 2 * (kv // kv_div) * hd * pb,
                  "lower train.batch_size or sampling.num_samples, or raise mesh.data",
                  f"{rows} rollouts x {seq} tokens per device"))
    mrows = math.ceil(micro_batch / batch_shards)
    tok = mrows * seq
    per_layer = tok * (10 * d + 2 * inter // t_) * pb
    act = (tok * d * pb * layers + per_layer) if remat else per_layer * layers
    act += tok * 4 * 2  # fp32 log-probs + mask
    # the chunked log-prob path holds one [rows, chunk, V] fp32 logits block and its gradient
    act += 2 * mrows * min(seq, logprob_chunk) * t["vocab_size"] * 4 // (t_ if t_ > 1 else 1)
    vis = hf_config.get("vision_config")
    if vis and not freeze_vision:
        dv = vis["hidden_size"]
        npatch = image_tokens * vis.get("spatial_merge_size", 1) ** 2
        vdepth = vis.get("depth", vis.get("num_hidden_layers", 1))
        act += mrows * npatch * dv * pb * (vdepth if remat else 12 * vdepth)
    items.append(("activations (est.)", act,
                  "lower train.micro_batch_size" + ("" if remat else ", or train.remat=True"),
                  f"micro-batch {mrows} x {seq} tokens per device, remat={remat}"))
    return MemoryPlan(items, device_bytes)


def device_memory_bytes(device: Any = None) -> float | None:
    """Bytes the backend reports for one device, or None (CPU reports nothing)."""
    import jax
    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # some backends raise instead of returning None
        return None
    if not stats:
        return None
    return stats.get("bytes_limit") or None
