"""Decompose every reference of a dataset into units once, offline, into the judges' cache.

    python -m balcap_jax.prepare_references --config=configs/qwen.py \
        --config.data.files=/data/sharegpt4v.json --config.data.image_root=/data/images \
        [--config.judges.* as for the run] [--batch=256]

The references of data.files and data.eval_files, read and checked as the dataset builders read
them (no images are opened), are decomposed by the run's text judge with the run's prompt and
stored in the run's reference-unit cache (workdir/judge_cache or judges.cache_dir; SQLite,
copied up after each batch when the workdir is a bucket), keyed by the reference, the judge's
name and the prompt version exactly as the scorer keys them. A run with the same judge and
prompt then never decomposes a reference (its metrics show reference_cache/misses 0). Batches
of --batch references (default judges.decode_batch: one decode each), a progress bar; the cache
is committed per batch, so a killed command run again skips what is done. References whose
decomposition fails are not cached (the run tries them again) and are counted.
"""
from __future__ import annotations

import json
from typing import Callable, Sequence

__all__ = ["references_of", "prepare"]


def references_of(cfg) -> list[str]:
    """The distinct non-empty references of the data block's annotation files."""
    from balcap_jax.data.config import with_defaults
    from balcap_jax.data.records import Summary, read_records
    d = with_defaults(cfg.data)
    files = [f.strip() for group in (d.files, d.eval_files) for f in str(group).split(",")
             if f.strip()]
    if not files:
        raise ValueError("no annotation files: set --config.data.files (and data.eval_files)")
    summary = Summary()
    records = read_records(d.builder, files, d.image_root or None, summary,
                           allow_outside=d.allow_outside_root,
                           max_caption_chars=d.max_caption_chars)
    summary.log("annotations")
    return list(dict.fromkeys(r for rec in records for r in rec.references if r.strip()))


def prepare(scorer, references: Sequence[str], *, batch: int, progress: bool = True,
            after_batch: Callable[[], None] | None = None) -> dict[str, int]:
    """`scorer.prepare_references` over `references` in batches; returns the summed counts
    (cached before, decomposed now, failed)."""
    from tqdm.auto import tqdm
    if batch < 1:
        raise ValueError(f"batch={batch} must be >= 1")
    totals = {"references": len(references), "cached": 0, "decomposed": 0, "failed": 0}
    bar = tqdm(total=len(references), desc="references", disable=not progress,
               dynamic_ncols=True)
    for start in range(0, len(references), batch):
        counts = scorer.prepare_references(references[start:start + batch])
        for k, v in counts.items():
            totals[k] += v
        if after_batch is not None:
            after_batch()
        bar.update(min(batch, len(references) - start))
        bar.set_postfix(decomposed=totals["decomposed"], failed=totals["failed"])
    bar.close()
    return totals


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    FLAGS = flags.FLAGS
    config_flags.DEFINE_config_file("config", None, "the run's config (configs/qwen.py)")
    flags.DEFINE_integer("batch", 0, "references per judge call (0: judges.decode_batch)")

    def main(_):
        from balcap_jax import build
        cfg = FLAGS.config
        if cfg.scorer.name != "judges":
            raise app.UsageError("prepare_references needs scorer.name=judges (the cache is "
                                 "the LLM judges')")
        refs = references_of(cfg)
        scorer = build.build_scorer(cfg, None)
        cache = build.judge_cache(cfg)
        totals = prepare(scorer, refs, batch=FLAGS.batch or int(cfg.judges.decode_batch),
                         after_batch=lambda: cache.sync("reference_units.sqlite"))
        print(json.dumps({**totals, "cache": cache.remote}), flush=True)

    app.run(main)
