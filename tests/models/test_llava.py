"""LLaVA-1.5 against transformers v5: submodules, full logits, checkpoint spellings, save/load,
prefill + decode, greedy generation.

Tolerance: float32 atol 1e-4 on logits and features (observed ~1e-5). Only valid (non-padding)
positions are compared: HF's logits at left-padding positions are not meaningful. HF is given
position_ids = cumsum(mask) - 1, as its generate() computes them for left-padded batches.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from balcap_jax import sampling
from balcap_jax.models import from_pretrained, layers, save_pretrained
from balcap_jax.models.llava import Llava, LlavaConfig
from tests.models import llava_fixtures as fx

ATOL = 1e-4


def _hf_logits(hf, batch):
    with torch.no_grad():
        return hf(**fx.torch_inputs(batch)).logits.float().numpy()


def _max_err(a, b, mask=None):
    d = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))
    return float((d if mask is None else d[mask.astype(bool)]).max())


@pytest.fixture(scope="module", params=sorted(fx.CONFIGS))
def trio(request, tmp_path_factory):
    hf, ours, path = fx.hf_and_ours(request.param, tmp_path_factory.mktemp("llava"))
    return request.param, hf, ours, path


@pytest.fixture(scope="module")
def mixed(trio):
    return fx.make_batch(fx.MIXED_ROWS, trio[0])


def _t(x):
    return torch.from_numpy(np.asarray(x))


# ----------------------------------------------------------------------------- submodules

def test_layer_norm_matches_torch():
    x = np.random.default_rng(0).standard_normal((3, 5, 16)).astype(np.float32) * 3 + 1
    ln = torch.nn.LayerNorm(16, eps=1e-5)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(16))
        ln.bias.copy_(torch.randn(16))
        want = ln(_t(x)).numpy()
    ours = layers.LayerNorm(16, eps=1e-5)
    ours.weight[...] = jnp.asarray(ln.weight.detach().numpy())
    ours.bias[...] = jnp.asarray(ln.bias.detach().numpy())
    assert _max_err(ours(jnp.asarray(x)), want) < 1e-5


def test_clip_embeddings_and_encoder_layer(trio, mixed):
    _, hf, ours, _ = trio
    tower = hf.model.vision_tower
    pv = mixed["pixel_values"]
    with torch.no_grad():
        emb = tower.embeddings(_t(pv))
        layer0 = tower.encoder.layers[0](tower.pre_layrnorm(emb), attention_mask=None)
        layer0 = layer0[0] if isinstance(layer0, tuple) else layer0
    call = nnx.jit(lambda module, x: module(x))   # one compile instead of op-by-op dispatch
    got_emb = call(ours.vision_tower.embeddings, jnp.asarray(pv))
    assert _max_err(got_emb, emb.numpy()) < ATOL
    x = call(ours.vision_tower.pre_layrnorm, jnp.asarray(emb.numpy()))
    assert _max_err(call(ours.vision_tower.encoder.layers.layer(0), x), layer0.numpy()) < ATOL


def test_image_features_and_projector(trio, mixed):
    name, hf, ours, _ = trio
    pv = mixed["pixel_values"]
    with torch.no_grad():
        feats = hf.model.get_image_features(pixel_values=_t(pv))
        feats = getattr(feats, "pooler_output", feats)
        feats = torch.cat(list(feats), 0) if isinstance(feats, (list, tuple)) else feats
        want = feats.reshape(-1, feats.shape[-1]).numpy()
        x = np.random.default_rng(1).standard_normal(
            (5, ours.multi_modal_projector.linear_1.in_shape[0])).astype(np.float32)
        want_proj = hf.model.multi_modal_projector(_t(x)).numpy()
    got = nnx.jit(lambda m, p: m.encode_images(p))(ours, jnp.asarray(pv))
    assert got.shape == (len(pv) * fx.tokens_per_image(name), 64)
    assert _max_err(got, want) < ATOL
    proj = nnx.jit(lambda m, x: m(x))(ours.multi_modal_projector, jnp.asarray(x))
    assert _max_err(proj, want_proj) < ATOL


# ----------------------------------------------------------------------------- full model

def test_full_logits_parity(trio, mixed):
    _, hf, ours, _ = trio
    assert isinstance(ours, Llava)
    want = _hf_logits(hf, mixed)
    got = ours(**mixed)
    assert got.dtype == jnp.float32 and got.shape == want.shape
    assert _max_err(got, want, mixed["attention_mask"]) < ATOL
    assert np.std(want[mixed["attention_mask"].astype(bool)]) > 0.5   # not flat


def test_positions_default_and_padding_invariance(trio, mixed):
    name, _, ours, _ = trio
    full = np.asarray(ours(**mixed))
    no_pos = {k: v for k, v in mixed.items() if k != "position_ids"}
    np.testing.assert_allclose(np.asarray(ours(**no_pos)), full, atol=1e-6)
    row = fx.make_batch(fx.MIXED_ROWS[:1], name)   # row 0 alone: no padding, one image
    t0 = row["input_ids"].shape[1]
    np.testing.assert_allclose(np.asarray(ours(**row))[0], full[0, -t0:], atol=ATOL)


def test_text_only_and_image_token_mismatch(trio, mixed):
    name, hf, ours, _ = trio
    batch = fx.make_batch([[1, 20, 21, 22], [1, 30, 31, 32, 33, 34]], name)
    assert _max_err(ours(**batch), _hf_logits(hf, batch), batch["attention_mask"]) < ATOL
    with pytest.raises(ValueError, match="image tokens"):
        ours(**dict(mixed, pixel_values=mixed["pixel_values"][:2]))


def test_image_token_is_never_sampled(trio):
    """The sampler masks a policy's vision_token_ids: for LLaVA, <image>."""
    _, _, ours, _ = trio
    assert ours.vision_token_ids == (fx.IMG,)


