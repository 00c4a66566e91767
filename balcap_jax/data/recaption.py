"""Re-caption a dataset's images into a new reference file (the paper's reference step).

    python -m balcap_jax.data.recaption --format sharegpt4v --files data.json \\
        --image_root /data/images --output refs.jsonl \\
        --endpoint http://127.0.0.1:8000/v1 --model Qwen/Qwen2.5-VL-72B-Instruct \\
        --api_key_env OPENAI_API_KEY --concurrency 16
    python -m balcap_jax.data.recaption ... --local_model /ckpt/Qwen2.5-VL-7B-Instruct

Output: JSONL, one {"image_id", "image", "caption", ...} per line, which the "captions" builder
reads as it is (`--config.data.builder=captions --config.data.files=refs.jsonl`).

Resumable: each finished caption is appended and flushed at once, so a crash or Ctrl-C keeps
everything done; a rerun skips the ids already in the output (a partial last line left by a kill
is cut off first). Images go through the same checks as dataset builds (images.load_image:
converted to RGB, downscaled to --max_side); unusable images and failed requests are counted per
reason, reported at the end and in <output>.summary.json, and retried by the next run.

The captioning step is a function (`recaption(records, captioner, output)`) taking any
captioner: `http_captioner(ChatClient, ...)` for an OpenAI-compatible endpoint (images as base64
data URLs) or `model_captioner(model, processor, ...)` for our in-process sampler.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import json
import logging
import os
import sys
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

from balcap_jax.client import ChatClient, user_message
from balcap_jax.data import images as images_lib
from balcap_jax.data import records as records_lib

log = logging.getLogger(__name__)

CAPTION_PROMPT = "Describe this image in detail."  # = balcap_jax.data.config.CAPTION_PROMPT


@dataclasses.dataclass
class CaptionJob:
    record: records_lib.Record
    image: images_lib.LoadedImage


class Caption(NamedTuple):
    job: CaptionJob
    text: str | None
    error: str | None = None     # reason when text is None
    truncated: bool = False      # stopped by the token limit


Captioner = Callable[[Iterable[CaptionJob]], Iterable[Caption]]


# --- the output file -------------------------------------------------------------------------
def read_done(path: str) -> set[str]:
    """Ids already captioned in `path`; cuts off a partial last line (left by a kill)."""
    if not os.path.exists(path):
        return set()
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            log.warning("%s: dropping a partial last line (%d bytes) left by an interrupted run",
                        path, len(data) - keep)
            f.truncate(keep)
            data = data[:keep]
    done, bad = set(), 0
    for line in data.splitlines():
        try:
            rec = json.loads(line)
            if isinstance(rec, dict) and rec.get("caption"):
                done.add(str(rec["image_id"]))
        except (json.JSONDecodeError, KeyError):
            bad += 1
    if bad:
        log.warning("%s: %d lines are not caption records; their ids will be captioned again",
                    path, bad)
    return done


def recaption(records: Sequence[records_lib.Record], captioner: Captioner, output: str, *,
              max_side: int = images_lib.DEFAULT_MAX_SIDE,
              max_pixels: int = images_lib.DEFAULT_MAX_PIXELS, progress: bool = True,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Captions every record whose id is not yet in `output`, appending as they finish.
    Returns counts: total, already_done, written, failed {reason: n}, truncated, examples."""
    done = read_done(output)
    todo = [r for r in records if r.image_id not in done]
    failed: collections.Counter[str] = collections.Counter()
    examples: dict[str, list[str]] = {}
    counts = {"total": len(records), "already_done": len(records) - len(todo), "written": 0,
              "truncated": 0}

    def fail(reason: str, where: str) -> None:
        failed[reason] += 1
        ex = examples.setdefault(reason, [])
        if len(ex) < 5:
            ex.append(where)

    def jobs() -> Iterator[CaptionJob]:
        for r in todo:
            try:
                yield CaptionJob(r, images_lib.load_image(r.image, max_side=max_side,
                                                          max_pixels=max_pixels))
            except images_lib.BadImage as e:
                fail(e.reason, f"{r.where}: {e.detail}")
                bar.update()

    from tqdm import tqdm
    bar = tqdm(total=len(todo), desc="recaption", unit="img", disable=not progress)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    try:
        with open(output, "a", encoding="utf-8") as out:
            for c in captioner(jobs()):
                r = c.job.record
                text = c.text.strip() if c.text else ""
                if not text:
                    fail(c.error or "empty_caption", f"{r.where} ({r.image_id})")
                else:
                    rec = {"image_id": r.image_id, "image": r.image, "caption": text,
                           **({"truncated": True} if c.truncated else {}), **(extra or {})}
                    out.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    out.flush()
                    counts["written"] += 1
                    counts["truncated"] += int(c.truncated)
                bar.update()
                if failed:
                    bar.set_postfix(failed=sum(failed.values()), refresh=False)
    finally:
        bar.close()
        summary = {**counts, "failed": dict(sorted(failed.items())),
                   "failed_total": sum(failed.values()), "examples": examples}
        with open(output + ".summary.json", "w") as f:
            json.dump(summary, f, indent=1)
        (log.warning if failed else log.info)(
            "recaption %s: %d written, %d already done, %d failed %s", output,
            counts["written"], counts["already_done"], sum(failed.values()), dict(failed))
    return summary


