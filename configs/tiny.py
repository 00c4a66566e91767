"""A tiny random Qwen2.5-VL on generated images with a scripted reward: a CPU smoke run.

    python -m balcap_jax.main --config=configs/tiny.py --config.workdir=/tmp/tiny

The policy learns to emit one target token more often (the "frequency" reward); nothing here is
a real captioner. It exercises the whole loop (sampling, scoring, advantages, update,
checkpoints, metrics, export) in well under a minute on two cores.
"""
from balcap_jax.config import base_config
from balcap_jax.models.presets import tiny_qwen2_5_vl


def tiny_qwen_vl_config(vocab_size: int = 512) -> dict:
    """A 64-wide 2-layer Qwen2.5-VL with the tiny BPE's special-token ids."""
    return tiny_qwen2_5_vl(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                           num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                           mrope_section=[2, 3, 3], vision_hidden_size=32, spatial_merge_size=2,
                           window_size=56)


def get_config():
    c = base_config()
    c.workdir = "workdir/tiny"
    c.model.hf_config = tiny_qwen_vl_config()
    c.model.tokenizer = "tiny"
    c.model.tiny_vocab = 400
    c.mesh.fsdp = -1
    c.data.source = "synthetic"
    c.data.image_size = 56
    c.data.num_train = 256
    c.data.num_eval = 8
    c.data.max_prompt_tokens = 64
    c.data.max_image_tokens = 4
    c.data.image_processor = dict(min_pixels=56 * 56, max_pixels=56 * 56)
    c.sampling.num_samples = 4
    c.sampling.max_new_tokens = 16
    c.rl.rewards = ["frequency"]
    c.rl.weights = [1.0]
    c.rl.length_control = "none"
    c.rl.length_reward = "frequency"
    c.train.steps = 20
    c.train.batch_size = 4
    c.train.micro_batch_size = 8
    c.train.lr = 3e-3
    c.train.eval_every = 10
    c.checkpoint.every = 10
    c.scorer.name = "token_frequency"
    c.scorer.tokens = [" a", " red", " blue", " green", " on", " background", "."]
    return c
