"""Re-captioning: resumes after a crash or a kill without duplicates, counts failures, talks to a
local OpenAI-style server (127.0.0.1 only), and the in-process captioner's batching/decoding."""
import json
import os
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from balcap_jax.client import ChatClient
from balcap_jax.data import recaption as rc
from balcap_jax.data import records as records_lib
from tests._fakes.chat_server import ChatServer, Reply, completion
from tests.data import fakes

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BAD = {"empty_image": 1, "missing_image": 1, "too_many_pixels": 1, "truncated_image": 1,
       "undecodable_image": 1}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("recap"))
    images = fakes.make_images(root)
    path = os.path.join(root, "list.jsonl")
    with open(path, "w") as f:
        for n in fakes.usable(images) + images["bad"]:
            f.write(json.dumps({"image": n, "caption": "old " + n}) + "\n")
    records = records_lib.read_records("captions", [path], os.path.join(root, "img"),
                                       records_lib.Summary())
    return root, images, path, records


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _fake(fail_after=None):
    def run(jobs):
        for i, job in enumerate(jobs):
            if fail_after is not None and i == fail_after:
                raise RuntimeError("simulated crash")
            h, w = job.image.height, job.image.width
            yield rc.Caption(job, f"new caption of {job.record.image_id} ({w}x{h})")
    return run


