"""TRL's side of benchmarks.step: wall time of whole GRPO steps of `trl.GRPOTrainer` (CPU, float32).

Loads a local Qwen2.5-VL checkpoint (`model_dir`) and tokenizer (`tokenizer_dir`), builds an
image-only Qwen2.5-VL processor around them (112 px image -> 8x8 patches -> 16 <|image_pad|>),
and trains `steps` optimizer steps of 2 prompts x `num_generations` completions, each exactly
`new_tokens` long (`min_new_tokens` masks the eos until then). One cheap Python reward: the
fraction of completion tokens with an even id (random weights almost never sample a word of the
tiny vocabulary; a reward that varies within a group keeps the loss and gradients non-zero).
beta 0 (no reference model), the dapo loss, one update per rollout batch, AdamW at a constant
lr (clip 1.0, no decay), no activation checkpointing unless asked (TRL's default is on; our
tiny config has remat off).
Nothing is downloaded (offline flags; the model and processor are passed in built).

Timings per optimizer step (time.perf_counter): `step_s` from a TrainerCallback's on_step_begin
to on_step_end (the first step includes warm-up); `generate_s` = `GRPOTrainer._generate` (chat
template + image preprocessing + `model.generate` + decoding), of which `sample_s` is
`_generate_single_turn` (padding + `generate`); `score_s` = `_calculate_rewards`; `update_s` =
the rest (second image preprocessing for the loss forward, advantages, loss forward/backward,
optimizer step, logging).

    .venv/bin/python -m benchmarks.trl_step --model-dir D --tokenizer-dir T --examples x.npz \
        [--steps 4]     # prints one line: RESULT <json>
"""
from __future__ import annotations

import os

for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_k, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

# Used when the tokenizer has no chat template: Qwen's layout, one image before the text.
MINIMAL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_processor(tokenizer_dir: str, image_size: int):
    """Qwen2_5_VLProcessor without its video processor (that one needs torchvision)."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from balcap_jax.processing.hf import image_only_qwen2_5_vl_processor
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, padding_side="left",
                                        truncation_side="left")
    template = tok.chat_template or MINIMAL_CHAT_TEMPLATE
    tok.chat_template = template
    pixels = image_size * image_size  # min = max: every image becomes image_size x image_size
    ip = Qwen2VLImageProcessorPil(size={"shortest_edge": pixels, "longest_edge": pixels},
                                  patch_size=14, merge_size=2, temporal_patch_size=2)
    return image_only_qwen2_5_vl_processor(ip, tok, chat_template=template)


def run_trl(model_dir: str, tokenizer_dir: str, examples: list[dict], *, num_generations: int = 8,
            new_tokens: int = 64, steps: int = 4, lr: float = 1e-6, image_size: int = 112,
            gradient_checkpointing: bool = False) -> dict:
    """examples: dicts with "image" (uint8 [H, W, 3]) and "prompt" (str); each step takes the next
    2 of them (cycling) x num_generations completions."""
    import torch
    from datasets import Dataset
    from PIL import Image
    from transformers import Qwen2_5_VLForConditionalGeneration, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    processor = build_processor(tokenizer_dir, image_size)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    dataset = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": e["prompt"]}] for e in examples],
        "image": [Image.fromarray(np.asarray(e["image"], np.uint8)) for e in examples]})

    def even_fraction(completion_ids, **_):  # cheap, pure Python, varies within a group
        return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]

    prompts_per_step = 2
    tmp = tempfile.TemporaryDirectory(prefix="trl_step_")
    args = GRPOConfig(
        output_dir=tmp.name, seed=0, use_cpu=True, bf16=False, fp16=False, report_to="none",
        save_strategy="no", logging_steps=1, max_steps=steps, learning_rate=lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        per_device_train_batch_size=prompts_per_step * num_generations,
        gradient_accumulation_steps=1, generation_batch_size=prompts_per_step * num_generations,
        num_generations=num_generations, num_iterations=1, beta=0.0, loss_type="dapo",
        scale_rewards="group", max_completion_length=new_tokens, temperature=1.0, top_p=1.0,
        top_k=0, use_vllm=False, disable_dropout=True, shuffle_dataset=False,
        activation_checkpointing=gradient_checkpointing, dataloader_pin_memory=False,
        generation_kwargs={"min_new_tokens": new_tokens})
    trainer = GRPOTrainer(model=model, reward_funcs=even_fraction, args=args,
                          train_dataset=dataset, processing_class=processor)

    res = {k: [] for k in ("step_s", "generate_s", "sample_s", "score_s", "completion_tokens",
                           "prompt_tokens")}

    def timed(fn, key, count_tokens=False):  # wrap a bound method, add its time to this step
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            t = time.perf_counter()
            out = fn(*a, **kw)
            res[key][-1] += time.perf_counter() - t
            if count_tokens:  # _generate returns (prompt_ids, completion_ids, ...)
                res["completion_tokens"][-1] += sum(len(c) for c in out[1])
                res["prompt_tokens"][-1] = max(len(p) for p in out[0])  # image tokens included
            return out
        return wrapper

    trainer._generate = timed(trainer._generate, "generate_s", count_tokens=True)
    trainer._generate_single_turn = timed(trainer._generate_single_turn, "sample_s")
    trainer._calculate_rewards = timed(trainer._calculate_rewards, "score_s")

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            for k in ("generate_s", "sample_s", "score_s", "completion_tokens", "prompt_tokens"):
                res[k].append(0)
            self.t = time.perf_counter()

        def on_step_end(self, *a, **kw):
            res["step_s"].append(time.perf_counter() - self.t)

    trainer.add_callback(StepTimer())
    trainer.train()
    tmp.cleanup()
    res["update_s"] = [s - g - r for s, g, r in zip(res["step_s"], res["generate_s"],
                                                    res["score_s"])]
    res["rewards"] = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    res.update(peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               torch_threads=torch.get_num_threads(),
               gradient_checkpointing=bool(trainer.model.is_activation_checkpointing))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--tokenizer-dir", required=True)
    ap.add_argument("--examples", required=True, help=".npz with images [N,H,W,3], prompts [N]")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--num-generations", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    a = ap.parse_args()
    data = np.load(a.examples)
    examples = [dict(image=im, prompt=str(p)) for im, p in zip(data["images"], data["prompts"])]
    r = run_trl(a.model_dir, a.tokenizer_dir, examples, num_generations=a.num_generations,
                new_tokens=a.new_tokens, steps=a.steps, image_size=a.image_size,
                gradient_checkpointing=a.gradient_checkpointing)
    print("RESULT " + json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