def test_config_round_trip(trio):
    _, _, ours, path = trio
    with open(os.path.join(path, "config.json")) as f:
        saved = json.load(f)
    again = LlavaConfig.from_hf(ours.cfg.to_hf())
    assert again == ours.cfg == LlavaConfig.from_hf(saved)


def test_hub_style_partial_config_takes_hf_defaults():
    """llava-hf/llava-1.5-7b-hf lists only non-default fields; transformers fills the rest."""
    from transformers import LlavaConfig as HFConfig

    from balcap_jax.models.presets import preset
    d = preset("llava_1_5_7b")
    d["text_config"] = {"model_type": "llama", "vocab_size": 32064, "rms_norm_eps": 1e-5,
                        "max_position_embeddings": 4096}
    d["vision_config"].pop("hidden_act", None)
    ours, ref = LlavaConfig.from_hf(d), HFConfig(**d)
    assert (ours.text.hidden_size, ours.text.num_layers, ours.text.num_heads,
            ours.text.num_kv_heads, ours.text.intermediate_size) == (
        ref.text_config.hidden_size, ref.text_config.num_hidden_layers,
        ref.text_config.num_attention_heads, ref.text_config.num_key_value_heads,
        ref.text_config.intermediate_size)
    assert ours.vision.hidden_act == ref.vision_config.hidden_act == "quick_gelu"
    assert ours.tokens_per_image == 576 and ours.vision_feature_layer == (-2,)


def _rewrite(src, dst, rename, extra=None):
    from safetensors.numpy import load_file, save_file
    tensors = load_file(os.path.join(src, "model.safetensors"))
    out = {rename(k): v for k, v in tensors.items()}
    out.update(extra or {})
    os.makedirs(dst, exist_ok=True)
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src, "config.json")) as f, \
            open(os.path.join(dst, "config.json"), "w") as g:
        g.write(f.read())


@pytest.mark.parametrize("layout", ["hub", "v5_modules"])
def test_other_checkpoint_spellings_load_equal(trio, mixed, tmp_path, layout):
    """hub: vision_tower.vision_model.* (+ the old position_ids buffer); v5_modules: the names
    of v5's modules (model.language_model.*, model.vision_tower.*, lm_head.weight)."""
    _, _, ours, path = trio
    if layout == "hub":
        ren = lambda k: k.replace("vision_tower.", "vision_tower.vision_model.", 1)
        extra = {"vision_tower.vision_model.embeddings.position_ids":
                 np.arange(ours.cfg.vision.num_positions, dtype=np.int64)[None]}
    else:
        def ren(k):
            if k.startswith("language_model.model."):
                return "model.language_model." + k[len("language_model.model."):]
            if k.startswith("language_model.lm_head."):
                return k[len("language_model."):]
            return "model." + k
        extra = None
    _rewrite(path, str(tmp_path), ren, extra)
    other = from_pretrained(str(tmp_path))
    np.testing.assert_array_equal(np.asarray(other(**mixed)), np.asarray(ours(**mixed)))


def test_wrong_key_is_an_error(trio, tmp_path):
    _, _, _, path = trio
    _rewrite(path, str(tmp_path), lambda k: k.replace("linear_1", "linear_9"))
    with pytest.raises(ValueError, match="linear_9"):
        from_pretrained(str(tmp_path))


