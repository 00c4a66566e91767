"""A small generated image-caption source for smoke runs (configs/tiny.py) and trainer tests.

Each example is a solid background with one coloured rectangle and a one-sentence reference.
Examples are a pure function of (seed, index), so the loader's whole state is its position.
"""
from __future__ import annotations

import numpy as np

__all__ = ["SyntheticCaptions", "synthetic_example"]

_COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220),
            "yellow": (230, 210, 40), "white": (245, 245, 245), "black": (15, 15, 15)}
_NAMES = list(_COLOURS)


def synthetic_example(seed: int, index: int, size: int) -> dict:
    r = np.random.default_rng([seed, index])
    bg, fg = r.choice(len(_NAMES), size=2, replace=False)
    img = np.empty((size, size, 3), np.uint8)
    img[:] = _COLOURS[_NAMES[bg]]
    h, w = r.integers(size // 4, size // 2, size=2)
    y, x = r.integers(0, size - h), r.integers(0, size - w)
    img[y:y + h, x:x + w] = _COLOURS[_NAMES[fg]]
    ref = f"a {_NAMES[fg]} rectangle on a {_NAMES[bg]} background."
    return {"image": img, "image_id": f"syn-{seed}-{index}", "references": [ref]}


class SyntheticCaptions:
    """Yields batches (lists of example dicts with ``prompt``), in a seeded order per epoch.

    ``get_state()`` / ``set_state()`` give the JSON-able position that checkpoints save.
    """

    def __init__(self, *, num_examples: int, batch_size: int, seed: int, image_size: int,
                 prompt: str, shard_index: int = 0, shard_count: int = 1):
        if num_examples < batch_size * shard_count:
            raise ValueError(f"data.num_train={num_examples} is smaller than one global batch "
                             f"({batch_size} x {shard_count} hosts)")
        self.n, self.batch_size, self.seed = num_examples, batch_size, seed
        self.image_size, self.prompt = image_size, prompt
        self.shard_index, self.shard_count = shard_index, shard_count
        self.epoch, self.pos = 0, 0

    def _order(self) -> np.ndarray:
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        return perm[self.shard_index::self.shard_count]

    def __iter__(self):
        return self

    def __next__(self) -> list[dict]:
        order = self._order()
        if self.pos + self.batch_size > len(order):  # drop the ragged tail, start a new epoch
            self.epoch, self.pos = self.epoch + 1, 0
            order = self._order()
        idx = order[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return [dict(synthetic_example(self.seed, int(i), self.image_size), prompt=self.prompt)
                for i in idx]

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed}

    def set_state(self, state: dict) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"checkpoint data seed {state['seed']} != config seed {self.seed}")
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
