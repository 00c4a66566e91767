"""Caption data: annotation files -> TFDS (array_record) datasets -> grain loaders.

- records.py   annotation formats (ShareGPT4V, COCO, CSV/JSONL) -> records, with a summary of
               everything skipped or fixed
- images.py    one image file -> clean RGB bytes, or the reason it is unusable
- builders.py  TFDS builders configured at run time; build_dataset(), open_source()
- loader.py    CaptionLoader: seeded, sharded, resumable batches for the trainer
- config.py    default_data_config(), make_loader(cfg, ...)
- recaption.py python -m balcap_jax.data.recaption: new reference captions from a model

Submodules are imported on use so the command-line tools start without TFDS, grain or JAX.
"""
import importlib

_EXPORTS = {"default_data_config": "config", "make_loader": "config",
            "CaptionLoader": "loader", "build_dataset": "builders", "open_source": "builders"}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
