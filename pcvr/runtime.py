"""Small shared helpers: logging, seeding, losses, metrics, EMA and atomic file writes."""
from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, Iterable, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel


class LogFormatter(logging.Formatter):
    """``<date time> - H:MM:SS elapsed - message``, continuation lines indented under it."""

    def __init__(self) -> None:
        super().__init__()
        self.start_time = time.time()

    def format(self, record: logging.LogRecord) -> str:
        elapsed = int(record.created - self.start_time)
        prefix = "%s - %d:%02d:%02d - " % (time.strftime("%x %X", time.localtime(record.created)),
                                           elapsed // 3600, elapsed // 60 % 60, elapsed % 60)
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        return prefix + message.replace("\n", "\n" + " " * len(prefix))


def create_logger(path: Optional[str] = None) -> logging.Logger:
    """Root logger to stderr (INFO) and, if ``path`` is given, to that file (DEBUG)."""
    formatter = LogFormatter()
    logger = logging.getLogger()
    logger.handlers = []
    logger.setLevel(logging.DEBUG)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fh = logging.FileHandler(path, mode="w")
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(formatter)
        logger.addHandler(fh)
    sh = logging.StreamHandler(sys.stderr)
    sh.setLevel(logging.INFO)
    sh.setFormatter(formatter)
    logger.addHandler(sh)
    return logger


def set_seed(seed: int) -> None:
    """Seeds python, numpy and torch (all devices)."""
    random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return dev


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.1,
                       gamma: float = 2.0) -> torch.Tensor:
    """Per-sample focal loss (no reduction).

    Args:
        logits, targets: (B,) float; targets in {0, 1}.
    Returns:
        (B,) ``alpha_t (1 - p_t)^gamma BCE(logits, targets)``.
    """
    p = torch.sigmoid(logits)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return alpha_t * (1 - p_t).pow(gamma) * bce


class ModelEMA:
    """Exponential moving average of a model's parameters, built on ``swa_utils.AveragedModel``.

    Fixes relative to the reference's EMA:
    * warm-up: the effective decay is ``min(decay, (1 + n) / (10 + n))`` after n updates, so
      early averages are not dominated by the initial weights;
    * ``restart()`` after a sparse re-initialisation: the average starts again from the
      current weights, since dense weights averaged across a re-init were tuned for embeddings
      that no longer exist;
    * the trainer validates both the raw and the averaged weights and keeps the better one.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.decay = decay

        def multi_avg(avg: List[torch.Tensor], cur: List[torch.Tensor], n: torch.Tensor) -> None:
            d = min(self.decay, (1.0 + float(n)) / (10.0 + float(n)))
            torch._foreach_lerp_(avg, cur, 1.0 - d)

        # Buffers (RoPE caches and the like) are constants: averaging them would be wasted work.
        self.averaged = AveragedModel(model, multi_avg_fn=multi_avg, use_buffers=False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.averaged.update_parameters(model)

    def restart(self) -> None:
        """Forget the average; the next update copies the current weights."""
        self.averaged.n_averaged.zero_()

    @property
    def module(self) -> torch.nn.Module:
        return self.averaged.module


def atomic_write_json(path: str, obj: Any, indent: Optional[int] = None) -> None:
    """Writes JSON to a temporary file in the same folder, then renames it into place."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=indent)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_dir(final_path: str) -> "AtomicDir":
    """Context manager: yields a temporary folder that is renamed to ``final_path`` on success."""
    return AtomicDir(final_path)


class AtomicDir:
    def __init__(self, final_path: str) -> None:
        self.final_path = os.path.abspath(final_path)
        self.tmp_path = ""

    def __enter__(self) -> str:
        parent = os.path.dirname(self.final_path)
        os.makedirs(parent, exist_ok=True)
        self.tmp_path = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
        return self.tmp_path

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp_path, ignore_errors=True)
            return
        if os.path.exists(self.final_path):
            shutil.rmtree(self.final_path)
        os.replace(self.tmp_path, self.final_path)


class MetricsWriter:
    """TensorBoard ``SummaryWriter`` when the package is installed, else a JSON-lines file."""

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

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._fh is not None:
            self._fh.close()


def fmt_metrics(metrics: Dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.6f}" if isinstance(v, float) and math.isfinite(v) else f"{k} {v}"
                     for k, v in metrics.items())


def count_params(params: Iterable[torch.nn.Parameter]) -> int:
    return sum(p.numel() for p in params)
