# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # BalCapRL in JAX on one GPU or TPU chip
#
# This notebook fine-tunes a captioner with BalCapRL (balanced precision / recall / linguistic
# rewards, c-GDPO, length masking) using **balcap_jax**. First a self-contained demo on
# ShapesWorld (procedural scenes with exact rewards, no download), then the real path: a
# Qwen2.5-VL checkpoint, your ShareGPT4V-style captions, a LoRA run judged by the model's own
# frozen base, curves, captions before and after, and the export.
#
# The source of this notebook is `launch/colab.py` (jupytext); `python launch/sync_notebook.py`
# rewrites `launch/colab.ipynb` from it.

# %% [markdown]
# Settings. `SMOKE=1` (the test suite sets it) runs every cell tiny on a CPU; in Colab leave
# it unset. `REPO` is where the balcap_jax repository is (clone or upload it there first).

# %%
import os
import shutil
import subprocess
import sys

SMOKE = os.environ.get("BALCAP_NOTEBOOK_SMOKE", "") == "1"
REPO = os.environ.get("BALCAP_REPO", "/content/balcap_jax")
WORK = os.environ.get("BALCAP_NOTEBOOK_WORKDIR", "/content/work")
os.makedirs(WORK, exist_ok=True)
print(f"smoke={SMOKE} repo={REPO} work={WORK}")

# %% [markdown]
# ## 1. Check the runtime
# Which accelerator this session has (a GPU's name and memory, or a TPU) and the Python
# version; the LoRA run below picks its memory variant from this.

# %%
ACCEL, GPU = "cpu", ""
if shutil.which("nvidia-smi"):
    GPU = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
    ACCEL = "gpu" if GPU else "cpu"
elif os.environ.get("COLAB_TPU_ADDR") or os.environ.get("TPU_ACCELERATOR_TYPE") or \
        os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0"):
    ACCEL = "tpu"
print(f"Python {sys.version.split()[0]}; accelerator: {ACCEL} {GPU}")
if ACCEL == "cpu" and not SMOKE:
    print("No accelerator: Runtime > Change runtime type > a GPU or TPU. The demo still runs "
          "on a CPU, slowly (about 11 minutes on 2 cores).")

# %% [markdown]
# ## 2. Install
# Colab preinstalls older jax and flax than this project pins. This installs the project with
# its pinned versions (`launch/constraints.txt`) and the jax build for this accelerator (CUDA
# 12 wheels on a GPU, libtpu on a TPU). Run it before anything imports jax; the smoke run
# skips it (the test environment is already installed).

# %%
if not SMOKE:
    if not os.path.isdir(REPO):
        raise SystemExit(f"put the balcap_jax repository at {REPO} (git clone or upload), or "
                         "set BALCAP_REPO")
    jax_pkg = {"gpu": "jax[cuda12]", "tpu": "jax[tpu]"}.get(ACCEL, "jax")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-c",
                    f"{REPO}/launch/constraints.txt", jax_pkg, "-e", REPO], check=True)
sys.path.insert(0, REPO)
import jax  # noqa: E402

print("jax", jax.__version__, jax.devices())

# %% [markdown]
# ## 3. The ShapesWorld demo
# A tiny Qwen2.5-VL learns to caption procedural scenes: its vision tower is pretrained on
# per-cell labels, a supervised warm start imitates deliberately imperfect captions, then
# BalCapRL improves them with exact rewards, against a supervised control given the same
# wall time. About 11 minutes on 2 CPU cores, a few on a GPU; the smoke run shortens every
# stage.

# %%
from IPython.display import Image, display  # noqa: E402

from balcap_jax.shapes_demo import run_demo  # noqa: E402
from configs.shapes import get_config as shapes_config  # noqa: E402

shapes = shapes_config()
shapes.workdir = f"{WORK}/shapes"
if SMOKE:   # tests/shapes/test_demo.py checks what this run writes
    shapes.data.num_train, shapes.data.num_eval = 256, 16
    shapes.sft.max_steps, shapes.sft.warmup_steps, shapes.sft.chunk = 60, 5, 20
    shapes.sft.vision_pretrain_steps = 10
    shapes.train.steps = 4
    shapes.demo.meteor = False   # METEOR's Java start-up (~5 s a policy) for 16 images
summary = run_demo(shapes, progress=True)
display(Image(filename=f"{shapes.workdir}/curves.png"))
for name in ("before", "after", "sft_control"):
    print(f"{name:12s} b-CapScore {summary[name]['b_capscore']:.1f}")

# %% [markdown]
# The same held-out images captioned by the warm start and after BalCapRL.

# %%
for b, a in zip(summary["examples"]["before"][:3], summary["examples"]["after"][:3]):
    print("before:", b["caption"])
    print("after: ", a["caption"], "\n")

# %% [markdown]
# ## 4. The real path: a checkpoint and your captions
# A Qwen2.5-VL-3B-Instruct checkpoint directory (config.json, safetensors, tokenizer and
# preprocessor files), and captions in ShareGPT4V format (JSON or JSONL records with `image`
# and `conversations`) with an image folder. On Colab, keep them on Google Drive: the cell
# mounts it when the paths point there.

# %%
CKPT = os.environ.get("BALCAP_NOTEBOOK_CKPT", "/content/drive/MyDrive/Qwen2.5-VL-3B-Instruct")
DATA = os.environ.get("BALCAP_NOTEBOOK_DATA", "/content/drive/MyDrive/captions/train.jsonl")
IMAGES = os.environ.get("BALCAP_NOTEBOOK_IMAGES", "/content/drive/MyDrive/captions/images")
if any(p.startswith("/content/drive") for p in (CKPT, DATA, IMAGES)):
    from google.colab import drive
    drive.mount("/content/drive")

