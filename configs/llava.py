"""BalCapRL on LLaVA-1.5-7B (``configs/llava.py``), from a local llava-hf checkpoint.

    python -m balcap_jax.main --config=configs/llava.py \
        --config.model.path=/ckpt/llava-1.5-7b-hf --config.workdir=/runs/balcap_llava

SPEC.md's defaults as in configs/qwen.py: G = 8, lr 1e-6 AdamW, clip 0.2, no KL, temperature
1.0, 512 new tokens, c-GDPO with batch normalisation, linguistic reward masked outside rho in
[0.5, 2.0], weights (1, 1, 1). LLaVA specifics: prompts are "USER: <image>\\n{instruction}
ASSISTANT:" (the checkpoint's chat template), each image 336 px padded to a square with the mean
colour and expanded to 576 tokens, the stop token is </s>. The CLIP tower is frozen by default
(LLaVA-1.5 never trained it; the projector and the language model are trained):
``--config.train.freeze_vision=False`` trains it too.
The checkpoint directory is the llava-hf layout (config.json, safetensors, tokenizer and
preprocessor_config.json); both the hub's and transformers v5's key spellings load.
"""
from balcap_jax.config import checkpoint_run_config


def get_config(arg: str = "7b"):
    if arg != "7b":
        raise ValueError(f"configs/llava.py:{arg}: only LLaVA-1.5-7B is configured "
                         "(configs/llava.py or configs/llava.py:7b)")
    c = checkpoint_run_config(workdir="workdir/llava_1_5_7b", path="checkpoints/llava-1.5-7b-hf",
                              preset="llava_1_5_7b")
    c.data.max_prompt_tokens = 640  # 576 image tokens + the chat template and instruction
    c.data.max_image_tokens = 576   # LLaVA-1.5: every image is 336 px, 576 tokens
    c.train.micro_batch_size = 64
    c.train.freeze_vision = True
    return c
