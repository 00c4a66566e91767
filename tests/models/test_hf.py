"""Hugging Face checkpoints in and out (hf.py): round trips through transformers, config
versions, sharded files, mesh loading, key errors. float32 logits atol 1e-4."""
import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from balcap_jax import sharding as shd
from balcap_jax.models import from_pretrained, save_pretrained
from balcap_jax.models import hf as H
from tests.models.conftest import hf_logits

ATOL = 1e-4
IDS = np.random.default_rng(1).integers(3, 160, size=(2, 10))


def _auto_model(path):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    return m


@pytest.mark.parametrize("name", ["qwen2_gqa", "qwen2_tied", "llama"])
def test_save_then_transformers_loads_same_logits(name, hf_models, tmp_path):
    d, hf = hf_models[name]
    ours = from_pretrained(d)
    save_pretrained(ours, tmp_path)
    cfg = json.load(open(tmp_path / "config.json"))
    assert "rope_parameters" in cfg and "rope_scaling" not in cfg    # v5 form
    back = _auto_model(str(tmp_path))
    assert type(back) is type(hf)
    ref = hf_logits(hf, IDS)
    np.testing.assert_allclose(hf_logits(back, IDS), ref, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(from_pretrained(str(tmp_path))(input_ids=IDS)), ref,
                               atol=ATOL, rtol=0)


def _rewrite_config_v4(src, dst, rope_scaling=None):
    shutil.copytree(src, dst)
    cfg = json.load(open(os.path.join(src, "config.json")))
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp.pop("rope_theta")
    if rp.get("rope_type", "default") != "default":
        cfg["rope_scaling"] = rope_scaling or rp
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))


@pytest.mark.parametrize("name", ["qwen2_tied", "llama"])
def test_v4_style_config(name, hf_models, tmp_path):
    d, hf = hf_models[name]
    v4 = tmp_path / "v4"
    scaling = None
    if name == "llama":   # v4 spelled the type key "type" in old checkpoints
        scaling = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    _rewrite_config_v4(d, v4, scaling)
    raw = json.load(open(v4 / "config.json"))
    assert "rope_parameters" not in raw and "rope_theta" in raw
    ours = from_pretrained(str(v4))
    assert ours.cfg.rope_theta == hf.config.rope_parameters["rope_theta"]
    ref = hf_logits(hf, IDS)
    np.testing.assert_allclose(np.asarray(ours(input_ids=IDS)), ref, atol=ATOL, rtol=0)
    np.testing.assert_allclose(hf_logits(_auto_model(str(v4)), IDS), ref, atol=ATOL, rtol=0)


def test_rope_from_hf_forms():
    v5 = H.rope_from_hf({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                             "mrope_section": [16, 24, 24]}})
    v4 = H.rope_from_hf({"rope_theta": 1e6, "rope_scaling": {"type": "mrope",
                                                           "mrope_section": [16, 24, 24]}})
    assert v4 == v5 == dict(rope_theta=1e6, rope_type="default", rope_params=(),
                            mrope_section=(16, 24, 24))
    assert H.rope_from_hf({})["rope_theta"] == 10000.0
    with pytest.raises(NotImplementedError, match="yarn"):
        H.rope_from_hf({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_sharded_checkpoint_with_index(hf_models, tmp_path):
    _, hf = hf_models["qwen2_gqa"]
    hf.save_pretrained(tmp_path / "hf", max_shard_size="50KB")
    files = os.listdir(tmp_path / "hf")
    assert "model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 2
    ours = from_pretrained(str(tmp_path / "hf"))
    ref = hf_logits(hf, IDS)
    np.testing.assert_allclose(np.asarray(ours(input_ids=IDS)), ref, atol=ATOL, rtol=0)
    # and our own sharded save loads in transformers
    save_pretrained(ours, tmp_path / "ours", max_shard_size=50_000)
    assert os.path.exists(tmp_path / "ours" / "model.safetensors.index.json")
    np.testing.assert_allclose(hf_logits(_auto_model(str(tmp_path / "ours")), IDS), ref,
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["qwen2_gqa", "qwen2_tied"])
def test_load_onto_2x2x2_mesh(name, hf_models):
    d, hf = hf_models[name]
    assert len(jax.devices()) == 8
    mesh = shd.make_mesh((2, 2, 2))
    ours = from_pretrained(d, mesh=mesh)
    # stacked layers: a leading, replicated layers axis
    q = ours.model.layers.stack.self_attn.q_proj.kernel[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (2, 32, 2, 16)
    k = ours.model.layers.stack.self_attn.k_proj.kernel[...]
    kv_heads = hf.config.num_key_value_heads
    assert k.sharding.spec[2] == ("tensor" if kv_heads % 2 == 0 else None)
    emb = ours.model.embed_tokens.embedding[...]
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert len({s.device for s in emb.addressable_shards}) == 8
    ids, mask = IDS.copy(), np.ones_like(IDS)
    mask[1, :3] = 0
    pos = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    ref = hf_logits(hf, ids, mask, pos)
    got = np.asarray(ours(input_ids=ids, attention_mask=mask))
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], ref[valid], atol=ATOL, rtol=0)


def test_missing_tensor_is_named(hf_models, tmp_path):
    d, _ = hf_models["qwen2_gqa"]
    shutil.copytree(d, tmp_path / "ck")
    f = tmp_path / "ck" / "model.safetensors"
    t = load_file(f)
    del t["model.layers.1.self_attn.k_proj.bias"]
    t["model.layers.0.mlp.extra.weight"] = np.zeros((2,), np.float32)
    save_file(t, f, metadata={"format": "pt"})
    with pytest.raises(ValueError) as e:
        from_pretrained(str(tmp_path / "ck"))
    assert "model/layers/1/self_attn/k_proj/bias" in str(e.value)
    assert "model.layers.0.mlp.extra.weight" in str(e.value)


def test_unknown_model_type_and_missing_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="gpt2"):
        from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(str(tmp_path / "nope"))