def test_resume_after_injected_crash(corpus, tmp_path):
    root, images, _, records = corpus
    out = str(tmp_path / "refs.jsonl")
    kw = dict(max_side=fakes.MAX_SIDE, max_pixels=fakes.MAX_PIXELS, progress=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        rc.recaption(records, _fake(fail_after=10), out, **kw)
    first = _lines(out)
    assert len(first) == 10
    s = rc.recaption(records, _fake(), out, **kw)
    lines = _lines(out)
    ids = [r["image_id"] for r in lines]
    assert len(ids) == len(set(ids)) == 26
    assert set(ids) == set(fakes.usable(images))
    assert lines[:10] == first
    assert (s["total"], s["already_done"], s["written"]) == (31, 10, 16)
    assert s["failed"] == BAD
    assert s["examples"]["missing_image"][0].startswith("list.jsonl:")
    with open(out + ".summary.json") as f:
        assert json.load(f) == s
    huge = next(r for r in lines if r["image_id"] == "huge.png")
    assert huge["caption"].endswith("(64x26)") and huge["image"].endswith("img/huge.png")
    # A third run has nothing left but the unusable images.
    s = rc.recaption(records, _fake(), out, **kw)
    assert (s["already_done"], s["written"], s["failed"]) == (26, 0, BAD)


def test_partial_last_line_is_cut(tmp_path):
    out = tmp_path / "x.jsonl"
    out.write_text('{"image_id": "a", "caption": "c"}\n{"image_id": "b", "capt')
    assert rc.read_done(str(out)) == {"a"}
    assert out.read_text() == '{"image_id": "a", "caption": "c"}\n'


def test_http_failures_are_counted_and_retried_next_run(corpus, tmp_path):
    root, images, _, records = corpus
    calls = {"n": 0}
    lock = threading.Lock()

    def script(req, n_seen):
        with lock:
            calls["n"] += 1
            n = calls["n"]
        content = req["messages"][0]["content"]
        assert content[0]["image_url"]["url"].startswith("data:image/")
        assert content[1] == {"type": "text", "text": "Say what you see."}
        if n <= 3:
            return Reply(400, {"error": "bad image"})
        return Reply(body=completion(f"caption {n}"))

    out = str(tmp_path / "refs.jsonl")
    with ChatServer(script) as server:
        client = ChatClient(server.base_url, "m", timeout=5, max_retries=0, concurrency=3)
        cap = rc.http_captioner(client, "Say what you see.", max_tokens=50)
        s1 = rc.recaption(records, cap, out, max_side=fakes.MAX_SIDE,
                          max_pixels=fakes.MAX_PIXELS, progress=False)
        s2 = rc.recaption(records, cap, out, max_side=fakes.MAX_SIDE,
                          max_pixels=fakes.MAX_PIXELS, progress=False)
    assert (s1["written"], s1["failed"]) == (23, {**BAD, "http_400": 3})
    assert (s2["already_done"], s2["written"], s2["failed"]) == (23, 3, BAD)
    assert server.requests[0]["max_tokens"] == 50
    ids = [r["image_id"] for r in _lines(out)]
    assert sorted(ids) == sorted(fakes.usable(images))


def test_cli_killed_midway_then_resumed(corpus, tmp_path):
    root, images, path, _ = corpus
    out = str(tmp_path / "refs.jsonl")
    args = ["--format", "captions", "--files", path, "--image_root", os.path.join(root, "img"),
            "--output", out, "--model", "judge-x", "--api_key_env", "BALCAP_TEST_KEY",
            "--concurrency", "2", "--max_retries", "1", "--timeout", "10",
            "--max_side", str(fakes.MAX_SIDE), "--max_pixels", str(fakes.MAX_PIXELS),
            "--no_progress"]
    slow = lambda req, n: Reply(body=completion(f"caption {time.monotonic()}"), delay=0.15)  # noqa
    with ChatServer(slow) as server:
        env = {**os.environ, "BALCAP_TEST_KEY": "k123", "PYTHONPATH": REPO}
        proc = subprocess.Popen([sys.executable, "-m", "balcap_jax.data.recaption",
                                 "--endpoint", server.base_url, *args], env=env, cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and proc.poll() is None:
                if os.path.exists(out) and len(open(out).read().splitlines()) >= 6:
                    break
                time.sleep(0.05)
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            proc.terminate()
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        n_killed = len(rc.read_done(out))
        assert 6 <= n_killed < 26
        assert server.headers[0]["Authorization"] == "Bearer k123"
        s = rc.main(["--endpoint", server.base_url, *args])
        n_requests = len(server.requests)
    ids = [r["image_id"] for r in _lines(out)]
    assert len(ids) == len(set(ids)) == 26 and set(ids) == set(fakes.usable(images))
    assert all(r["model"] == "judge-x" for r in _lines(out))
    assert (s["already_done"], s["written"], s["failed"]) == (n_killed, 26 - n_killed, BAD)
    # Only requests in flight at the kill are repeated (at most 2 * concurrency).
    assert 26 <= n_requests <= 26 + 4


def test_model_captioner_batches_and_decodes(corpus, monkeypatch):
    root, images, _, records = corpus
    eos, pad = 2, 0
    calls = []

    class Tok:
        pad_token_id = pad
        chat_template = None

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(f"w{i}" for i in ids if not (skip_special_tokens and i == eos))

    tok = Tok()

    def processor(texts, images):
        assert len(texts) == len(images) and all(im[0].ndim == 3 for im in images)
        return {"input_ids": np.zeros((len(texts), 3), np.int32), "n": len(texts)}
    processor.tokenizer = tok

    def generate(model, inputs, *, max_new_tokens, num_samples, temperature, top_p,
                 eos_token_ids, rng, pad_id):
        calls.append((inputs["n"], max_new_tokens, temperature, eos_token_ids, pad_id))
        n = inputs["n"]
        toks = np.tile(np.array([[5, 6, eos, pad]], np.int32), (n, 1))
        toks[-1] = [7, 8, 9, 10]  # the last row hits the token limit
        lengths = np.array([3] * (n - 1) + [4], np.int32)
        return SimpleNamespace(tokens=toks, lengths=lengths,
                               truncated=np.array([False] * (n - 1) + [True]))

    import balcap_jax.processing as processing
    monkeypatch.setattr(processing, "build_caption_prompt", lambda p, tok: f"<prompt>{p}")
    cap = rc.model_captioner("model", processor, "Describe.", eos_token_ids=[eos],
                             max_new_tokens=4, batch_size=4, generate=generate)
    image = SimpleNamespace(to_array=lambda: np.zeros((2, 2, 3), np.uint8))
    jobs = [rc.CaptionJob(r, image) for r in records[:6]]
    out = list(cap(jobs))
    assert [c[0] for c in calls] == [4, 2]
    assert calls[0][1:] == (4, 0.0, [eos], pad)
    assert [c.text for c in out] == ["w5 w6", "w5 w6", "w5 w6", "w7 w8 w9 w10",
                                     "w5 w6", "w7 w8 w9 w10"]
    assert [c.truncated for c in out] == [False, False, False, True, False, True]
    assert [c.job for c in out] == jobs


@pytest.mark.heavy
def test_local_model_recaption_matches_transformers_greedy(corpus, tmp_path):
    """--local_model wiring end to end: a tiny random Qwen2.5-VL checkpoint on disk, read by
    models.from_pretrained, sampled greedily by our sampler; captions equal transformers'
    greedy generate on the same inputs."""
    torch = pytest.importorskip("torch")
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from balcap_jax.data.images import load_image
    from balcap_jax.processing import Qwen25VLProcessor, QwenImageProcessor, build_caption_prompt
    from balcap_jax.tokenizers import train_tiny_bpe
    root, images, _, records = corpus
    ckpt = str(tmp_path / "ckpt")
    tok = train_tiny_bpe([fakes.caption(n) for n in fakes.usable(images)] * 3, vocab_size=300)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=320, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                          "mrope_section": [2, 3, 3]},
                         initializer_range=0.3, bos_token_id=0, eos_token_id=2, pad_token_id=0),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2,
                           out_hidden_size=64, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=56, fullatt_block_indexes=[0]),
        image_token_id=5, video_token_id=6, vision_start_token_id=3, vision_end_token_id=4)
    torch.manual_seed(0)
    hf = Qwen2_5_VLForConditionalGeneration(config).eval()
    hf.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    with open(os.path.join(ckpt, "preprocessor_config.json"), "w") as f:
        json.dump({"min_pixels": 56 * 56, "max_pixels": 56 * 56, "patch_size": 14,
                   "merge_size": 2, "temporal_patch_size": 2}, f)

    out = str(tmp_path / "refs.jsonl")
    cap = rc.load_local_captioner(ckpt, dtype="float32", prompt="Describe.", max_new_tokens=5,
                                  batch_size=2)
    picked = [r for r in records if r.image_id in ("good01.jpg", "mode_RGBA.png")]
    s = rc.recaption(picked, cap, out, progress=False)
    assert (s["written"], s["failed_total"]) == (2, 0)
    got = {r["image_id"]: r["caption"] for r in _lines(out)}

    processor = Qwen25VLProcessor(tok, QwenImageProcessor.from_pretrained(ckpt))
    text = build_caption_prompt("Describe.", tok)
    for r in picked:
        inputs = processor([text], images=[[load_image(r.image).to_array()]])
        # transformers v5 needs mm_token_type_ids (and int64 ids) to place M-RoPE positions.
        t = {k: torch.from_numpy(v.astype(np.int64) if v.dtype.kind == "i" else v)
             for k, v in ((k, np.asarray(v)) for k, v in inputs.items())}
        with torch.no_grad():
            seq = hf.generate(**t, max_new_tokens=5, do_sample=False, eos_token_id=[2, 0])
        new = seq[0, inputs["input_ids"].shape[1]:].tolist()
        if 2 in new:
            new = new[:new.index(2)]
        assert got[r.image_id] == tok.decode(new, skip_special_tokens=True).strip(), r.image_id