# %% [markdown]
# No checkpoint yet? This cell downloads one with the Hugging Face CLI (about 7.5 GB) into
# `CKPT`. It does nothing unless you set `DOWNLOAD = True`: nothing is downloaded behind
# your back.

# %%
DOWNLOAD = False
if DOWNLOAD:
    subprocess.run(["hf", "download", "Qwen/Qwen2.5-VL-3B-Instruct", "--local-dir", CKPT],
                   check=True)
print("checkpoint:", CKPT, "files:", sorted(os.listdir(CKPT))[:8])

# %% [markdown]
# ## 5. Configure the LoRA run
# `configs/colab.py` holds one variant per device (T4, L4, A100, H100, TPU v5e), sized with
# the memory plan: rank-16 adapters on the language model, the vision tower frozen, an NF4
# base on 16 GB devices, and the judges running on the policy's own frozen base (no second
# copy). The plan is printed when the run starts. The smoke run makes everything tiny.

# %%
import importlib.util  # noqa: E402

spec = importlib.util.spec_from_file_location("colab_config", f"{REPO}/configs/colab.py")
colab_config = importlib.util.module_from_spec(spec)
spec.loader.exec_module(colab_config)
VARIANT = "tpu" if ACCEL == "tpu" else next(
    (v for v in ("t4", "l4", "a100", "h100") if v.upper() in GPU.upper()), "l4")
cfg = colab_config.get_config(VARIANT)
cfg.workdir = f"{WORK}/lora"
cfg.model.path = cfg.judges.multimodal_path = CKPT
cfg.data.files, cfg.data.image_root = DATA, IMAGES
if SMOKE:
    cfg.model.preset = cfg.judges.multimodal_preset = ""
    cfg.mesh.device_memory_gb = 0.0
    cfg.train.steps, cfg.train.batch_size, cfg.train.micro_batch_size = 2, 2, 4
    cfg.train.warmup_steps, cfg.train.eval_every, cfg.checkpoint.every = 0, 100, 1
    cfg.train.lr = 1e-3
    cfg.sampling.num_samples, cfg.sampling.max_new_tokens = 2, 8
    cfg.data.max_image_tokens, cfg.data.max_prompt_tokens, cfg.data.num_eval = 4, 128, 2
    cfg.data.image_processor = dict(min_pixels=56 * 56, max_pixels=56 * 56)
    cfg.judges.max_image_tokens, cfg.judges.list_max_tokens = 4, 8
    cfg.judges.decode_batch, cfg.judges.prefix_batch, cfg.judges.item_batch = 4, 2, 8
    cfg.compile_cache_dir = ""
print(f"variant {VARIANT}: LoRA rank {cfg.model.lora.rank}, base "
      f"{cfg.model.lora.quantize or cfg.model.dtype}, {cfg.train.batch_size} prompts x "
      f"{cfg.sampling.num_samples} rollouts per step")

# %% [markdown]
# ## 6. Captions before training
# The base model's captions of a few held-out images (greedy), to compare with the trained
# policy's at the end.

# %%
from balcap_jax.caption import caption  # noqa: E402

held_out = sorted(os.path.join(IMAGES, f) for f in os.listdir(IMAGES))[:4]
base_cfg = colab_config.get_config(VARIANT)
base_cfg.update_from_flattened_dict({"model.path": CKPT, "data.max_image_tokens":
                                     cfg.data.max_image_tokens, "data.max_prompt_tokens":
                                     cfg.data.max_prompt_tokens, "sampling.max_new_tokens":
                                     cfg.sampling.max_new_tokens, "model.lora.rank": 0,
                                     "model.lora.quantize": "", "model.preset": cfg.model.preset})
base_cfg.data.image_processor = cfg.data.image_processor
caption(base_cfg, held_out, f"{WORK}/captions_before.jsonl", batch=4)

# %% [markdown]
# ## 7. Train
# The BalCapRL loop with a progress bar (per-step rewards and caption length). Checkpoints go
# to `workdir/checkpoints`: running this cell again resumes where it stopped.

# %%
from balcap_jax import main  # noqa: E402

result = main.run(cfg)

# %% [markdown]
# ## 8. Curves
# Rewards and caption length per step, read back from the run's `metrics.jsonl`.

# %%
from balcap_jax.plot import plot_metrics  # noqa: E402

keys = ["reward/precision", "reward/recall", "reward/linguistic", "length/caption_words"]
png = plot_metrics(f"{WORK}/metrics.png", f"{cfg.workdir}/metrics.jsonl", keys,
                   title=f"BalCapRL LoRA, {VARIANT}")
display(Image(filename=png))

# %% [markdown]
# ## 9. Captions after training, and the export
# The export is a merged checkpoint (adapters folded in; transformers loads it) in
# `workdir/export`, and the adapters alone in PEFT's layout in `workdir/export/adapter`.

# %%
import json  # noqa: E402

after_cfg = base_cfg.copy_and_resolve_references()
after_cfg.model.path = f"{cfg.workdir}/export"
caption(after_cfg, held_out, f"{WORK}/captions_after.jsonl", batch=4)
before = [json.loads(line) for line in open(f"{WORK}/captions_before.jsonl")]
after = {r["image"]: r for r in map(json.loads, open(f"{WORK}/captions_after.jsonl"))}
for r in before:
    print(os.path.basename(r["image"]))
    print("  before:", r["caption"])
    print("  after: ", after[r["image"]]["caption"])
print("export:", sorted(os.listdir(f"{cfg.workdir}/export")))
print("adapter:", sorted(os.listdir(f"{cfg.workdir}/export/adapter")))
