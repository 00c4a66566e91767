"""The group-shared update: each prompt (and its image) is forwarded once and its G rollouts
read it as a shared prefix. The loss and every gradient must equal the update that repeats the
prompt per rollout (train.share_prompts=False), on Qwen2.5-VL and LLaVA, with the vision tower
trainable and frozen, on one device and sharded over 8. A frozen tower gets no gradient at all
(no backward pass through it)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from balcap_jax import build
from balcap_jax.sharding import make_mesh
from tests.train.test_llava_train import llava_config, llava_tokenizer_dir, llava_trainer
from tests.train.test_trainer import _leaves, tiny_config


def _qwen(share, frozen, mesh, tmp_path):
    cfg = tiny_config(micro_batch_size=8)          # 4 prompts x G = 4: groups of 4 in a batch
    cfg.workdir = str(tmp_path)
    cfg.train.share_prompts, cfg.train.freeze_vision = share, frozen
    return build.build_trainer(cfg, mesh)


def _llava(share, frozen, mesh, tmp_path):
    cfg = llava_config(str(tmp_path), _llava.tok_dir)
    cfg.train.share_prompts, cfg.train.freeze_vision = share, frozen
    return llava_trainer(cfg, mesh)


def _update_grads(trainer, args):
    """(loss, the gradient the update applies) of one _update on fixed rollouts."""
    fn, got = trainer.fn, []
    real = fn.apply

    def apply(p, m, o, g, s, **kw):
        got.append(jax.tree.map(jnp.copy, g))
        return real(p, m, o, g, s, **kw)
    fn.apply = apply
    out = trainer._update(*args)
    fn.apply = real
    return out["loss"], got[0]


def _rollouts(trainer, seed=0):
    examples = next(trainer.p.loader)
    g = trainer.cfg.sampling.num_samples
    n, width = len(examples) * g, trainer.cfg.sampling.max_new_tokens
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, width + 1, n)
    tokens = rng.integers(10, 60, (n, width)).astype(np.int32)
    mask = (np.arange(width)[None] < lengths[:, None]).astype(np.float32)
    adv = rng.normal(size=n).astype(np.float32)
    rows = np.repeat(np.arange(len(examples)), g)
    return (trainer._inputs(examples), rows, tokens, mask, adv, np.zeros_like(mask))


# every (model, tower) pair on one device, and one pair on 8 devices (the sharded layouts are
# the same code for both models; each further sharded pair cost ~20 s of the suite's budget)
@pytest.mark.heavy
@pytest.mark.parametrize("model, frozen, devices", [
    ("qwen2_5_vl", False, 1), ("qwen2_5_vl", True, 1), ("llava", False, 1), ("llava", True, 1),
    ("qwen2_5_vl", False, 8)])
def test_shared_prompt_update_equals_repeated_prompts(model, frozen, devices, tmp_path,
                                                      tmp_path_factory):
    if model == "llava" and not hasattr(_llava, "tok_dir"):
        _llava.tok_dir = llava_tokenizer_dir(tmp_path_factory)
    make = _qwen if model == "qwen2_5_vl" else _llava
    mesh = make_mesh((1, 1, 1), jax.devices()[:1]) if devices == 1 else make_mesh((2, 2, 2))
    shared = make(True, frozen, mesh, tmp_path / "a")
    repeated = make(False, frozen, mesh, tmp_path / "b")
    args = _rollouts(shared)
    _, mbs = args[1], list(shared._micro_batches(*args[:4]))
    n_prompts = [np.shape(mb["prompt"].mask)[0] for _, mb in mbs]
    assert all(p < len(mb["completions"]) for p, (_, mb) in zip(n_prompts, mbs))  # grouped
    loss_a, grads_a = _update_grads(shared, args)
    loss_b, grads_b = _update_grads(repeated, args)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
    scale = max(float(np.abs(x).max()) for x in _leaves(grads_b))
    assert scale > 1e-4
    flat_a = jax.tree_util.tree_flatten_with_path(grads_a)[0]
    flat_b = dict(jax.tree_util.tree_flatten_with_path(grads_b)[0])
    for path, a in flat_a:
        b = flat_b[path]
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * scale, rtol=0,
                                   err_msg=jax.tree_util.keystr(path))
        if frozen and any(str(getattr(k, "key", k)).startswith(("visual", "vision"))
                          for k in path):
            assert not np.asarray(a).any(), jax.tree_util.keystr(path)   # no backward at all


def test_a_frozen_tower_costs_no_backward(tmp_path):
    """Differentiating the loss with the tower frozen costs fewer FLOPs than with it trainable
    by at least the tower's backward (XLA's own count of the compiled gradient)."""
    flops = {}
    for frozen in (False, True):
        one = make_mesh((1, 1, 1), jax.devices()[:1])
        trainer = _qwen(True, frozen, one, tmp_path / str(frozen))
        args = _rollouts(trainer)
        _, mb = next(trainer._micro_batches(*args[:4]))
        fn, st = trainer.fn, trainer.state
        acc = fn.zeros(st.params)
        adv = jnp.asarray(args[4][:8])
        cost = fn.grad.lower(acc, st.params, trainer.rest, mb, adv, None, None,
                             jnp.float32(100.0)).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        flops[frozen] = cost["flops"]
    assert flops[True] < 0.97 * flops[False], flops