# --- captioners --------------------------------------------------------------------------------
def http_captioner(client: ChatClient, prompt: str = CAPTION_PROMPT, *,
                   system_prompt: str | None = None, **params: Any) -> Captioner:
    """Captions through an OpenAI-compatible endpoint, `client.concurrency` requests at once;
    `params` (max_tokens, temperature, ...) go into each request."""
    def run(jobs: Iterable[CaptionJob]) -> Iterator[Caption]:
        started: dict[int, CaptionJob] = {}

        def messages() -> Iterator[list[dict]]:
            for i, job in enumerate(jobs):
                started[i] = job
                msgs = [user_message(prompt, [job.image.data])]
                if system_prompt:
                    msgs.insert(0, {"role": "system", "content": system_prompt})
                yield msgs

        for i, res in client.imap_unordered(messages(), **params):
            yield Caption(started.pop(i), res.text, res.error, res.finish_reason == "length")
    return run


def model_captioner(model, processor, prompt: str = CAPTION_PROMPT, *, eos_token_ids,
                    max_new_tokens: int = 512, batch_size: int = 8, temperature: float = 0.0,
                    top_p: float = 1.0, seed: int = 0, generate: Callable | None = None,
                    pad_id: int | None = None) -> Captioner:
    """Captions with an in-process policy: `processor` (balcap_jax.processing's Qwen25VLProcessor
    or LlavaProcessor) builds the inputs, `generate` (default balcap_jax.sampling.generate)
    samples, and the tokens are decoded up to (not including) the stop token."""
    def run(jobs: Iterable[CaptionJob]) -> Iterator[Caption]:
        import jax
        import numpy as np

        from balcap_jax.processing import build_caption_prompt
        gen = generate
        if gen is None:
            from balcap_jax.sampling import generate as gen
        tokenizer = processor.tokenizer
        pad = int(tokenizer.pad_token_id) if pad_id is None else pad_id
        text = build_caption_prompt(prompt, tokenizer)
        it = iter(jobs)
        for step in itertools.count():
            chunk = list(itertools.islice(it, batch_size))
            if not chunk:
                return
            inputs = processor([text] * len(chunk),
                               images=[[j.image.to_array()] for j in chunk])
            samples = gen(model, inputs, max_new_tokens=max_new_tokens, num_samples=1,
                          temperature=temperature, top_p=top_p, eos_token_ids=eos_token_ids,
                          rng=jax.random.fold_in(jax.random.key(seed), step), pad_id=pad)
            tokens, lengths, truncated = (np.asarray(samples.tokens),
                                          np.asarray(samples.lengths),
                                          np.asarray(samples.truncated))
            for j, t, n, cut in zip(chunk, tokens, lengths, truncated):
                n = int(n) if cut else max(int(n) - 1, 0)  # drop the stop token
                caption = tokenizer.decode(t[:n].tolist(), skip_special_tokens=True)
                yield Caption(j, caption, None if caption.strip() else "empty_caption",
                              bool(cut))
    return run


