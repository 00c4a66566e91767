"""Config validation fails early, naming the field and the fix; configs load."""

import pytest

from balcap_jax.config import ConfigError, base_config, load_config_file, resolve_mesh, validate


def _ok():
    c = load_config_file("configs/tiny.py")
    c.mesh.fsdp = -1
    return c


def test_shipped_configs_validate():
    assert validate(_ok(), 1) == {"data": 1, "fsdp": 1, "tensor": 1}
    assert validate(_ok(), 4) == {"data": 1, "fsdp": 4, "tensor": 1}
    q = load_config_file("configs/qwen.py")
    assert validate(q, 8)["fsdp"] == 8
    q.scorer.name = "oracle"
    with pytest.raises(ConfigError, match="scorer.name='oracle' is not one of"):
        validate(q, 8)
    assert load_config_file("configs/qwen.py", "3b").model.preset == "qwen2_5_vl_3b"
    with pytest.raises(ValueError, match="qwen.py:3b"):
        load_config_file("configs/qwen.py", "13b")


@pytest.mark.parametrize("edit, match", [
    (lambda c: setattr(c.train, "batch_size", 3), r"train.batch_size=3 does not divide .* 2"),
    (lambda c: setattr(c.rl, "advantage", "ppo"), r"rl.advantage='ppo' is not one of"),
    (lambda c: setattr(c.rl, "weights", [1.0, 2.0]), r"rl.weights has 2 entries"),
    (lambda c: setattr(c.sampling, "num_samples", 1), r"sampling.num_samples must be >= 2"),
    (lambda c: setattr(c.train, "micro_batch_size", 5), r"micro_batch_size=5 must divide"),
    (lambda c: setattr(c.rl, "aggregation", "mean"), r"rl.aggregation='mean'"),
    (lambda c: setattr(c.mesh, "fsdp", 3), r"mesh: .*must equal the 2 devices"),
    (lambda c: setattr(c.model, "hf_config", {}), r"model: set model.path"),
    (lambda c: setattr(c.model, "scan_unroll", -1), r"model.scan_unroll must be >= 0"),
    (lambda c: setattr(c.sampling, "cache_windows", 0), r"sampling.cache_windows must be >= 1"),
])
def test_bad_config_names_field_and_fix(edit, match):
    c = _ok()
    edit(c)
    with pytest.raises(ConfigError, match=match):
        validate(c, 2)


def _judged(**judges):
    c = _ok()
    c.scorer.name = "judges"
    c.judges.multimodal_path = "/ckpt/judge"
    c.judges.update(judges)
    return c


@pytest.mark.parametrize("judges, match", [
    (dict(backend="cloud"), r"judges.backend='cloud' is not one of"),
    (dict(backend="remote"), r"judges.backend='remote' needs judges.base_url"),
    (dict(backend="remote", base_url="localhost:8000", model="m"), r"must start with http"),
    (dict(timeout=0.0), r"judges.timeout=0.0 must be >= "),
    (dict(max_retries=-1), r"judges.max_retries=-1 must be >= 0"),
    (dict(concurrency=0), r"judges.concurrency=0 must be >= 1"),
    (dict(top_logprobs=50), r"judges.top_logprobs=50 must be in 1..20"),
    (dict(multimodal_path=""), r"needs judges.multimodal_path"),
    (dict(devices=2), r"judges.devices=2 must leave the policy"),
    (dict(dtype="int8"), r"judges.dtype='int8' is not one of"),
])
def test_bad_judges_fields_name_field_and_fix(judges, match):
    with pytest.raises(ConfigError, match=match):
        validate(_judged(**judges), 2)


def test_judges_fields_validate():
    validate(_judged(), 2)
    validate(_judged(backend="remote", base_url="http://127.0.0.1:8000/v1", model="m",
                     multimodal_path=""), 2)
    assert validate(_judged(devices=1), 2) == {"data": 1, "fsdp": 1, "tensor": 1}


def test_mesh_resolution():
    c = base_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, -1, 2
    assert resolve_mesh(c, 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    c.mesh.fsdp = 4
    with pytest.raises(ConfigError, match="must equal the 8 devices"):
        resolve_mesh(c, 8)


@pytest.mark.parametrize("variant", ["l4", "t4", "a100", "h100", "tpu", "7b"])
def test_colab_variants_validate_and_fit_their_device(variant):
    """configs/colab.py: each variant validates on one device and its memory plan (LoRA, the
    judges on the shared base) fits the device it names, with the plan's 10% headroom."""
    from balcap_jax import build
    c = load_config_file("configs/colab.py", variant)
    sizes = validate(c, 1)
    assert c.model.lora.rank > 0 and build.shares_policy_base(c, "multimodal")
    plan = build.memory_plan(c, sizes, query_device=False)
    plan.check()
    assert not any(it.name.startswith("judge weights") for it in plan.items)


@pytest.mark.parametrize("edit, match", [
    (lambda c: setattr(c.model.lora, "dropout", 1.0), r"model.lora.dropout=1.0 must be in"),
    (lambda c: setattr(c.model.lora, "quantize", "nf4"), r"model.lora.quantize='nf4' needs"),
    (lambda c: setattr(c.model.lora, "quantize", "int4"), r"model.lora.quantize='int4' is not"),
    (lambda c: setattr(c.train, "optimizer", "sgd"), r"train.optimizer='sgd' is not one of"),
])
def test_bad_lora_and_optimizer_fields(edit, match):
    c = _ok()
    edit(c)
    with pytest.raises(ConfigError, match=match):
        validate(c, 2)


def test_scan_unroll_reaches_every_layer_stack():
    """model.scan_unroll is set on each scanned stack the policy has (Qwen2.5-VL: the decoder's
    layers and the vision tower's blocks)."""
    from flax import nnx

    from balcap_jax import build
    from balcap_jax.models.stack import StackedLayers
    c = _ok()
    c.model.scan_unroll = 0
    stacks = [m for _, m in nnx.iter_modules(build._ready_policy(c))
              if isinstance(m, StackedLayers)]
    assert len(stacks) == 2 and all(m.unroll == 0 for m in stacks)
