"""The training loader: an endless, seeded, per-host-sharded stream of caption batches.

    loader = CaptionLoader(source, batch_size=8, seed=0, prompt="Describe this image in detail.")
    batch = next(loader)          # list of batch_size dicts:
                                  #   image uint8 [H, W, 3], image_id str, references list[str],
                                  #   prompt str
    state = loader.get_state()    # {"epoch", "index", "seed", ...}: small, JSON-serialisable
    loader.set_state(state)       # the next batch is the one that followed when state was taken

Order: epoch e is a permutation of the whole split, numpy's PCG64 seeded with (seed, e) (grain's
own index shuffle costs ~10 ms per element on splits of a few dozen, fine on big ones, but this is
as cheap at every size; the permutation is one int64 per example, computed once per epoch);
host k of K takes every K-th element of it from position k, so hosts are disjoint and together
cover the split; the host then reads its share in order, epochs following one another without a
gap (a batch may straddle two epochs). Images differ in size, so a batch is a list, not an array.

The position counts examples handed out, so a restore yields exactly the remaining examples.
Hosts with the same batch size hold the same position at the same step, so process 0's state
restores every host (set_state reads the epoch length of the shard that saved it).
grain runs the reads and the batching in threads (`read_threads`) and prefetches ahead of the
consumer; prefetched but unconsumed examples are simply read again after a restore.
"""
from __future__ import annotations

import functools
import logging
import threading
import zlib
from typing import Any, Sequence

import grain
import numpy as np

log = logging.getLogger(__name__)

_STATE_VERSION = 1
_ENDLESS = 1 << 62


def _text(x: Any) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def default_shard() -> tuple[int, int]:
    """(process_index, process_count) from JAX: one shard per host."""
    import jax  # deferred: the data tools must not pay for JAX unless sharding asks for it
    return jax.process_index(), jax.process_count()


