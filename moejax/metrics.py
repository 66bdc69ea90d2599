"""Run metrics: `WORKDIR/metrics.jsonl` (one JSON object per logged step) and TensorBoard events."""
from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.ndarray, np.generic)):
        v = v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the line parseable
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    return v


class MetricsWriter:
    """Appends to metrics.jsonl (so a resumed run continues the same file) and writes scalars to
    TensorBoard event files under WORKDIR/tensorboard. Only process 0 writes (`enabled`)."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=10)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in metrics.items():
            if isinstance(v, (int, float, np.generic)) and not isinstance(v, bool):
                self._tb.add_scalar(k, float(v), step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
