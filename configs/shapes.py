"""ShapesWorld, the built-in default: a tiny Qwen2.5-VL learns to caption procedural scenes on a
CPU in minutes, first by imitation (a warm start on deliberately imperfect captions), then with
BalCapRL (c-GDPO over exact precision / recall / linguistic rewards, length masking).

    bash launch/demo.sh                      # the whole pipeline (balcap_jax.shapes_demo)
    python -m balcap_jax.shapes_demo --config=configs/shapes.py --config.seed=1

The `sft` block drives the warm start (balcap_jax.sft) and the supervised control; `demo`
sizes the phases. Everything else is the ordinary RL config (balcap_jax.config).

Measured with these settings (200 held-out images, greedy, b-CapScore; 2 quiet cores):

    seed  warm start          after 150 RL steps   SFT control (RL's wall time)
    0     61.2 (1400 steps)   73.3 (+12.1)         63.5 (410 steps; RL +9.8)
    1     55.7 (1100 steps)   65.8 (+10.1)         58.0 (427 steps; RL +7.8)
    2     60.6 (1400 steps)   68.6 (+8.0)          62.7 (387 steps; RL +5.9)
    mean  59.2                69.2 (+10.1)         61.4 (RL +7.8)
    seeds 3-5 were run after the schedule was chosen (below):
    3     63.6 (1300 steps)   71.1 (+7.6)          65.4 (RL +5.8)
    4     62.4 (1500 steps)   71.2 (+8.8)          64.2 (370 steps; RL +7.0)
    5     63.3 (1500 steps)   75.2 (+11.9)         64.3 (355 steps; RL +10.9)
    mean  63.1                72.5 (+9.4)          64.6 (RL +7.9)

Precision and recall rose on every seed, linguistic on all but seed 3 (-0.015). Issue 8 asks
for +10 over the warm start and +5 over the control, on average and on seed 0, with no channel
falling by over 0.02: seeds 3-5 gain +9.4 on average (control +7.9), all six +9.7 (+7.9).
Runs are deterministic on one machine; the control's step count depends on the load. A run
takes 570-700 s (seed 0: warm start 401 s, RL 121 s, control 121 s; seeds 4-5, measured after
old_logp stopped costing a separate forward pass, RL 106-108 s).

The RL schedule (150 steps, cosine from 1.5e-4) was picked on seeds 0-2 among five:
constant 1e-4 for 100 steps gave a mean +8.6, cosine from 1.5e-4 over 100 steps +9.1 (README).
At a constant 2e-4 seed 0 fell (61.2 -> 54.9). What made the warm start see the objects
(ShapesWorld v1 and the first v2 settings scored 44.5-51.2): the processor shrinks the 112 px
image to 42 px, one 14 px patch per grid cell (9 image tokens instead of 64, steps ~2.5x
cheaper), and the supervised lr is 5e-4 (at 2e-3 the colour loss of a single-object probe
stayed at chance for 150 steps, then spiked). Shapes it still does not see (README).
"""
import ml_collections

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
    c.train.eval_every = 10_000    # the demo evaluates before / after itself
    c.checkpoint.every = 10_000
    c.scorer.name = "shapes"

    c.sft = ml_collections.ConfigDict()
    c.sft.batch_size = 32
    c.sft.lr = 5e-4               # at 2e-3 colour stayed at chance longer, then the loss spiked
    c.sft.warmup_steps = 50
    c.sft.max_steps = 2500         # the warm start stops earlier when the loss plateaus
    c.sft.chunk = 100              # steps per plateau check
    c.sft.plateau_tol = 0.01       # stop when a chunk's mean loss improves by less (relative)
    c.sft.max_len = 80            # caption tokens incl. the stop; longer ones cut at a sentence

    c.demo = ml_collections.ConfigDict()
    c.demo.curve_every = 10        # RL steps between the points of the plotted curves
    c.demo.warm_from = ""          # a saved warm_start.npz: skip the warm start (module doc of
                                   # balcap_jax.shapes_demo)
    return c
