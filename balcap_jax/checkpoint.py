"""Orbax checkpoints with exact resume.

A checkpoint is the whole train state (params, optimiser state, step, rng key data) as one
pytree plus a JSON side record (data-loader position, counters). Restoring onto the abstract
state of a freshly built run puts every array back on its original sharding, so a resumed run
continues exactly as an uninterrupted one would.

Layout under ``workdir``:
    checkpoints/<step>/state/...   orbax PyTree (StandardSave)
    checkpoints/<step>/meta/...    JSON: data position, skipped-step count, anything small
    config.json                    the resolved run config (written by ``save_config``)
"""
from __future__ import annotations

import json
import os
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp

from balcap_jax import workdir as wd

__all__ = ["Checkpointer", "save_config", "SigtermFlag"]


class Checkpointer:
    """Saves every ``every`` steps (and on demand), keeps the last ``keep``."""

    def __init__(self, workdir: str, *, every: int = 100, keep: int = 3, async_save: bool = False,
                 directory: str | None = None):
        """Checkpoints in `directory` (a path or bucket URL), by default workdir/checkpoints."""
        if every < 1:
            raise ValueError(f"checkpoint.every must be >= 1, got {every}")
        if keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1, got {keep}")
        directory = directory or wd.join(workdir, "checkpoints")
        # a bucket URL goes to orbax as it is (it writes gs:// itself)
        self.directory = directory if wd.is_remote(directory) else os.path.abspath(directory)
        self.every = every
        opts = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        # handlers named up front: metadata (`read`) is readable before any save or restore
        self._mngr = ocp.CheckpointManager(
            self.directory, options=opts,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})

    @property
    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def should_save(self, step: int) -> bool:
        return step % self.every == 0

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        """Saves ``state`` (a pytree of arrays) and ``meta`` (JSON-able) at ``step``."""
        if not force and not self.should_save(step):
            return False
        if step in self._mngr.all_steps():
            return False
        self._mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        self._mngr.wait_until_finished()
        return True

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
        """Restores onto ``abstract_state``'s shapes, dtypes and shardings."""
        step = self._mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        out = self._mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return out.state, dict(out.meta), step

    def read(self, step: int | None = None) -> tuple[dict, dict]:
        """Reads a checkpoint without a target (inspection, tests): (state tree, meta), every
        array whole on this process's first device, whatever mesh or hosts saved it."""
        step = self._mngr.latest_step() if step is None else step
        meta = self._mngr.item_metadata(step)["state"]
        tree = getattr(meta, "tree", meta)
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                              tree, is_leaf=lambda m: hasattr(m, "shape"))
        out = self._mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return out.state, dict(out.meta)

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


def save_config(workdir: str, config: Any) -> str:
    """Writes the resolved config beside the checkpoints (JSON; ConfigDict or dict)."""
    path = wd.join(workdir, "config.json")
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    wd.write_text(path, json.dumps(as_dict, indent=2, sort_keys=True, default=str))
    return path


class SigtermFlag:
    """Turns SIGTERM (preemption) into a flag the loop polls between steps.

    The loop then saves a checkpoint and exits cleanly instead of dying mid-write.
    Only installs in the main thread (signal handlers cannot be set elsewhere).
    """

    def __init__(self):
        self.triggered = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.triggered = True

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
