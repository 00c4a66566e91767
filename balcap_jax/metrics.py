"""Run outputs: metrics.jsonl, TensorBoard events and completions.jsonl under the workdir.

Each line of metrics.jsonl is one JSON object with ``step``; every value is a plain float so the
file is readable with pandas (`pd.read_json(path, lines=True)`) or jq. Lines are flushed as they
are written, so a crash loses at most the step in flight.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import numpy as np

__all__ = ["MetricsWriter", "to_float"]


def to_float(x: Any) -> float:
    v = float(np.asarray(x))
    return v


class MetricsWriter:
    def __init__(self, workdir: str, *, tensorboard: bool = True):
        os.makedirs(workdir, exist_ok=True)
        self.workdir = workdir
        self._metrics = open(os.path.join(workdir, "metrics.jsonl"), "a")
        self._completions = open(os.path.join(workdir, "completions.jsonl"), "a")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter  # no TensorFlow needed
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict:
        row = {"step": int(step)}
        for k, v in metrics.items():
            f = to_float(v)
            row[k] = f if math.isfinite(f) else None  # JSON has no NaN; None reads as missing
            if self._tb is not None and math.isfinite(f):
                self._tb.add_scalar(k, f, int(step))
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        return row

    def write_completions(self, step: int, records: list[dict]) -> None:
        for r in records:
            self._completions.write(json.dumps({"step": int(step), **r}, default=_json_default) + "\n")
        self._completions.flush()

    def close(self) -> None:
        self._metrics.close()
        self._completions.close()
        if self._tb is not None:
            self._tb.close()


def _json_default(x):
    if isinstance(x, (np.generic, np.ndarray)):
        return x.tolist()
    return str(x)
