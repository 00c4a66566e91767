"""The evaluation harness's judged metrics: CaptionQA's scoring rule, fact P/R/F1, the pairwise
position swap, the HTML report, and the whole of `evaluate` with an LLM judge behind a local
fake OpenAI-compatible server. Every expected number is worked out by hand in the comments."""
import html.parser
import json
import os
import random
import re

import numpy as np
import pytest
from PIL import Image

from balcap_jax.data.records import Record
from balcap_jax.eval import qa
from balcap_jax.eval.facts import prf
from balcap_jax.eval.judges import LLMJudge
from balcap_jax.eval.pairwise import pairwise_scores
from balcap_jax.eval.report import highlight
from balcap_jax.evaluate import eval_settings, evaluate
from balcap_jax.rewards.remote import RemoteBackend
from tests._fakes.chat_server import ChatServer, Reply, completion, user_text


def test_captionqa_scoring_rule():
    # correct 1; another option or no answer 0; "cannot answer" 1/K + 0.05 (K own options)
    assert qa.question_score(2, 2, 4, 3) == 1.0
    assert qa.question_score(1, 2, 4, 3) == 0.0
    assert qa.question_score(None, 2, 4, 3) == 0.0
    assert qa.question_score(-1, 2, 4, 3) == 0.0
    assert qa.question_score(3, 2, 4, 3) == pytest.approx(0.25 + 0.05)
    assert qa.question_score(3, 2, 3, 3) == pytest.approx(1 / 3 + 0.05)


def test_present_adds_cannot_answer_except_to_yes_no_and_tracks_the_answer():
    q = {"question": "What colour is the car?", "choices": ["red", {"text": "blue"}, "green"],
         "answer": "blue", "id": 7}
    rng = random.Random(0)
    for _ in range(20):
        shown, answer, k, cannot = qa.present(q, rng)
        assert k == 3 and len(shown["choices"]) == 4 and shown["id"] == 7
        assert shown["choices"][answer] == "blue"
        assert shown["choices"][cannot] == qa.CANNOT_ANSWER
    yn = {"question": "Is the car red?", "choices": ["Yes", "No"], "answer": "No"}
    shown, answer, k, cannot = qa.present(yn, random.Random(1))
    assert cannot is None and sorted(shown["choices"]) == ["No", "Yes"] and k == 2
    assert shown["choices"][answer] == "No"
    assert qa.is_yes_no({"question": "How many?", "choices": ["yes", "no"]})


def test_read_questions_takes_the_published_format_and_names_a_bad_question(tmp_path):
    good = {"a.jpg": [{"question": "Q?", "choices": [{"text": "x"}, "y"], "answer": "y",
                       "category": ["Attribute"]}]}
    (tmp_path / "q.json").write_text(json.dumps(good))
    assert qa.read_questions(str(tmp_path / "q.json")) == good
    bad = {"b.jpg": [{"question": "Q?", "choices": ["x", "y"], "answer": "z"}]}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="'b.jpg' question 0"):
        qa.read_questions(str(tmp_path / "bad.json"))
    # question keys match captions by equal key, else by a unique file name
    assert qa.match_keys(["a.jpg", "/x/b.jpg", "c.jpg"], ["/d/a.jpg", "/x/b.jpg", "/e/c.jpg",
                                                          "/f/c.jpg"]) == {
        "a.jpg": "/d/a.jpg", "/x/b.jpg": "/x/b.jpg"}


def test_fact_precision_recall_f1_by_hand():
    from balcap_jax.eval.judges import FactResult
    # 3 facts, 2 true, one judge failure left out: P = 2/3; 4 reference facts, 1 covered
    r = FactResult(["a", "b", "c", "d"], [True, True, False, None], ["w", "x", "y", "z"],
                   [True, False, False, False])
    p, rec, f1 = prf(r)
    assert (p, rec) == (pytest.approx(2 / 3), 0.25)
    assert f1 == pytest.approx(2 * (2 / 3) * 0.25 / (2 / 3 + 0.25))
    assert prf(FactResult([], [], ["w"], [True]))[:2] == (0.0, 1.0)        # no facts: P = 0
    assert np.isnan(prf(FactResult(["a"], [True], [], []))[2])             # no reference


class _Judge:
    def __init__(self, rule):
        self.rule = rule

    def compare(self, items):
        return [self.rule(it) for it in items]


