"""Tiny random HF reference models (transformers v5, float32), built once per session.

initializer_range 0.2 so logits are not flat. Each entry: name -> (saved dir, torch model).
"""
import pytest
import torch

TINY = dict(vocab_size=160, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
            max_position_embeddings=256, initializer_range=0.2, bos_token_id=1, eos_token_id=2,
            pad_token_id=0)

CONFIGS = {
    # GQA 4:2, untied, theta 1e4
    "qwen2_gqa": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2,
                                rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                                tie_word_embeddings=False)),
    # MQA 4:1, tied, theta 1e6
    "qwen2_tied": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=1,
                                 rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                 tie_word_embeddings=True)),
    # MHA 8 heads of 8, untied, theta 5e5
    "qwen2_mha": ("qwen2", dict(num_attention_heads=8, num_key_value_heads=8,
                                rope_parameters={"rope_type": "default", "rope_theta": 5e5},
                                tie_word_embeddings=False)),
    # Llama, GQA 4:2, no biases, llama3 rope scaling
    "llama": ("llama", dict(num_attention_heads=4, num_key_value_heads=2,
                            rope_parameters={"rope_type": "llama3", "rope_theta": 5e5,
                                             "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 32},
                            tie_word_embeddings=False)),
}


def build_hf(model_type, kw, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    cls_cfg, cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM),
                    "llama": (LlamaConfig, LlamaForCausalLM)}[model_type]
    torch.manual_seed(seed)
    cfg = cls_cfg(**TINY, **kw)
    cfg._attn_implementation = "eager"
    model = cls(cfg).eval()
    with torch.no_grad():   # non-trivial norm weights and biases, too
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p) if "norm" in name
                        else 0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    out = {}
    for name, (mtype, kw) in CONFIGS.items():
        model = build_hf(mtype, kw)
        d = tmp_path_factory.mktemp(name)
        model.save_pretrained(d)
        out[name] = (str(d), model)
    return out


def hf_logits(model, ids, mask=None, positions=None):
    with torch.no_grad():
        kw = {}
        if mask is not None:
            kw["attention_mask"] = torch.as_tensor(mask)
        if positions is not None:
            kw["position_ids"] = torch.as_tensor(positions)
        return model(input_ids=torch.as_tensor(ids), **kw).logits.float().numpy()
