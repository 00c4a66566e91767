"""Per-submodule parity of balcap_jax.models.layers against transformers v5 (PyTorch, float32).

Tolerance: float32 atol 1e-5 for single submodules (1e-4 is the logit tolerance of the brief).
Weights use std 0.2 so outputs are not flat.
"""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers.models.qwen2 import modeling_qwen2 as hq
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hvl
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLVisionConfig,
)

from balcap_jax.models import layers as L

ATOL = 1e-5
torch.manual_seed(0)


@nnx.jit
def run(module, *args):
    """One compiled call instead of dozens of eagerly dispatched ops (faster on 2 CPUs)."""
    return module(*args)


def t2n(t):
    return t.detach().float().numpy()


def randomise(module, std=0.2):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module


def set_linear(proj: L.Proj, lin: torch.nn.Linear):
    """HF Linear [out, in] -> our kernel [in..., out...]."""
    k = t2n(lin.weight).T.reshape(proj.kernel[...].shape)
    proj.kernel[...] = jnp.asarray(k)
    if lin.bias is not None:
        proj.bias[...] = jnp.asarray(t2n(lin.bias).reshape(proj.bias[...].shape))


def qwen2_cfg(**kw):
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rope_parameters={
                    "rope_type": "default", "rope_theta": 10000.0}, rms_norm_eps=1e-6,
                attn_implementation="eager")
    base.update(kw)
    return Qwen2Config(**base)


def test_rmsnorm():
    hf = randomise(hq.Qwen2RMSNorm(64, eps=1e-6))
    ours = L.RMSNorm(64, eps=1e-6)
    ours.weight[...] = jnp.asarray(t2n(hf.weight))
    x = torch.randn(2, 5, 64) * 3
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x.numpy()))), t2n(hf(x)), atol=ATOL)


def _rms_grads(x, w, dy):
    import jax
    return jax.jit(jax.grad(lambda x, w: jnp.sum(L.rms_norm(x, w, 1e-6).astype(jnp.float32)
                                                 * dy), argnums=(0, 1)))(x, w)


def test_rmsnorm_backward_matches_torch():
    """rms_norm's hand-written backward against torch autograd through HF's Qwen2RMSNorm."""
    hf = randomise(hq.Qwen2RMSNorm(64, eps=1e-6))
    x = (torch.randn(3, 7, 64) * 3).requires_grad_()
    dy = torch.randn(3, 7, 64)
    (hf(x) * dy).sum().backward()
    dx, dw = _rms_grads(jnp.asarray(t2n(x)), jnp.asarray(t2n(hf.weight)), jnp.asarray(t2n(dy)))
    for got, want in ((dx, x.grad), (dw, hf.weight.grad)):
        want = t2n(want)
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("w_dtype", ["float32", "bfloat16"])
def test_rmsnorm_backward_bf16(w_dtype):
    """bf16 activations (2-D and 3-D; float32 or bf16 weight): gradients within bf16 rounding
    of float32 autodiff of the forward formula on the same (rounded) inputs, in their dtypes."""
    import jax
    r = np.random.default_rng(0)
    for shape in ((5, 64), (2, 9, 64)):
        x = jnp.asarray(r.normal(size=shape) * 3, jnp.bfloat16)
        w = jnp.asarray(r.normal(size=64), w_dtype)
        dy = jnp.asarray(r.normal(size=shape), jnp.float32)

        def plain(x, w, dy=dy):
            n = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
            return jnp.sum(w * n * dy)
        want = jax.grad(plain, argnums=(0, 1))(x.astype(jnp.float32), w.astype(jnp.float32))
        got = _rms_grads(x, w, dy)
        for g, ref, dt in zip(got, want, (x.dtype, w.dtype)):
            assert g.dtype == dt and g.shape == ref.shape
            np.testing.assert_allclose(np.asarray(g, np.float32), ref,
                                       atol=2e-2 * float(jnp.abs(ref).max()))