@pytest.mark.heavy
def test_save_then_transformers_load(trio, mixed, tmp_path):
    """Saved directory loads in transformers with no missing/unexpected keys, same logits; the
    unused last CLIP layer and post_layernorm are written back unchanged."""
    from transformers import LlavaForConditionalGeneration
    _, hf, ours, _ = trio
    save_pretrained(ours, str(tmp_path))
    back, info = LlavaForConditionalGeneration.from_pretrained(str(tmp_path),
                                                               output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    back.eval()
    assert _max_err(ours(**mixed), _hf_logits(back, mixed), mixed["attention_mask"]) < ATOL
    a, b = hf.state_dict(), back.state_dict()
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k].numpy(), b[k].numpy(), err_msg=k)


@pytest.mark.heavy
def test_prefill_and_decode_match_hf(trio, mixed):
    """Sampler contract: prepare_prompt + embed_prompt prefill with a KV cache, then one token
    at a time at slot T+j with position T+j+delta, equals HF on the whole sequence."""
    _, hf, ours, _ = trio
    b, t = mixed["input_ids"].shape
    extra = np.array([[30, 31, 32]] * b)
    n = extra.shape[1]
    full_mask = np.concatenate([mixed["attention_mask"], np.ones_like(extra)], 1)
    full = dict(mixed, input_ids=np.concatenate([mixed["input_ids"], extra], 1),
                attention_mask=full_mask,
                position_ids=np.clip(np.cumsum(full_mask, 1) - 1, 0, None))
    want = _hf_logits(hf, full)

    @nnx.jit
    def prefill(model, embed_inputs, positions, kv_mask, cache):
        hidden, cache = model.forward_embeds(model.embed_prompt(embed_inputs), positions,
                                             kv_mask, cache, 0)
        return model.logits(hidden), cache

    @nnx.jit
    def step(model, tok, pos, kv_mask, cache, index):
        hidden, cache = model.forward_embeds(model.embed(tok), pos, kv_mask, cache, index)
        return model.logits(hidden), cache

    embed_inputs, positions, deltas = ours.prepare_prompt(mixed)
    assert len(embed_inputs["vision"]["pixel_values"]) == 4   # 3 images padded to 4
    kv_mask = jnp.asarray(full_mask, jnp.int32)
    logits, cache = prefill(ours, embed_inputs, jnp.asarray(positions), kv_mask,
                            ours.init_cache(b, t + n))
    assert _max_err(logits, want[:, :t], mixed["attention_mask"]) < ATOL
    for j in range(n):
        pos = jnp.asarray(t + j + deltas)[:, None]
        logits, cache = step(ours, jnp.asarray(extra[:, j:j + 1]), pos, kv_mask, cache, t + j)
        assert _max_err(np.asarray(logits)[:, 0], want[:, t + j]) < ATOL


@pytest.mark.heavy
def test_greedy_generate_equals_transformers(trio, mixed):
    """sampling.generate(temperature=0) vs HF generate(do_sample=False) on a left-padded batch,
    token for token up to the first step where HF's top-2 logits are within 1e-3 (a near tie
    that float noise may break either way)."""
    _, hf, ours, _ = trio
    steps, eos = 8, 2
    batch = {k: v for k, v in mixed.items() if k != "position_ids"}
    with torch.no_grad():   # suppress_tokens: <image> is never sampled (as our sampler)
        out = hf.generate(**fx.torch_inputs(batch), max_new_tokens=steps, do_sample=False,
                          eos_token_id=eos, pad_token_id=0, output_scores=True,
                          return_dict_in_generate=True, suppress_tokens=[fx.IMG])
    want = out.sequences[:, batch["input_ids"].shape[1]:].numpy()
    scores = torch.stack(out.scores, 1).numpy()                    # [B, steps, V]
    top2 = np.sort(scores, -1)[..., -2:]
    near_tie = (top2[..., 1] - top2[..., 0]) < 1e-3
    got = sampling.generate(ours, batch, max_new_tokens=steps, temperature=0.0,
                            eos_token_ids=eos, rng=jax.random.key(0), pad_id=0)
    tokens, lengths = np.asarray(got.tokens), np.asarray(got.lengths)
    compared = 0
    for r in range(len(tokens)):
        n = min(int(lengths[r]), want.shape[1])
        ties = np.nonzero(near_tie[r, :n])[0]
        n = int(ties[0]) + 1 if len(ties) else n   # the tied step itself may differ
        upto = n - 1 if len(ties) else n
        np.testing.assert_array_equal(tokens[r, :upto], want[r, :upto], err_msg=f"row {r}")
        compared += upto
    assert compared >= len(tokens) * 3, "too few steps compared to mean anything"
    # the sampler's logprobs are log_softmax of HF's scores at the chosen tokens
    lp = torch.log_softmax(torch.from_numpy(scores), -1).numpy()
    chosen = np.take_along_axis(lp, want[..., None], -1)[..., 0]
    m = np.asarray(got.mask).astype(bool) & (tokens == want)
    assert _max_err(np.asarray(got.logprobs)[m], chosen[m]) < ATOL


