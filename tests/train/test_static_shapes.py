"""Real images compile once: a ShareGPT4V-format dataset of images of many sizes and aspect
ratios, through the TFDS builder, the grain loader, the processor and the trainer, compiles its
programs in the first steps and never again (data.max_prompt_tokens / data.max_image_tokens
fix every shape: prompts padded to one bucket, each image to its own vision slot)."""
import collections
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from balcap_jax import build
from balcap_jax.rewards.scripted import TokenFrequencyScorer
from balcap_jax.sharding import make_mesh
from tests.train.test_trainer import tiny_config

# (width, height): squares, wide, tall, tiny (scaled up to min_pixels) and large (scaled down
# to max_image_tokens); 8 sizes, 7 aspect ratios
SIZES = [(40, 40), (60, 30), (28, 100), (90, 56), (160, 160), (33, 77), (150, 50), (64, 96)]
WORDS = ["red", "blue", "green", "a", "square", "on", "the", "left", "background", "small"]


def _sharegpt4v(root: str, n: int = 32, sizes=SIZES, name: str = "sharegpt4v") -> str:
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    rng = np.random.default_rng(len(sizes))
    records = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        image = f"{name}{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            os.path.join(root, "img", image))
        caption = " ".join(rng.choice(WORDS, size=8 + i % 5)) + "."
        records.append({"id": f"{name}{i}", "image": image, "conversations": [
            {"from": "human", "value": "<image>\nDescribe this image."},
            {"from": "gpt", "value": caption}]})
    path = os.path.join(root, f"{name}.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path


@pytest.mark.heavy
def test_images_of_many_sizes_compile_in_the_first_steps_only(tmp_path):
    files = _sharegpt4v(str(tmp_path))
    cfg = tiny_config(steps=10)
    cfg.workdir = str(tmp_path / "run")
    d = cfg.data
    d.source = "tfds"
    d.builder = "sharegpt4v"
    d.files = files
    d.image_root = str(tmp_path / "img")
    d.data_dir = str(tmp_path / "tfds")
    # a held-out set of two sizes, not a multiple of the batch (4): the last chunk pads
    d.eval_files = _sharegpt4v(str(tmp_path), 6, SIZES[:2], "heldout")
    d.num_eval = 6
    d.max_image_tokens = 16
    d.max_prompt_tokens = 80
    d.image_processor = {"min_pixels": 56 * 56}
    trainer = build.build_trainer(cfg, make_mesh((1, 1, 1), jax.devices()[:1]))
    trainer.p.scorer = TokenFrequencyScorer(range(7, 47))
    grids = set()
    real = trainer._inputs

    def inputs(examples):
        out = real(examples)
        grids.update(tuple(g) for g in out["image_grid_thw"].tolist())
        return out
    trainer._inputs = inputs

    compiles: list[str] = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compiles.append(kw.get("fun_name", "?"))
        if event == "/jax/core/compile/backend_compile_duration" else None)
    for _ in range(2):                 # warm-up: every program compiles here
        trainer.train_step(next(trainer.p.loader))
    trainer.evaluate()
    warm = len(compiles)
    assert warm > 0
    seen_before = set(grids)
    for _ in range(6):
        trainer.train_step(next(trainer.p.loader))
    trainer.evaluate()
    later = collections.Counter(compiles[warm:])
    assert not later, f"steps 3-8 compiled again: {dict(later)}"
    # the batches really held images of many sizes, and later steps brought new ones
    assert len(grids) >= 6, grids
    assert grids - seen_before, (grids, seen_before)
    assert max(t * h * w for t, h, w in grids) // 4 <= 16          # within max_image_tokens