def load_local_captioner(path: str, *, tokenizer: str = "", dtype: str = "bfloat16",
                         **kwargs: Any) -> Captioner:
    """A Qwen2.5-VL checkpoint directory -> model_captioner (models.from_pretrained)."""
    from balcap_jax import models
    from balcap_jax.processing import Qwen25VLProcessor, QwenImageProcessor
    with open(os.path.join(path, "config.json")) as f:
        model_type = json.load(f).get("model_type")
    if model_type != "qwen2_5_vl":
        raise ValueError(f"{path}: --local_model supports Qwen2.5-VL checkpoints, this one is "
                         f"model_type={model_type!r}; use --endpoint with a server instead")
    if tokenizer == "qwen2.5":
        from balcap_jax.tokenizers import qwen25_tokenizer
        tok = qwen25_tokenizer()
    else:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(tokenizer or path)
    ip = (QwenImageProcessor.from_pretrained(path)
          if os.path.exists(os.path.join(path, "preprocessor_config.json"))
          else QwenImageProcessor())
    from balcap_jax.tokenizers import stop_token_ids
    model = models.from_pretrained(path, dtype=dtype)
    return model_captioner(model, Qwen25VLProcessor(tok, ip), eos_token_ids=stop_token_ids(tok),
                           **kwargs)


# --- command line ------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m balcap_jax.data.recaption",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--format", required=True, choices=sorted(records_lib.READERS),
                   help="annotation format of --files")
    p.add_argument("--files", required=True, help="annotation file(s), comma-separated")
    p.add_argument("--image_root", default="", help="base of relative image paths")
    p.add_argument("--output", required=True, help="JSONL to append captions to")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--endpoint", help="OpenAI-compatible base URL, e.g. http://host:8000/v1")
    src.add_argument("--local_model", help="Qwen2.5-VL checkpoint directory (in-process)")
    p.add_argument("--model", default="", help="model name sent to --endpoint")
    p.add_argument("--api_key_env", default="OPENAI_API_KEY",
                   help="environment variable holding the API key (unset: no key sent)")
    p.add_argument("--prompt", default=CAPTION_PROMPT)
    p.add_argument("--system_prompt", default="")
    p.add_argument("--max_tokens", type=int, default=1024, help="new tokens per caption")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--max_retries", type=int, default=4)
    p.add_argument("--batch_size", type=int, default=8, help="images per --local_model batch")
    p.add_argument("--tokenizer", default="", help="--local_model tokenizer dir or 'qwen2.5'")
    p.add_argument("--dtype", default="bfloat16", help="--local_model parameter dtype")
    p.add_argument("--max_side", type=int, default=images_lib.DEFAULT_MAX_SIDE)
    p.add_argument("--max_pixels", type=int, default=images_lib.DEFAULT_MAX_PIXELS)
    p.add_argument("--limit", type=int, default=0, help="only the first N records (0: all)")
    p.add_argument("--no_progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    summary = records_lib.Summary()
    files = [f.strip() for f in args.files.split(",") if f.strip()]
    records = records_lib.read_records(args.format, files, args.image_root or None, summary)
    summary.kept = len(records)
    summary.log(f"read {args.files}")
    if args.limit:
        records = records[:args.limit]
    if args.endpoint:
        if not args.model:
            raise SystemExit("--endpoint needs --model (the name the server serves)")
        client = ChatClient(args.endpoint, args.model, os.environ.get(args.api_key_env) or None,
                            timeout=args.timeout, max_retries=args.max_retries,
                            concurrency=args.concurrency)
        captioner = http_captioner(client, args.prompt, system_prompt=args.system_prompt or None,
                                   max_tokens=args.max_tokens, temperature=args.temperature)
        model_name = args.model
    else:
        captioner = load_local_captioner(args.local_model, tokenizer=args.tokenizer,
                                         dtype=args.dtype, prompt=args.prompt,
                                         max_new_tokens=args.max_tokens,
                                         batch_size=args.batch_size,
                                         temperature=args.temperature)
        model_name = os.path.basename(os.path.normpath(args.local_model))
    return recaption(records, captioner, args.output, max_side=args.max_side,
                     max_pixels=args.max_pixels, progress=not args.no_progress,
                     extra={"model": model_name})


if __name__ == "__main__":
    main(sys.argv[1:])