@pytest.mark.parametrize("bias,act", [(False, "silu"), (True, "silu"), (True, "gelu_pytorch_tanh")])
def test_gated_mlp(bias, act):
    cfg = qwen2_cfg(hidden_act=act)
    hf = randomise(hvl.Qwen2_5_VLMLP(cfg, bias=bias))
    ours = L.GatedMLP(64, 96, bias=bias, act=act)
    for name in ("gate_proj", "up_proj", "down_proj"):
        set_linear(getattr(ours, name), getattr(hf, name))
    x = torch.randn(2, 5, 64)
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x.numpy()))), t2n(hf(x)), atol=ATOL)


@pytest.mark.parametrize("theta", [10000.0, 1e6])
def test_rope_1d(theta):
    cfg = qwen2_cfg(rope_parameters={"rope_type": "default", "rope_theta": theta})
    rot = hq.Qwen2RotaryEmbedding(cfg)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 2, 3]])
    cos, sin = rot(torch.zeros(1), pos)
    inv = L.rope_inv_freq(16, theta)
    np.testing.assert_allclose(inv, t2n(rot.inv_freq), rtol=1e-6)
    c, s = L.rope_cos_sin(jnp.asarray(pos.numpy()), inv)
    np.testing.assert_allclose(np.asarray(c), t2n(cos), atol=ATOL)
    np.testing.assert_allclose(np.asarray(s), t2n(sin), atol=ATOL)
    q, k = torch.randn(2, 4, 6, 16), torch.randn(2, 2, 6, 16)     # HF layout [B, H, T, hd]
    hq_, hk_ = hq.apply_rotary_pos_emb(q, k, cos, sin)
    oq = L.apply_rotary(jnp.asarray(q.numpy().transpose(0, 2, 1, 3)), c, s)
    np.testing.assert_allclose(np.asarray(oq).transpose(0, 2, 1, 3), t2n(hq_), atol=ATOL)
    ok = L.apply_rotary(jnp.asarray(k.numpy().transpose(0, 2, 1, 3)), c, s)
    np.testing.assert_allclose(np.asarray(ok).transpose(0, 2, 1, 3), t2n(hk_), atol=ATOL)


def test_rope_llama3_and_linear_inv_freq():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    for params in ({"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5},
                   {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                    "rope_theta": 5e5}):
        cfg = LlamaConfig(hidden_size=64, num_attention_heads=2, rope_parameters=dict(params),
                          max_position_embeddings=256)
        ref, _ = ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, "cpu")
        p = dict(params)
        ours = L.rope_inv_freq(32, p.pop("rope_theta"), p.pop("rope_type"), **p)
        np.testing.assert_allclose(ours, t2n(ref), rtol=1e-6)


def test_mrope_matches_hf():
    cfg = Qwen2_5_VLTextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                               rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                "mrope_section": [2, 3, 3]})
    rot = hvl.Qwen2_5_VLRotaryEmbedding(cfg)
    pos = torch.stack([torch.tensor([[0, 1, 2, 3, 3, 3, 3, 6, 7]] * 2),
                       torch.tensor([[0, 1, 2, 3, 3, 4, 4, 6, 7]] * 2),
                       torch.tensor([[0, 1, 2, 3, 4, 3, 4, 6, 7]] * 2)])  # [3, B, T]
    cos, sin = rot(torch.zeros(1), pos)
    c, s = L.mrope_cos_sin(jnp.asarray(pos.numpy()), L.rope_inv_freq(16, 1e6), [2, 3, 3])
    np.testing.assert_allclose(np.asarray(c), t2n(cos), atol=ATOL)
    np.testing.assert_allclose(np.asarray(s), t2n(sin), atol=ATOL)
    # the sections really mix the axes: differs from plain 1-D rope on the t row
    c1, _ = L.rope_cos_sin(jnp.asarray(pos[0].numpy()), L.rope_inv_freq(16, 1e6))
    assert np.abs(np.asarray(c1) - np.asarray(c)).max() > 1e-3


