"""The process around a run: logging, seeding and the device."""
from __future__ import annotations

import logging
import os
import random
import sys
import time
from typing import Iterable, List, Optional

import numpy as np
import torch


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
    """Root logger to stderr (INFO) and, if ``path`` is given, to that file (DEBUG).

    Replaces the handlers of an earlier call (a second run in one process logs to its own
    file) and leaves everyone else's, e.g. a test harness's, in place.
    """
    formatter = LogFormatter()
    logger = logging.getLogger()
    for old in [h for h in logger.handlers if getattr(h, "pcvr_owned", False)]:
        logger.removeHandler(old)
        old.close()
    logger.setLevel(logging.DEBUG)
    handlers: List[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    handlers[0].setLevel(logging.INFO)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        handlers.append(logging.FileHandler(path, mode="w"))
        handlers[1].setLevel(logging.DEBUG)
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.pcvr_owned = True
        logger.addHandler(handler)
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


def count_params(params: Iterable[torch.nn.Parameter]) -> int:
    """Number of elements of ``params``."""
    return sum(p.numel() for p in params)
