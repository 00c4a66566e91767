"""LoRA runs of the tiny trainer: the adapters learn, the base never moves and keeps no
optimiser state, checkpoints hold the adapters alone and resume exactly, the export is merged
plus a PEFT adapter; and the low-memory optimisers."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from balcap_jax import build, main
from balcap_jax.models import from_pretrained, lora
from balcap_jax.sharding import make_mesh
from balcap_jax.train import optim
from tests.train.test_trainer import _final_tree, _leaves, _target_scorer, tiny_config


def lora_config(**train):
    """The tiny run with rank-8 adapters on every projection and on an untied lm head: the
    scripted reward (raise 40 token ids) is learned through the head; with only the decoder's
    projections even full fine-tuning of them does not move it in 40 steps."""
    c = tiny_config(**dict(dict(lr=1e-2), **train))
    c.model.hf_config.tie_word_embeddings = False
    c.model.lora.rank = 8
    c.model.lora.alpha = 16.0
    c.model.lora.modules = tuple(c.model.lora.modules) + ("lm_head",)
    c.model.lora.dropout = 0.05
    return c


@pytest.fixture(scope="module")
def lora_run():
    trainer = build.build_trainer(lora_config(), make_mesh((1, 1, 1), jax.devices()[:1]))
    trainer.p.scorer = _target_scorer()
    base = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(trainer.rest)}
    steps = [trainer.train_step(next(trainer.p.loader)) for _ in range(30)]
    return trainer, base, steps


@pytest.mark.heavy
def test_lora_learns_the_scripted_reward(lora_run):
    """With LoRA dropout 0.05: the update's forward drops adapter inputs (the sampler does
    not), so the sampler-trainer log-prob gap is no longer 0, while the first pass's ratio
    stays exactly 1 (old_logp comes from the same dropped-out forward)."""
    _, _, steps = lora_run
    curve = [m["reward/frequency"] for m in steps]
    start, end = np.mean(curve[:5]), np.mean(curve[-5:])
    assert start > 0.02, curve
    assert end >= 2 * start, f"reward went {start:.3f} -> {end:.3f}: {np.round(curve, 3)}"
    assert all(m["ratio"] == 1.0 for m in steps)
    assert max(abs(m["logp_gap_sampler_trainer"]) for m in steps[1:]) > 1e-4


@pytest.mark.heavy
def test_frozen_base_gets_no_update_and_no_state(lora_run):
    trainer, base, _ = lora_run
    params = nnx.to_flat_state(trainer.state.params)
    assert len(params) == 16 and all(isinstance(v, lora.LoRAParam) for _, v in params)
    # the base (every other array) is bit for bit what it was before 30 steps
    now = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(trainer.rest)}
    assert now.keys() == base.keys() and len(base) > 30
    for p in base:
        np.testing.assert_array_equal(now[p], base[p], err_msg=str(p))
    # optimiser state: adapter-shaped moments only (and counters)
    shapes = {v.get_value().shape for _, v in params}
    state = [x for x in jax.tree.leaves(trainer.state.opt_state) if np.ndim(x)]
    assert state and all(x.shape in shapes for x in state)
    assert trainer.state.master is None          # float32 adapters need no master copy


@pytest.mark.heavy
def test_lora_resume_is_exact_and_export_is_merged_plus_peft(tmp_path, monkeypatch):
    """AdamW with bfloat16 moments; the run stopped at its step-1 checkpoint and restarted
    equals the straight 2-step run; the checkpoint holds the adapters alone; the merged export
    loads with the trained policy's logits."""
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    monkeypatch.setattr(build, "mesh_and_rules", lambda cfg, sizes: (
        make_mesh((1, 1, 1), jax.devices()[:1]), None))
    runs = {}
    for name, stops in (("straight", (2,)), ("parted", (1, 2))):
        c = lora_config(eval_every=100, moment_dtype="bfloat16")
        c.workdir = str(tmp_path / name)
        c.checkpoint.every = 1
        for steps in stops:
            c.train.steps = steps
            main.run(c)
        runs[name] = _final_tree(c.workdir, 2)
    a, b = runs["straight"], runs["parted"]
    assert len(_leaves(a["params"])) == 16           # adapters only: no base in the checkpoint
    for x, y in zip(_leaves(a["params"]), _leaves(b["params"])):
        np.testing.assert_array_equal(x, y)
    moments = [x for x in jax.tree.leaves(a["opt_state"]) if np.ndim(x)]
    assert moments and all(x.dtype == jnp.bfloat16 for x in moments)
    export = str(tmp_path / "straight" / "export")
    cfg = json.load(open(os.path.join(export, "adapter", "adapter_config.json")))
    assert cfg["r"] == 8 and cfg["peft_type"] == "LORA" and len(cfg["target_modules"]) == 15
    # the merged export is the trained policy: rebuild it from the checkpoint and compare
    c = lora_config()
    c.workdir = str(tmp_path / "straight")
    trainer = build.build_trainer(c, make_mesh((1, 1, 1), jax.devices()[:1]))
    trainer.state.params = jax.tree.map(jnp.asarray, a["params"])
    ids = np.arange(10, 30, dtype=np.int32)[None]
    want = trainer.model()(input_ids=ids, attention_mask=np.ones_like(ids))
    got = from_pretrained(export)(input_ids=ids, attention_mask=np.ones_like(ids))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4)
    # ... and so is the base with the PEFT adapter put back on (model.adapter: what captioning
    # a LoRA run uses), from the adapter's own settings alone
    c = lora_config()
    c.model.lora.rank, c.model.adapter = 0, os.path.join(export, "adapter")
    policy = build.build_captioner(c, make_mesh((1, 1, 1), jax.devices()[:1]),
                                   tokenizer=trainer.p.tokenizer).model
    got = policy(input_ids=ids, attention_mask=np.ones_like(ids))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4)
    c.model.adapter = ""
    base = build.build_captioner(c, make_mesh((1, 1, 1), jax.devices()[:1]),
                                 tokenizer=trainer.p.tokenizer).model
    base = base(input_ids=ids, attention_mask=np.ones_like(ids))
    assert np.abs(np.asarray(base) - np.asarray(want)).max() > 1e-3    # the adapters matter