@pytest.mark.heavy
def test_token_logprobs_match_hf(trio, mixed):
    _, hf, ours, _ = trio
    comp = np.array([[40, 41, 42, 43]] * 3)
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], np.float32)
    b, t = mixed["input_ids"].shape
    full_mask = np.concatenate([mixed["attention_mask"], np.ones_like(comp)], 1)
    full = dict(mixed, input_ids=np.concatenate([mixed["input_ids"], comp], 1),
                attention_mask=full_mask,
                position_ids=np.clip(np.cumsum(full_mask, 1) - 1, 0, None))
    logits = _hf_logits(hf, full)
    logits[..., fx.IMG] = -np.inf      # <image> is left out of the policy's distribution
    lp = torch.log_softmax(torch.from_numpy(logits), -1).numpy()
    want = np.take_along_axis(lp[:, t - 1:-1], comp[..., None], -1)[..., 0] * mask
    batch = {k: v for k, v in mixed.items() if k != "position_ids"}
    got = sampling.token_logprobs(ours, batch, comp, mask)
    assert _max_err(got, want) < ATOL


BF16_ATOL = 0.3      # bf16 keeps ~3 significant digits; logit std ~1.6


@pytest.mark.heavy
def test_bfloat16(trio, mixed):
    _, hf, _, path = trio
    ours16 = from_pretrained(path, dtype="bfloat16")
    assert ours16.vision_tower.embeddings.patch_embedding.kernel[...].dtype == jnp.bfloat16
    want = _hf_logits(hf, mixed)
    got = np.asarray(ours16(**mixed))
    m = mixed["attention_mask"].astype(bool)
    assert _max_err(got, want, m) < BF16_ATOL
    assert (got.argmax(-1) == want.argmax(-1))[m].mean() >= 0.9


@pytest.mark.heavy
def test_sharded_on_8_devices(trio, mixed):
    """Loaded onto a (2, 2, 2) mesh: same logits and greedy samples as on one device (3 prompt
    rows and 4 padded images: dims that do not divide the mesh axes are replicated)."""
    from balcap_jax import sharding as shd
    assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
    _, _, ours, path = trio
    sharded = from_pretrained(path, mesh=shd.make_mesh((2, 2, 2)))
    k = sharded.model.layers.stack.self_attn.q_proj.kernel[...]   # [layers, embed, heads, hd]
    assert len(k.sharding.device_set) == 8 and not k.sharding.is_fully_replicated
    batch = {k: v for k, v in mixed.items() if k != "position_ids"}
    np.testing.assert_allclose(np.asarray(sharded(**batch)), np.asarray(ours(**batch)), atol=ATOL)
    kw = dict(max_new_tokens=4, temperature=0.0, eos_token_ids=2, rng=jax.random.key(0))
    a = sampling.generate(sharded, batch, **kw)
    b = sampling.generate(ours, batch, **kw)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))


@pytest.mark.heavy
def test_llava_processor_with_llama_vocabulary(tmp_path):
    """Our LlavaProcessor with a Llama-style 32k SentencePiece vocabulary (<image> = 32000):
    its batch gives transformers' logits on a tiny LLaVA with the real token ids."""
    from PIL import Image

    from balcap_jax.processing import LlavaImageProcessor, LlavaProcessor, caption_messages
    from balcap_jax.tokenizers import llama_sp_tokenizer
    tok = llama_sp_tokenizer()
    proc = LlavaProcessor(tok, LlavaImageProcessor(size=28, crop_size=(28, 28)), patch_size=14)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 30, 3), np.uint8)) for _ in range(2)]
    convs = [caption_messages("Describe this image."),
             caption_messages("What colour is the sky in this picture, roughly?")]
    batch = proc(convs, images=[[im] for im in images])
    assert (batch["input_ids"] == 32000).sum() == 2 * fx.tokens_per_image("l2_default")
    assert batch["input_ids"][0, -1] == tok.convert_tokens_to_ids(":")   # "... ASSISTANT:"
    hf = fx.hf_model("l2_default", vocab_size=32064, image_token=32000)
    hf.save_pretrained(str(tmp_path))
    ours = from_pretrained(str(tmp_path))
    mask = batch["attention_mask"]
    ref_in = dict(input_ids=batch["input_ids"].astype(np.int64), attention_mask=mask,
                  pixel_values=batch["pixel_values"],
                  position_ids=np.clip(np.cumsum(mask, 1) - 1, 0, None))
    assert _max_err(ours(**batch), _hf_logits(hf, ref_in), mask) < ATOL
