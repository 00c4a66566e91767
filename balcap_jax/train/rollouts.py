"""From rollouts to rewards and update batches: length control of the reward channels, the
completion columns the update needs, prompt rows of a processor batch, decoded captions."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from balcap_jax import sampling
from balcap_jax.rewards.types import ScoreResult
from balcap_jax.rl import length as length_lib

__all__ = ["word_count", "rollout_rewards", "update_width", "gather_rows", "completion_text",
           "merge_scores"]


def word_count(text: str) -> int:
    return len(text.split())


def rollout_rewards(result: ScoreResult, rl, captions: Sequence[str],
                    references: Sequence[Sequence[str]], b: int, g: int
                    ) -> tuple[np.ndarray, list[str], np.ndarray, dict]:
    """Stacks the scorer's rewards [B, G, K] in config order and applies length control.

    Returns (rewards, channel names, weights, diagnostics). rho uses whitespace words of the
    decoded caption against the mean word count of the image's references (SPEC.md section 3).
    """
    names = list(rl.rewards)
    weights = list(rl.weights)
    r = result.stack(names)                                            # [N, K]
    gen = np.array([word_count(c) for c in captions], np.float32)
    ref = np.array([np.mean([word_count(x) for x in refs]) if refs else 0.0
                    for refs in references], np.float32)
    rho = np.asarray(length_lib.length_ratio(gen, ref))
    diag = {"caption_words": float(gen.mean()), "rho_mean": float(np.nanmean(rho)) if
            np.isfinite(rho).any() else float("nan")}
    if rl.length_control == "mask":
        k = names.index(rl.length_reward)
        inside = np.asarray(length_lib.in_length_window(gen, ref, tau_low=rl.tau_low,
                                                        tau_high=rl.tau_high))
        r[:, k] = np.asarray(length_lib.length_conditional_mask(
            r[:, k], gen, ref, tau_low=rl.tau_low, tau_high=rl.tau_high))
        diag["masked_fraction"] = float(1.0 - inside.mean())
    elif rl.length_control == "linear":
        pen = np.asarray(length_lib.linear_length_penalty(gen, ref, coef=1.0), np.float32)
        r = np.concatenate([r, pen[:, None]], axis=1)
        names, weights = names + ["length"], weights + [rl.w_len]
    return r.reshape(b, g, -1), names, np.asarray(weights, np.float32), diag


def update_width(lengths: np.ndarray, max_new_tokens: int) -> int:
    """Completion columns the update needs: the longest rollout, rounded up to a power of two
    (at least max(16, max_new_tokens / 8), at most max_new_tokens). Columns past every rollout's
    end carry mask 0 and change nothing but the cost; the floor bounds the distinct widths (each
    a compile of the gradient) to four: 64, 128, 256, 512 for 512 new tokens."""
    longest = int(np.max(lengths)) if np.size(lengths) else 0
    floor = max(16, max_new_tokens // 8)
    return min(max_new_tokens, sampling.bucket_length(max(longest, 1), minimum=floor))


def gather_rows(inputs: dict, rows: np.ndarray) -> dict:
    """Selects prompt rows (with repeats) from a processor batch with one image per row,
    keeping pixel_values aligned with image_grid_thw."""
    out = {k: np.asarray(v)[rows] for k, v in inputs.items()
           if k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    if "pixel_values" in inputs and "image_grid_thw" not in inputs:  # LLaVA: [N, C, H, W]
        pv = np.asarray(inputs["pixel_values"])
        if len(pv) != len(np.asarray(inputs["input_ids"])):
            raise ValueError("gather_rows needs exactly one image per prompt row")
        out["pixel_values"] = pv[rows]
    elif "pixel_values" in inputs:
        grid = np.asarray(inputs["image_grid_thw"])
        if len(grid) != len(np.asarray(inputs["input_ids"])):
            raise ValueError("gather_rows needs exactly one image per prompt row")
        sizes = grid.prod(-1)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        pv = np.asarray(inputs["pixel_values"])
        out["pixel_values"] = np.concatenate([pv[starts[i]:starts[i] + sizes[i]] for i in rows])
        out["image_grid_thw"] = grid[rows]
    return out


def completion_text(tokenizer, tokens: np.ndarray, lengths: np.ndarray,
                    truncated: np.ndarray) -> list[str]:
    """Decoded captions without the stop token and padding."""
    out = []
    for t, n, cut in zip(tokens, lengths, truncated):
        n = int(n) if cut else max(int(n) - 1, 0)   # drop the stop token
        out.append(tokenizer.decode(t[:n].tolist(), skip_special_tokens=True).strip())
    return out


def merge_scores(results: list) -> ScoreResult:
    """Chunks' ScoreResults as one: rewards concatenated, diagnostics averaged by rows."""
    if len(results) == 1:
        return results[0]
    rows = [len(next(iter(r.rewards.values()))) for r in results]
    rewards = {k: np.concatenate([np.asarray(r.rewards[k]) for r in results])
               for k in results[0].rewards}
    keys = dict.fromkeys(k for r in results for k in r.diagnostics)
    diag = {k: float(np.average([r.diagnostics.get(k, np.nan) for r in results],
                                weights=rows)) for k in keys}
    return ScoreResult(rewards, diag)
