"""BalCapRL on Qwen2.5-VL-7B-Instruct (``configs/qwen.py``) or -3B (``configs/qwen.py:3b``).

    python -m balcap_jax.main --config=configs/qwen.py \
        --config.model.path=/ckpt/Qwen2.5-VL-7B-Instruct --config.workdir=/runs/balcap7b

SPEC.md's defaults: G = 8, lr 1e-6 AdamW, clip 0.2, no KL (no reference model loaded),
temperature 1.0, 512 new tokens, c-GDPO with batch normalisation, linguistic reward masked
outside rho in [0.5, 2.0], weights (1, 1, 1) for (precision, recall, linguistic).
The policy is read from a local checkpoint directory (nothing is downloaded). The judges'
fields (``judges.*``) name the in-process judge checkpoints the scorer uses.
"""
from balcap_jax.config import checkpoint_run_config


def get_config(arg: str = "7b"):
    if arg not in ("7b", "3b"):
        raise ValueError(f"configs/qwen.py:{arg}: use configs/qwen.py (7B) or configs/qwen.py:3b")
    c = checkpoint_run_config(workdir=f"workdir/qwen2_5_vl_{arg}",
                              path=f"checkpoints/Qwen2.5-VL-{arg.upper()}-Instruct",
                              preset=f"qwen2_5_vl_{arg}")
    c.train.micro_batch_size = 16
    return c
