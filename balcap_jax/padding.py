"""Padding sizes: every shape a jitted function sees comes from a small set, so it compiles a
bounded number of times. Imports nothing from the package."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["next_pow2", "bucket_length", "to_numpy"]


def next_pow2(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= n (1 for n <= 1), at least `minimum`."""
    return max(int(minimum), 1 << max(int(n) - 1, 0).bit_length())


def bucket_length(n: int, buckets: Sequence[int] | None = None, minimum: int = 8) -> int:
    """Padded prompt length: the next power of two (>= minimum) or the smallest listed bucket."""
    if buckets is None:
        return next_pow2(n, minimum)
    fitting = [b for b in sorted(buckets) if b >= n]
    if not fitting:
        raise ValueError(f"prompt length {n} exceeds the largest prompt bucket {max(buckets)}; "
                         "add a larger bucket (data.max_prompt_tokens / data.prompt_buckets in "
                         "a run config, prompt_buckets= here) or shorten the prompts")
    return fitting[0]


def to_numpy(x: Any) -> np.ndarray:
    """numpy of a numpy, jax or torch array (torch tensors from an HF processor)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)