def test_vision_rope_matches_hf():
    vcfg = Qwen2_5_VLVisionConfig(hidden_size=32, num_heads=2, depth=1)
    rot = hvl.Qwen2_5_VLVisionRotaryEmbedding(vcfg)
    from transformers.vision_utils import get_vision_position_ids
    pos = get_vision_position_ids(torch.tensor([[1, 4, 6]]), 2)  # [N, 2]
    cos, sin = rot(torch.zeros(1), pos)
    c, s = L.vision_rope_cos_sin(jnp.asarray(pos.numpy()), L.vision_rope_inv_freq(16, 10000.0))
    np.testing.assert_allclose(np.asarray(c), t2n(cos), atol=ATOL)
    np.testing.assert_allclose(np.asarray(s), t2n(sin), atol=ATOL)
    q, k = torch.randn(24, 2, 16), torch.randn(24, 2, 16)
    hq_, _ = hvl.apply_rotary_pos_emb_vision(q, k, cos, sin)
    np.testing.assert_allclose(np.asarray(L.apply_rotary(jnp.asarray(q.numpy()), c, s)),
                               t2n(hq_), atol=ATOL)


def _hf_attention_mask(mask_bool):
    return torch.where(torch.from_numpy(np.array(mask_bool))[:, None], 0.0,
                       torch.finfo(torch.float32).min)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_gqa_attention_left_padded(kv_heads):
    cfg = qwen2_cfg(num_key_value_heads=kv_heads)
    hf = randomise(hq.Qwen2Attention(cfg, 0)).eval()
    ours = L.Attention(64, 4, kv_heads, 16, qkv_bias=True)
    for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
        set_linear(getattr(ours, n), getattr(hf, n))
    kv_mask = np.array([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])
    pos = np.clip(np.cumsum(kv_mask, -1) - 1, 0, None)
    x = torch.randn(2, 7, 64)
    cos, sin = hq.Qwen2RotaryEmbedding(cfg)(x, torch.from_numpy(pos))
    mask = L.causal_mask(jnp.asarray(kv_mask), 7)
    ref, _ = hf(x, (cos, sin), _hf_attention_mask(mask))
    c, s = L.rope_cos_sin(jnp.asarray(pos), L.rope_inv_freq(16, 10000.0))
    out, cache = run(ours, jnp.asarray(x.numpy()), c, s, mask)
    assert cache is None
    valid = kv_mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out)[valid], t2n(ref)[valid], atol=ATOL)

    # same result written through a KV cache in two steps (prefill 4, then 3 tokens)
    ck = jnp.zeros((2, kv_heads, 16, 10)); cv = jnp.zeros((2, kv_heads, 10, 16))  # k [B,KV,hd,S]
    kvm = jnp.asarray(np.pad(kv_mask, ((0, 0), (0, 3))))
    o1, (ck, cv) = run(ours, jnp.asarray(x.numpy()[:, :4]), c[:, :4], s[:, :4],
                        L.causal_mask(kvm, 4, 0), (ck, cv), 0)
    o2, _ = run(ours, jnp.asarray(x.numpy()[:, 4:]), c[:, 4:], s[:, 4:],
                 L.causal_mask(kvm, 3, 4), (ck, cv), 4)
    both = np.concatenate([np.asarray(o1), np.asarray(o2)], axis=1)
    np.testing.assert_allclose(both[valid], t2n(ref)[valid], atol=ATOL)


