"""model.attention: the fused kernels give the einsum path's logits. The Pallas splash kernel
runs here in interpret mode (the TPU kernel's own code, on the CPU); cuDNN needs a GPU, so on
the CPU `resolve` must fall back to "xla" with a warning, never fail a run."""
import logging

import jax
import numpy as np
import pytest

from balcap_jax import sampling
from balcap_jax.models import attention
from tests.models import qwen_vl_fixtures as F

ATOL = 1e-4


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    hf, ours, _ = F.hf_and_ours("win56_full1", tmp_path_factory.mktemp("attn"))
    return ours


@pytest.mark.heavy
def test_splash_kernel_logits_and_log_probs_equal_xla(vl):
    """Qwen2.5-VL on a left-padded batch with images of several sizes: the vision tower's
    window and full blocks, the language model's training forward and the sampler's prefill
    through the splash kernel equal the einsum path."""
    batch = F.make_batch(F.MIXED_ROWS)
    comp = np.random.default_rng(0).integers(10, 90, (3, 5))
    mask = np.ones((3, 5), np.float32)
    kw = dict(max_new_tokens=4, temperature=0, eos_token_ids=[-1], rng=jax.random.key(0))
    want = np.asarray(vl(**batch))
    want_lp = np.asarray(sampling.token_logprobs(vl, batch, comp, mask))
    want_tok = np.asarray(sampling.generate(vl, batch, **kw).tokens)
    try:
        vl.set_attention("splash_interpret")
        got = np.asarray(vl(**batch))
        got_lp = np.asarray(sampling.token_logprobs(vl, batch, comp, mask))
        got_tok = np.asarray(sampling.generate(vl, batch, **kw).tokens)
    finally:
        vl.set_attention("xla")
    m = batch["attention_mask"].astype(bool)
    assert float(np.abs(got - want)[m].max()) < ATOL
    np.testing.assert_allclose(got_lp, want_lp, atol=ATOL)
    np.testing.assert_array_equal(got_tok, want_tok)


def test_resolve_falls_back_where_a_kernel_cannot_run(caplog):
    assert attention.resolve("xla") == "xla"
    assert attention.resolve("auto") == ("xla" if jax.default_backend() == "cpu" else
                                         attention.resolve("auto"))
    with caplog.at_level(logging.WARNING):
        got = attention.resolve("cudnn", "float32")
    if jax.default_backend() == "cpu":
        assert got == "xla" and "not usable" in caplog.text
    with pytest.raises(ValueError, match="model.attention='flash'"):
        attention.resolve("flash")
