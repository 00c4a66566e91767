"""ShapesWorld, the built-in default: a tiny Qwen2.5-VL learns to caption procedural scenes on a
CPU in minutes, first by imitation (a warm start on deliberately imperfect captions), then with
BalCapRL (c-GDPO over exact precision / recall / linguistic rewards, length masking).

    bash launch/demo.sh                      # the whole pipeline (balcap_jax.shapes_demo)
    python -m balcap_jax.shapes_demo --config=configs/shapes.py --config.seed=1

The `sft` block drives the warm start (balcap_jax.sft) and the supervised control; `demo`
sizes the phases. Everything else is the ordinary RL config (balcap_jax.config).

Status (issue 8, open: it asks for +10 over the warm start and +5 over the control on 3
seeds, in under 15 minutes). Measured with these settings, 200 held-out images, b-CapScore:

    seed  warm start  after 60 RL steps  SFT control (RL's wall time)
    0     44.5        54.3 (+9.8)        50.7
    1     51.2        50.9 (-0.3)        51.7
    2     44.8        47.5 (+2.7)        51.4

Under RL precision moved +0.044 / +0.003 / +0.004, recall +0.136 / -0.004 / +0.053,
linguistic -0.013 / +0.015 / -0.026 (seeds 0 / 1 / 2). One run takes
720 s on 2 quiet cores (warm start 504 s), 1200-1400 s when the cores are shared. RL drops
the commentary sentence and names more objects; colours and positions are still often wrong.
The warm start is the slow part: objects are a few percent of the pixels, and the colour-token
loss leaves chance only after ~400 steps (ShapesWorld v1, with smaller objects, never left it
in 800).
"""
import ml_collections

from balcap_jax.config import base_config
from balcap_jax.models.presets import tiny_qwen2_5_vl

IMAGE = 112   # 112 px / patch 14 = an 8x8 grid of image tokens (merge 1: with a 2x2 merge, 16 tokens,
              # the colour loss stayed at chance longer in a 150-step single-object probe)


def shapes_qwen_vl_config(vocab_size: int = 512) -> dict:
    """A 2-layer, 128-wide Qwen2.5-VL (about 1M parameters) with the tiny BPE's special-token
    ids; one image token per 14 px patch, one attention window over the whole image."""
    return tiny_qwen2_5_vl(vocab_size=vocab_size, hidden_size=128, intermediate_size=256,
                           num_attention_heads=2, num_key_value_heads=2, rope_theta=1000.0,
                           mrope_section=[8, 12, 12], vision_hidden_size=64,
                           spatial_merge_size=1, window_size=IMAGE)


def get_config():
    c = base_config()
    c.workdir = "workdir/shapes"
    c.seed = 0
    c.model.hf_config = shapes_qwen_vl_config()
    c.model.tokenizer = "tiny"
    c.model.tiny_vocab = 512
    c.mesh.fsdp = -1
    c.data.source = "shapes"
    c.data.world_seed = 0          # the world (scenes, splits) is fixed; c.seed varies the run
    c.data.image_size = IMAGE
    c.data.num_train = 4000
    c.data.num_eval = 200          # the fixed held-out set of the summary
    c.data.max_prompt_tokens = 128
    c.data.max_image_tokens = 64
    c.data.image_processor = dict(min_pixels=IMAGE * IMAGE, max_pixels=IMAGE * IMAGE,
                                merge_size=1)

    c.sampling.max_new_tokens = 80  # G = 8 and the rl block (c-GDPO, masking): base_config's

    c.train.steps = 60
    c.train.batch_size = 8
    c.train.micro_batch_size = 64
    c.train.lr = 2e-4
    c.train.eval_every = 10_000    # the demo evaluates before / after itself
    c.checkpoint.every = 10_000
    c.scorer.name = "shapes"

    c.sft = ml_collections.ConfigDict()
    c.sft.batch_size = 32
    c.sft.lr = 2e-3
    c.sft.warmup_steps = 50
    c.sft.max_steps = 1000         # the warm start stops earlier when the loss plateaus
    c.sft.chunk = 100              # steps per plateau check
    c.sft.plateau_tol = 0.01       # stop when a chunk's mean loss improves by less (relative)
    c.sft.max_len = 80            # caption tokens incl. the stop; longer ones cut at a sentence

    c.demo = ml_collections.ConfigDict()
    c.demo.curve_every = 10        # RL steps between the points of the plotted curves
    return c
