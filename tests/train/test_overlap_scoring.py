"""train.rollout_chunks and train.overlap_scoring: each host's prompts sampled in chunks, a
finished chunk scored in a thread while the next one decodes. The overlapped step equals the
sequential one (same chunks, same keys): rollouts, rewards, advantages and parameters; and the
first chunk's scoring really runs during the second chunk's decode (an order of events, not a
speed)."""
import threading
import time

import jax
import numpy as np

from balcap_jax import build
from balcap_jax.rewards.types import ScoreResult
from balcap_jax.sharding import make_mesh
from tests.train.test_trainer import _target_scorer, tiny_config


class Recording:
    """The target-token scorer, with the time span of each call."""

    def __init__(self):
        self.inner, self.spans, self.lock = _target_scorer(), [], threading.Lock()

    def __call__(self, images, captions, refs, **kw):
        t = time.perf_counter()
        out = self.inner(images, captions, refs, **kw)
        time.sleep(0.2)       # a judge that takes a while: the decode goes on meanwhile
        with self.lock:
            self.spans.append((t, time.perf_counter()))
        return ScoreResult(out.rewards, out.diagnostics)


def test_overlapped_scoring_equals_the_sequential_step():
    cfg = tiny_config()
    cfg.train.rollout_chunks = 2
    trainer = build.build_trainer(cfg, make_mesh((1, 1, 1), jax.devices()[:1]))
    params = jax.tree.map(np.asarray, trainer.state.params)
    rng = np.asarray(trainer.state.rng)
    examples = next(trainer.p.loader)
    runs = {}
    decodes = []
    real = trainer._generate

    def generate(*a, **k):
        t = time.perf_counter()
        out = real(*a, **k)
        jax.block_until_ready(out.tokens)
        decodes.append((t, time.perf_counter()))
        return out
    trainer._generate = generate
    for overlap in (False, True):
        trainer.reset_params(jax.tree.map(np.asarray, params))
        trainer.state.rng, trainer.state.step = rng.copy(), 0
        trainer.cfg.train.overlap_scoring = overlap
        scorer = trainer.p.scorer = Recording()
        decodes.clear()
        m = trainer.train_step(examples)
        runs[overlap] = (m, [np.asarray(x) for x in jax.tree.leaves(trainer.state.params)],
                         list(scorer.spans), list(decodes))
    (m0, p0, s0, d0), (m1, p1, s1, d1) = runs[False], runs[True]
    assert len(s0) == len(s1) == 2 and len(d0) == len(d1) == 2       # two chunks
    for k in ("reward/frequency", "reward/frequency_std", "advantage_abs", "loss",
              "grad_norm", "length/tokens"):
        assert m0[k] == m1[k], k
    for a, b in zip(p0, p1):
        np.testing.assert_array_equal(a, b)
    # sequential: chunk 1 is scored before chunk 2 decodes; overlapped: during it
    assert s0[0][1] <= d0[1][0]
    assert s1[0][0] < d1[1][1] and s1[0][0] >= d1[0][1]
    assert 0 <= m1["time/scoring_exposed"] <= m1["time/scoring"]
    assert m0["time/scoring_exposed"] == m0["time/scoring"]


def test_overlap_with_judges_on_the_policys_devices_is_refused():
    import pytest

    from balcap_jax import config as config_lib
    cfg = tiny_config()
    cfg.train.overlap_scoring = True
    cfg.scorer.name = "judges"
    cfg.judges.backend, cfg.judges.devices = "in_process", 0
    with pytest.raises(config_lib.ConfigError, match="overlap_scoring"):
        config_lib.validate(cfg, 1)
    cfg.judges.backend, cfg.judges.base_url, cfg.judges.model = "remote", "http://h:1/v1", "m"
    config_lib.validate(cfg, 1)         # remote judges: fine
