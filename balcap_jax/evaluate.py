"""Score caption files of one image set, the ways the field does; write results.json and a
markdown table.

    python -m balcap_jax.evaluate --config=configs/eval.py \
        --config.data.builder=coco --config.data.files=captions_val2017.json \
        --config.data.image_root=/data/val2017 [judges flags] \
        --config.eval.captions=base=base.jsonl,rl=rl.jsonl --config.eval.baselines=base \
        --config.eval.questions=captionqa_natural.json --config.eval.out=eval/

(or any run config, e.g. configs/qwen.py, with --captions=... --out=... flags).
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
- With an evaluation judge (`eval_judge`: `llm`, the scorer's judge model, or `shapes`, the
  exact ShapesWorld judge; eval/judges.py): CaptionQA-style QA accuracy on a question file
  (eval/qa.py), DCScore-style fact precision/recall/F1 (eval/facts.py) and CapArena-style
  pairwise scores against the named baselines, positions swapped (eval/pairwise.py).
- report.html: bars with intervals, a gallery with the false facts marked, caption lengths.
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


def coco_metrics(refs: dict[str, list[str]], caps: dict[str, str], *, meteor: bool = True
                 ) -> dict:
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
    if java and not meteor:
        skipped["METEOR"] = "turned off (meteor=False)"
    if java and meteor:
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


def _judge(scorer, images: list, caps: list[str], refs: list[list[str]], batch: int,
           context=None, keys=None) -> dict:
    """Per-image rewards of the scorer, and b-CapScore per image when it gives all three."""
    from balcap_jax.eval import b_capscore_details
    out: dict[str, list] = {}
    for s in range(0, len(caps), batch):
        kw = context(keys[s:s + batch]) if context is not None else {}
        res = scorer([f() for f in images[s:s + batch]], caps[s:s + batch], refs[s:s + batch],
                     **kw)
        for k, v in res.rewards.items():
            out.setdefault(k, []).append(np.asarray(v, np.float64))
    per = {k: np.concatenate(v) for k, v in out.items()}
    if all(k in per for k in ("precision", "recall", "linguistic")):
        d = b_capscore_details(per["precision"], per["recall"], per["linguistic"])
        per["b_capscore"] = np.asarray(d.per_image, np.float64) * 100
    return per


def _entry(values, samples: int, seed: int) -> dict:
    v = np.asarray(values, np.float64)
    return {"value": float(np.nanmean(v)) if np.isfinite(v).any() else float("nan"),
            "nan": int((~np.isfinite(v)).sum()),
            "ci95": bootstrap_interval(v, samples=samples, seed=seed)}


def evaluate(records, caption_files: dict[str, str], out_dir: str, *, scorer=None,
             load_image=None, judge_batch: int = 16, samples: int = 1000, seed: int = 0,
             judges_meta: dict | None = None, eval_judge=None, questions=None,
             baselines: tuple[str, ...] = (), gallery: int = 12, scorer_context=None,
             title: str = "Evaluation", html_path: str | None = None,
             meteor: bool = True) -> dict:
    """Scores each policy's captions of the images `records` (data.records.Record) name;
    writes out_dir/results.json, results.md and (with load_image) report.html, or html_path;
    returns the results.

    eval_judge (eval.judges.EvalJudge): QA accuracy on `questions` (CaptionQA format, see
    eval/qa.py), fact precision/recall/F1 (eval/facts.py) and the pairwise score against each
    policy named in `baselines` (eval/pairwise.py). scorer_context: image keys -> the scorer's
    context keywords (the exact ShapesWorld scorer takes image_ids=)."""
    from balcap_jax.eval.facts import fact_scores
    from balcap_jax.eval.pairwise import pairwise_scores
    from balcap_jax.eval.qa import qa_scores
    from balcap_jax.eval.report import write_html
    refs = {r.image: list(r.references) for r in records}
    files = {name: read_captions(path) for name, path in caption_files.items()}
    unknown = [b for b in baselines if b not in files]
    if unknown:
        raise ValueError(f"baselines {unknown} are not among the caption files {list(files)}")
    common = [i for i in refs if all(i in caps for caps in files.values())]
    if not common:
        raise ValueError("no image has a caption in every file and references in the "
                         "annotations: compare the files' 'image' fields with the annotations' "
                         "resolved paths (data.image_root)")
    meta = dict(judges_meta or {})
    if eval_judge is not None:
        meta["eval_judge"] = eval_judge.metadata()
    results = {"images": len(common), "images_without_every_caption": len(refs) - len(common),
               "bootstrap_samples": samples, "judges": meta,
               "note": "a local judge is not calibrated to the published leaderboards",
               "policies": {}}
    false_facts: dict[str, dict[str, list[str]]] = {}
    for name, caps in files.items():
        own = {i: caps[i] for i in common}
        cap_list = list(own.values())
        coco = coco_metrics(refs, own, meteor=meteor)
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
                         [refs[i] for i in common], judge_batch, scorer_context, common)
            for k, v in per.items():
                metrics[k] = _entry(v, samples, seed)
        extra = {}
        if eval_judge is not None:
            if questions:
                qa = qa_scores(eval_judge, own, questions, seed=seed)
                for k, v in qa["per_image"].items():
                    metrics[f"qa_{k}"] = _entry(v, samples, seed)
                extra["qa"] = {"questions": qa["questions"], "failed": qa["failed"],
                               "overall": qa["overall"]}
            fs = fact_scores(eval_judge, own, refs, batch=judge_batch)
            for k, v in fs["per_image"].items():
                metrics[k] = _entry(v, samples, seed)
            false_facts[name] = {i: [f for f, t in zip(r.caption_facts, r.true) if t is False]
                                 for i, r in zip(common, fs["details"])}
            for b in baselines:
                if b == name:
                    continue
                pw = pairwise_scores(eval_judge, own, {i: files[b][i] for i in common}, refs,
                                     batch=judge_batch)
                metrics[f"pairwise_vs_{b}"] = _entry(pw["per_image"]["pairwise"], samples, seed)
                extra.setdefault("pairwise", {})[b] = {k: v for k, v in pw.items()
                                                       if k != "per_image"}
        words = [len(c.split()) for c in cap_list]
        results["policies"][name] = {
            "captions": caption_files[name], "metrics": metrics, **extra,
            "coco_tokenizer": coco["tokenizer"], "skipped": coco["skipped"],
            "words": {"mean": float(np.mean(words)), "p50": float(np.median(words)),
                      "max": int(max(words))}, "word_counts": words}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown(results))
    if load_image is not None:
        shown = [{"key": i, "image": load_image(i),
                  "captions": {n: files[n][i] for n in files},
                  "false_facts": {n: false_facts.get(n, {}).get(i, []) for n in files}}
                 for i in common[:gallery]]
        write_html(html_path or os.path.join(out_dir, "report.html"), results, shown,
                   title=title)
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


def eval_settings(cfg, **flags) -> dict:
    """The `eval` block of a config (configs/eval.py) with the command's flags over it: a flag
    given (not None) wins."""
    base = {"captions": "", "out": "eval", "judges": True, "eval_judge": "none",
            "questions": "", "baselines": "", "bootstrap": 1000, "seed": 0, "gallery": 12,
            "meteor": True}
    block = cfg.get("eval") if hasattr(cfg, "get") else None
    for k in base:
        if block is not None and k in block:
            base[k] = block[k]
        if flags.get(k) is not None:
            base[k] = flags[k]
    if base["eval_judge"] not in ("none", "llm", "shapes"):
        raise ValueError(f"eval.eval_judge={base['eval_judge']!r}: use none, llm (the "
                         "scorer's judge model) or shapes (ShapesWorld's exact judge)")
    return base


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    FLAGS = flags.FLAGS
    config_flags.DEFINE_config_file("config", None, "a config file (configs/eval.py)")
    flags.DEFINE_string("captions", None, "NAME=FILE[,NAME=FILE...]: each policy's caption "
                        "JSONL (default: the config's eval.captions)")
    flags.DEFINE_string("out", None, "directory for results.json, results.md, report.html")
    flags.DEFINE_bool("judges", None, "score b-CapScore with the config's scorer")
    flags.DEFINE_string("eval_judge", None, "none | llm | shapes: the judge of QA accuracy, "
                        "fact P/R/F1 and pairwise scores")
    flags.DEFINE_string("questions", None, "a CaptionQA question file (JSON)")
    flags.DEFINE_string("baselines", None, "NAME[,NAME...]: policies to compare each against")
    flags.DEFINE_integer("bootstrap", None, "bootstrap resamples for the intervals")
    flags.DEFINE_integer("seed", None, "bootstrap and option-shuffle seed")
    flags.DEFINE_string("split", "", "train | eval: score captions of the data block's "
                        "prepared TFDS split (keys: image ids; `caption --split`)")

    def main(_):
        from balcap_jax import build
        from balcap_jax.data import images as images_lib
        from balcap_jax.data.records import Summary, read_records
        from balcap_jax.eval.qa import read_questions
        cfg = FLAGS.config
        e = eval_settings(cfg, **{k: FLAGS[k].value for k in (
            "captions", "out", "judges", "eval_judge", "questions", "baselines", "bootstrap",
            "seed")})
        pairs = [p.split("=", 1) for p in e["captions"].split(",") if p]
        if not pairs or any(len(p) != 2 for p in pairs):
            raise app.UsageError("--captions=NAME=FILE[,NAME=FILE...] (or eval.captions)")
        if FLAGS.split:     # a prepared TFDS split: image ids, its references and images
            from balcap_jax.data.config import prepared_split
            from balcap_jax.data.records import Record
            ids, example = prepared_split(cfg.data, FLAGS.split)
            records = [Record(image=i, image_id=i, references=example(i)["references"])
                       for i in ids]

            def load(key):
                return example(key)["image"]
        else:
            summary = Summary()
            files = [f.strip() for f in cfg.data.files.split(",") if f.strip()]
            records = read_records(cfg.data.builder, files, cfg.data.image_root or None,
                                   summary, allow_outside=cfg.data.allow_outside_root)

            def load(path):
                return images_lib.load_image(path, max_side=cfg.data.max_side).to_array()
        scorer, meta = None, {}
        if e["judges"] or e["eval_judge"] == "llm":
            scorer = build.build_scorer(cfg, build.build_tokenizer(cfg))
            meta = scorer.metadata() if callable(getattr(scorer, "metadata", None)) else {}
        judge = build.build_eval_judge(e["eval_judge"], scorer, load)
        res = evaluate(records, dict(pairs), e["out"], scorer=scorer if e["judges"] else None,
                       load_image=load, samples=e["bootstrap"], seed=e["seed"],
                       judges_meta=meta, eval_judge=judge,
                       questions=read_questions(e["questions"]) if e["questions"] else None,
                       baselines=tuple(b for b in e["baselines"].split(",") if b),
                       gallery=e["gallery"], meteor=e["meteor"])
        print(markdown(res), flush=True)
        print(f"report: {os.path.join(e['out'], 'report.html')}", flush=True)

    app.run(main)
