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
    by = lambda p: {n: b for n, b, _, _ in p.items}
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


def test_plan_that_cannot_fit_names_largest_item_and_knob():
    plan = _plan(device_bytes=16 * GiB)
    with pytest.raises(MemoryError, match=r"Largest item: optimizer state.*mesh.fsdp"):
        plan.check()
    _plan(mesh_shape={"data": 1, "fsdp": 16, "tensor": 1}, device_bytes=80 * GiB).check()
