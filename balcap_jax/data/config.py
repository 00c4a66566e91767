"""The data section of an experiment config, and the loader made from it.

    data = default_data_config()
    data.files = "/data/sharegpt4v/share-captioner_coco_lcs_sam_1246k_1107.json"
    data.image_root = "/data/sharegpt4v/images"
    loader = make_loader(data, batch_size=8, seed=0)

`builder`: "sharegpt4v" | "coco" | "captions" (CSV/JSONL `image,caption`). `files`: one path or
several joined by commas. The dataset is prepared once under `data_dir` (default
`workdir/tfds`) and reused while the inputs are unchanged.

`make_loader` and `eval_examples` accept any ConfigDict holding some of these keys (e.g. a base
config's `data` section): missing keys take the defaults below.
"""
from __future__ import annotations

import ml_collections

from balcap_jax.data import builders
from balcap_jax.data.loader import CaptionLoader

# The paper's caption instruction is not published; this is our default.
CAPTION_PROMPT = "Describe this image in detail."


def default_data_config() -> ml_collections.ConfigDict:
    """The data block of the run config (`balcap_jax.config.base_config().data`): the one
    place its fields and defaults are declared."""
    from balcap_jax.config import base_config
    return base_config().data


def with_defaults(cfg) -> ml_collections.ConfigDict:
    """default_data_config() overridden by every key `cfg` has (extra keys kept)."""
    full = default_data_config()
    for key, value in (cfg.items() if cfg is not None else ()):
        if key in full and isinstance(full[key], tuple) and isinstance(value, list):
            value = tuple(value)
        with full.ignore_type():
            full[key] = value
    return full


def _options(cfg) -> dict:
    """The builder settings of a data block (they key the prepared dataset)."""
    return dict(image_root=cfg.image_root or None, max_side=cfg.max_side,
                max_pixels=cfg.max_pixels, max_image_bytes=cfg.max_image_bytes,
                max_caption_chars=cfg.max_caption_chars,
                allow_outside_root=cfg.allow_outside_root, num_workers=cfg.build_workers)


def _build(cfg: ml_collections.ConfigDict, *, is_builder_host: bool):
    if is_builder_host:
        return builders.build_dataset(cfg.builder, cfg.files, split=cfg.split,
                                      data_dir=cfg.data_dir or None, name=cfg.name or None,
                                      **_options(cfg))[0]
    return builders.open_builder(
        builders.BUILDERS[cfg.builder],
        builders.make_config(cfg.builder, cfg.files, split=cfg.split, name=cfg.name or None,
                             **_options(cfg)), cfg.data_dir or None)


def make_loader(cfg: ml_collections.ConfigDict, *, batch_size: int, seed: int = 0,
                shard_index: int | None = None, shard_count: int | None = None) -> CaptionLoader:
    """Prepares (or reuses) the dataset of `cfg` and returns this host's CaptionLoader.

    With several JAX processes, process 0 builds while the others wait at a barrier; then they
    read it from the data dir, which must be a file system all hosts share or a bucket (each
    host copies the dataset down); shard index/count default to the process's.
    """
    import jax  # deferred: data-only tools need not start JAX

    cfg = with_defaults(cfg)
    if not cfg.files:
        raise ValueError("data.files is empty: name the annotation file(s), e.g. "
                         "--config.data.files=/data/sharegpt4v.json "
                         "--config.data.image_root=/data/images")
    multi = jax.process_count() > 1
    is_builder_host = not multi or jax.process_index() == 0
    if is_builder_host:
        builder = _build(cfg, is_builder_host=True)
    if multi:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("balcap_jax.data.build")
    if not is_builder_host:
        builder = _build(cfg, is_builder_host=False)
        if not builder.is_prepared():
            raise RuntimeError(f"dataset {builder.data_dir} was built by process 0 but is not "
                               "visible here: data_dir must be on a file system all hosts "
                               "share, or a bucket (gs://...)")
    source = builders.open_source(builder, cfg.split)
    return CaptionLoader(source, batch_size=batch_size, seed=seed, prompt=cfg.prompt,
                         prompts=tuple(cfg.prompts), use_data_prompt=cfg.use_data_prompt,
                         shard_index=shard_index, shard_count=shard_count,
                         read_threads=cfg.read_threads)


def eval_examples(cfg) -> list[dict]:
    """A fixed held-out set: the first `num_eval` examples (by image id) of `eval_files`, built
    like the training data, as loader-style dicts with the first prompt. [] without eval_files."""
    cfg = with_defaults(cfg)
    if not cfg.eval_files or cfg.num_eval <= 0:
        return []
    builder, _ = builders.build_dataset(cfg.builder, cfg.eval_files, split="eval",
                                        data_dir=cfg.data_dir or None, **_options(cfg))
    source = builders.open_source(builder, "eval")
    loader = CaptionLoader(source, batch_size=1, seed=0, prompt=cfg.prompt,
                           prompts=tuple(cfg.prompts)[:1], shard_index=0, shard_count=1)
    examples = [loader.example_at_index(i) for i in range(len(source))]
    return sorted(examples, key=lambda e: e["image_id"])[:cfg.num_eval]


def prepared_split(cfg, split: str):
    """(image ids, id -> example) of a split of the data block's TFDS dataset ("train": the
    `files`, "eval": the `eval_files`), prepared as training prepares it, or reused. For
    captioning and evaluating a prepared split; examples are the source's (image arrays,
    references)."""
    cfg = with_defaults(cfg)
    files = {"train": cfg.files, "eval": cfg.eval_files}.get(split)
    if files is None:
        raise ValueError(f"split {split!r}: use train (data.files) or eval (data.eval_files)")
    if not files:
        field = "files" if split == "train" else "eval_files"
        raise ValueError(f"the {split} split needs data.{field}")
    builder, _ = builders.build_dataset(cfg.builder, files, split=split,
                                        data_dir=cfg.data_dir or None,
                                        name=(cfg.name or None) if split == "train" else None,
                                        **_options(cfg))
    source = builders.open_source(builder, split)

    def text(x):
        return x.decode() if isinstance(x, bytes) else str(x)
    index = {text(source[i]["image_id"]): i for i in range(len(source))}

    def example(image_id: str) -> dict:
        ex = source[index[image_id]]
        return {"image": ex["image"], "references": [text(r) for r in ex["references"]]}
    return sorted(index), example
