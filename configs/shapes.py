"""ShapesWorld, the built-in default: a tiny Qwen2.5-VL learns to caption procedural scenes on a
CPU in minutes, first by imitation (a warm start on deliberately imperfect captions), then with
BalCapRL (c-GDPO over exact precision / recall / linguistic rewards, length masking).

    bash launch/demo.sh                      # the whole pipeline (balcap_jax.shapes_demo)
    python -m balcap_jax.shapes_demo --config=configs/shapes.py --config.seed=1

The pipeline: vision pretraining (`sft.vision_pretrain_steps`; the tower is then frozen), the
warm start (the `sft` block), BalCapRL (the ordinary RL blocks), and a supervised control given
the RL phase's wall time. The settings below, and how each was chosen, are in the README's
ShapesWorld section, with the measured results of six seeds.
"""

from balcap_jax.config import base_config
from balcap_jax.models.presets import tiny_qwen2_5_vl

IMAGE = 112   # the world's images (ShapesWorld renders a 3x3 grid of cells)
PIXELS = 42   # the policy's input: the processor resizes to 42x42, so each 14 px patch (one image
              # token, merge 1) is one grid cell: 9 image tokens instead of 64 at 112 px. The warm
              # start's steps are then ~2.5x cheaper and colour is learned in fewer of them.


def shapes_qwen_vl_config(vocab_size: int = 512) -> dict:
    """A 2-layer, 128-wide Qwen2.5-VL (about 1M parameters) with the tiny BPE's special-token
    ids; one image token per 14 px patch, one attention window over the whole image."""
    return tiny_qwen2_5_vl(vocab_size=vocab_size, hidden_size=128, intermediate_size=256,
                           num_attention_heads=2, num_key_value_heads=2, rope_theta=1000.0,
                           mrope_section=[8, 12, 12], vision_hidden_size=64,
                           spatial_merge_size=1, window_size=PIXELS)


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
    c.data.max_image_tokens = (PIXELS // 14) ** 2
    c.data.image_processor = dict(min_pixels=PIXELS * PIXELS, max_pixels=PIXELS * PIXELS,
                                  merge_size=1)

    c.sampling.max_new_tokens = 80  # G = 8 and the rl block (c-GDPO, masking): base_config's

    c.train.steps = 150
    c.train.batch_size = 8
    c.train.micro_batch_size = 64
    c.train.lr = 1.5e-4           # peak of a cosine decay to 0 over the 150 steps (module doc)
    c.train.schedule = "cosine"
    c.train.warmup_steps = 10
    c.train.freeze_vision = True   # keep the pretrained tower (RL's gradient erodes it too)
    c.train.eval_every = 10_000    # the demo evaluates before / after itself
    c.checkpoint.every = 10_000
    c.scorer.name = "shapes"

    # the sft block's defaults (base_config) are ShapesWorld's: 32 captions a step, lr 5e-4
    # (at 2e-3 colour stayed at chance longer, then the loss spiked), 50 warm-up steps, at most
    # 2500 steps with a plateau check every 100, captions of at most 80 tokens
    # Stage 0 (balcap_jax.shapes.vision_pretrain): the vision tower learns per-cell shape / colour /
    # size labels first and is then frozen for the warm start and RL, like a real MLLM's
    # pretrained encoder (without it the warm start states shape right ~36% of the time).
    c.sft.vision_pretrain_steps = 300
    c.sft.vision_pretrain_lr = 1e-3
    c.sft.freeze_vision = True

    # demo: curves every 10 RL steps; demo.warm_from (a saved warm_start.npz) skips stages 0-1
    return c
