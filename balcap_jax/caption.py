"""Caption images with any policy checkpoint: a folder, or an annotation file's images.

    python -m balcap_jax.caption --config=configs/qwen.py \
        --config.model.path=/runs/balcap7b/export --images=/data/val_images --out=caps.jsonl
    python -m balcap_jax.caption --config=configs/qwen.py --config.model.path=... \
        --config.data.builder=coco --config.data.files=captions_val2017.json \
        --config.data.image_root=/data/val2017 --out=caps.jsonl
    python -m balcap_jax.caption --config=configs/qwen.py --config.model.path=... \
        [data block of the run] --split=eval --out=caps.jsonl   # a prepared TFDS split

The config's model block picks the checkpoint (a run's export or a Hugging Face Qwen2.5-VL /
LLaVA-1.5 directory with its tokenizer; for a LoRA run, the base there and
`--config.model.adapter=RUN/export/adapter`, the PEFT adapter put back on), its data block
the prompt, the image bounds and the fixed shapes (with --split, the prepared TFDS split),
its sampling block the decoding (greedy by default: --sample draws at sampling.temperature /
top_p / top_k with --seed). Images are read with the data builders'
checks; a bad one is skipped and counted by reason (the summary is printed and written to
OUT.summary.json). Each caption is one JSONL line {"image", "caption", "model", "decoding"},
flushed as written: a killed run started again skips the images already in OUT (a torn last
line is dropped), so no image is captioned twice.
"""
from __future__ import annotations

import json
import os

__all__ = ["image_files", "done_images", "inputs", "caption"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def image_files(folder: str) -> list[str]:
    """The image files under `folder` (recursively, by suffix), sorted."""
    out = []
    for root, _, files in os.walk(os.path.expanduser(folder)):
        out += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_SUFFIXES)]
    return sorted(out)


def done_images(out: str) -> set[str]:
    """Images already captioned in `out`; a torn last line (a kill mid-write) is cut off."""
    if not os.path.exists(out):
        return set()
    done, good = set(), 0
    with open(out, "rb") as f:
        for line in f:
            try:
                done.add(json.loads(line)["image"])
                good += len(line)
            except (ValueError, KeyError):
                break
    with open(out, "r+b") as f:       # drop whatever follows the last whole line
        f.truncate(good)
    return done


def inputs(cfg, folder: str = "") -> list[str]:
    """Image paths: those under `folder`, else the images the data block's annotation files
    name (read and checked as the dataset builders do)."""
    from balcap_jax.data.records import Summary, read_records
    if folder:
        return image_files(folder)
    if not cfg.data.files:
        raise ValueError("give --images=FOLDER or --config.data.files=ANNOTATIONS "
                         "(--config.data.builder=sharegpt4v|coco|captions)")
    summary = Summary()
    files = [f.strip() for f in cfg.data.files.split(",") if f.strip()]
    records = read_records(cfg.data.builder, files, cfg.data.image_root or None, summary,
                           allow_outside=cfg.data.allow_outside_root)
    summary.log("annotations")
    return [r.image for r in records]


def caption(cfg, paths: list[str], out: str, *, batch: int, sample: bool = False,
            seed: int = 0, load=None) -> dict:
    """Captions `paths` into `out` (JSONL), skipping those already there; returns the
    summary (kept, skipped by reason, fixes). `load(key) -> image array` reads keys that are
    not files (a prepared split's image ids, `data.config.prepared_split`)."""
    import jax

    from balcap_jax import build
    from balcap_jax import config as config_lib
    from balcap_jax.sharding import use_sharding

    if not cfg.model.path:
        raise ValueError("captioning needs model.path: a checkpoint directory (a run's export "
                         "or a Hugging Face Qwen2.5-VL / LLaVA-1.5 directory)")
    done = done_images(out)
    todo = [p for p in paths if p not in done]
    # sharded as training is: the config's mesh over this process's devices
    sizes = config_lib.validate(cfg, jax.device_count())
    shards = sizes["data"] * sizes["fsdp"]
    if batch < 1 or batch % shards:
        raise ValueError(f"--batch={batch} must be a positive multiple of the {shards} batch "
                         "shards (mesh.data * mesh.fsdp)")
    mesh, rules = build.mesh_and_rules(cfg, sizes)
    with use_sharding(mesh, rules):
        cap = build.build_captioner(cfg, mesh, rules)
        return _caption(cfg, cap, paths, todo, out, batch=batch, sample=sample, seed=seed,
                        load=load)


