"""Where training figures go besides the log: TensorBoard or a JSON-lines file."""
from __future__ import annotations

import json
import math
import os
from typing import Mapping


def fmt_metrics(metrics: Mapping[str, float]) -> str:
    """``'k v, ...'`` with 6 decimals for finite floats."""
    return ", ".join(f"{k} {v:.6f}" if isinstance(v, float) and math.isfinite(v) else f"{k} {v}"
                     for k, v in metrics.items())


class MetricsWriter:
    """TensorBoard ``SummaryWriter`` when the package is installed, else ``metrics.jsonl``.

    Args:
        folder: the events folder (created).
    """

    def __init__(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        self._tb = None
        self._fh = None
        try:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(folder)
        except ImportError:
            self._fh = open(os.path.join(folder, "metrics.jsonl"), "a", encoding="utf-8")
        self.kind = "tensorboard" if self._tb is not None else "metrics.jsonl"

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self._tb is not None:
            self._tb.add_scalar(tag, value, step)
        else:
            self._fh.write(json.dumps({"tag": tag, "value": float(value), "step": step}) + "\n")

    def scalars(self, values: Mapping[str, float], step: int, suffix: str = "") -> None:
        """``scalar(tag + suffix, value, step)`` for every finite value."""
        for tag, value in values.items():
            if math.isfinite(float(value)):
                self.scalar(tag + suffix, float(value), step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._fh is not None:
            self._fh.close()