def test_bf16_moments_track_float32_adamw():
    """Stored in bfloat16, computed in float32: 5 steps stay within bf16 rounding of float32
    AdamW's updates, and the state really is bfloat16."""
    params = {"w": jnp.linspace(-1, 1, 256, dtype=jnp.float32).reshape(16, 16)}
    ref, low = optax.adamw(1e-3), optim.stored_in(optax.adamw(1e-3), jnp.bfloat16)
    s_ref, s_low = ref.init(params), low.init(params)
    for i in range(5):
        g = {"w": jnp.sin(params["w"] * (i + 1))}
        u_ref, s_ref = ref.update(g, s_ref, params)
        u_low, s_low = low.update(g, s_low, params)
        # bf16 keeps 8 bits: error within 3% of the largest update (near-cancelling moments
        # are where rounding shows)
        scale = float(jnp.abs(u_ref["w"]).max())
        np.testing.assert_allclose(u_low["w"], u_ref["w"], rtol=0, atol=0.03 * scale)
        assert float(jnp.abs(u_low["w"] - u_ref["w"]).mean()) < 0.005 * scale
    floats = [x for x in jax.tree.leaves(s_low) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.bfloat16 for x in floats)


def test_adafactor_state_is_factored():
    """Adafactor keeps row and column statistics of a [512, 256] matrix: under 1% of
    AdamW's two full moments."""
    tc = tiny_config(optimizer="adafactor").train
    params = {"w": jnp.ones((512, 256))}
    state = optim.make_optimizer(tc, params).init(params)
    n = sum(x.size for x in jax.tree.leaves(state) if np.ndim(x))
    assert n < 0.01 * 2 * params["w"].size
    tc.optimizer = "lion"
    with pytest.raises(ValueError, match="train.optimizer"):
        optim.make_optimizer(tc, params)


@pytest.mark.parametrize("freeze", [False, True])
def test_clip_takes_the_known_global_norm(freeze):
    """The optimiser's clip equals optax.clip_by_global_norm (updates and state) when it
    computes the norm itself; given grad_norm= (the one-micro-batch gradient pass's norm) it
    clips by that number, also through the frozen-vision multi_transform and AdamW's chain."""
    clip, ref = optim.clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)
    params = {"model": {"w": jnp.ones((4, 4))}, "visual": {"w": jnp.ones((3,))}}
    for size in (0.5, 3.0):                          # below and above the clip
        g = jax.tree.map(lambda x, s=size: jnp.full(x.shape, s / 19 ** 0.5), params)  # norm s
        got, state = clip.update(g, clip.init(params))
        want, ref_state = ref.update(g, ref.init(params))
        assert jax.tree.structure(state) == jax.tree.structure(ref_state)
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(x, y)
    told, _ = clip.update(g, clip.init(params), grad_norm=jnp.float32(6.0))   # not recomputed
    np.testing.assert_allclose(told["model"]["w"], g["model"]["w"] / 6.0, rtol=1e-6)

    tc = tiny_config(grad_clip=1.0, freeze_vision=freeze, warmup_steps=0, lr=1e-2).train
    opt = optim.make_optimizer(tc, params)
    state = opt.init(params)
    trained = g["model"] if freeze else g                # the frozen tower is not in the norm
    true = optax.global_norm(trained)
    # Adam's first step divides the clip's scale back out of the update, so look at the first
    # moment, which holds the clipped gradient
    moments = lambda **kw: [x for x in jax.tree.leaves(opt.update(g, state, params, **kw)[1])
                            if np.ndim(x) == 2]
    own, told, wrong = moments(), moments(grad_norm=true), moments(grad_norm=10 * true)
    for x, y in zip(own, told):
        np.testing.assert_allclose(y, x, rtol=1e-6)
    assert not np.allclose(wrong[0], own[0]), "grad_norm= did not reach the clip"