class CaptionLoader:
    """Endless batches of caption examples from a random-access source (see module doc)."""

    def __init__(self, source: Sequence[dict], *, batch_size: int, seed: int,
                 prompt: str = "Describe this image in detail.", prompts: Sequence[str] = (),
                 use_data_prompt: bool = False, shard_index: int | None = None,
                 shard_count: int | None = None, read_threads: int = 4,
                 prefetch: int = 16):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if seed < 0:
            raise ValueError(f"seed={seed} must be >= 0")
        if shard_index is None or shard_count is None:
            d_index, d_count = default_shard()
            shard_index = d_index if shard_index is None else shard_index
            shard_count = d_count if shard_count is None else shard_count
        if shard_count < 1 or not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index={shard_index} must be in [0, shard_count="
                             f"{shard_count})")
        self.num_examples = len(source)
        if self.num_examples < shard_count:
            raise ValueError(f"the split has {self.num_examples} examples, fewer than "
                             f"shard_count={shard_count}: every host needs at least one")
        self.source = source
        self.batch_size = batch_size
        self.seed = int(seed)
        self.prompts = tuple(prompts) if prompts else (prompt,)
        self.use_data_prompt = use_data_prompt
        self.shard_index, self.shard_count = shard_index, shard_count
        self.read_threads, self.prefetch = read_threads, prefetch
        # Examples this host reads per epoch: len(range(shard_index, N, shard_count)).
        self.examples_per_epoch = len(range(shard_index, self.num_examples, shard_count))
        self._position = 0
        self._iter = None
        self._perms: dict[int, np.ndarray] = {}
        self._perm_lock = threading.Lock()

    # --- position ---------------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        epoch, index = divmod(self._position, self.examples_per_epoch)
        return {"version": _STATE_VERSION, "epoch": epoch, "index": index, "seed": self.seed,
                "shard_index": self.shard_index, "shard_count": self.shard_count,
                "num_examples": self.num_examples}

    def set_state(self, state: dict[str, Any]) -> None:
        missing = {"epoch", "index", "seed"} - set(state)
        if missing:
            raise ValueError(f"loader state {state} lacks {sorted(missing)}; it must come from "
                             "CaptionLoader.get_state()")
        epoch, index = int(state["epoch"]), int(state["index"])
        if int(state["seed"]) != self.seed:
            log.warning("loader state has seed %s, config has %s: resuming with the state's "
                        "seed so the order continues", state["seed"], self.seed)
            self.seed = int(state["seed"])
        if state.get("num_examples", self.num_examples) != self.num_examples:
            log.warning("loader state was saved on a split of %s examples, this one has %s: "
                        "the resumed order is not a continuation", state["num_examples"],
                        self.num_examples)
        old_count = int(state.get("shard_count", self.shard_count))
        old_index = int(state.get("shard_index", self.shard_index))
        old_len = len(range(old_index, self.num_examples, old_count))
        if not 0 <= index < old_len:
            raise ValueError(f"loader state index {index} is outside the saving host's epoch "
                             f"of {old_len} examples")
        if old_count == self.shard_count:
            # Same partition: the host position is epoch * (saver's epoch length) + index.
            self._position = epoch * old_len + index
        else:
            # Another host count means another partition; keep the epoch and the fraction of it.
            index = index * self.examples_per_epoch // old_len
            log.warning("loader state was saved with %s shards, now %s: resuming epoch %s at "
                        "the same fraction (index %s); a few examples may repeat or be missed",
                        old_count, self.shard_count, epoch, index)
            self._position = epoch * self.examples_per_epoch + index
        self._iter = None   # the old iterator's prefetch threads keep their own seed (_make_iter)

    # --- reading ----------------------------------------------------------------------------
    def _permutation(self, epoch: int, seed: int | None = None) -> np.ndarray:
        seed = self.seed if seed is None else seed
        # Keyed by (seed, epoch): an iterator replaced by set_state may still be prefetching
        # with its own seed in grain's threads, and must not fill the cache of the new order.
        with self._perm_lock:  # grain calls _example from several threads
            perm = self._perms.get((seed, epoch))
            if perm is None:
                perm = np.random.default_rng([seed, epoch]).permutation(self.num_examples)
                self._perms = {k: p for k, p in self._perms.items()
                               if k[0] == seed and k[1] >= epoch - 1}
                self._perms[(seed, epoch)] = perm
            return perm

    def source_index(self, position: int, seed: int | None = None) -> int:
        """Host position -> index into the source: this host's strided share of the epoch's
        permutation (of ``seed``, default the loader's)."""
        epoch, i = divmod(position, self.examples_per_epoch)
        return int(self._permutation(epoch, seed)[self.shard_index + i * self.shard_count])

    def _example(self, position: int, seed: int) -> dict[str, Any]:
        epoch = position // self.examples_per_epoch
        return self._decode(self.source[self.source_index(position, seed)], epoch, seed)

    def example_at_index(self, index: int) -> dict[str, Any]:
        """Source record `index` as an example (epoch-0 prompt), outside the stream order."""
        return self._decode(self.source[index], 0, self.seed)

    def _decode(self, raw: dict[str, Any], epoch: int, seed: int) -> dict[str, Any]:
        image_id = _text(raw["image_id"])
        prompt = _text(raw.get("prompt", b"")) if self.use_data_prompt else ""
        if not prompt:
            # Deterministic in (seed, epoch, image): resumes and hosts agree, epochs vary.
            key = f"{seed}:{epoch}:{image_id}".encode()
            prompt = self.prompts[zlib.crc32(key) % len(self.prompts)]
        image = np.asarray(raw["image"], dtype=np.uint8)
        return {"image": image, "image_id": image_id,
                "references": [_text(r) for r in raw["references"]], "prompt": prompt}

    def _make_iter(self):
        # the seed is bound now: this iterator's threads never read a later set_state's seed
        ds = (grain.MapDataset.range(self._position, _ENDLESS)
              .map(functools.partial(self._example, seed=self.seed))
              .batch(self.batch_size, batch_fn=list))
        options = grain.ReadOptions(num_threads=self.read_threads,
                                    prefetch_buffer_size=self.prefetch)
        return iter(ds.to_iter_dataset(options))

    def __iter__(self):
        return self

    def __next__(self) -> list[dict[str, Any]]:
        if self._iter is None:
            self._iter = self._make_iter()
        batch = next(self._iter)
        self._position += len(batch)
        return batch
