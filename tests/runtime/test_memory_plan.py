"""The memory planner's parameter counts equal transformers' own models of the real shapes.

Models are built on torch's meta device: exact shapes, no memory, no download.
"""
import pytest
import torch
import transformers

from balcap_jax.memory_plan import GiB, count_params, plan_memory
from balcap_jax.models.presets import preset

_CLASSES = {
    "qwen2_5_vl_3b": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
    "qwen2_5_vl_7b": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
    "qwen2_5_7b": ("Qwen2Config", "Qwen2ForCausalLM"),
    "llava_1_5_7b": ("LlavaConfig", "LlavaForConditionalGeneration"),
}


@pytest.mark.parametrize("name", sorted(_CLASSES))
def test_param_counts_equal_transformers(name):
    c = preset(name)
    cfg_cls, model_cls = (getattr(transformers, n) for n in _CLASSES[name])
    cfg = cfg_cls(**{k: v for k, v in c.items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        model = model_cls(cfg)
    vision = sum(p.numel() for n, p in model.named_parameters()
                 if "visual" in n or "vision_tower" in n or "multi_modal_projector" in n)
    total = sum(p.numel() for p in model.parameters())
    counts = count_params(c)
    assert counts["vision"] == vision
    assert counts["language"] + counts["vision"] == total


def _plan(**kw):
    args = dict(mesh_shape={"data": 1, "fsdp": 1, "tensor": 1}, rollouts_per_step=64,
                prompt_len=512, max_new_tokens=512, micro_batch=8, remat=True,
                freeze_vision=False, reference_model=False)
    args.update(kw)
    return plan_memory(preset("qwen2_5_vl_7b"), **args)


def test_plan_items_scale_with_sharding_and_options():
    one = _plan()
    eight = _plan(mesh_shape={"data": 1, "fsdp": 8, "tensor": 1})
    by = lambda p: {it.name: it.bytes for it in p.items}
    # parameters and optimiser state shard over fsdp exactly
    assert by(eight)["parameters"] == pytest.approx(by(one)["parameters"] / 8)
    assert by(eight)["optimizer state"] == pytest.approx(by(one)["optimizer state"] / 8)
    # AdamW in fp32: two moments of 4 bytes per trainable parameter
    n = sum(count_params(preset("qwen2_5_vl_7b")).values())
    assert by(one)["optimizer state"] == 8 * n
    assert "reference model" not in by(one) and "reference model" in by(_plan(reference_model=True))
    frozen = _plan(freeze_vision=True)
    assert by(frozen)["optimizer state"] < by(one)["optimizer state"]
    assert by(_plan(remat=False))["activations (est.)"] > by(one)["activations (est.)"]
    # bf16 params train through a float32 master copy of the trainable ones; float32 has none
    assert by(one)["master weights"] == 4 * n
    assert by(frozen)["master weights"] < by(one)["master weights"]
    assert "master weights" not in by(_plan(param_dtype="float32"))


def test_plan_that_cannot_fit_names_largest_item_and_knob():
    plan = _plan(device_bytes=16 * GiB)
    with pytest.raises(MemoryError, match=r"Largest item: optimizer state.*mesh.fsdp"):
        plan.check()
    _plan(mesh_shape={"data": 1, "fsdp": 16, "tensor": 1}, device_bytes=80 * GiB).check()


def _config(*overrides):
    """configs/qwen.py:3b with --config.* style overrides, as --plan_only reads it."""
    import os
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from balcap_jax.config import load_config_file
    c = load_config_file(os.path.join(root, "configs/qwen.py"), "3b")
    for key, value in overrides:
        node = c
        *parents, leaf = key.split(".")
        for k in parents:
            node = node[k]
        node[leaf] = value
    return c


def test_plan_only_counts_the_in_process_judges():
    """--plan_only with the shipped in-process judges (7B Qwen2.5-VL + 7B Qwen2.5, planned from
    their presets): their bf16 weights are in the plan, exactly 2 bytes per parameter sharded
    like the policy's, plus their scoring caches; remote judges add nothing."""
    from balcap_jax import main
    from balcap_jax.build import memory_plan
    sizes = {"data": 1, "fsdp": 8, "tensor": 1}
    plan = memory_plan(_config(("mesh.fsdp", 8)), sizes, query_device=False)
    by = {it.name: it for it in plan.items}
    mm = by["judge weights: Qwen2.5-VL-7B-Instruct"]
    text = by["judge weights: Qwen2.5-7B-Instruct"]
    assert mm.bytes == 2 * sum(count_params(preset("qwen2_5_vl_7b")).values()) / 8
    assert text.bytes == 2 * sum(count_params(preset("qwen2_5_7b")).values()) / 8
    assert by["judge caches: Qwen2.5-VL-7B-Instruct (est.)"].phase == "scoring"
    remote = memory_plan(_config(("mesh.fsdp", 8), ("judges.backend", "remote")), sizes,
                         query_device=False)
    assert not [it for it in remote.items if it.name.startswith("judge")]
    assert plan.total - remote.total >= mm.bytes + text.bytes
    assert "judge weights: Qwen2.5-VL-7B-Instruct" in main.plan(_config(("mesh.fsdp", 8)))


def test_a_plan_that_fits_only_without_the_judges_names_them():
    """3B on 4 x 40 GB with batch 16: the policy fits, the judges' 30 GiB of weights (7.4 GiB a
    device) tip it over. The message names the judges and how to move them; judges.devices=4
    gives them four devices and a plan (and a check) of their own."""
    from balcap_jax import main
    from balcap_jax.build import memory_plan
    sizes = {"data": 1, "fsdp": 4, "tensor": 1}
    over = (("mesh.fsdp", 4), ("mesh.device_memory_gb", 40.0), ("train.batch_size", 16),
            ("train.micro_batch_size", 8))
    memory_plan(_config(*over, ("judges.backend", "remote")), sizes).check()
    with pytest.raises(MemoryError, match=r"Without the in-process judges.*"
                                          r"judges.backend=remote"):
        memory_plan(_config(*over), sizes).check()
    out = main.plan(_config(*over))
    assert "DOES NOT FIT" in out and "judge weights: Qwen2.5-VL-7B-Instruct" in out
    split = memory_plan(_config(*over, ("judges.devices", 4)), sizes)
    assert not [it for it in split.items if it.name.startswith("judge")]
    assert [o.title for o in split.others] == ["judge devices (4)"]
    assert [it.name for it in split.others[0].items][::2] == [
        "judge weights: Qwen2.5-VL-7B-Instruct", "judge weights: Qwen2.5-7B-Instruct"]
    split.check()


def test_lora_plan_counts_peft_adapters_and_shrinks_state():
    """LoRA: the adapter count equals peft's on transformers' 3B (meta device); the optimiser
    state and gradients shrink to the adapters'; NF4 stores the adapted kernels in ~4.5 bits;
    bf16 moments halve AdamW's state and Adafactor's is under 1/64 of it."""
    from peft import LoraConfig, get_peft_model

    from balcap_jax.memory_plan import lora_counts
    c = preset("qwen2_5_vl_3b")
    cfg = transformers.Qwen2_5_VLConfig(**{k: v for k, v in c.items()
                                           if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        model = transformers.Qwen2_5_VLForConditionalGeneration(cfg)
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    peft_model = get_peft_model(model, LoraConfig(
        r=16, target_modules=r".*language_model.*\.(" + "|".join(names) + ")"))
    want = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    adapters, adapted = lora_counts(c, 16)
    assert adapters == want
    adapters, adapted = lora_counts(preset("qwen2_5_vl_7b"), 16)     # _plan's model
    by = lambda p: {it.name: it.bytes for it in p.items}
    full, lo = by(_plan()), by(_plan(lora_rank=16))
    assert lo["LoRA adapters"] == 4 * adapters and "master weights" not in lo
    assert lo["optimizer state"] == 8 * adapters and lo["gradients"] == 4 * adapters
    assert lo["parameters"] == full["parameters"]
    nf4 = by(_plan(lora_rank=16, lora_quantize="nf4"))
    assert full["parameters"] - nf4["parameters"] == pytest.approx(adapted * (2 - 0.5625))
    assert by(_plan(moment_dtype="bfloat16"))["optimizer state"] == full["optimizer state"] / 2
    assert by(_plan(optimizer="adafactor"))["optimizer state"] < full["optimizer state"] / 64
