"""BalCapRL on Qwen2.5-VL-7B-Instruct (``configs/qwen.py``) or -3B (``configs/qwen.py:3b``).

    python -m balcap_jax.main --config=configs/qwen.py \
        --config.model.path=/ckpt/Qwen2.5-VL-7B-Instruct --config.workdir=/runs/balcap7b

SPEC.md's defaults: G = 8, lr 1e-6 AdamW, clip 0.2, no KL (no reference model loaded),
temperature 1.0, 512 new tokens, c-GDPO with batch normalisation, linguistic reward masked
outside rho in [0.5, 2.0], weights (1, 1, 1) for (precision, recall, linguistic).
The policy is read from a local checkpoint directory (nothing is downloaded). The judges'
fields (``judges.*``) name the in-process judge checkpoints the scorer uses.
"""
from balcap_jax.config import base_config


def get_config(arg: str = "7b"):
    if arg not in ("7b", "3b"):
        raise ValueError(f"configs/qwen.py:{arg}: use configs/qwen.py (7B) or configs/qwen.py:3b")
    c = base_config()
    c.workdir = f"workdir/qwen2_5_vl_{arg}"
    c.model.path = f"checkpoints/Qwen2.5-VL-{arg.upper()}-Instruct"
    c.model.preset = f"qwen2_5_vl_{arg}"   # shapes for the memory plan before loading
    c.model.dtype = "bfloat16"
    c.model.tokenizer = ""                  # the checkpoint's own tokenizer files
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    c.data.source = "tfds"
    # ShareGPT4V-style JSON/JSONL + image folder (balcap_jax.data; all fields documented there)
    c.data.builder = "sharegpt4v"
    c.data.files = "data/sharegpt4v_recaptioned.jsonl"
    c.data.image_root = "data/images"
    c.data.eval_files = ""           # a held-out file in the same format; "" = no eval set
    c.data.num_eval = 256
    c.data.data_dir = ""             # "" = <workdir>/tfds
    c.data.max_prompt_tokens = 1024
    c.data.max_image_tokens = 1024
    # sampling (G = 8, 512 new tokens) and rl: SPEC.md's defaults, from base_config
    c.train.steps = 1000
    c.train.batch_size = 64
    c.train.micro_batch_size = 16
    c.train.lr = 1e-6
    c.train.warmup_steps = 10
    c.train.remat = True
    c.train.eval_every = 50
    c.checkpoint.every = 50
    c.scorer.name = "judges"
    c.judges = dict(
        multimodal_path=f"checkpoints/Qwen2.5-VL-7B-Instruct",   # verification, pointability
        text_path="checkpoints/Qwen2.5-7B-Instruct",               # decomposition, recall, style
        threshold=False,
        cache_dir="",  # reference units cache; "" = <workdir>/judge_cache
    )
    return c
