"""The trainer end to end on a tiny random Qwen2.5-VL: learning, exact resume, sharding,
SIGTERM, and config errors before any compile."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from balcap_jax import build, main
from balcap_jax.checkpoint import Checkpointer
from balcap_jax.config import ConfigError, load_config_file
from balcap_jax.rewards.scripted import TokenFrequencyScorer
from balcap_jax.sharding import make_mesh
from tests.conftest import XLA_CACHE, xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config(**train):
    c = load_config_file(os.path.join(ROOT, "configs/tiny.py"))
    for k, v in train.items():
        setattr(c.train, k, v)
    return c


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _target_scorer():
    # a target set of 40 of the 512 token ids: about 8% of random tokens at the start
    return TokenFrequencyScorer(range(7, 47))


@pytest.fixture(scope="module")
def single_device_run():
    """One 40-step run on one device, shared: its first two steps are the reference of the
    sharding test, the whole curve is the learning test's."""
    trainer = build.build_trainer(tiny_config(), make_mesh((1, 1, 1), jax.devices()[:1]))
    trainer.p.scorer = _target_scorer()
    steps, after_two = [], None
    for i in range(40):
        steps.append(trainer.train_step(next(trainer.p.loader)))
        if i == 1:
            after_two = _leaves(trainer.state.params)
    return steps, after_two


@pytest.mark.heavy
def test_scripted_reward_at_least_doubles_within_40_steps(single_device_run):
    curve = [m["reward/frequency"] for m in single_device_run[0]]
    start, end = np.mean(curve[:5]), np.mean(curve[-5:])
    assert start > 0.02, curve
    assert end >= 2 * start, f"reward went {start:.3f} -> {end:.3f}: {np.round(curve, 3)}"


def _final_tree(workdir, step):
    ck = Checkpointer(workdir)
    state, _ = ck.read(step)
    ck.close()
    return state


def _final_params(workdir, step):
    return _leaves(_final_tree(workdir, step)["params"])


def _trained_weights(trainer):
    """The weights the optimiser moves, in float32: the master copy where the trainer keeps
    one (low-precision params), else the params themselves."""
    master = getattr(trainer.state, "master", None)
    if master is None:
        return [x.astype(np.float32) for x in _leaves(trainer.state.params)]
    return _leaves(master)


@pytest.mark.heavy
@pytest.mark.parametrize("lr", [1e-6, 1e-5])
def test_bf16_weights_move_as_far_as_float32(lr):
    """At the paper's learning rate an AdamW step (about lr per weight) is far below half a
    bf16 spacing (6e-5 at |w| = 0.02); adding it to bf16 params rounds it away. Six steps of the
    same run in float32 and in bfloat16 must move the weights about as far: the mean absolute
    change from the initial weights within 25% (rollouts differ a little, as bf16 logits do).
    The bf16 working copy that sampling reads is the master rounded to bf16."""
    drift = {}
    for dtype in ("float32", "bfloat16"):
        cfg = tiny_config(lr=lr)
        cfg.model.dtype = dtype
        trainer = build.build_trainer(cfg, make_mesh((1, 1, 1), jax.devices()[:1]))
        trainer.p.scorer = _target_scorer()
        start = [x.astype(np.float32) for x in _leaves(trainer.state.params)]
        for _ in range(6):
            trainer.train_step(next(trainer.p.loader))
        now = _trained_weights(trainer)
        drift[dtype] = np.mean(np.concatenate([np.abs(b - a).ravel()
                                               for a, b in zip(start, now)]))
        if dtype == "bfloat16":
            for p, m in zip(_leaves(trainer.state.params), now):
                assert p.dtype == jnp.bfloat16
                np.testing.assert_array_equal(p, m.astype(jnp.bfloat16))
    assert drift["float32"] > 2 * lr          # the run really moved the weights
    assert 0.75 < drift["bfloat16"] / drift["float32"] < 1.25, drift

