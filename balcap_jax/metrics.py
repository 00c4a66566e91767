"""Run outputs: metrics.jsonl, TensorBoard events and completions.jsonl under the workdir.

Each line of metrics.jsonl is one JSON object with ``step``; every value is a plain float so the
file is readable with pandas (`pd.read_json(path, lines=True)`) or jq. Lines are flushed as they
are written, so a crash loses at most the step in flight.

A run resumed from the checkpoint of step k (`resume_step=k`) first drops every row past k from
metrics.jsonl and completions.jsonl (a crash between a step's line and its checkpoint would
otherwise log the steps after k twice), and starts its TensorBoard writer with purge_step k + 1,
so TensorBoard hides the old events past k too: each step appears once.

A workdir in a bucket (gs://...) is written through a local `workdir.Mirror`: the files are
appended locally and copied up after each row (an object store cannot append).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import numpy as np

from balcap_jax.workdir import Mirror

__all__ = ["MetricsWriter", "to_float", "truncate_jsonl"]


def to_float(x: Any) -> float:
    return float(np.asarray(x))


def truncate_jsonl(path: str, last_step: int) -> int:
    """Keeps the rows of a JSONL file whose "step" is <= last_step (and drops a torn last
    line); rewritten atomically. Returns the number of rows dropped."""
    if not os.path.exists(path):
        return 0
    keep, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:      # a line cut by the crash
                dropped += 1
                continue
            if int(row.get("step", 0)) <= last_step:
                keep.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        with open(path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)
    return dropped


class MetricsWriter:
    def __init__(self, workdir: str, *, tensorboard: bool = True, resume_step: int | None = None):
        """`resume_step`: the step the run restarts from (0 for a fresh start in a workdir
        that may hold rows of a run killed before its first checkpoint); rows past it are
        dropped. None appends to whatever is there."""
        self.workdir = workdir
        self._files = ("metrics.jsonl", "completions.jsonl") + (
            ("tensorboard",) if tensorboard else ())
        self._mirror = Mirror(workdir)
        os.makedirs(self._mirror.local, exist_ok=True)
        self._mirror.pull(*self._files)      # a bucket's rows so far (a resumed run)
        paths = [self._mirror.path(n) for n in self._files[:2]]
        if resume_step is not None:
            for path in paths:
                truncate_jsonl(path, int(resume_step))
        self._metrics = open(paths[0], "a")
        self._completions = open(paths[1], "a")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter  # no TensorFlow needed
            self._tb = SummaryWriter(
                self._mirror.path("tensorboard"),
                purge_step=None if resume_step is None else int(resume_step) + 1)

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict:
        row = {"step": int(step)}
        for k, v in metrics.items():
            f = to_float(v)
            row[k] = f if math.isfinite(f) else None  # JSON has no NaN; None reads as missing
            if self._tb is not None and math.isfinite(f):
                self._tb.add_scalar(k, f, int(step))
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        if self._tb is not None:   # tensorboardX queues events: a crash would lose them
            self._tb.flush()
        self._mirror.sync("metrics.jsonl", *self._files[2:])
        return row

    def write_completions(self, step: int, records: list[dict]) -> None:
        for r in records:
            self._completions.write(json.dumps({"step": int(step), **r}, default=_json_default)
                                    + "\n")
        self._completions.flush()
        self._mirror.sync("completions.jsonl")

    def close(self) -> None:
        self._metrics.close()
        self._completions.close()
        if self._tb is not None:
            self._tb.close()
        self._mirror.sync(*self._files)


def _json_default(x):
    if isinstance(x, (np.generic, np.ndarray)):
        return x.tolist()
    return str(x)
