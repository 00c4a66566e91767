"""The rollout layout of a pod: weights gathered over fsdp once per step for decoding
(train.rollout_layout=replicated) instead of at every token. On 8 fake devices (fsdp 8) the
rollouts equal one device's, the decode loop's program holds no all-gather, and the training
layout's does."""
import jax
import numpy as np
import pytest
from flax import nnx

from balcap_jax import build, sampling
from balcap_jax.sharding import make_mesh
from tests.train.test_trainer import _target_scorer, tiny_config


def _trainer(layout, devices):
    cfg = tiny_config()
    cfg.train.rollout_layout = layout
    mesh = make_mesh((1, devices, 1), jax.devices()[:devices])
    trainer = build.build_trainer(cfg, mesh)
    trainer.p.scorer = _target_scorer()
    return trainer


def _decode_hlo(trainer, model):
    """The compiled decode loop of one rollout batch, as text."""
    s = trainer.cfg.sampling
    inputs = trainer._inputs(next(trainer.p.loader))
    prompt = sampling._place(model, sampling.prepare_prompt(
        model, inputs, prompt_buckets=trainer.p.prompt_buckets, pad_id=trainer.p.pad_id),
        sampling._prompt_batch_axis)
    # 40 tokens in 4 cache windows: the cache grows between the loops without a collective
    cfg = sampling._Config(40, s.num_samples, 1.0, 0, 1.0, trainer.p.pad_id, 4)
    assert len(sampling._step_windows(cfg)) == 4
    eos = np.asarray(trainer.p.eos_token_ids, np.int32)
    suppress = sampling.suppressed_ids(model)
    graphdef, state = nnx.split(model)
    carry, cache, kv_mask, deltas, keys, prefix = sampling._jit("prefill")(
        graphdef, state, prompt, jax.random.key(0), eos, suppress, cfg)
    return sampling._jit("decode").lower(
        graphdef, state, carry, cache, kv_mask, deltas, keys, eos, suppress, prefix, cfg,
        np.ndim(prompt.positions) == 3, int(np.shape(prompt.mask)[1])).compile().as_text()


@pytest.mark.heavy
def test_replicated_rollouts_equal_one_device_and_gather_once():
    one = _trainer("fsdp", 1)
    pod = _trainer("replicated", 8)
    assert pod.p.rollout_layout == "replicated"
    key = lambda m: (m["reward/frequency"], m["length/tokens"])
    for _ in range(2):
        a, b = one.train_step(next(one.p.loader)), pod.train_step(next(pod.p.loader))
        assert key(a) == key(b)                   # the same rollouts, token for token
    model = pod.rollout_model()
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(x.sharding.is_fully_replicated for x in leaves)   # tensor = 1: all replicated
    train_leaves = jax.tree.leaves(pod.state.params)
    assert any(not x.sharding.is_fully_replicated for x in train_leaves)
    assert "all-gather" not in _decode_hlo(pod, model)
    assert "all-gather" in _decode_hlo(pod, pod.model())      # the training layout gathers


def test_auto_layout_follows_the_memory_plan():
    cfg = tiny_config()
    sizes = {"data": 1, "fsdp": 8, "tensor": 1}
    assert build.rollout_layout(cfg, sizes, query_device=False) == "replicated"
    assert build.rollout_layout(cfg, {"data": 1, "fsdp": 1, "tensor": 1}) == "fsdp"
    cfg.mesh.device_memory_gb = 1e-4                # nothing fits: keep the training layout
    assert build.rollout_layout(cfg, sizes, query_device=False) == "fsdp"
    cfg.mesh.device_memory_gb = 0.0
    plan = build.memory_plan(cfg, sizes, query_device=False, rollout="replicated")
    assert "rollout weights" in [it.name for it in plan.items]
