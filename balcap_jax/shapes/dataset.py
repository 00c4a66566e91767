"""ShapesWorld: a procedural captioning world small enough for a CPU (the built-in default).

    from balcap_jax import shapes
    builder = shapes.build_shapes_dataset(seed=0, num_train=4000, num_eval=256)
    source = shapes.open_shapes_source(builder, "train")   # tfds.data_source, for CaptionLoader
    ex = source[0]   # image uint8 [112, 112, 3], image_id, references [1], prompt, scene (JSON)
    loader = shapes.make_shapes_loader(builder, batch_size=16, seed=0)   # training batches
    held_out = shapes.shapes_eval_examples(builder, 256)                 # fixed, with `scene`

    scene = shapes.as_scene(ex["scene"])
    shapes.sft_caption(scene, shapes.caption_rng(0, "train", 0, draw=1 + epoch))

The pieces: `shapes_world` (scenes and pixels), `shapes_text` (reference and warm-start
captions, the tokenizer corpus), `shapes_grammar` (caption -> assertions), and the scorer in
`balcap_jax.shapes.scorer`. This module adds the TFDS builder `shapes_world` (array_record, no
TensorFlow), so ShapesWorld goes through the same data path as real data, and `ShapesSource`, the
same examples generated in memory for tests that need no dataset on disk.

Splits: "train" and "eval" (held out), each a fixed function of the config's seed; every example
is a pure function of (seed, split, index, image_size).
"""
from __future__ import annotations

import dataclasses
import io
import logging
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from balcap_jax.data import builders
from balcap_jax.shapes.grammar import parse_caption
from balcap_jax.shapes.text import (
    SHAPES_PROMPT,
    SftErrors,
    caption_rng,
    reference_caption,
    sft_caption,
    tokenizer_corpus,
    words,
)
from balcap_jax.shapes.world import (
    SCENE_VERSION,
    as_scene,
    image_id,
    make_scene,
    parse_image_id,
    render,
    scene_to_json,
)

log = logging.getLogger(__name__)

__all__ = ["ShapesWorld", "ShapesWorldConfig", "ShapesSource", "shapes_example",
           "build_shapes_dataset", "open_shapes_source", "make_shapes_loader",
           "shapes_eval_examples", "make_scene", "render", "as_scene", "scene_to_json",
           "image_id", "parse_image_id", "reference_caption", "sft_caption", "sft_caption_for",
           "SftErrors", "caption_rng", "tokenizer_corpus", "parse_caption", "words",
           "SHAPES_PROMPT", "BUILDER_NAME"]

BUILDER_NAME = "shapes_world"


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def shapes_example(seed: int, split: str, index: int, image_size: int = 112) -> dict[str, Any]:
    """Example `index` of `split`: image, image_id, references (one), prompt, scene (JSON)."""
    scene = make_scene(seed, split, index, image_size)
    return {"image": render(scene), "image_id": image_id(seed, split, index, image_size),
            "references": [reference_caption(scene, caption_rng(seed, split, index))],
            "prompt": SHAPES_PROMPT, "scene": scene_to_json(scene)}


def sft_caption_for(image_id_: str, draw: int = 1, errors: SftErrors = SftErrors()) -> str:
    """A warm-start caption of the example with this id; use draw = 1 + epoch so every epoch
    sees a fresh sample (draw 0 is the reference's rng)."""
    seed, split, index, size = parse_image_id(image_id_)
    return sft_caption(make_scene(seed, split, index, size),
                       caption_rng(seed, split, index, draw), errors)


class ShapesSource:
    """The examples of one split, generated on access (len / [i], like tfds.data_source)."""

    def __init__(self, *, seed: int, split: str, num_examples: int, image_size: int = 112):
        if num_examples < 1:
            raise ValueError(f"num_examples={num_examples} must be >= 1")
        make_scene(seed, split, 0, image_size)  # checks the arguments now, not at first read
        self.seed, self.split, self.n, self.image_size = seed, split, num_examples, image_size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} outside [0, {self.n})")
        return shapes_example(self.seed, self.split, int(index), self.image_size)


@dataclasses.dataclass(eq=False)
class ShapesWorldConfig(tfds.core.BuilderConfig):
    seed: int = 0
    num_train: int = 4000
    num_eval: int = 256
    image_size: int = 112


