"""ShapesWorld: a procedural captioning world small enough for a CPU, the built-in demo.

- world.py            scenes (objects, attributes, positions) and their pixels
- text.py             reference and deliberately imperfect warm-start captions, the corpus
- grammar.py          caption -> assertions (the exact judges' parser)
- dataset.py          the TFDS builder, loaders and held-out examples (the real data path)
- scorer.py           exact precision / recall / linguistic rewards from the scene graph
- attributes.py       per-attribute accuracy of a policy's captions
- vision_pretrain.py  stage 0 of the demo: the vision tower learns per-cell labels
- plot.py             the demo's curves

The demo's entry point is `balcap_jax.shapes_demo` (it builds runs through `balcap_jax.build`).
The dataset names below are re-exported here, imported on first use (TFDS is heavy).
"""
import importlib

_DATASET = ("ShapesWorld", "ShapesWorldConfig", "ShapesSource", "shapes_example",
            "build_shapes_dataset", "open_shapes_source", "make_shapes_loader",
            "shapes_eval_examples", "make_scene", "render", "as_scene", "scene_to_json",
            "image_id", "parse_image_id", "reference_caption", "sft_caption", "sft_caption_for",
            "SftErrors", "caption_rng", "tokenizer_corpus", "parse_caption", "words",
            "SHAPES_PROMPT", "BUILDER_NAME")
__all__ = list(_DATASET) + ["ShapesScorer"]


def __getattr__(name):
    if name in _DATASET:
        return getattr(importlib.import_module(f"{__name__}.dataset"), name)
    if name == "ShapesScorer":
        return importlib.import_module(f"{__name__}.scorer").ShapesScorer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
