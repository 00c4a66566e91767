"""`python -m balcap_jax.evaluate`: COCO metrics checked by hand, bootstrap intervals, and the
report files of two policies scored with a judge."""
import json
import os

import numpy as np
import pytest

from balcap_jax.data.records import Record
from balcap_jax.evaluate import bootstrap_interval, coco_metrics, evaluate, read_captions
from balcap_jax.rewards.types import ScoreResult


def test_bleu4_and_rouge_l_by_hand():
    """candidate "a red circle on blue" against "a red circle on a blue background":
    n-gram precisions 5/5, 3/4, 2/3, 1/2 -> geometric mean 0.25 ** 0.25; brevity penalty
    exp(1 - 7/5); ROUGE-L: LCS 5, P = 1, R = 5/7, F(beta = 1.2) = 2.44 R / (R + 1.44)."""
    m = coco_metrics({"x": ["a red circle on a blue background"]}, {"x": "a red circle on blue"})
    assert m["corpus"]["BLEU-4"] == pytest.approx(0.25 ** 0.25 * np.exp(1 - 7 / 5), abs=1e-6)
    r = 5 / 7
    assert m["corpus"]["ROUGE-L"] == pytest.approx(2.44 * r / (r + 1.44), abs=1e-6)
    assert m["per_image"]["ROUGE-L"].shape == (1,)


def test_bootstrap_interval():
    assert bootstrap_interval([0.3] * 20) == (pytest.approx(0.3), pytest.approx(0.3))
    v = np.random.default_rng(0).normal(1.0, 1.0, 400)
    lo, hi = bootstrap_interval(v, samples=2000, seed=1)
    assert lo < v.mean() < hi and hi - lo == pytest.approx(2 * 1.96 / 20, rel=0.2)
    assert bootstrap_interval([np.nan, 1.0, 1.0]) == (1.0, 1.0)      # NaN (judge failure) out


class WordJudge:
    """precision: caption words found in the references; recall: reference words found in
    the caption; linguistic 1 (a stand-in for the LLM judges)."""

    def __call__(self, images, captions, refs, **_):
        p, r = [], []
        for c, rs in zip(captions, refs):
            cw, rw = set(c.split()), set(" ".join(rs).split())
            p.append(len(cw & rw) / max(len(cw), 1))
            r.append(len(cw & rw) / max(len(rw), 1))
        n = len(captions)
        return ScoreResult({"precision": np.array(p, np.float32),
                            "recall": np.array(r, np.float32),
                            "linguistic": np.ones(n, np.float32)})


def _write(path, rows):
    with open(path, "w") as f:
        for image, caption in rows:
            f.write(json.dumps({"image": image, "caption": caption}) + "\n")
        f.write('{"image": "torn')          # a killed writer's last line is ignored


def test_two_policies_results_and_table(tmp_path):
    words = ["red", "blue", "green", "circle", "square", "small", "large", "left", "right"]
    rng = np.random.default_rng(0)
    refs = {f"/img/{i}.png": [" ".join(rng.choice(words, 6)) for _ in range(2)] for i in range(12)}
    records = [Record(image=k, image_id=k, references=v) for k, v in refs.items()]
    good = [(k, v[0]) for k, v in refs.items()]
    bad = [(k, "a photo of something") for k in list(refs)[:-1]]     # one image uncaptioned
    _write(tmp_path / "good.jsonl", good)
    _write(tmp_path / "bad.jsonl", bad)
    assert len(read_captions(tmp_path / "bad.jsonl")) == 11
    res = evaluate(records, {"good": str(tmp_path / "good.jsonl"),
                             "bad": str(tmp_path / "bad.jsonl")}, str(tmp_path / "out"),
                   scorer=WordJudge(), load_image=lambda path: np.zeros((4, 4, 3), np.uint8),
                   judge_batch=5, samples=200, judges_meta={"judge": "words v1"})
    assert res["images"] == 11 and res["images_without_every_caption"] == 1
    g, b = res["policies"]["good"]["metrics"], res["policies"]["bad"]["metrics"]
    for m in ("BLEU-4", "ROUGE-L", "CIDEr", "precision", "recall", "b_capscore"):
        assert g[m]["value"] > b[m]["value"], m
    assert g["precision"]["value"] == pytest.approx(1.0)          # its words are all in refs
    assert b["b_capscore"]["value"] == 0.0                       # no word right: harmonic 0
    for e in list(g.values()) + list(b.values()):
        if "ci95" in e:
            assert e["ci95"][0] <= e["value"] + 1e-9 <= e["ci95"][1] + 2e-9
    assert "ci95" not in g["BLEU-4"]                             # corpus-level
    on_disk = json.load(open(tmp_path / "out" / "results.json"))
    assert on_disk["policies"]["good"]["metrics"]["CIDEr"]["value"] == g["CIDEr"]["value"]
    assert on_disk["judges"] == {"judge": "words v1"}
    table = open(tmp_path / "out" / "results.md").read().splitlines()
    assert table[0].startswith("11 images")
    row = next(line for line in table if line.startswith("| good |"))
    assert f"{g['CIDEr']['value']:.4g} [{g['CIDEr']['ci95'][0]:.4g}" in row
    assert os.path.exists(tmp_path / "out" / "results.md")
