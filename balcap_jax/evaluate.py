"""Score caption files of one image set, the ways the field does; write results.json and a
markdown table.

    python -m balcap_jax.evaluate --config=configs/qwen.py \
        --config.data.builder=coco --config.data.files=captions_val2017.json \
        --config.data.image_root=/data/val2017 --config.scorer.name=judges [judges flags] \
        --captions=base=base.jsonl,rl=rl.jsonl --out=eval/

Caption files are `python -m balcap_jax.caption` output (or any JSONL with "image" and
"caption"); the references are the data block's annotation files. Every policy is scored on
the images all files caption and the annotations name (the others are counted, not scored).

- COCO metrics through pycocoevalcap: BLEU-4, METEOR, ROUGE-L, CIDEr, on PTB-tokenized text.
  METEOR and the PTB tokenizer need Java: without it METEOR is skipped and the text is
  tokenized by a lower-case/punctuation split (said in the results). SPICE stays off (it
  downloads models).
- b-CapScore and its three parts with the configured scorer (the training judges, in-process
  or remote; `--judges=false` skips them), per image and in aggregate.
- 95% bootstrap intervals over images (`--bootstrap` resamples) for every per-image metric;
  BLEU is corpus-level and has none.
The results record the judges' names and prompt versions; a local judge is not calibrated to
published leaderboards.
"""
from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np

__all__ = ["read_captions", "coco_metrics", "bootstrap_interval", "evaluate", "markdown"]

COCO = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def read_captions(path: str) -> dict[str, str]:
    """image -> caption from a JSONL file (a torn last line is ignored; the first caption of an
    image wins)."""
    out: dict[str, str] = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "image" not in row or "caption" not in row:
                raise ValueError(f"{path}:{n}: a caption line needs 'image' and 'caption'")
            out.setdefault(str(row["image"]), str(row["caption"]))
    return out


def _simple_tokens(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower()))


