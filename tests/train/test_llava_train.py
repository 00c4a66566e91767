"""A tiny random LLaVA through build.build_parts and train.Trainer with a scripted reward.

Checks the LLaVA wiring of the loop: the processor build picks (pad-to-square at the tower's
resolution, `<image>` expanded to grid**2 tokens), the stop id from a Llama-style tokenizer
(</s>, not <unk>), sampling, the recomputed log-probabilities (equal to the sampler's: the
prompt path through the CLIP tower and the scatter is the same in both), and updates reaching
the decoder, the projector and the vision tower.
"""
import jax
import numpy as np
import pytest
from flax import nnx

from balcap_jax import build, train
from balcap_jax.config import base_config
from balcap_jax.models import hf
from balcap_jax.processing import LLAVA15_CHAT_TEMPLATE, LlavaProcessor
from balcap_jax.rewards.scripted import TokenFrequencyScorer
from balcap_jax.sharding import make_mesh
from balcap_jax.tokenizers import train_tiny_bpe

SPECIALS = ("<pad>", "</s>", "<image>")     # ids 0, 1, 2


def tiny_llava_config(vocab_size: int = 320, image_token_id: int = 2) -> dict:
    return dict(
        model_type="llava", architectures=["LlavaForConditionalGeneration"],
        image_token_index=image_token_id, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
        text_config=dict(model_type="llama", vocab_size=vocab_size, hidden_size=64,
                         intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
                         bos_token_id=1, eos_token_id=1, pad_token_id=0),
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=3, num_attention_heads=2, image_size=28,
                           patch_size=14, projection_dim=16))


def llava_tokenizer_dir(tmp_path_factory) -> str:
    """A tiny Llama-style BPE with LLaVA's chat template, saved (model.tokenizer reads a dir)."""
    corpus = ["a red square on a blue background.", "a green circle on a white background.",
              "Describe this image in detail.", "USER: ASSISTANT:"] * 4
    tok = train_tiny_bpe(corpus, vocab_size=300, specials=SPECIALS,
                         chat_template=LLAVA15_CHAT_TEMPLATE)
    tok.eos_token = "</s>"
    tok_dir = str(tmp_path_factory.mktemp("tok"))
    tok.save_pretrained(tok_dir)
    return tok_dir


def llava_trainer(cfg, mesh=None):
    parts = build.build_parts(cfg, mesh or make_mesh((1, 1, 1), jax.devices()[:1]))
    parts.scorer = TokenFrequencyScorer(range(10, 60))
    return train.Trainer(cfg, parts)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    tok_dir = llava_tokenizer_dir(tmp_path_factory)
    return llava_trainer(llava_config(str(tmp_path_factory.mktemp("run")), tok_dir))


def llava_config(workdir: str, tok_dir: str):
    """A tiny LLaVA run config (2 prompts x G = 4, micro-batches of 4) over generated images."""
    c = base_config()
    c.workdir = workdir
    c.model.hf_config = tiny_llava_config()
    c.model.tokenizer = tok_dir
    c.data.image_size = 40
    c.data.num_train = 16
    c.data.num_eval = 2
    c.sampling.num_samples = 4
    c.sampling.max_new_tokens = 8
    c.rl.rewards = ["frequency"]
    c.rl.weights = [1.0]
    c.rl.length_control = "none"
    c.rl.length_reward = "frequency"
    c.train.batch_size = 2
    c.train.micro_batch_size = 4
    c.train.lr = 3e-3
    c.scorer.name = "token_frequency"
    c.scorer.tokens = ["a"]
    return c