@pytest.mark.heavy
def test_vision_attention_fused_qkv_block_diagonal():
    vcfg = Qwen2_5_VLVisionConfig(hidden_size=32, num_heads=2, depth=1)
    vcfg._attn_implementation = "eager"
    hf = randomise(hvl.Qwen2_5_VLVisionAttention(vcfg)).eval()
    ours = L.Attention(32, 2, 2, 16, qkv_bias=True, out_bias=True, fused_qkv=True)
    set_linear(ours.qkv, hf.qkv)
    set_linear(ours.o_proj, hf.proj)
    n = 12
    x = torch.randn(n, 32)
    pos = torch.stack([torch.arange(n) // 4, torch.arange(n) % 4], -1)
    cos, sin = hvl.Qwen2_5_VLVisionRotaryEmbedding(vcfg)(x, pos)
    cu = torch.tensor([0, 4, 10, 12], dtype=torch.int32)
    ref = hf(x, cu_seqlens=cu, position_embeddings=(cos, sin))
    seg = np.repeat(np.arange(3), [4, 6, 2])[None]
    c, s = L.vision_rope_cos_sin(jnp.asarray(pos.numpy()), L.vision_rope_inv_freq(16))
    out, _ = run(ours, jnp.asarray(x.numpy())[None], c, s, L.segment_mask(jnp.asarray(seg)))
    np.testing.assert_allclose(np.asarray(out)[0], t2n(ref), atol=ATOL)


def test_params_carry_logical_names():
    att = L.Attention(64, 4, 2, 16, qkv_bias=True, rngs=nnx.Rngs(0))
    md = att.q_proj.kernel.get_metadata()
    assert md["out_sharding"] == ("embed", "heads", "head_dim")
    assert att.k_proj.bias.get_metadata()["out_sharding"] == ("kv_heads", "head_dim")
    assert att.o_proj.kernel[...].shape == (4, 16, 64)


def test_bad_shapes_raise_clear_errors():
    with pytest.raises(ValueError, match="mrope_section"):
        L.mrope_cos_sin(jnp.zeros((3, 1, 4), jnp.int32), L.rope_inv_freq(16, 1e4), [2, 2, 2])
    with pytest.raises(ValueError, match="kv_mask"):
        L.causal_mask(jnp.ones((4,)), 4)


@pytest.mark.parametrize("t", [1, 5])
def test_prefix_attention_equals_attention_over_concatenated_keys(t):
    """Rows grouped per prompt (G = 3) reading their prompt's keys as a shared prefix equal
    attention over [the prompt's keys repeated per row; the row's own keys], values and
    gradients: a decode step (T = 1, prompt-major matmuls) and the update (T = 5, the prompt's
    keys broadcast to the rows). Masked prompt slots and a row with masked own keys included."""
    import jax
    r = np.random.default_rng(0)
    b, g, s, p, kvh, hg, d = 2, 3, 5, 4, 2, 2, 8
    n = b * g
    q = jnp.asarray(r.normal(size=(n, t, kvh * hg, d)), jnp.float32)
    kt = jnp.asarray(r.normal(size=(n, kvh, d, s)), jnp.float32)
    v = jnp.asarray(r.normal(size=(n, kvh, s, d)), jnp.float32)
    pkt = jnp.asarray(r.normal(size=(b, kvh, d, p)), jnp.float32)
    pv = jnp.asarray(r.normal(size=(b, kvh, p, d)), jnp.float32)
    mask = np.tril(np.ones((t, s), bool), s - t)[None].repeat(n, 0)
    mask[1, :, :3] = False
    mask = jnp.asarray(mask)
    pmask = jnp.asarray([[0, 1, 1, 1], [1, 1, 1, 0]], jnp.int32)
    dy = jnp.asarray(r.normal(size=q.shape), jnp.float32)

    def shared(q, kt, v, pkt, pv):
        return jnp.sum(L.prefix_attention(q, kt, v, mask, (pkt, pv, pmask)) * dy)

    def concatenated(q, kt, v, pkt, pv):
        keys = jnp.concatenate([jnp.repeat(pkt, g, 0), kt], -1)
        values = jnp.concatenate([jnp.repeat(pv, g, 0), v], -2)
        full = jnp.concatenate([jnp.broadcast_to(jnp.repeat(pmask, g, 0)[:, None] != 0,
                                                 (n, t, p)), mask], -1)
        return jnp.sum(L.heads_major_attention(q, keys, values, full) * dy)
    args = (q, kt, v, pkt, pv)
    np.testing.assert_allclose(jax.jit(shared)(*args), jax.jit(concatenated)(*args), rtol=1e-6)
    got = jax.jit(jax.grad(shared, argnums=range(5)))(*args)
    want = jax.jit(jax.grad(concatenated, argnums=range(5)))(*args)
    for x, y in zip(got, want):
        np.testing.assert_allclose(x, y, atol=1e-5)
