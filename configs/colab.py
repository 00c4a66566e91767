"""BalCapRL with LoRA on one GPU or one TPU chip (Colab): Qwen2.5-VL-3B-Instruct, judged by
its own frozen base.

    python -m balcap_jax.main --config=configs/colab.py          # an L4 (24 GB)
    python -m balcap_jax.main --config=configs/colab.py:t4       # a T4 (16 GB)
    ... :a100 (40 GB), :h100 (80 GB), :tpu (one TPU v5e chip, 16 GB), :7b (7B on an H100)

The policy trains rank-16 adapters on every attention and MLP projection of the language model;
the base stays frozen (no gradient, no optimiser state), stored in NF4 on the 16 GB devices.
The judges (verification, pointability, decomposition, coverage, linguistic ratings) run on
that same frozen base with the adapters off (`judges.multimodal_path` = `model.path`, no second
copy). A stronger judge can be served elsewhere: `--config.judges.backend=remote
--config.judges.base_url=http://host:8000/v1 --config.judges.model=...`.

Each variant's batch, rollouts and image size were chosen with the memory plan printed at
start-up (README, "One GPU and Colab"): every plan fits its device's memory with 10% headroom.
T4s have no bfloat16 arithmetic: XLA emulates it there, slowly; prefer an L4.
"""
from balcap_jax.config import checkpoint_run_config

# variant: (device GiB, base quantisation, prompts per step, rollouts per prompt, new tokens,
#           rollouts per micro-batch, image tokens)
VARIANTS = {
    "l4": (22.0, "", 8, 4, 384, 8, 512),
    "t4": (15.0, "nf4", 4, 4, 384, 4, 512),
    "a100": (40.0, "", 16, 8, 512, 16, 768),
    "h100": (80.0, "", 32, 8, 512, 32, 1024),
    "tpu": (15.75, "nf4", 4, 4, 384, 4, 512),
    "7b": (80.0, "", 16, 8, 512, 16, 1024),
}


def get_config(arg: str = "l4"):
    if arg not in VARIANTS:
        raise ValueError(f"configs/colab.py:{arg}: use one of {sorted(VARIANTS)}")
    gib, quant, prompts, g, new, micro, image = VARIANTS[arg]
    size = "7B" if arg == "7b" else "3B"
    c = checkpoint_run_config(workdir=f"workdir/colab_{arg}",
                              path=f"checkpoints/Qwen2.5-VL-{size}-Instruct",
                              preset=f"qwen2_5_vl_{size.lower()}")
    c.mesh.device_memory_gb = gib
    c.model.lora.rank = 16
    c.model.lora.alpha = 32.0
    c.model.lora.quantize = quant
    c.train.lr = 2e-5               # adapters take larger steps than full fine-tuning's 1e-6
    c.train.warmup_steps = 5
    c.train.steps = 200
    c.train.batch_size = prompts
    c.train.micro_batch_size = micro
    c.train.remat = True
    c.train.freeze_vision = True
    c.sampling.num_samples = g
    c.sampling.max_new_tokens = new
    c.data.max_image_tokens = image
    c.data.max_prompt_tokens = image + 128
    c.data.num_eval = 32
    c.train.eval_every = 50
    c.checkpoint.every = 25
    # the judges: the policy's own base (adapters off), one model for every role
    c.judges.multimodal_path = c.model.path
    c.judges.text_path = ""
    c.judges.multimodal_preset = c.model.preset
    c.judges.text_preset = ""
    c.judges.dtype = "bfloat16"
    c.judges.max_image_tokens = image
    c.judges.decode_batch = 8
    c.judges.prefix_batch = 4
    c.judges.item_tokens = 128
    c.judges.list_max_tokens = 256
    return c