def make_config(*, seed: int = 0, num_train: int = 4000, num_eval: int = 256,
                image_size: int = 112) -> ShapesWorldConfig:
    """A config named by its settings: other settings get their own prepared directory."""
    if num_train < 1 or num_eval < 1:
        raise ValueError(f"num_train={num_train} and num_eval={num_eval} must be >= 1")
    return ShapesWorldConfig(
        name=f"s{seed}_t{num_train}_e{num_eval}_i{image_size}", seed=seed, num_train=num_train,
        num_eval=num_eval, image_size=image_size,
        description=f"ShapesWorld seed {seed}: {num_train} train, {num_eval} eval, "
                    f"{image_size}px")


class ShapesWorld(builders.LocalBuilder):
    """TFDS builder `shapes_world`: generated scenes with references and scene graphs."""

    # The builder's version follows the scene version, so a directory prepared from an older
    # world is not reused (its image ids would no longer parse).
    VERSION = tfds.core.Version(f"{SCENE_VERSION}.0.0")
    RELEASE_NOTES = {"1.0.0": "image, image_id, references, prompt, scene (JSON)",
                     "2.0.0": "ShapesWorld v2 scenes: larger objects, less jitter"}
    BUILDER_CONFIG_CLASS = ShapesWorldConfig

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description="ShapesWorld: one to four shapes on a plain background, a reference "
                        "caption stating every fact, and the scene graph as JSON.",
            features=builders.caption_features((size, size, 3), scene=tfds.features.Text()),
            disable_shuffling=True)  # record i is example i, as in ShapesSource

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        return {"train": self._generate_examples("train", cfg.num_train),
                "eval": self._generate_examples("eval", cfg.num_eval)}

    def _generate_examples(self, split: str, num: int):
        cfg = self.builder_config
        for i in range(num):
            ex = shapes_example(cfg.seed, split, i, cfg.image_size)
            ex["image"] = _png(ex["image"])  # TFDS encodes arrays with TensorFlow; bytes pass
            yield ex["image_id"], ex


def build_shapes_dataset(*, seed: int = 0, num_train: int = 4000, num_eval: int = 256,
                         image_size: int = 112, data_dir: str | None = None) -> ShapesWorld:
    """Prepares the dataset under `data_dir` (default workdir/tfds; a bucket URL works, see
    builders.open_builder), or reuses a prepared one."""
    config = make_config(seed=seed, num_train=num_train, num_eval=num_eval,
                         image_size=image_size)
    builder = builders.open_builder(ShapesWorld, config, data_dir)
    if builder.is_prepared():
        log.info("reusing prepared ShapesWorld %s", builder.data_dir)
    else:
        builder.download_and_prepare()
        builders.publish(builder, data_dir)
    return builder


def open_shapes_source(builder: ShapesWorld, split: str = "train"):
    """Random-access source of a prepared split (tfds.data_source; text fields come as bytes)."""
    return builders.open_source(builder, split)


def make_shapes_loader(builder: ShapesWorld, *, batch_size: int, seed: int,
                       split: str = "train", shard_index: int | None = None,
                       shard_count: int | None = None, read_threads: int = 4):
    """The trainer's CaptionLoader over a prepared split, with the world's prompt. Its examples
    lack `scene`; score them with `image_ids=` (or regenerate with `make_scene`)."""
    from balcap_jax.data.loader import CaptionLoader
    return CaptionLoader(open_shapes_source(builder, split), batch_size=batch_size, seed=seed,
                         prompt=SHAPES_PROMPT, shard_index=shard_index,
                         shard_count=shard_count, read_threads=read_threads)


def shapes_eval_examples(builder: ShapesWorld, num: int | None = None) -> list[dict[str, Any]]:
    """The first `num` (default all) held-out examples in order, as loader-style dicts plus
    `scene` (JSON text): a fixed evaluation set."""
    src = open_shapes_source(builder, "eval")
    num = len(src) if num is None else num
    if not 0 < num <= len(src):
        raise ValueError(f"num={num} held-out examples asked, the eval split has {len(src)}; "
                         "build the dataset with a larger num_eval")

    def text(x):
        return x.decode("utf-8") if isinstance(x, bytes) else str(x)
    out = []
    for i in range(num):
        raw = src[i]
        out.append({"image": raw["image"], "image_id": text(raw["image_id"]),
                    "references": [text(r) for r in raw["references"]],
                    "prompt": text(raw["prompt"]), "scene": text(raw["scene"])})
    return out