@pytest.mark.heavy
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_resume_continues_exactly(tmp_path, monkeypatch, dtype):
    """bfloat16: the checkpoint holds the float32 master weights, so the resumed run continues
    bit for bit (the bf16 working copy alone would lose the updates that have not yet moved a
    bf16 value)."""
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    monkeypatch.setattr(build, "mesh_and_rules", lambda cfg, sizes: (
        make_mesh((1, 1, 1), jax.devices()[:1]), None))
    straight = tiny_config(steps=4, eval_every=100)
    straight.model.dtype = dtype
    straight.workdir = str(tmp_path / "straight")
    straight.checkpoint.every = 2
    main.run(straight)

    # the same run stopped after its step-2 checkpoint, then started again from scratch
    parted = tiny_config(steps=2, eval_every=100)
    parted.model.dtype = dtype
    parted.workdir = str(tmp_path / "parted")
    parted.checkpoint.every = 2
    main.run(parted)
    parted.train.steps = 4
    main.run(parted)

    a, b = _final_params(straight.workdir, 4), _final_params(parted.workdir, 4)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), atol=1e-6, rtol=0)
    if dtype == "bfloat16":
        ma, mb = (_final_tree(w, 4)["master"] for w in (straight.workdir, parted.workdir))
        assert len(_leaves(ma)) == len(a)          # every leaf trains: every leaf has a master
        for x, y in zip(_leaves(ma), _leaves(mb)):
            assert x.dtype == np.float32
            np.testing.assert_array_equal(x, y)
    rows = [json.loads(l) for l in open(os.path.join(parted.workdir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert os.path.exists(os.path.join(straight.workdir, "export", "config.json"))


@pytest.mark.heavy
def test_sharded_steps_equal_single_device(single_device_run):
    trainer = build.build_trainer(tiny_config(), make_mesh((2, 2, 2)))
    trainer.p.scorer = _target_scorer()
    steps = [trainer.train_step(next(trainer.p.loader)) for _ in range(2)]
    sharded_leaves = jax.tree.leaves(trainer.state.params)
    assert any(len(x.sharding.device_set) > 1 and not x.sharding.is_fully_replicated
               for x in sharded_leaves), "nothing was actually sharded"
    # the sampled rollouts are discrete: they must be identical
    key = lambda m: (m["reward/frequency"], m["length/tokens"])
    assert [key(m) for m in steps] == [key(m) for m in single_device_run[0][:2]]
    # parameters: sharded reductions sum in another order; Adam divides by sqrt(v) so a
    # near-zero gradient's float noise moves a weight by up to ~lr * 1e-2 (lr = 3e-3)
    for x, y in zip(_leaves(trainer.state.params), single_device_run[1]):
        np.testing.assert_allclose(x, y, atol=1e-4, rtol=0)


def test_bad_config_fails_before_building_anything(monkeypatch):
    def no_build(*a, **k):
        raise AssertionError("a model was built for an invalid config")
    monkeypatch.setattr(build, "build_trainer", no_build)
    cfg = tiny_config(batch_size=3)
    with pytest.raises(ConfigError, match="train.batch_size=3 does not divide"):
        main.run(cfg)


@pytest.mark.heavy
def test_sigterm_leaves_a_restorable_checkpoint(tmp_path):
    env = dict(os.environ, XLA_FLAGS=xla_flags(1),
               PYTHONPATH=ROOT, JAX_COMPILATION_CACHE_DIR=XLA_CACHE)
    proc = subprocess.Popen(
        [sys.executable, "-m", "balcap_jax.main", "--config=configs/tiny.py",
         f"--config.workdir={tmp_path}", "--config.train.steps=100000",
         "--config.checkpoint.every=1000", "--config.train.eval_every=100000"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or
                                      len(metrics.read_text().splitlines()) < 2):
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out.decode()[-3000:]
    steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines()]
    ck = Checkpointer(str(tmp_path))
    assert ck.latest_step == steps[-1] and steps[-1] < 100000
    state, meta = ck.read()
    assert int(state["step"]) == steps[-1]
    assert meta["data"]["pos"] > 0
    ck.close()


@pytest.mark.heavy
def test_non_finite_step_is_skipped_counted_and_not_applied(monkeypatch):
    from balcap_jax import train
    real = train.loss_lib.policy_loss

    def nan_loss(*args, **kwargs):     # as if the policy had produced a NaN log-prob
        loss, metrics = real(*args, **kwargs)
        return loss * jnp.nan, metrics

    monkeypatch.setattr(train.loss_lib, "policy_loss", nan_loss)
    trainer = build.build_trainer(tiny_config(), make_mesh((1, 1, 1), jax.devices()[:1]))
    before = _leaves(trainer.state.params)
    opt_before = _leaves(trainer.state.opt_state)
    for step in (1, 2):
        m = trainer.train_step(next(trainer.p.loader))
        assert not np.isfinite(m["loss"]) and m["skipped_steps"] == step
    for x, y in zip(before + opt_before,
                    _leaves(trainer.state.params) + _leaves(trainer.state.opt_state)):
        np.testing.assert_array_equal(x, y)


def test_sampling_config_reaches_the_sampler(monkeypatch):
    """Every sampling.* field of the config is passed to sampling.generate (rollouts sample
    with them; greedy evaluation turns the filters off)."""
    from balcap_jax import sampling
    cfg = tiny_config()
    cfg.sampling.update(cache_windows=3, top_k=7, top_p=0.8, temperature=0.7)
    trainer = build.build_trainer(cfg, make_mesh((1, 1, 1), jax.devices()[:1]))
    calls = []
    monkeypatch.setattr(sampling, "generate", lambda model, inputs, **kw: calls.append(kw))
    trainer._generate({}, greedy=False, num_samples=4)
    trainer._generate({}, greedy=True, num_samples=1)
    want = dict(max_new_tokens=cfg.sampling.max_new_tokens, cache_windows=3, top_k=7,
                top_p=0.8, temperature=0.7, num_samples=4)
    assert {k: calls[0][k] for k in want} == want
    assert (calls[1]["temperature"], calls[1]["top_k"], calls[1]["top_p"],
            calls[1]["cache_windows"]) == (0.0, 0, 1.0, 3)


def _record_update(trainer) -> dict:
    """Spies on the trainer's update: seen["args"] (the step's rollouts), seen["out"] (its
    metrics) and seen["apply"] ((params, grads) of each optimiser update, copied first: the
    update donates them)."""
    fn, copy = trainer.fn, lambda t: jax.tree.map(jnp.copy, t)
    seen, real_update, real_apply = {"apply": []}, trainer._update, fn.apply

    def update(inputs, rows, tokens, mask, adv, sampler_logp):
        seen["args"] = (inputs, rows, tokens, mask, adv)
        seen["out"] = real_update(inputs, rows, tokens, mask, adv, sampler_logp)
        return seen["out"]

    def apply(params, master, opt_state, grads, scale, **kw):
        seen["apply"].append((copy(params), copy(grads)))
        return real_apply(params, master, opt_state, grads, scale, **kw)

    trainer._update, fn.apply = update, apply
    return seen


def _reference_grad(trainer, cfg, mask):
    """jax.grad of the textbook loss, (params, micro-batch, advantages, old_logp) -> grads."""
    from balcap_jax import train
    norm = train.loss_lib.loss_normalizer(mask, aggregation=cfg.rl.aggregation,
                                          max_completion_length=mask.shape[1])
    return jax.jit(jax.grad(lambda p, mb, a, o: train._loss_fn(
        p, trainer.graphdef, trainer.rest, mb, a, o, None, norm, rl=cfg.rl,
        temperature=cfg.sampling.temperature, max_len=cfg.sampling.max_new_tokens)[0]))


@pytest.mark.heavy
def test_update_equals_a_separate_old_logp_forward():
    """The step takes old_logp from its first gradient pass (SPEC.md section 5: the trainer's
    forward before the first update) instead of a separate forward. With two PPO passes over two
    micro-batches, each pass's summed gradient must equal the textbook one at the same
    parameters: old_logp from its own forward at the step's start, then the clipped loss's
    gradient. (Gradients, not parameters: AdamW's first step is about lr * sign(g), which
    turns rounding noise in a near-zero gradient into an lr-sized difference.)"""
    cfg = tiny_config(micro_batch_size=8, lr=3e-2)     # 16 rollouts: 2 micro-batches
    cfg.rl.ppo_epochs = 2
    cfg.rl.eps_low = cfg.rl.eps_high = 0.05            # a large lr and tight clip: pass 2 clips
    trainer = build.build_trainer(cfg, make_mesh((1, 1, 1), jax.devices()[:1]))
    trainer.p.scorer = _target_scorer()
    seen = _record_update(trainer)
    trainer.train_step(next(trainer.p.loader))
    inputs, rows, tokens, mask, adv = seen["args"]
    assert len(seen["apply"]) == 2 and seen["out"]["clip_region"] > 0, seen["out"]

    mbs = list(trainer._micro_batches(inputs, rows, tokens, mask))
    p0 = seen["apply"][0][0]
    old = [trainer.fn.logprobs(p0, trainer.rest, mb) for _, mb in mbs]   # the separate forward
    ref_grad = _reference_grad(trainer, cfg, mask)
    for params, got in seen["apply"]:
        want = None
        for (sl, mb), o in zip(mbs, old):
            g = ref_grad(params, mb, jnp.asarray(adv[sl], jnp.float32), o)
            want = g if want is None else jax.tree.map(jnp.add, want, g)
        scale = max(float(np.abs(x).max()) for x in _leaves(want))
        assert scale > 1e-3
        for x, y in zip(_leaves(want), _leaves(got)):
            np.testing.assert_allclose(y, x, rtol=0, atol=1e-5 * scale)
    # the second pass's gradient is not the first's: the ratios (and clipping) are in play
    d = max(float(np.abs(x - y).max()) for x, y in zip(_leaves(seen["apply"][0][1]),
                                                       _leaves(seen["apply"][1][1])))
    assert d > 1e-3 * scale, d


@pytest.mark.heavy
def test_single_micro_batch_gradient_and_norm_come_from_one_pass():
    """All rollouts in one micro-batch: grad() returns that micro-batch's gradient itself (no
    zero-filled accumulator) with its global norm (no separate norm pass). The applied
    gradient must equal the textbook one at the step's parameters, and the logged grad_norm
    its global norm."""
    import optax
    cfg = tiny_config(micro_batch_size=16)             # 4 prompts x G = 4: one micro-batch
    trainer = build.build_trainer(cfg, make_mesh((1, 1, 1), jax.devices()[:1]))
    trainer.p.scorer = _target_scorer()
    seen = _record_update(trainer)

    def no_zeros(params):
        raise AssertionError("one micro-batch needs no zero-filled accumulator")

    trainer.fn.zeros = no_zeros
    m = trainer.train_step(next(trainer.p.loader))
    inputs, rows, tokens, mask, adv = seen["args"]
    (params, got), = seen["apply"]
    (_, mb), = trainer._micro_batches(inputs, rows, tokens, mask)
    want = _reference_grad(trainer, cfg, mask)(params, mb, jnp.asarray(adv, jnp.float32), None)
    scale = max(float(np.abs(x).max()) for x in _leaves(want))
    assert scale > 1e-3
    for x, y in zip(_leaves(want), _leaves(got)):
        np.testing.assert_allclose(y, x, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(m["grad_norm"], float(optax.global_norm(want)), rtol=1e-5)


@pytest.mark.heavy
@pytest.mark.parametrize("aggregation", ["dapo", "dr_grpo"])
def test_update_on_trimmed_completions_equals_full_width(aggregation):
    """train.trim_completions cuts the update's completion columns to the longest rollout
    (a power of two): columns past every rollout's end are padding with mask 0, so the
    gradient must be the full width's. dr_grpo's normaliser N * L_max must stay on
    max_new_tokens (40), not the cut width (16), or the loss is 2.5x too large."""
    from balcap_jax import train
    assert [train.update_width(np.array(l), 80) for l in ([3, 9], [17], [33, 64], [65], [])] \
        == [16, 32, 64, 80, 16]
    cfg = tiny_config(micro_batch_size=8)
    cfg.sampling.max_new_tokens = 40
    cfg.rl.aggregation = aggregation
    trainer = build.build_trainer(cfg, make_mesh((1, 1, 1), jax.devices()[:1]))
    fn, copy = trainer.fn, lambda t: jax.tree.map(jnp.copy, t)
    grads, real_apply = [], fn.apply
    fn.apply = lambda p, m, o, g, s, **kw: (grads.append(copy(g)),
                                            real_apply(p, m, o, g, s, **kw))[1]
    examples = next(trainer.p.loader)
    inputs = trainer._inputs(examples)
    rng = np.random.default_rng(0)
    n = len(examples) * cfg.sampling.num_samples
    lengths = rng.integers(1, 13, n)
    tokens = rng.integers(7, 300, (n, 40)).astype(np.int32)
    mask = (np.arange(40)[None] < lengths[:, None]).astype(np.float32)
    adv = rng.normal(size=n).astype(np.float32)
    rows = np.repeat(np.arange(len(examples)), cfg.sampling.num_samples)
    p0, o0 = copy(trainer.state.params), copy(trainer.state.opt_state)
    w = train.update_width(lengths, 40)
    assert w == 16
    full = trainer._update(inputs, rows, tokens, mask, adv, np.zeros_like(mask))
    trainer.state.params, trainer.state.opt_state = p0, o0
    cut = trainer._update(inputs, rows, tokens[:, :w], mask[:, :w], adv, np.zeros((n, w)))
    np.testing.assert_allclose(cut["loss"], full["loss"], rtol=1e-5)
    scale = max(float(np.abs(x).max()) for x in _leaves(grads[0]))
    assert scale > 1e-4
    for x, y in zip(_leaves(grads[0]), _leaves(grads[1])):
        np.testing.assert_allclose(y, x, rtol=0, atol=1e-5 * scale)
