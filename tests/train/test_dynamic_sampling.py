"""rl.dynamic_sampling (DAPO): groups whose rewards do not differ give no gradient; the step
samples up to N more rounds of prompts and keeps, per host, its first groups with signal.

A scripted scorer decides which prompts have signal (by synthetic image index), so the rounds
and the groups kept are known by hand."""
import jax
import numpy as np
import pytest

from balcap_jax import build
from balcap_jax.rewards.types import ScoreResult
from balcap_jax.sharding import make_mesh
from tests.train.test_trainer import tiny_config


class SignalFor:
    """frequency = a different value per rollout for prompts whose index satisfies `has`,
    0.5 for every rollout of the others (no spread). Records the indices it scored."""

    def __init__(self, has):
        self.has, self.seen = has, []

    def __call__(self, images, captions, refs, image_ids=None, **_):
        idx = [int(str(i).rsplit("-", 1)[1]) for i in image_ids]
        self.seen.append(idx)
        vals = [0.1 * (k % 4) if self.has(i) else 0.5 for k, i in enumerate(idx)]
        return ScoreResult({"frequency": np.asarray(vals, np.float32)})


@pytest.fixture(scope="module")
def trainer():
    t = build.build_trainer(tiny_config(), make_mesh((1, 1, 1), jax.devices()[:1]))
    return t, jax.tree.map(np.asarray, t.state.params), np.asarray(t.state.rng)


def _reset(t, params, rng):
    t.reset_params(jax.tree.map(np.asarray, params))
    t.state.rng, t.state.step = rng.copy(), 0


def _batches(t):
    """The loader's batches of 4 prompts from its start (the same stream every call)."""
    t.p.loader.set_state({"epoch": 0, "pos": 0, "seed": t.p.loader.seed})
    return iter(t.p.loader)


def test_scarce_signal_takes_more_rounds_and_keeps_the_groups_with_signal(trainer):
    t, params, rng = trainer
    _reset(t, params, rng)
    t.cfg.rl.dynamic_sampling = 3
    batches = _batches(t)
    first = next(batches)
    ids = [int(e["image_id"].rsplit("-", 1)[1]) for e in first]
    scorer = t.p.scorer = SignalFor(lambda i: i % 3 == 0)
    try:
        m = t.train_step(first, more=lambda: next(batches))
    finally:
        t.cfg.rl.dynamic_sampling = 0
    rounds = int(m["dynamic/rounds"])
    seen = [sorted(set(s)) for s in scorer.seen]
    assert seen[0] == sorted(ids) and len(seen) == rounds
    # by hand: rounds stop as soon as 4 prompts with signal were seen, or after 1 + 3
    with_signal = [i for s in seen for i in s if i % 3 == 0]
    before_last = [i for s in seen[:-1] for i in s if i % 3 == 0]
    assert len(before_last) < 4 and (len(with_signal) >= 4 or rounds == 4)
    assert m["dynamic/signal_groups"] == min(len(with_signal), 4) / 4
    assert m["dynamic/signal_groups_first_round"] == np.mean([i % 3 == 0 for i in ids])
    assert m["dynamic/extra_prompts"] == 4 * (rounds - 1)
    assert m["zero_std_groups/frequency"] == 1 - m["dynamic/signal_groups"]
    assert np.isfinite(m["loss"])


def test_with_signal_everywhere_the_step_is_the_plain_step(trainer):
    """Every group has signal: one round, and the update equals dynamic_sampling=0's."""
    t, params, rng = trainer
    out = []
    for extra in (0, 2):
        _reset(t, params, rng)
        t.cfg.rl.dynamic_sampling = extra
        t.p.scorer = SignalFor(lambda i: True)
        batches = _batches(t)
        try:
            m = t.train_step(next(batches), more=batches.__next__)
        finally:
            t.cfg.rl.dynamic_sampling = 0
        out.append((m, [np.asarray(x) for x in jax.tree.leaves(t.state.params)]))
    (m0, p0), (m2, p2) = out
    assert m2["dynamic/rounds"] == 1 and "dynamic/rounds" not in m0
    assert m0["loss"] == m2["loss"]
    for a, b in zip(p0, p2):
        np.testing.assert_array_equal(a, b)
