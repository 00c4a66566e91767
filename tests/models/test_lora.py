"""LoRA / QLoRA on a tiny Qwen2.5-VL against transformers and peft.

Tolerances: float32 logits atol 1e-4 (as the model parity tests); int8 / NF4 dequantisation
error bounded by half a quantisation step of each block's scale (the round-to-nearest bound).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from balcap_jax.models import from_pretrained, lora, quant, save_pretrained
from tests.models import qwen_vl_fixtures as fx

ATOL = 1e-4
NAME = "win56_full1"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    hf, _, path = fx.hf_and_ours(NAME, tmp_path_factory.mktemp("lora"))
    return hf, path


@pytest.fixture(scope="module")
def mixed():
    return fx.make_batch(fx.MIXED_ROWS)


def _hf_logits(model, batch):
    with torch.no_grad():
        return model(**fx.torch_inputs(batch)).logits.float().numpy()


def _err(a, b, mask):
    return float(np.abs(np.asarray(a) - np.asarray(b))[mask.astype(bool)].max())


def _randomise_b(model, seed=1):
    """Non-zero B matrices (as after training), so the adapters change the logits."""
    key = jax.random.key(seed)
    for _, node in lora.adapted(model):
        key, sub = jax.random.split(key)
        old = node.lora_b.get_value()
        node.lora_b.set_value(jax.device_put(0.05 * jax.random.normal(sub, old.shape),
                                             old.sharding))


def test_fresh_adapters_leave_logits_unchanged(setup, mixed):
    _, path = setup
    base = from_pretrained(path)
    model = from_pretrained(path)
    names = lora.apply_lora(model, rank=4, alpha=8)
    # every language-model attention and MLP projection, nothing in the vision tower
    assert len(names) == 7 and all(n.startswith("model/layers/stack/") for n in names)
    got, want = model(**mixed), base(**mixed)
    # B = 0 adds exact zeros; only XLA's fusion order differs (observed 3e-6)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
    _randomise_b(model)
    assert _err(model(**mixed), want, mixed["attention_mask"]) > 1e-2   # the adapters act


def test_merged_export_and_peft_adapter_load_with_equal_logits(setup, mixed, tmp_path):
    from peft import PeftModel
    from transformers import Qwen2_5_VLForConditionalGeneration
    hf, path = setup
    model = from_pretrained(path)
    lora.apply_lora(model, rank=4, alpha=8, parts=("language", "vision"),
                    modules=lora.DEFAULT_MODULES + ("qkv",))
    _randomise_b(model)
    ours = np.asarray(model(**mixed))
    m = mixed["attention_mask"]
    # merged: a plain checkpoint transformers loads
    save_pretrained(lora.merged(model), str(tmp_path / "merged"))
    back = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path / "merged")).eval()
    assert _err(_hf_logits(back, mixed), ours, m) < ATOL
    # adapter only: peft puts it on the transformers base
    names = lora.save_peft(model, str(tmp_path / "adapter"), base_model=path)
    assert any(".visual." in n for n in names) and any(".language_model." in n for n in names)
    peft_model = PeftModel.from_pretrained(fx.hf_model(NAME), str(tmp_path / "adapter")).eval()
    assert _err(_hf_logits(peft_model, mixed), ours, m) < ATOL
    assert _err(_hf_logits(hf, mixed), ours, m) > 1e-2       # peft's adapters were applied


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantised_base_round_trip_bound(kind):
    w = jax.random.normal(jax.random.key(0), (3, 64, 4, 16), jnp.float32)   # stacked [L, D, H, hd]
    codes, scale = quant.quantize(kind, w, (1,))
    back = quant.dequantize(kind, codes, scale, jnp.float32)
    assert back.shape == w.shape
    if kind == "int8":
        assert codes.dtype == jnp.int8
        step = np.broadcast_to(np.asarray(scale), w.shape)      # one step per output channel
        assert np.all(np.abs(np.asarray(back - w)) <= 0.5 * step + 1e-7)
    else:
        assert codes.dtype == jnp.uint8 and codes.shape == (3, 64, 4, 8)   # two codes a byte
        gaps = np.diff(quant.NF4_LEVELS).max()       # widest gap between neighbouring levels
        per = np.repeat(np.asarray(scale), 16 // scale.shape[-1], axis=-1)
        assert np.all(np.abs(np.asarray(back - w)) <= 0.5 * gaps * per + 1e-6)
        # the block's largest magnitude is a level (+-1) exactly
        assert np.allclose(np.abs(np.asarray(back)).max(-1), np.abs(np.asarray(w)).max(-1))


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_qlora_model_runs_on_dequantised_kernels(setup, mixed, kind):
    _, path = setup
    model = from_pretrained(path)
    lora.apply_lora(model, rank=4, alpha=8, quantize=kind)
    q = model.model.layers.stack.self_attn.q_proj
    assert q.quant == kind and q.kernel[...].dtype == (jnp.int8 if kind == "int8" else jnp.uint8)
    # the same model with each kernel replaced by its dequantised values, no quantisation
    dense = lora.merged(model)
    np.testing.assert_allclose(np.asarray(model(**mixed)), np.asarray(dense(**mixed)),
                               atol=ATOL)
    # and near the unquantised model: mean |error| relative to the logits' spread (observed
    # int8 1.6%, nf4 22% on these random weights of std 0.2, far rougher than trained ones)
    m = mixed["attention_mask"].astype(bool)
    base = np.asarray(from_pretrained(path)(**mixed))[m]
    rel = np.abs(np.asarray(model(**mixed))[m] - base).mean() / base.std()
    assert rel < (0.03 if kind == "int8" else 0.3), rel


def test_shared_base_view_holds_the_same_arrays(setup, mixed):
    _, path = setup
    model = from_pretrained(path)
    lora.apply_lora(model, rank=4, alpha=8)
    _randomise_b(model)
    view = lora.without_adapters(model)
    assert not lora.has_lora(view) and lora.has_lora(model)
    base_arrays = {id(v.get_value()) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    view_arrays = [id(v.get_value()) for _, v in nnx.to_flat_state(nnx.state(view, nnx.Param))]
    assert all(a in base_arrays for a in view_arrays)        # no copy of any weight
    np.testing.assert_array_equal(np.asarray(view(**mixed)),
                                  np.asarray(from_pretrained(path)(**mixed)))


@pytest.mark.heavy
def test_adapters_and_quantised_base_sharded_on_8_devices(setup, mixed):
    """On a (2, 2, 2) mesh: adapters, codes and scales are created in place by their logical
    axes (one program per array, as every host of a pod runs it), and the logits equal the
    same adapted, NF4-quantised model on one device."""
    from balcap_jax import sharding as shd
    _, path = setup
    one = from_pretrained(path)
    lora.apply_lora(one, rank=4, alpha=8, quantize="nf4")
    mesh = shd.make_mesh((2, 2, 2))
    many = from_pretrained(path, mesh=mesh)
    lora.apply_lora(many, rank=4, alpha=8, quantize="nf4", mesh=mesh)
    _randomise_b(one)
    _randomise_b(many)
    q = many.model.layers.stack.mlp.gate_proj
    for var in (q.lora_a, q.lora_b, q.kernel, q.kernel_scale):
        want = shd.named_sharding(var.get_metadata()["out_sharding"], var.get_value().shape,
                                  mesh, shd.Rules())
        assert var.get_value().sharding.is_equivalent_to(want, var.get_value().ndim)
    assert not q.kernel[...].sharding.is_fully_replicated
    np.testing.assert_allclose(np.asarray(many(**mixed)), np.asarray(one(**mixed)), atol=ATOL)


def _dropout_logits(model, key, rate):
    """Text-only logits with LoRA dropout at `rate` inside the traced forward."""
    from balcap_jax.models import layers
    graphdef, state = nnx.split(model)
    ids = jnp.arange(10, 26, dtype=jnp.int32)[None]
    pos = jnp.broadcast_to(jnp.arange(16)[None, None], (3, 1, 16))

    @jax.jit
    def f(state, key):
        m = nnx.merge(graphdef, state)
        with layers.lora_dropout(key, rate):
            h, _ = m.forward_embeds(m.embed(ids), pos, jnp.ones_like(ids))
        return m.logits(h)
    return np.asarray(f(state, key))


def test_lora_dropout_touches_only_the_adapter_path(setup):
    _, path = setup
    model = from_pretrained(path)
    lora.apply_lora(model, rank=4, alpha=8)
    k0, k1 = jax.random.key(0), jax.random.key(1)
    plain = _dropout_logits(model, k0, 0.0)
    # B = 0: the adapters add nothing, dropped or not
    np.testing.assert_allclose(_dropout_logits(model, k0, 0.5), plain, atol=1e-5, rtol=0)
    _randomise_b(model)
    plain = _dropout_logits(model, k0, 0.0)
    a, b, c = (_dropout_logits(model, k, 0.5) for k in (k0, k0, k1))
    np.testing.assert_array_equal(a, b)                  # the key fixes the masks
    assert np.abs(a - plain).max() > 1e-3 and np.abs(a - c).max() > 1e-3