def test_pairwise_position_swap_catches_an_order_biased_judge():
    policy = {"1": "a long and careful caption", "2": "another long careful caption"}
    base = {"1": "short", "2": "brief"}
    refs = {"1": ["r"], "2": ["r"]}
    biased = pairwise_scores(_Judge(lambda it: 1), policy, base, refs)
    # always "Caption 1": the policy wins when shown first, loses when shown second -> 0
    np.testing.assert_array_equal(biased["per_image"]["pairwise"], [0.0, 0.0])
    assert biased["consistency"] == 0.0 and biased["first_position_rate"] == 1.0
    assert (biased["wins"], biased["losses"]) == (2, 2)
    fair = pairwise_scores(_Judge(lambda it: 1 if len(it.first) > len(it.second) else 2),
                           policy, base, refs)
    np.testing.assert_array_equal(fair["per_image"]["pairwise"], [1.0, 1.0])
    assert fair["consistency"] == 1.0 and fair["first_position_rate"] == 0.5
    ties = pairwise_scores(_Judge(lambda it: 0 if it.first in base.values() else None),
                           policy, base, refs)
    assert (ties["ties"], ties["failed"]) == (2, 2)
    np.testing.assert_array_equal(ties["per_image"]["pairwise"], [0.0, 0.0])


def test_highlight_marks_false_facts_found_in_the_caption():
    pieces, rest = highlight("A red car. The mood is calm.", ["the mood is calm", "a blue sky"])
    assert pieces == [("A red car. ", False), ("The mood is calm", True), (".", False)]
    assert rest == ["a blue sky"]


# ---------------------------------------------------------------------------------------------
# evaluate() with an LLM judge behind a fake OpenAI-compatible server

def _options(text):
    return dict(re.findall(r"^([A-Z])\. (.+)$", text, re.M))


def _script(req, n_seen):
    """A deterministic judge. QA: the option whose text is a word of the caption, else
    "cannot answer". Decomposition: the sentences. Verification: true iff it says "red" (the
    images are red). Coverage: the information is in the caption. Pairwise: the longer caption.
    """
    text = user_text(req)
    if "Use only the caption" in text:
        caption = text.split("Caption:\n", 1)[1].split("\n\nQuestion:", 1)[0].lower()
        opts = _options(text)
        pick = [k for k, v in opts.items() if re.search(rf"\b{re.escape(v.lower())}\b", caption)]
        pick = pick or [k for k, v in opts.items() if v == qa.CANNOT_ANSWER]
        return Reply(body=completion(json.dumps(pick[:1])))
    if text.startswith(("Split the following image caption", "Split the following reference")):
        body = text.rsplit(": ", 1)[1]
        return Reply(body=completion(json.dumps([s.strip() for s in body.split(".")
                                                 if s.strip()])))
    if text.startswith("Is the following assertion true"):
        return Reply(body=completion("yes" if "red" in text.rsplit("Assertion:", 1)[1]
                                     else "no"))
    if text.startswith("Here is a caption of an image"):
        caption = text.split("\n\n")[1]
        info = text.rsplit("Information: ", 1)[1]
        return Reply(body=completion("yes" if info.lower() in caption.lower() else "no"))
    if text.startswith("You compare two captions"):
        one = text.split("Caption 1:\n", 1)[1].split("\n\nCaption 2:", 1)[0]
        two = text.split("Caption 2:\n", 1)[1].split("\n\nBetter caption:", 1)[0]
        return Reply(body=completion(json.dumps(["1" if len(one) > len(two) else "2"])))
    return Reply(status=400, body={"error": f"unexpected prompt {text[:80]!r}"})


