"""Per-device memory plan, printed and checked before anything compiles.

Counts come from the checkpoint's config.json (or a preset), never from building the model, so
a plan for a 7B policy costs nothing. Estimates are deliberately simple and a little pessimistic:
parameters, gradients and optimiser moments are exact; the KV cache is exact for the sampler's
preallocated cache; activations are an estimate (stated in the item's note).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

__all__ = ["count_params", "lora_counts", "Item", "MemoryPlan", "plan_memory", "judge_items",
           "device_memory_bytes"]

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


def matmul_params(hf_config: dict) -> tuple[int, int]:
    """(the decoder layers' projection weights, the LM head's) from an HF config dict: what each
    forwarded token multiplies through, and what each scored token adds (FLOPs = 6 x these x
    tokens; a decode step reads them). The embedding table is a gather (no FLOPs, one row read
    per token), so an untied model's table counts in neither; a tied one's is the LM head.
    Biases and norms are left out (well under 0.1%)."""
    t = _text_cfg(hf_config)
    d, f, v, h = t["hidden_size"], t["intermediate_size"], t["vocab_size"], t["num_attention_heads"]
    hd = t.get("head_dim") or d // h
    q, kv = h * hd, t.get("num_key_value_heads", h) * hd
    return t["num_hidden_layers"] * (d * (q + 2 * kv) + q * d + 3 * d * f), d * v


class Item(NamedTuple):
    name: str
    bytes: float        # per device
    knob: str           # the setting that shrinks it
    note: str
    phase: str = "always"   # always | step (the policy's rollout and update) | scoring


# The policy's rollout and update transients are summed (a little pessimistic: on an H200 a 3B
# step with 512 rollouts of 640 tokens peaked at 82.8 GiB against a plan of 88.5); the judges'
# scoring caches live only while the step scores, when neither exists, so the peak takes the
# larger of the two phases on top of what is always held.
_PHASES = ("step", "scoring")


@dataclasses.dataclass
class MemoryPlan:
    items: list[Item]
    device_bytes: float | None
    title: str = "policy devices"
    others: list["MemoryPlan"] = dataclasses.field(default_factory=list)  # e.g. judge devices

    def _sum(self, phase: str) -> float:
        return sum(it.bytes for it in self.items if it.phase == phase)

    @property
    def total(self) -> float:
        return self._sum("always") + max(self._sum(p) for p in _PHASES)

    def table(self) -> str:
        w = max([28] + [len(it.name) + 2 for it in self.items])
        lines = [f"[{self.title}]", f"{'item':<{w}}{'GiB/device':>12}  {'phase':<8} note"]
        for it in self.items:
            lines.append(f"{it.name:<{w}}{it.bytes / GiB:>12.2f}  {it.phase:<8} {it.note}")
        cap = "unknown (no limit reported by this backend)" if self.device_bytes is None else \
            f"{self.device_bytes / GiB:.2f}"
        peak = max(_PHASES, key=self._sum)
        lines.append(f"{'total':<{w}}{self.total / GiB:>12.2f}  always + {peak} (the larger "
                     f"phase); device memory: {cap} GiB")
        return "\n".join(lines + [o.table() for o in self.others])

    def check(self, headroom: float = 0.9) -> None:
        """Raises MemoryError naming the largest item and the knob that shrinks it; when
        in-process judges are what tips the plan over, the message says so and how to move
        them."""
        for other in self.others:
            other.check(headroom)
        if self.device_bytes is None or self.total <= headroom * self.device_bytes:
            return
        usable = headroom * self.device_bytes
        peak = max(_PHASES, key=self._sum)
        live = [it for it in self.items if it.phase in ("always", peak)]
        it = max(live, key=lambda x: x.bytes)
        msg = (f"[{self.title}] memory plan needs {self.total / GiB:.1f} GiB per device but only "
               f"{usable / GiB:.1f} GiB ({headroom:.0%} of {self.device_bytes / GiB:.1f}) is "
               f"usable. Largest item: {it.name} ({it.bytes / GiB:.1f} GiB); to shrink it: "
               f"{it.knob}.")
        judges = [x for x in self.items if x.name.startswith("judge")]
        if judges:
            without = MemoryPlan([x for x in self.items if x not in judges], self.device_bytes)
            share = sum(x.bytes for x in judges if x.phase == "always")
            if without.total <= usable:
                msg += (f" Without the in-process judges ({share / GiB:.1f} GiB of weights "
                        "per device, plus their scoring caches) the policy fits: "
                        f"{JUDGE_KNOB}.")
        raise MemoryError(f"{msg}\n{self.table()}")


JUDGE_KNOB = ("serve the judges elsewhere (judges.backend=remote with judges.base_url), use "
              "smaller judge checkpoints (judges.multimodal_path / judges.text_path), give them "
              "their own devices (judges.devices), or add devices (mesh.fsdp)")


def _kv_bytes_per_token(t: dict, dtype_bytes: int, tensor: int) -> int:
    h = t["num_attention_heads"]
    kv, hd = t.get("num_key_value_heads", h), t.get("head_dim") or t["hidden_size"] // h
    kv_div = tensor if kv % tensor == 0 else 1
    return t["num_hidden_layers"] * 2 * (kv // kv_div) * hd * dtype_bytes


def _vision_attention(vis: dict | None, images: int, image_tokens: int, *,
                      training: bool = False) -> float:
    """Bytes of the vision tower's attention transient: float32 scores and probabilities
    (and, in the update, their gradients) of one chunk of attention rows. Qwen2.5-VL's blocks
    run their rows in chunks of at most ATTN_SCORES entries per head (qwen2_5_vl_vision); a
    CLIP tower attends over all images at once."""
    if not vis or images <= 0:
        return 0.0
    factor = 4 if training else 2
    if "spatial_merge_size" in vis:          # Qwen2.5-VL
        from balcap_jax.models.qwen2_5_vl_vision import ATTN_SCORES
        slot = image_tokens * vis["spatial_merge_size"] ** 2
        window_row = min(256, images * slot)           # the model's default window rows
        widest = 0
        for rows, r in ((images, slot), (-(-images * slot // max(window_row - 63, 1)),
                                         window_row)):
            widest = max(widest, min(rows * r * r, max(ATTN_SCORES, r * r)))
        return float(factor * vis["num_heads"] * widest * 4)
    slot = (vis["image_size"] // vis["patch_size"]) ** 2 + 1   # CLIP: grid + class token
    return float(factor * images * vis["num_attention_heads"] * slot * slot * 4)


def plan_memory(hf_config: dict, *, mesh_shape: dict, param_dtype: str = "bfloat16",
                opt_dtype: str = "float32", rollouts_per_step: int, prompt_len: int,
                max_new_tokens: int, micro_batch: int, remat: bool, freeze_vision: bool,
                reference_model: bool, image_tokens: int = 1024, prompts_per_step: int = 0,
                device_bytes: float | None = None, logprob_chunk: int = 256,
                rollout_replicated: bool = False, optimizer: str = "adamw",
                moment_dtype: str = "float32", lora_rank: int = 0,
                lora_quantize: str = "") -> MemoryPlan:
    """The plan for one device of a mesh {"data": d, "fsdp": f, "tensor": t}.

    Parameters, master weights and optimiser state are sharded over fsdp x tensor; rollouts and
    micro-batches over data x fsdp; the KV cache's heads over tensor. The vision tower's inputs
    are not batch-sharded: every device encodes every image of a prefill (`prompts_per_step`)
    or a micro-batch.
    """
    counts = count_params(hf_config)
    n_all = counts["language"] + counts["vision"]
    n_train = counts["language"] + (0 if freeze_vision else counts["vision"])
    n_adapt = 0          # LoRA: the adapted (possibly quantised) language projections
    if lora_rank:
        n_train, n_adapt = lora_counts(hf_config, lora_rank)
    d_, f_, t_ = (int(mesh_shape.get(k, 1)) for k in ("data", "fsdp", "tensor"))
    shard = f_ * t_
    pb, ob = _BYTES[param_dtype], _BYTES[opt_dtype]
    t = _text_cfg(hf_config)
    d, layers, inter = t["hidden_size"], t["num_hidden_layers"], t["intermediate_size"]
    batch_shards = d_ * f_
    rows = math.ceil(rollouts_per_step / batch_shards)
    seq = prompt_len + max_new_tokens
    shrink_state = "raise mesh.fsdp" + ("" if freeze_vision or not counts["vision"] else
                                        ", or train.freeze_vision=True")
    base_bytes = n_all * pb
    note = f"{n_all / 1e9:.2f}B params in {param_dtype}"
    if lora_rank:
        shrink_state = "lower model.lora.rank"
        if lora_quantize:
            from balcap_jax.models.quant import storage_bytes
            base_bytes = (n_all - n_adapt) * pb + storage_bytes(lora_quantize, n_adapt)
            note += f", {n_adapt / 1e9:.2f}B of them in {lora_quantize}"
    items = [Item("parameters", base_bytes / shard, "raise mesh.fsdp (shards parameters)" +
                  ("" if lora_quantize or not lora_rank else ", or model.lora.quantize=nf4"),
                  note)]
    if lora_rank:
        items.append(Item("LoRA adapters", n_train * 4 / shard, shrink_state,
                          f"{n_train / 1e6:.1f}M float32 adapter params, rank {lora_rank}"))
    elif pb < 4:
        items.append(Item("master weights", n_train * 4 / shard, shrink_state,
                          "float32 copy of the trainable low-precision params"))
    if optimizer == "adafactor":
        state = Item("optimizer state", n_train * 4 * 2 / 128 / shard, shrink_state,
                     "Adafactor: factored second moments, <= 1/64 of the params")
    else:
        mb = _BYTES[moment_dtype]
        state = Item("optimizer state", 2 * n_train * mb / shard, shrink_state + (
            "" if mb < 4 else ", or train.moment_dtype=bfloat16 / train.optimizer=adafactor"),
            f"AdamW mu + nu in {moment_dtype}")
    items += [
        state,
        Item("gradients", n_train * ob / shard, shrink_state,
             f"{n_train / 1e9:.2f}B trainable, {opt_dtype} accumulation", "step"),
        Item("optimizer update", n_train * ob / shard, "raise mesh.fsdp",
             "transient fp32 updates while the step is applied", "step"),
    ]
    if reference_model:
        ref = n_train * 4 if lora_rank else n_all * pb   # LoRA: the base plus fresh adapters
        items.append(Item("reference model", ref / shard, "rl.beta=0 drops it, or raise "
                          "mesh.fsdp", "frozen copy for the KL term" +
                          (" (the initial adapters)" if lora_rank else "")))
    if rollout_replicated and f_ > 1:
        items.append(Item("rollout weights", n_all * pb / t_, "train.rollout_layout=fsdp",
                          "a copy gathered over fsdp for decoding, once per step", "step"))
    items.append(Item("rollout KV cache", rows * seq * _kv_bytes_per_token(t, pb, t_),
                      "lower train.batch_size or sampling.num_samples, or raise mesh.data",
                      f"{rows} rollouts x {seq} tokens per device", "step"))
    vis = hf_config.get("vision_config")
    if vis and prompts_per_step:
        items.append(Item("prefill vision attn (est.)",
                          _vision_attention(vis, prompts_per_step, image_tokens),
                          "lower data.max_image_tokens or train.batch_size",
                          f"{prompts_per_step} images x {image_tokens} tokens, fp32 scores "
                          "of one chunk of rows", "step"))
    mrows = math.ceil(micro_batch / batch_shards)
    tok = mrows * seq
    per_layer = tok * (10 * d + 2 * inter // t_) * pb
    act = (tok * d * pb * layers + per_layer) if remat else per_layer * layers
    act += tok * 4 * 2  # fp32 log-probs + mask
    # the chunked log-prob path holds one [rows, chunk, V] fp32 logits block and its gradient
    act += 2 * mrows * min(seq, logprob_chunk) * t["vocab_size"] * 4 // (t_ if t_ > 1 else 1)
    if vis:
        # a frozen tower still runs its backward inside the update, so it keeps activations
        dv = vis["hidden_size"]
        npatch = image_tokens * vis.get("spatial_merge_size", 1) ** 2
        vdepth = vis.get("depth", vis.get("num_hidden_layers", 1))
        act += micro_batch * npatch * dv * pb * (vdepth if remat else 12 * vdepth)
        act += _vision_attention(vis, micro_batch, image_tokens, training=True)
    items.append(Item("activations (est.)", act,
                      "lower train.micro_batch_size" + ("" if remat else ", or train.remat=True"),
                      f"micro-batch {mrows} x {seq} tokens per device, remat={remat}", "step"))
    return MemoryPlan(items, device_bytes)


def lora_counts(hf_config: dict, rank: int) -> tuple[int, int]:
    """(adapter params, params of the adapted kernels) for rank-`rank` adapters on every
    attention and MLP projection of the language model (model.lora's default targets)."""
    t = _text_cfg(hf_config)
    d, inter, layers = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"]
    h = t["num_attention_heads"]
    kv = t.get("num_key_value_heads", h)
    hd = t.get("head_dim") or d // h
    shapes = [(d, h * hd), (d, kv * hd), (d, kv * hd), (h * hd, d),
              (d, inter), (d, inter), (inter, d)]
    return (layers * sum(rank * (i + o) for i, o in shapes),
            layers * sum(i * o for i, o in shapes))


def judge_items(name: str, hf_config: dict, *, dtype: str, shard: int, batch_shards: int,
                caption_tokens: int, image_tokens: int, list_max_tokens: int,
                decode_batch: int, prefix_batch: int, item_tokens: int,
                tensor: int = 1, text_roles: bool = True) -> list[Item]:
    """An in-process judge: its weights (sharded like the policy's over `shard` devices) and
    its scoring caches (est.): the larger of a decomposition's greedy decode (decode_batch
    rows of a caption prompt + list_max_tokens) and a yes/no pass over the prefix tree (heads
    and their extensions, each holding a cache of head + shared slots, and the items packed
    item_tokens to a row beside each of them, reading that row in place).
    Multimodal judges also count their vision attention for prefix_batch images."""
    counts = count_params(hf_config)
    n = counts["language"] + counts["vision"]
    b = _BYTES[dtype]
    t = _text_cfg(hf_config)
    per_tok = _kv_bytes_per_token(t, b, tensor)
    rows = 2 * prefix_batch                         # heads and their extensions
    caption = 1 << max(caption_tokens + 256 - 1, 1).bit_length()     # caption prompt bucket
    slots = 0
    if hf_config.get("vision_config"):               # verification / pointability: image heads
        slots = rows * (image_tokens + 64 + 256) + prefix_batch * item_tokens
    if text_roles:                                   # decomposition, coverage, linguistic
        slots = max(slots, rows * (64 + caption) + prefix_batch * item_tokens,
                    decode_batch * (caption + list_max_tokens))
    cache = slots / batch_shards * per_tok
    cache += decode_batch * t["vocab_size"] * 4 if text_roles else 0   # fp32 decode logits
    cache += _vision_attention(hf_config.get("vision_config"), prefix_batch, image_tokens)
    return [Item(f"judge weights: {name}", n * b / shard, JUDGE_KNOB,
                 f"{n / 1e9:.2f}B params in {dtype}"),
            Item(f"judge caches: {name} (est.)", cache,
                 "lower judges.prefix_batch / item_tokens / decode_batch",
                 f"KV for {slots} slots, while scoring", "scoring")]


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