def coco_metrics(refs: dict[str, list[str]], caps: dict[str, str]) -> dict:
    """{"corpus": {metric: value}, "per_image": {metric: [N] in the order of caps' keys},
    "tokenizer": "ptb" | "simple", "skipped": {metric: why}} over the images of `caps`."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    ids = list(caps)
    java = shutil.which("java") is not None
    gts = {i: [{"caption": r} for r in refs[i]] for i in ids}
    res = {i: [{"caption": caps[i] or " "}] for i in ids}
    skipped = {}
    if java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
        tok = PTBTokenizer()
        gts, res = tok.tokenize(gts), tok.tokenize(res)
    else:
        gts = {i: [_simple_tokens(c["caption"]) for c in v] for i, v in gts.items()}
        res = {i: [_simple_tokens(v[0]["caption"])] for i, v in res.items()}
        skipped["METEOR"] = "no java on PATH (METEOR and the PTB tokenizer need it)"
    res = {i: [c if c.strip() else "<empty>"] for i, (c,) in res.items()}   # scorers need a word
    corpus, per_image = {}, {}
    # per-image BLEU is not what corpus BLEU averages: it gets no interval
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    corpus["BLEU-4"] = float(bleu[3])
    for name, scorer in (("ROUGE-L", Rouge()), ("CIDEr", Cider())):
        value, each = scorer.compute_score(gts, res)
        corpus[name], per_image[name] = float(value), np.asarray(each, np.float64)
    if java:
        from pycocoevalcap.meteor.meteor import Meteor
        value, each = Meteor().compute_score(gts, res)    # its Java process ends with it
        corpus["METEOR"], per_image["METEOR"] = float(value), np.asarray(each, np.float64)
    return {"corpus": corpus, "per_image": per_image, "tokenizer": "ptb" if java else "simple",
            "skipped": skipped}


def bootstrap_interval(values, *, samples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean of `values` (NaNs dropped) over `samples` resamples."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0 or samples < 1:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(samples, len(v)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def _judge(scorer, images: list, caps: list[str], refs: list[list[str]], batch: int) -> dict:
    """Per-image rewards of the scorer, and b-CapScore per image when it gives all three."""
    from balcap_jax.eval import b_capscore_details
    out: dict[str, list] = {}
    for s in range(0, len(caps), batch):
        res = scorer([f() for f in images[s:s + batch]], caps[s:s + batch], refs[s:s + batch])
        for k, v in res.rewards.items():
            out.setdefault(k, []).append(np.asarray(v, np.float64))
    per = {k: np.concatenate(v) for k, v in out.items()}
    if all(k in per for k in ("precision", "recall", "linguistic")):
        d = b_capscore_details(per["precision"], per["recall"], per["linguistic"])
        per["b_capscore"] = np.asarray(d.per_image, np.float64) * 100
    return per


def evaluate(records, caption_files: dict[str, str], out_dir: str, *, scorer=None,
             load_image=None, judge_batch: int = 16, samples: int = 1000, seed: int = 0,
             judges_meta: dict | None = None) -> dict:
    """Scores each policy's captions of the images `records` (data.records.Record) name;
    writes out_dir/results.json and results.md; returns the results."""
    refs = {r.image: list(r.references) for r in records}
    files = {name: read_captions(path) for name, path in caption_files.items()}
    common = [i for i in refs if all(i in caps for caps in files.values())]
    if not common:
        raise ValueError("no image has a caption in every file and references in the "
                         "annotations: compare the files' 'image' fields with the annotations' "
                         "resolved paths (data.image_root)")
    results = {"images": len(common), "images_without_every_caption": len(refs) - len(common),
               "bootstrap_samples": samples, "judges": judges_meta or {},
               "note": "a local judge is not calibrated to the published leaderboards",
               "policies": {}}
    for name, caps in files.items():
        cap_list = [caps[i] for i in common]
        coco = coco_metrics(refs, {i: caps[i] for i in common})
        metrics = {}
        for m in COCO:
            if m in coco["corpus"]:
                entry = {"value": coco["corpus"][m]}
                if m in coco["per_image"]:
                    entry["ci95"] = bootstrap_interval(coco["per_image"][m], samples=samples,
                                                       seed=seed)
                metrics[m] = entry
        if scorer is not None:
            per = _judge(scorer, [(lambda i=i: load_image(i)) for i in common], cap_list,
                         [refs[i] for i in common], judge_batch)
            for k, v in per.items():
                metrics[k] = {"value": float(np.nanmean(v)) if np.isfinite(v).any()
                              else float("nan"), "nan": int((~np.isfinite(v)).sum()),
                              "ci95": bootstrap_interval(v, samples=samples, seed=seed)}
        words = [len(c.split()) for c in cap_list]
        results["policies"][name] = {
            "captions": caption_files[name], "metrics": metrics,
            "coco_tokenizer": coco["tokenizer"], "skipped": coco["skipped"],
            "words": {"mean": float(np.mean(words)), "p50": float(np.median(words)),
                      "max": int(max(words))}}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown(results))
    return results


def markdown(results: dict) -> str:
    """One row per policy, one column per metric: value [95% interval]."""
    names = []
    for p in results["policies"].values():
        names += [m for m in p["metrics"] if m not in names]
    head = "| policy | " + " | ".join(names) + " | words |\n"
    head += "|---" * (len(names) + 2) + "|\n"
    rows = []
    for policy, p in results["policies"].items():
        cells = []
        for m in names:
            e = p["metrics"].get(m)
            if e is None:
                cells.append("n/a")
                continue
            ci = e.get("ci95")
            cells.append(f"{e['value']:.4g}" + (f" [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else ""))
        rows.append(f"| {policy} | " + " | ".join(cells) + f" | {p['words']['mean']:.1f} |\n")
    return (f"{results['images']} images; 95% bootstrap intervals over images "
            f"({results['bootstrap_samples']} resamples).\n\n" + head + "".join(rows))


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    FLAGS = flags.FLAGS
    config_flags.DEFINE_config_file("config", None, "a config file (configs/qwen.py)")
    flags.DEFINE_string("captions", "", "NAME=FILE[,NAME=FILE...]: each policy's caption JSONL")
    flags.DEFINE_string("out", "eval", "directory for results.json and results.md")
    flags.DEFINE_bool("judges", True, "score b-CapScore with the config's scorer")
    flags.DEFINE_integer("bootstrap", 1000, "bootstrap resamples for the intervals")
    flags.DEFINE_integer("seed", 0, "bootstrap seed")

    def main(_):
        from balcap_jax import build
        from balcap_jax.data import images as images_lib
        from balcap_jax.data.records import Summary, read_records
        cfg = FLAGS.config
        pairs = [p.split("=", 1) for p in FLAGS.captions.split(",") if p]
        if not pairs or any(len(p) != 2 for p in pairs):
            raise app.UsageError("--captions=NAME=FILE[,NAME=FILE...]")
        summary = Summary()
        files = [f.strip() for f in cfg.data.files.split(",") if f.strip()]
        records = read_records(cfg.data.builder, files, cfg.data.image_root or None, summary,
                               allow_outside=cfg.data.allow_outside_root)
        scorer, meta = None, {}
        if FLAGS.judges:
            scorer = build.build_scorer(cfg, build.build_tokenizer(cfg))
            meta = scorer.metadata() if callable(getattr(scorer, "metadata", None)) else {}

        def load(path):
            return images_lib.load_image(path, max_side=cfg.data.max_side).to_array()
        res = evaluate(records, dict(pairs), FLAGS.out, scorer=scorer, load_image=load,
                       samples=FLAGS.bootstrap, seed=FLAGS.seed, judges_meta=meta)
        print(markdown(res), flush=True)

    app.run(main)
