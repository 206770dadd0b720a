"""Progress a user can read: steps done of the total, rate and time left, for the epoch and the
whole run, as a tqdm bar on a terminal and as one log line every ``log_every`` steps
otherwise (a log file, the platform's log page).

Totals come from the loaders (``PCVRLoader.num_batches``, counted from the parquet footers),
so a bar knows its end before the first batch.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Callable, Dict, Iterable, Iterator, Optional, TypeVar

from tqdm import tqdm

log = logging.getLogger(__name__)
T = TypeVar("T")

# Seconds between log lines when stderr is not a terminal (and at least this many steps).
LOG_EVERY_SECONDS = 30.0


def fmt_seconds(seconds: float) -> str:
    """``H:MM:SS`` (``?`` when unknown)."""
    if seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    """Wraps an iterable of batches and reports how far it is.

    Args:
        items: the batches.
        desc: what the pass is (``"epoch 2/6"``, ``"valid"``, ``"infer"``).
        total: batches in this pass, or None when unknown.
        rows_per_item: rows per batch, for the samples/s figure (0: not shown).
        run_left: a function of the batches done in this pass -> the run's batches still to
            do after this pass (for the run's time left), or None.
        status: extra figures for the line (e.g. the last loss), called when a line is made.
        terminal: draw a tqdm bar (default: when stderr is a terminal); else log lines.
        log_every: seconds between log lines.
    """

    def __init__(self, items: Iterable[T], desc: str, total: Optional[int] = None,
                 rows_per_item: int = 0, run_left: Optional[Callable[[], int]] = None,
                 status: Optional[Callable[[], Dict[str, str]]] = None,
                 terminal: Optional[bool] = None, log_every: float = LOG_EVERY_SECONDS) -> None:
        self.items, self.desc, self.total = items, desc, total
        self.rows_per_item, self.run_left, self.status = rows_per_item, run_left, status
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.log_every = log_every
        self.done = 0
        self._start = 0.0

    def figures(self) -> Dict[str, str]:
        """The figures of a progress line: steps, rate, samples/s, epoch and run time left."""
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        rate = self.done / elapsed
        out = {"steps": f"{self.done}/{self.total if self.total is not None else '?'}",
               "it/s": f"{rate:.2f}"}
        if self.rows_per_item:
            out["samples/s"] = f"{rate * self.rows_per_item:.0f}"
        left = (self.total - self.done) / rate if self.total is not None and rate > 0 else \
            float("nan")
        out["left"] = fmt_seconds(left)
        if self.run_left is not None and rate > 0:
            out["run left"] = fmt_seconds(left + self.run_left() / rate)
        if self.status is not None:
            out.update(self.status())
        return out

    def line(self) -> str:
        """One progress line: ``desc: steps 120/1070, it/s 3.10, ...``."""
        return f"{self.desc}: " + ", ".join(f"{k} {v}" for k, v in self.figures().items())

    def __iter__(self) -> Iterator[T]:
        self._start = time.perf_counter()
        last_line = last_postfix = self._start
        bar = tqdm(total=self.total, desc=self.desc, dynamic_ncols=True, leave=False,
                   disable=not self.terminal)
        try:
            for item in self.items:
                yield item
                self.done += 1
                now = time.perf_counter()
                if self.terminal:
                    bar.update(1)
                    # At most once a second: ``status`` may read a loss off the device.
                    if now - last_postfix >= 1.0:
                        last_postfix = now
                        bar.set_postfix({k: v for k, v in self.figures().items()
                                         if k in ("run left", "loss", "samples/s")},
                                        refresh=False)
                elif now - last_line >= self.log_every:
                    last_line = now
                    log.info(self.line())
        finally:
            bar.close()
