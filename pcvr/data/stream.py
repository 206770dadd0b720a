"""Streaming and shuffling: row-group slices -> converted ``Batch``es, one shard per process.

``PCVRDataset`` streams the row groups of its shard with ``iter_batches`` of ``MIN_CHUNK_ROWS``
rows or more, reading only the needed columns, so memory stays bounded by a few batches; it
converts every Arrow record batch with ``BatchConverter`` and, when training, shuffles rows
through a pool of ``buffer_batches`` batches.

Fixes relative to the reference:

* ``user_id`` is permuted with its row by the shuffle pool (the reference kept the first
  buffered batch's Python list, so ids no longer matched rows);
* row-group order is reshuffled every epoch (seed + epoch, ``set_epoch``) and rows pass
  through the pool (converted straight into it, leaving it in batches drawn at random), so
  every batch but the last of a shard is full; row groups are sharded over (distributed
  rank, DataLoader worker), so every row is read exactly once per epoch.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Generator, Iterable, Iterator, List, Optional, Sequence, \
    Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from pcvr.batch import HISTORY_FIELDS, ROW_FIELDS, Array, Batch
from pcvr.config import DataConfig
from pcvr.data.convert import BatchConverter
from pcvr.data.files import RowGroupSlice, damaged_columns, open_parquet
from pcvr.errors import ConfigError, DataError
from pcvr.schema import FeatureLayout

# Rows converted at a time: per-call overheads (~120 columns) make smaller chunks slower per row.
MIN_CHUNK_ROWS = 512
# _RELEASE: every reference to a record batch is dropped before the next one is decoded, so
# Arrow's allocator reuses its memory at once; held during the conversion, it would be
# returned to the OS meanwhile and faulted in afresh (~15% of the reading time).


def shard_of_process() -> Tuple[int, int]:
    """(rank, world size) of torch.distributed, or (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class PCVRDataset(IterableDataset):
    """Streams converted batches from a list of row-group slices.

    Each (distributed rank, DataLoader worker) reads every ``n_shards``-th row group of the
    epoch's order, so every row is read once per epoch. Rows are read and converted
    ``chunk_rows`` at a time. With ``shuffle`` the row-group order is a permutation seeded by
    ``seed + epoch``, and with ``buffer_batches > 0`` rows pass through a shuffle pool of
    that many batches (every batch of a shard is then full but its last).

    Args:
        row_groups: row-group slices to read.
        layout: the feature layout.
        data_cfg: conversion flags.
        batch_size: rows per batch (without shuffle, the last batch of a row group may be
            shorter).
        shuffle: shuffle row groups and rows (training).
        buffer_batches: shuffle pool size in batches (0 = row groups shuffled, rows not).
        seed: base seed.
        read_labels: read ``label_type``.
    """

    def __init__(self, row_groups: Sequence[RowGroupSlice], layout: FeatureLayout,
                 data_cfg: DataConfig, batch_size: int, shuffle: bool = False,
                 buffer_batches: int = 0, seed: int = 0, read_labels: bool = True) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        self.row_groups = list(row_groups)
        self.layout = layout
        self.converter = BatchConverter(layout, data_cfg, read_labels)
        self.batch_size = batch_size
        self.chunk_rows = batch_size * -(-MIN_CHUNK_ROWS // batch_size)  # a multiple of it
        self.shuffle = shuffle
        self.buffer_batches = max(0, int(buffer_batches))
        self.seed = seed
        self.epoch = 0
        # Captured here, in the main process: a spawned worker would not see the process group.
        self.rank, self.world = shard_of_process()
        self._pool: Optional[Batch] = None  # the shuffle pool, kept for reuse

    def __getstate__(self) -> Dict[str, Any]:
        return dict(self.__dict__, _pool=None)  # never pickle hundreds of MB of pool

    @property
    def stat_names(self) -> List[str]:
        return self.converter.stat_names

    @property
    def num_rows(self) -> int:
        return sum(rg.num_rows for rg in self.row_groups)

    def num_batches(self, n_workers: int) -> int:
        """Batches of this epoch's pass with ``n_workers`` DataLoader workers (0 = none),
        counted from the row groups' sizes: with the shuffle pool every batch of a shard is
        full but its last, without it every row group ends in its own partial batch."""
        shards = self.world * max(1, n_workers)
        row_groups = self.epoch_row_groups()
        mine = [row_groups[s::shards] for s in range(self.rank * max(1, n_workers),
                                                     (self.rank + 1) * max(1, n_workers))]
        if self.shuffle and self.buffer_batches > 0:
            return sum(-(-sum(rg.num_rows for rg in part) // self.batch_size) for part in mine)
        return sum(-(-rg.num_rows // self.batch_size) for part in mine for rg in part)

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch's row-group order; takes effect at the next ``iter(loader)``
        (the loaders' workers are not persistent, so they start from this state)."""
        self.epoch = int(epoch)

    def epoch_row_groups(self) -> List[RowGroupSlice]:
        """All row-group slices in this epoch's reading order (before sharding)."""
        if not self.shuffle:
            return list(self.row_groups)
        perm = np.random.default_rng(self.seed + self.epoch).permutation(len(self.row_groups))
        return [self.row_groups[k] for k in perm]

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shard, n_shards = self.rank * n_workers + worker, self.world * n_workers
        row_groups = self.epoch_row_groups()[shard::n_shards]
        if self.shuffle and self.buffer_batches > 0:
            rng = np.random.default_rng([self.seed, self.epoch, shard])
            batches = self._shuffled(row_groups, rng)
        else:
            batches = self._plain(row_groups)
        for batch in batches:
            yield Batch.from_numpy(batch)

    def _plain(self, row_groups: Sequence[RowGroupSlice]) -> Iterator[Batch]:
        """Batches in stored order (views of each converted chunk, histories trimmed)."""
        for rb in self._record_batches(row_groups):
            chunk = self.converter(rb)
            del rb  # see _RELEASE
            yield from _split(chunk, self.batch_size)

    def _shuffled(self, row_groups: Sequence[RowGroupSlice], rng: np.random.Generator
                  ) -> Iterator[Batch]:
        """A shuffle pool that rows are converted straight into.

        The pool holds up to ``buffer_batches * batch_size`` rows plus one chunk of headroom;
        whenever it holds more than that, a batch of rows drawn at random leaves it, and the
        freed rows take the next rows read. The pool is kept for the next pass, so its
        hundreds of MB are not faulted in again and again.
        """
        B, cap = self.batch_size, self.buffer_batches * self.batch_size
        size = min(cap + self.chunk_rows, sum(rg.num_rows for rg in row_groups))
        if size == 0:  # an idle shard (more workers than row groups)
            return
        pool, self._pool = self._pool, None  # taken, so that a concurrent pass makes its own
        if pool is None or pool.size != size:
            pool = self.converter.allocate(size)
        pool.data_stats[:] = 0
        slots = np.arange(size)  # slots[:held] hold rows, slots[held:] are free
        held = 0
        try:
            for rb in self._record_batches(row_groups):
                while rb.num_rows:
                    n = min(rb.num_rows, size - held)
                    self.converter(rb.slice(0, n), pool, slots[held:held + n])
                    held, rb = held + n, rb.slice(n)
                    while held > cap:
                        held = yield from _draw(pool, slots, held, B, rng)
                del rb  # see _RELEASE
            while held:
                held = yield from _draw(pool, slots, held, min(B, held), rng)
        finally:
            self._pool = pool  # drawn batches are copies: nothing refers to the pool any more

    def _record_batches(self, row_groups: Iterable[RowGroupSlice]) -> Iterator[pa.RecordBatch]:
        files: Dict[str, pq.ParquetFile] = {}
        columns = list(self.converter.columns)
        for rg in row_groups:
            if rg.path not in files:
                files[rg.path] = open_parquet(rg.path)
            pf = files[rg.path]
            row = 0
            try:
                for rb in pf.iter_batches(batch_size=self.chunk_rows, row_groups=[rg.row_group],
                                          columns=columns, use_threads=False):
                    lo, hi = max(rg.start - row, 0), min(rg.stop - row, rb.num_rows)
                    row += rb.num_rows
                    if hi > lo:
                        yield rb if (lo, hi) == (0, rb.num_rows) else rb.slice(lo, hi - lo)
                    del rb  # see _RELEASE
                    if row >= rg.stop:
                        break
            except (OSError, pa.ArrowException) as exc:
                bad = damaged_columns(pf, rg.path, rg.row_group, columns)
                where = f"column '{bad[0].column}' " if bad else ""
                raise DataError(f"{rg.path}: row group {rg.row_group}: cannot decode "
                                f"{where}({exc})") from exc


def _trim(batch: Batch, take: Callable[[Array, Tuple[Any, ...]], Array]) -> Batch:
    """``take(array, columns)`` of every array of ``batch`` but ``data_stats`` (kept as it
    is): ``columns`` indexes the axes after the first, ``()`` for all of them, but for a
    history tensor ``(..., slice(width))``, ``width`` being the longest kept history (at
    least 1) of the rows taken."""
    seq = {}
    for name, s in batch.seq.items():
        lens = take(s.lens, ())
        columns = (Ellipsis, slice(max(1, int(lens.max(initial=0)))))
        seq[name] = dataclasses.replace(s, lens=lens, **{
            f: take(getattr(s, f), columns) for f in HISTORY_FIELDS})
    return Batch(**{f: take(getattr(batch, f), ()) for f in ROW_FIELDS}, seq=seq,
                 data_stats=batch.data_stats)


def _split(batch: Batch, batch_size: int) -> Iterator[Batch]:
    """``batch_size``-row slices of a converted chunk, histories trimmed (``_trim``); its
    ``data_stats`` go with the first. A slice is a view unless trimming cuts columns."""
    for lo in range(0, batch.size, batch_size):
        part = _trim(batch, lambda v, columns, lo=lo: np.ascontiguousarray(
            v[(slice(lo, lo + batch_size),) + columns]))
        if lo:
            part.data_stats = np.zeros_like(batch.data_stats)
        yield part


def _draw(pool: Batch, slots: np.ndarray, held: int, n: int, rng: np.random.Generator
          ) -> Generator[Batch, None, int]:
    """Yields ``n`` random held rows of ``pool`` as a batch (a copy, histories trimmed as in
    ``_trim``) and frees their slots; returns the new number of held rows. The pool's
    ``data_stats`` (the counts of every row converted since the last draw) go with the
    batch, so totals are kept."""
    pick = np.zeros(held, dtype=bool)
    pick[rng.choice(held, size=n, replace=False)] = True
    rows = slots[:held][pick]
    slots[:held] = np.concatenate([slots[:held][~pick], rows])  # drawn slots become free
    batch = _trim(pool, lambda v, columns: v[(rows,) + columns])
    batch.data_stats = pool.data_stats.copy()
    pool.data_stats[:] = 0
    yield batch
    return held - n