def _caption(cfg, cap, paths, todo, out, *, batch, sample, seed, load=None) -> dict:
    import jax
    import numpy as np
    from tqdm.auto import tqdm

    from balcap_jax import sampling
    from balcap_jax.data import images as images_lib
    from balcap_jax.data.records import Summary
    from balcap_jax.processing import build_caption_prompt
    from balcap_jax.train.rollouts import completion_text

    s, d = cfg.sampling, cfg.data
    decoding = {"greedy": not sample, "max_new_tokens": int(s.max_new_tokens)}
    if sample:
        decoding.update(temperature=float(s.temperature), top_p=float(s.top_p),
                        top_k=int(s.top_k), seed=seed)
    prompt = build_caption_prompt(d.prompt, cap.tokenizer)
    summary = Summary()
    rng = jax.random.key(seed)
    bar = tqdm(total=len(paths), initial=len(paths) - len(todo), desc="caption",
               dynamic_ncols=True)
    with open(out, "a") as f:
        for start in range(0, len(todo), batch):
            chunk, arrays = [], []
            for path in todo[start:start + batch]:
                if load is not None:    # a prepared split: checked when it was built
                    chunk.append(path)
                    arrays.append(np.asarray(load(path)))
                    continue
                try:
                    img = images_lib.load_image(path, max_side=d.max_side,
                                                max_pixels=d.max_pixels,
                                                max_bytes=d.max_image_bytes)
                except images_lib.BadImage as e:
                    summary.skip(e.reason, path)
                    bar.update(1)
                    continue
                for fix in img.fixes:
                    summary.fix(fix, path)
                chunk.append(path)
                arrays.append(img.to_array())
            if not chunk:
                continue
            # a short batch is filled with its last image (dropped below): one compiled shape
            fill = arrays + [arrays[-1]] * (batch - len(arrays))
            inputs = cap.processor([prompt] * batch, images=[[a] for a in fill])
            rng, key = jax.random.split(rng)
            smp = sampling.generate(
                cap.model, inputs, max_new_tokens=s.max_new_tokens, num_samples=1,
                temperature=s.temperature if sample else 0.0,
                top_p=s.top_p if sample else 1.0, top_k=s.top_k if sample else 0,
                eos_token_ids=cap.eos_token_ids, rng=key, pad_id=cap.pad_id,
                prompt_buckets=cap.prompt_buckets, cache_windows=int(s.get("cache_windows", 4)))
            texts = completion_text(cap.tokenizer, np.asarray(smp.tokens),
                                    np.asarray(smp.lengths), np.asarray(smp.truncated))
            for path, text in zip(chunk, texts):
                f.write(json.dumps({"image": path, "caption": text, "model": cfg.model.path,
                                    "decoding": decoding}) + "\n")
            f.flush()
            summary.kept += len(chunk)
            bar.update(len(chunk))
    bar.close()
    result = {"captioned_now": summary.kept, "already_done": len(paths) - len(todo),
              **summary.to_dict()}
    with open(out + ".summary.json", "w") as sf:
        json.dump(result, sf, indent=1)
    print(summary.message(f"[balcap_jax] captions in {out}"), flush=True)
    return result


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    FLAGS = flags.FLAGS
    config_flags.DEFINE_config_file("config", None, "a config file (configs/qwen.py)")
    flags.DEFINE_string("images", "", "a folder of images (recursively)")
    flags.DEFINE_string("out", "captions.jsonl", "the JSONL written (resumed if it exists)")
    flags.DEFINE_integer("batch", 8, "images per generate call")
    flags.DEFINE_bool("sample", False, "sample at the config's temperature instead of greedy")
    flags.DEFINE_integer("seed", 0, "the sampling seed")
    flags.DEFINE_string("split", "", "train | eval: the data block's prepared TFDS split "
                        "(built as training builds it if it is not yet); keys are image ids")

    def main(_):
        cfg = FLAGS.config
        if FLAGS.split:
            from balcap_jax.data.config import prepared_split
            ids, example = prepared_split(cfg.data, FLAGS.split)
            caption(cfg, ids, FLAGS.out, batch=FLAGS.batch, sample=FLAGS.sample,
                    seed=FLAGS.seed, load=lambda k: example(k)["image"])
            return
        caption(cfg, inputs(cfg, FLAGS.images), FLAGS.out, batch=FLAGS.batch,
                sample=FLAGS.sample, seed=FLAGS.seed)

    app.run(main)