def test_key_rule_round_trip():
    r = H.KeyRule("model.layers.{i}.self_attn.o_proj.weight",
                  "model/layers/{i}/self_attn/o_proj/kernel", H.LinearT(2),
                  aliases=("model.language_model.layers.{i}.self_attn.o_proj.weight",))
    assert r.match_hf("model.layers.12.self_attn.o_proj.weight") == \
        "model/layers/12/self_attn/o_proj/kernel"
    assert r.match_hf("model.language_model.layers.3.self_attn.o_proj.weight") == \
        "model/layers/3/self_attn/o_proj/kernel"
    assert r.match_hf("model.layers.1.self_attn.o_proj.bias") is None
    assert r.match_ours("model/layers/7/self_attn/o_proj/kernel") == \
        "model.layers.7.self_attn.o_proj.weight"
    w = np.arange(64 * 32, dtype=np.float32).reshape(64, 32)     # HF [out=D, in=H*hd]
    k = r.transform.to_ours(w, (2, 16, 64))
    np.testing.assert_array_equal(k.reshape(32, 64), w.T)
    np.testing.assert_array_equal(r.transform.to_hf(k), w)


@pytest.mark.heavy
def test_model_built_here_saves_for_transformers(tmp_path):
    """No config passthrough: our DecoderConfig alone must make a loadable v5 config.json.
    Llama with attention_bias and mlp_bias covers the o_proj/mlp bias key rules."""
    import jax.numpy as jnp
    from flax import nnx

    from balcap_jax.models import CausalLM, DecoderConfig
    cfg = DecoderConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=12, rope_theta=1e4,
                        qkv_bias=True, o_bias=True, mlp_bias=True, model_type="llama")
    lm = nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)))   # no eager random init
    rng = np.random.default_rng(1)
    for path, v in nnx.to_flat_state(nnx.state(lm, nnx.Param)):
        noise = 0.2 * rng.standard_normal(v.get_value().shape).astype(np.float32)
        v.set_value(jnp.asarray(noise + (1.0 if "norm" in str(path[-2]) else 0.0)))
    save_pretrained(lm, tmp_path)
    back = _auto_model(str(tmp_path))
    assert back.config.head_dim == 12 and back.config.attention_bias and back.config.mlp_bias
    ids = IDS % 96
    ref = hf_logits(back, ids)
    assert ref.std() > 0.5
    np.testing.assert_allclose(np.asarray(lm(input_ids=ids)), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["qwen2_gqa", "llama"])
def test_sharded_load_reads_each_block_once_and_equals_a_whole_load(name, hf_models):
    """On a (2, 2, 2) mesh every parameter is assembled from its devices' slices: exactly the
    unsharded load's values, each slice read once (replicated blocks are shared), and no
    tensor read whole (every block is one rectangle of its HF tensor)."""
    d, _ = hf_models[name]
    stats = H.LoadStats()
    sharded = from_pretrained(d, mesh=shd.make_mesh((2, 2, 2)), stats=stats)
    whole = from_pretrained(d)
    from flax import nnx
    a, b = nnx.to_flat_state(nnx.state(sharded)), nnx.to_flat_state(nnx.state(whole))
    for (pa, va), (pb, vb) in zip(a, b):
        assert pa == pb
        np.testing.assert_array_equal(np.asarray(va.get_value()), np.asarray(vb.get_value()))
    assert stats.whole == []
    assert stats.bytes_read == stats.bytes_total > 0


@pytest.mark.parametrize("transform,hf_shape,want", [
    (H.LINEAR, (48, 32), (32, 3, 16)),             # q_proj: [out, in] -> [in, heads, hd]
    (H.LinearT(2), (32, 48), (3, 16, 32)),         # o_proj: [out, in] -> [heads, hd, out]
    (H.RESHAPE, (48,), (3, 16)),                   # a bias
    (H.IDENTITY, (10, 32), (10, 32)),              # an embedding
])
def test_each_rectangular_block_is_read_from_one_slice(transform, hf_shape, want):
    """For every block a mesh can cut (leading dims of each transform's groups), the HF slice
    read and transformed equals the same block of the whole transformed tensor."""
    x = np.arange(np.prod(hf_shape), dtype=np.float32).reshape(hf_shape)
    full = transform.to_ours(x, want)
    n = len(want)
    for dim in range(n):
        for a, b in [(0, 1), (1, want[dim]), (0, want[dim])]:
            ranges = [(0, k) for k in want]
            ranges[dim] = (a, b)
            sl = H._hf_slice(transform, ranges, want, hf_shape)
            block = tuple(b_ - a_ for a_, b_ in ranges)
            expect = full[tuple(slice(*r) for r in ranges)]
            if sl is None:          # a block the helper declines must not be a contiguous one
                group = (range(transform.n_in), range(transform.n_in, n)) if isinstance(
                    transform, H.LinearT) else (range(n),)
                g = next(g for g in group if dim in g)
                assert dim != g[0]
                continue
            np.testing.assert_array_equal(transform.to_ours(x[sl], block), expect)
