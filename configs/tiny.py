"""A tiny random Qwen2.5-VL on generated images with a scripted reward: a CPU smoke run.

    python -m balcap_jax.main --config=configs/tiny.py --config.workdir=/tmp/tiny

The policy learns to emit one target token more often (the "frequency" reward); nothing here is
a real captioner. It exercises the whole loop (sampling, scoring, advantages, update,
checkpoints, metrics, export) in well under a minute on two cores.
"""
from balcap_jax.config import base_config


def tiny_qwen_vl_config(vocab_size: int = 512) -> dict:
    """A 2-layer Qwen2.5-VL whose special-token ids match balcap_jax.tokenizers.train_tiny_bpe
    (<|endoftext|> 0, <|im_start|> 1, <|im_end|> 2, <|vision_start|> 3, <|vision_end|> 4,
    <|image_pad|> 5, <|video_pad|> 6)."""
    return dict(
        model_type="qwen2_5_vl", architectures=["Qwen2_5_VLForConditionalGeneration"],
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        bos_token_id=0, eos_token_id=2, pad_token_id=0, image_token_id=5, video_token_id=6,
        vision_start_token_id=3, vision_end_token_id=4, initializer_range=0.02,
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                           out_hidden_size=64, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
                           in_chans=3, initializer_range=0.02))


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
