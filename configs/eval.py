"""Scoring caption files (``python -m balcap_jax.evaluate --config=configs/eval.py``).

    python -m balcap_jax.evaluate --config=configs/eval.py \
        --config.data.builder=coco --config.data.files=/data/captions_val2017.json \
        --config.data.image_root=/data/val2017 \
        --config.judges.multimodal_path=/ckpt/Qwen2.5-VL-7B-Instruct \
        --config.eval.captions=base=base.jsonl,rl=rl.jsonl --config.eval.baselines=base \
        --config.eval.questions=/data/captionqa_natural.json

The run config of configs/qwen.py (its judges score b-CapScore), plus the `eval` block. The
same judge model answers the evaluation's questions (eval_judge="llm"); a local judge is not
calibrated to the published leaderboards.
"""
import ml_collections

from configs.qwen import get_config as qwen_config


def get_config(arg: str = "7b"):
    c = qwen_config(arg)
    c.scorer.name = "judges"
    c.eval = ml_collections.ConfigDict()
    c.eval.captions = ""          # NAME=FILE[,NAME=FILE...]: `python -m balcap_jax.caption` output
    c.eval.out = "eval"           # results.json, results.md, report.html
    c.eval.judges = True          # b-CapScore and its parts with the scorer's judges
    c.eval.eval_judge = "llm"     # none | llm | shapes: QA accuracy, fact P/R/F1, pairwise
    c.eval.questions = ""         # a CaptionQA question file (JSON, as published); "" = no QA
    c.eval.baselines = ""         # NAME[,NAME...]: pairwise scores of every policy against these
    c.eval.bootstrap = 1000       # resamples for the 95% intervals
    c.eval.seed = 0               # bootstrap and option-shuffle seed
    c.eval.gallery = 12           # images in the report's gallery
    c.eval.meteor = True          # METEOR (needs Java; skipped with a note without it)
    return c