def test_build_wires_llava_processor_and_stop_id(trainer):
    p = trainer.p
    assert isinstance(p.processor, LlavaProcessor)
    assert p.processor.num_image_tokens == 4              # (28 / 14) ** 2, class token dropped
    assert p.processor.image_processor.crop_size == (28, 28)
    assert p.eos_token_ids == (1,) and p.pad_id == 0      # </s>; <pad>
    batch = p.processor(["USER: <image>\nhi ASSISTANT:"], images=[[np.zeros((30, 20, 3),
                                                                           np.uint8)]])
    assert batch["pixel_values"].shape == (1, 3, 28, 28)
    assert (batch["input_ids"] == 2).sum() == 4


@pytest.mark.heavy
def test_train_steps_update_every_part(trainer):
    before = jax.tree.map(np.asarray, trainer.state.params)
    for _ in range(3):
        m = trainer.train_step(next(trainer.p.loader))
        assert np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]) and m["grad_norm"] > 0
        assert 0.0 <= m["reward/frequency"] <= 1.0
        # the trainer's recomputed log-probs equal the sampler's (same prompt path, float32)
        assert m["logp_gap_sampler_trainer"] < 1e-4, m["logp_gap_sampler_trainer"]
    assert trainer.skipped == 0
    after = jax.tree.map(np.asarray, trainer.state.params)
    changed = {}   # per layer: a stacked parameter is compared slice by slice
    for (p, a), (_, b) in zip(nnx.to_flat_state(before), nnx.to_flat_state(after)):
        for name, i, _ in hf._per_layer("/".join(map(str, p)), a.shape):
            changed[name] = not np.array_equal(a if i is None else a[i], b if i is None else b[i])
    for part in ("model/layers/0/self_attn/q_proj/kernel", "lm_head/kernel",
                 "multi_modal_projector/linear_1/kernel",
                 "vision_tower/encoder/layers/0/mlp/fc1/kernel",
                 "vision_tower/embeddings/patch_embedding/kernel"):
        assert changed[part], part
    # layers past the feature layer (-2 of 3) and post_layernorm get no gradient: Adam
    # without weight decay leaves them exactly as loaded
    assert not changed["vision_tower/encoder/layers/2/mlp/fc1/kernel"]
    assert not changed["vision_tower/post_layernorm/weight"]


def _load_config(arg=None):
    import os
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from balcap_jax.config import load_config_file
    return load_config_file(os.path.join(root, "configs/llava.py"), arg)


def test_llava_7b_config_and_shapes():
    """configs/llava.py validates; its preset is LLaVA-1.5-7B's shape and builds a model with
    exactly the parameters of transformers' LlavaForConditionalGeneration at those widths (meta
    device, no weights); freeze_vision freezes the CLIP tower but not the projector."""
    import torch
    from transformers import LlavaConfig as HFConfig
    from transformers import LlavaForConditionalGeneration

    from balcap_jax.config import validate
    from balcap_jax.models.llava import Llava, LlavaConfig
    from balcap_jax.models.presets import preset
    c = _load_config()
    assert validate(c, 8)["fsdp"] == 8 and c.train.freeze_vision
    with pytest.raises(ValueError, match="llava.py"):
        _load_config("13b")
    d = preset(c.model.preset)
    with torch.device("meta"):
        assert sum(p.numel() for p in LlavaForConditionalGeneration(
            HFConfig(**d)).parameters()) == 7_063_427_072     # the preset is LLaVA-1.5-7B
    # every layer alike: compare the structure at the real widths with 2 + 2 layers (building
    # 7B abstractly in NNX takes ~25 s)
    d["text_config"]["num_hidden_layers"] = d["vision_config"]["num_hidden_layers"] = 2
    with torch.device("meta"):
        ref = LlavaForConditionalGeneration(HFConfig(**d))
    cfg = LlavaConfig.from_hf(d)
    params = nnx.state(nnx.eval_shape(lambda: Llava(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    n_ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert n_ours == sum(p.numel() for p in ref.parameters())
    assert cfg.tokens_per_image == 576
    vision = [p for p, _ in nnx.to_flat_state(params) if train.is_vision_path(p)]
    assert vision and all(p[0] == "vision_tower" for p in vision)