def test_evaluate_with_an_llm_judge_behind_a_local_server(tmp_path):
    keys = []
    for i in range(3):
        path = tmp_path / f"img{i}.png"
        Image.new("RGB", (24, 20), (200, 20, 20)).save(path)
        keys.append(str(path))
    ref = "A red square. A small dot."
    records = [Record(image=k, image_id=k, references=[ref]) for k in keys]
    files = {}
    for name, caption in (("good", "A red square. A small dot."), ("bad", "A blue circle.")):
        files[name] = str(tmp_path / f"{name}.jsonl")
        with open(files[name], "w") as f:
            for k in keys:
                f.write(json.dumps({"image": k, "caption": caption}) + "\n")
    questions = {f"img{i}.png": [      # keyed by file name, as a downloaded CaptionQA file
        {"question": "What colour is the square?", "choices": ["red", "blue", "green"],
         "answer": "red"},
        {"question": "What shape is there?", "choices": ["square", "circle", "triangle"],
         "answer": "square"},
        {"question": "What does the sign say?", "choices": ["stop", "go", "exit"],
         "answer": "stop"}] for i in range(3)}
    (tmp_path / "q.json").write_text(json.dumps(questions))

    def load(k):
        return np.asarray(Image.open(k).convert("RGB"))
    with ChatServer(_script) as server:
        judge = LLMJudge(RemoteBackend.from_url(server.base_url, "fake-judge", max_retries=0),
                         load)
        res = evaluate(records, files, str(tmp_path / "out"), load_image=load, samples=50,
                       eval_judge=judge, questions=qa.read_questions(str(tmp_path / "q.json")),
                       baselines=("bad",), meteor=False)
    good, bad = (res["policies"][n]["metrics"] for n in ("good", "bad"))
    # QA: good gets red and square right and cannot answer the sign (1/3 + 0.05): 0.79444;
    # bad answers blue and circle (wrong) and cannot answer the sign: 0.12778
    assert good["qa_score"]["value"] == pytest.approx((2 + 1 / 3 + 0.05) / 3)
    assert bad["qa_score"]["value"] == pytest.approx((1 / 3 + 0.05) / 3)
    assert (good["qa_accuracy"]["value"], bad["qa_accuracy"]["value"]) == (
        pytest.approx(2 / 3), 0.0)
    assert good["qa_cannot"]["value"] == pytest.approx(1 / 3)
    # facts: good has 2 facts, "A red square" true, "A small dot" not: P 0.5; both reference
    # facts are in it: R 1; F1 2/3. bad: its one fact is false, it covers nothing: 0, 0, 0
    assert (good["fact_precision"]["value"], good["fact_recall"]["value"]) == (0.5, 1.0)
    assert good["fact_f1"]["value"] == pytest.approx(2 / 3)
    assert (bad["fact_precision"]["value"], bad["fact_recall"]["value"],
            bad["fact_f1"]["value"]) == (0.0, 0.0, 0.0)
    # pairwise against bad: the longer caption wins in both orders on every image
    assert good["pairwise_vs_bad"]["value"] == 1.0 and "pairwise_vs_bad" not in bad
    assert res["policies"]["good"]["pairwise"]["bad"]["consistency"] == 1.0
    assert res["judges"]["eval_judge"]["prompt_versions"]["caption_qa"] == "caption_qa-v1"
    assert res["judges"]["eval_judge"]["judge"] == "fake-judge"
    # what was written: results.json, results.md and the page with the false facts marked
    out = tmp_path / "out"
    assert json.load(open(out / "results.json"))["policies"]["good"]["metrics"]["fact_f1"][
        "value"] == pytest.approx(2 / 3)
    assert "qa_score" in (out / "results.md").read_text()
    page = (out / "report.html").read_text()

    class Parse(html.parser.HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags, self.marks, self._in_mark = [], [], False

        def handle_starttag(self, tag, attrs):
            self.tags.append((tag, dict(attrs)))
            self._in_mark = tag == "mark"

        def handle_data(self, data):
            if self._in_mark:
                self.marks.append(data)
                self._in_mark = False
    p = Parse()
    p.feed(page)
    assert sum(t == "img" for t, _ in p.tags) == 3
    assert set(p.marks) == {"A small dot", "A blue circle"}     # the facts judged false
    assert sum(t == "svg" for t, _ in p.tags) == len(good) + 1      # one per metric + lengths


def test_eval_settings_take_the_config_block_then_the_flags():
    import ml_collections
    cfg = ml_collections.ConfigDict({"eval": {"captions": "a=x.jsonl", "eval_judge": "shapes",
                                              "bootstrap": 10}})
    e = eval_settings(cfg, captions=None, bootstrap=20)
    assert (e["captions"], e["eval_judge"], e["bootstrap"], e["out"]) == (
        "a=x.jsonl", "shapes", 20, "eval")
    with pytest.raises(ValueError, match="eval_judge"):
        eval_settings(cfg, eval_judge="gpt")


def test_configs_eval_loads():
    from configs.eval import get_config
    c = get_config()
    assert c.scorer.name == "judges" and c.eval.eval_judge == "llm"
    assert set(eval_settings(c)) == set(c.eval)      # every setting of the block is read


def test_the_command_writes_results_and_report(tmp_path):
    """`python -m balcap_jax.evaluate` on a COCO annotation file, COCO metrics only (no judge
    model here): results.json, results.md and report.html with the images."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    (tmp_path / "img").mkdir()
    coco = {"images": [], "annotations": []}
    for i in range(3):
        Image.new("RGB", (16, 16), (20 * i, 90, 200)).save(tmp_path / "img" / f"{i}.png")
        coco["images"].append({"id": i, "file_name": f"{i}.png"})
        coco["annotations"].append({"image_id": i, "caption": "a blue square on a wall"})
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    with open(tmp_path / "p.jsonl", "w") as f:
        for i in range(3):
            f.write(json.dumps({"image": str(tmp_path / "img" / f"{i}.png"),
                                "caption": "a blue square"}) + "\n")
    r = subprocess.run(
        [sys.executable, "-m", "balcap_jax.evaluate", f"--config={root}/configs/eval.py",
         "--config.data.builder=coco", f"--config.data.files={tmp_path / 'ann.json'}",
         f"--config.data.image_root={tmp_path / 'img'}", f"--captions=p={tmp_path / 'p.jsonl'}",
         "--judges=false", "--eval_judge=none", "--config.eval.meteor=false",
         "--bootstrap=20", f"--out={tmp_path / 'out'}"],
        cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(tmp_path / "out" / "results.json"))
    assert res["images"] == 3 and set(res["policies"]["p"]["metrics"]) == {
        "BLEU-4", "ROUGE-L", "CIDEr"}
    assert (tmp_path / "out" / "report.html").read_text().count("<img") == 3
    assert "report:" in r.stdout
