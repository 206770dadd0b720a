"""Parquet rows -> batch tensors: streaming reader, vectorised conversion, split and loaders.

Pipeline: ``scan_parquet`` checks every file's footer against the layout up front and lists
its row groups; ``split_row_groups`` makes the train/validation split; ``PCVRDataset`` streams
the row groups of its shard (``iter_batches`` of ``MIN_CHUNK_ROWS`` rows or more, only the
needed columns, so memory stays bounded by a few batches), converts each Arrow record batch
with ``BatchConverter`` and, when training, shuffles rows through a buffer of
``buffer_batches`` batches. ``get_pcvr_data`` and ``get_eval_loader`` build the DataLoaders;
``DataStats`` sums the repair counters that every batch carries.

The conversion never loops over rows in Python: every list column is handled through its Arrow
offsets and flattened values, with numpy (per-row segment sums, binary searches) and, for the
history tensors, the compiled loops of ``kernels.py`` (one read and one write per kept event;
numpy fallbacks where no C compiler exists).

Batch dict (B rows; F_d side features in domain d; L_d = the longest kept history among the
batch's rows, at least 1 and at most ``max_len``; every tensor is contiguous):

=====================================  ========  ===============================================
key                                    dtype     shape
=====================================  ========  ===============================================
user_int_feats / item_int_feats        int32     [B, layout.user_int_dim / item_int_dim]
user_dense_feats / item_dense_feats    float32   [B, layout.user_dense_dim / item_dense_dim]
label                                  float32   [B] (1.0 iff label_type == 2)
timestamp, user_id                     int64     [B]
hour, dayofweek                        int32     [B]
{d}                                    int32     [B, F_d, L_d] (position 0 = newest event)
{d}_len                                int64     [B] kept events (<= L_d)
{d}_time_bucket, {d}_hour,             int32     [B, L_d] (0 = padding)
{d}_dayofweek
data_stats                             int64     [len(stat_names(layout))] repair counts
=====================================  ========  ===============================================

Every id, bucket, hour and day of week is an embedding index, int32 (``ID_DTYPE``), which
``nn.Embedding`` and ``F.embedding_bag`` take as they are, forward and backward, dense or
sparse: half the bytes of int64 to convert, shuffle and copy to the device (vocabularies must
fit, ``BatchConverter`` checks). Histories are trimmed per batch: a column beyond every row's
history is padding only, so L_d varies from batch to batch (the model must not assume
``max_len``). The conversion gathers only the columns its chunk of rows needs; the shuffle
buffer keeps ``max_len`` columns and each drawn batch copies only its L_d.

Fixes relative to the reference
-------------------------------
1. Histories keep the L **most recent** events by timestamp, newest first (position 0 = most
   recent; ties keep stored order; events whose timestamp is missing or <= 0 count as the
   oldest). The reference keeps the first L stored events, whatever their order
   (``--seq_keep first`` still does that). Every side column of a domain is permuted with its
   timestamp column; a domain without a timestamp column keeps stored order.
2. Ids ``>= vocab_size`` map to the out-of-vocabulary id ``vocab_size`` (tables have
   ``vocab_size + 1`` rows) instead of to padding 0, and are counted per column
   (``oov/<column>`` in ``data_stats``); the reference counted them in worker copies that were
   never reported. Ids <= 0, -1 and nulls are still 0; a vocab_size of 0 still zeroes the
   feature (not counted).
3. NaN and +-inf dense values become 0 and are counted per column (``nonfinite/<column>``);
   a null element inside a list (which made the reference raise) is treated as missing (0).
4. ``user_id`` is an int64 tensor permuted with its row by the shuffle buffer (the reference
   kept the first buffered batch's Python list, so ids no longer matched rows).
5. The user activity features 900-915 use the **full** stored history: 900-903 are
   ``log1p`` of the full history length and the 1/3/5-day counts look at every stored event
   (the reference used the truncated window, so the length saturated at ``log1p(L)`` and the
   counts depended on the storage order). ``{d}_len`` stays the number of kept events.
6. The 62-66 paired int/dense lists: a row whose int list and dense list differ in length is
   truncated to the shorter of the two (both are then padded to the schema dim), so every id
   keeps its own value, and counted (``len_mismatch/pair_<fid>``). Likewise a row whose
   sequence columns differ in length inside one domain is counted
   (``len_mismatch/<domain>``); its event count is the longest side column, as in the
   reference, and missing entries are 0 (a missing timestamp sorts as oldest).
7. A timestamp <= 0 inside a history is missing everywhere: time bucket, hour and day of week
   are 0 (the reference gave negative timestamps a real bucket).
8. Split: ``train_ratio < 1`` keeps the head fraction of the training row groups and never
   moves rows into validation; with a single row group the last ``ceil(valid_ratio * rows)``
   rows are validation (the reference trained on nothing); ``valid_ratio = 0`` means no
   validation loader.
9. Row-group order is reshuffled every epoch (seed + epoch, see ``set_epoch``) and rows pass
   through a shuffle buffer of ``buffer_batches`` batches (rows are converted straight into
   it and leave it in batches drawn at random), so every batch but the last of a shard is
   full. Row groups are sharded over (distributed rank, DataLoader worker), so every row is
   read exactly once per epoch; validation and inference use the workers too.
   ``prefetch_factor`` is only passed with workers, so ``num_workers=0`` works.
10. Only the columns the layout needs are read, and every file's schema is checked up front:
    a missing column, a wrong Arrow type, an empty folder or an unreadable file is a
    ``DataError`` naming the file, column and row group. ``label`` is float32.
11. ``item_dense`` columns are read when the schema declares them.

Process-wide settings: importing this module changes nothing. A multi-worker loader moves
~5 tensors per sequence domain per batch through shared memory; the default
``file_descriptor`` sharing strategy keeps one descriptor open per tensor and can exhaust the
descriptor limit with many workers, so the entry scripts (``train.py``) choose the
``file_system`` strategy themselves.
"""
from __future__ import annotations

import glob
import logging
import math
import os
from dataclasses import dataclass
from typing import (Any, Callable, Dict, Generator, Iterable, Iterator, List, Mapping, NamedTuple,
                    Optional, Sequence, Tuple, Union)

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

import pcvr.data.kernels as kernels
from pcvr.config import DataConfig, parse_seq_max_lens
from pcvr.data.kernels import EventOrder
from pcvr.schema import (ACTIVITY, ACTIVITY_DOMAINS, ACTIVITY_FIDS, ACTIVITY_WINDOWS_S,
                    TIME_BUCKET_BOUNDARIES, FeatureLayout, FeatureSpec, SeqDomainSpec, load_schema)

ID_COLUMNS = ("user_id", "timestamp")
LABEL_COLUMN = "label_type"
POSITIVE_LABEL_TYPE = 2

# Rows converted at a time: per-call overheads (~120 columns) make smaller chunks slower per row.
MIN_CHUNK_ROWS = 512
# Embedding indices (ids, time buckets, hours, days) are int32: half the bytes of int64, and
# taken as they are by nn.Embedding / F.embedding_bag (forward and backward, dense or sparse).
ID_DTYPE = np.int32
ID_MAX = int(np.iinfo(ID_DTYPE).max)
# _RELEASE: every reference to a record batch is dropped before the next one is decoded, so
# Arrow's allocator reuses its memory at once; held during the conversion, it would be
# returned to the OS meanwhile and faulted in afresh (~15% of the reading time).
_WINDOWS = np.asarray(ACTIVITY_WINDOWS_S, dtype=np.int64)

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Parquet data that cannot be read as the schema describes; names file/column/row group."""


# ----------------------------------------------------------------------------- repair counters
def stat_names(layout: FeatureLayout) -> List[str]:
    """Names of the ``data_stats`` counters of a batch, in order (the first is ``rows``)."""
    names = ["rows"]
    names += [f"oov/{s.column}" for s in layout.user_int + layout.item_int if s.vocab_size > 0]
    names += [f"nonfinite/{s.column}" for s in layout.user_dense + layout.item_dense
              if s.kind != ACTIVITY]
    names += [f"len_mismatch/pair_{i.fid}" for i, _ in layout.pairs]
    for d in layout.seq:
        names += [f"oov/{s.column}" for s in d.side if s.vocab_size > 0]
        names.append(f"len_mismatch/{d.name}")
    return names


class DataStats:
    """Sums the ``data_stats`` counters of the batches of one pass (works across workers,
    since the counts travel inside the batches).

    Args:
        names: ``stat_names(layout)``, e.g. ``info['stat_names']`` or ``loader.stat_names``.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.totals = np.zeros(len(self.names), dtype=np.int64)

    def add(self, batch: Mapping[str, Any]) -> None:
        self.totals += torch.as_tensor(batch["data_stats"]).cpu().numpy()

    def reset(self) -> None:
        self.totals[:] = 0

    def as_dict(self) -> Dict[str, int]:
        return {n: int(v) for n, v in zip(self.names, self.totals)}

    def summary_lines(self) -> List[str]:
        """One line with the row count, then one per kind of repair that happened."""
        counts = self.as_dict()
        lines = [f"{counts.pop('rows')} rows"]
        by_kind: Dict[str, List[str]] = {}
        for name, value in counts.items():
            if value:
                kind, _, column = name.partition("/")
                by_kind.setdefault(kind, []).append(f"{column}={value}")
        lines += [f"{kind}: {', '.join(items)}" for kind, items in by_kind.items()]
        return lines


# ----------------------------------------------------------------------------- files and types
@dataclass(frozen=True)
class RowGroupSlice:
    """Rows ``[start, stop)`` of row group ``row_group`` of the parquet file ``path``."""
    path: str
    row_group: int
    start: int
    stop: int

    @property
    def num_rows(self) -> int:
        return self.stop - self.start


def list_parquet_files(path: str) -> List[str]:
    """A parquet file, or every ``*.parquet`` of a folder in sorted order."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise DataError(f"{path}: no such parquet file or folder")
    files = sorted(glob.glob(os.path.join(path, "*.parquet")))
    if not files:
        raise DataError(f"{path}: the folder has no *.parquet file")
    return files


def _is_int(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) and not pa.types.is_uint64(t)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


# kind -> (accepts an Arrow type, what to say when it does not)
_KINDS = {
    "scalar": (_is_int, "an integer scalar"),
    "int": (lambda t: _is_int(t) or (_is_list(t) and _is_int(t.value_type)),
            "an integer scalar or list<int>"),
    "dense": (lambda t: _is_list(t) and pa.types.is_floating(t.value_type),
              "list<float> or list<double>"),
    "seq": (lambda t: _is_list(t) and _is_int(t.value_type), "list<int>"),
}


def required_columns(layout: FeatureLayout, read_labels: bool) -> Dict[str, str]:
    """Column name -> kind (a key of ``_KINDS``) of every column the pipeline reads."""
    cols = {c: "scalar" for c in ID_COLUMNS}
    if read_labels:
        cols[LABEL_COLUMN] = "scalar"
    cols.update({s.column: "int" for s in layout.user_int + layout.item_int})
    cols.update({s.column: "dense" for s in layout.user_dense + layout.item_dense
                 if s.kind != ACTIVITY})
    for d in layout.seq:
        cols.update({s.column: "seq" for s in d.side})
        if d.ts_column:
            cols[d.ts_column] = "seq"
    return cols


def _open(path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: not a readable parquet file ({exc})") from exc


def scan_parquet(files: Sequence[str], columns: Mapping[str, str],
                 optional: Optional[Mapping[str, str]] = None
                 ) -> Tuple[List[RowGroupSlice], List[str]]:
    """Checks every file's footer (columns present, Arrow types) and lists its row groups.

    Reads parquet metadata only. Empty row groups are skipped.

    Args:
        files: parquet paths.
        columns: column -> kind (``required_columns``), required in every file.
        optional: column -> kind, type-checked where present.
    Returns:
        (row groups in file order, the optional columns present in every file).
    Raises:
        DataError: naming the file and column of the first problem found.
    """
    optional = optional or {}
    units, present = [], set(optional)
    for path in files:
        pf = _open(path)
        schema = pf.schema_arrow
        for col, kind in {**optional, **columns}.items():
            accepts, expected = _KINDS[kind]
            idx = schema.get_field_index(col)
            if idx < 0 and col in columns:
                raise DataError(f"{path}: column '{col}' is missing (expected {expected})")
            if idx < 0:
                present.discard(col)
            elif not accepts(schema.field(idx).type):
                raise DataError(f"{path}: column '{col}' has Arrow type "
                                f"{schema.field(idx).type}, expected {expected}")
        meta = pf.metadata
        units += [RowGroupSlice(path, rg, 0, meta.row_group(rg).num_rows)
                  for rg in range(meta.num_row_groups) if meta.row_group(rg).num_rows > 0]
    return units, sorted(present)


def split_row_groups(units: Sequence[RowGroupSlice], train_ratio: float, valid_ratio: float
                     ) -> Tuple[List[RowGroupSlice], List[RowGroupSlice]]:
    """(train, valid): the tail row groups are validation.

    ``n_valid = max(1, int(n * valid_ratio))`` row groups; with a single row group the last
    ``ceil(valid_ratio * rows)`` rows instead. ``train_ratio < 1`` keeps the head fraction of
    the training row groups (of the training rows when there is one) and drops the rest.
    """
    if not 0.0 < train_ratio <= 1.0:
        raise ValueError(f"train_ratio must be in (0, 1], got {train_ratio}")
    if not 0.0 <= valid_ratio < 1.0:
        raise ValueError(f"valid_ratio must be in [0, 1), got {valid_ratio}")
    if not units:
        raise DataError("the parquet files hold no rows")
    train, valid = list(units), []
    if valid_ratio > 0 and len(units) == 1:
        train, valid = _split_rows(units[0], math.ceil(valid_ratio * units[0].num_rows))
    elif valid_ratio > 0:
        n_valid = max(1, int(len(units) * valid_ratio))
        train, valid = train[:-n_valid], train[-n_valid:]
    if train_ratio < 1.0:
        if len(train) == 1:
            keep = max(1, int(train[0].num_rows * train_ratio))
            train = _split_rows(train[0], train[0].num_rows - keep)[0]
        else:
            train = train[:max(1, int(len(train) * train_ratio))]
    return train, valid


def _split_rows(unit: RowGroupSlice, n_tail: int
                ) -> Tuple[List[RowGroupSlice], List[RowGroupSlice]]:
    """([head], [tail]) of one row group, the tail holding ``n_tail`` rows."""
    if n_tail >= unit.num_rows:
        raise DataError(f"{unit.path}: row group {unit.row_group} has {unit.num_rows} rows, too "
                        f"few to keep {n_tail} for validation and still train")
    cut = unit.stop - n_tail
    return [RowGroupSlice(unit.path, unit.row_group, unit.start, cut)], \
        [RowGroupSlice(unit.path, unit.row_group, cut, unit.stop)]


# ----------------------------------------------------------------------------- conversion
class _Ragged(NamedTuple):
    """A column as per-row segments of a flat value array (a scalar is a list of length 1)."""
    starts: np.ndarray  # int64 [B]
    lens: np.ndarray    # int64 [B], 0 for null rows
    values: np.ndarray  # [N], nested nulls set to 0


def _numpy(arr: pa.Array) -> np.ndarray:
    """Zero-copy numpy view of a primitive Arrow array's values, nulls ignored.

    Straight from the buffer: ``Array.to_numpy`` would import pandas (~0.5 s) in every fresh
    DataLoader worker.
    """
    t = arr.type
    kind = "f" if pa.types.is_floating(t) else "u" if pa.types.is_unsigned_integer(t) else "i"
    dtype = np.dtype(f"{kind}{t.bit_width // 8}")
    if len(arr) == 0:
        return np.empty(0, dtype)
    return np.frombuffer(arr.buffers()[1], dtype, count=arr.offset + len(arr))[arr.offset:]


def _valid(arr: pa.Array) -> np.ndarray:
    """bool [len(arr)]: the validity bitmap (call only when ``arr.null_count``)."""
    bits = np.frombuffer(arr.buffers()[0], np.uint8)
    return np.unpackbits(bits, count=arr.offset + len(arr), bitorder="little")[arr.offset:] \
        .astype(bool)


def _ragged(arr: pa.Array) -> _Ragged:
    if _is_list(arr.type):
        offsets = _numpy(arr.offsets).astype(np.int64)
        starts, lens = offsets[:-1], np.diff(offsets)
        values = arr.values  # ignores the slice offset, as ``arr.offsets`` expects
    else:
        rows = len(arr)
        starts, lens, values = np.arange(rows, dtype=np.int64), np.ones(rows, np.int64), arr
    if arr.null_count:  # a null row may still span child values: make it empty
        lens = lens * _valid(arr)
    vals = _numpy(values)
    if values.null_count:
        vals = np.where(_valid(values), vals, vals.dtype.type(0))
    return _Ragged(starts, lens, vals)


def _positions(r: _Ragged, idx: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(mask [B, W], flat positions [B, W]) of event ``idx[b, j]`` of each row of ``r``.

    ``idx`` is [B, W] or [1, W]; ``mask`` is ``idx < lens``; masked-out positions are clamped
    into range, so they can be gathered and then zeroed.
    """
    pos = np.minimum(r.starts[:, None] + idx, max(r.values.size - 1, 0))
    return np.less(idx, r.lens[:, None]), pos


def _take(values: np.ndarray, mask: np.ndarray, pos: np.ndarray, dtype: type,
          out: Optional[np.ndarray] = None) -> np.ndarray:
    """``values[pos]`` where ``mask`` else 0, as ``dtype`` (integer values only), into ``out``
    when given."""
    if out is None:
        out = np.empty(mask.shape, dtype)
    if not values.size:
        out[...] = 0
        return out
    if values.dtype == out.dtype:
        values.take(pos, out=out, mode="clip")  # positions are in range already
    else:
        out[...] = values.take(pos)
    out *= mask
    return out


def _flat_events(r: _Ragged, n: np.ndarray) -> np.ndarray:
    """Row segments of ``r`` cut or zero-padded to lengths ``n``, concatenated: [sum(n)]."""
    seg = np.cumsum(n) - n
    start = r.starts[0] if n.size else 0
    if np.array_equal(r.lens, n) and np.array_equal(r.starts, start + seg):
        return r.values[start:start + int(n.sum())]  # already contiguous: a view
    rows = np.repeat(np.arange(n.size), n)
    j = np.arange(rows.size, dtype=np.int64) - seg[rows]
    pos = np.minimum(r.starts[rows] + j, max(r.values.size - 1, 0))
    return _take(r.values, j < r.lens[rows], pos, r.values.dtype)


def _row_events(values: np.ndarray, n: np.ndarray, rows: np.ndarray
                ) -> Tuple[np.ndarray, np.ndarray]:
    """(the segments of ``rows`` concatenated, their lengths) of ``values`` [sum(n)], whose
    rows have lengths ``n``."""
    n_r = n[rows]
    shift = (np.cumsum(n) - n)[rows] - (np.cumsum(n_r) - n_r)  # segment start, old - new
    return values[np.repeat(shift, n_r) + np.arange(int(n_r.sum()))], n_r


def _first(r: _Ragged) -> np.ndarray:
    """int64 [B]: each row's first value, 0 for an empty row."""
    if not r.values.size:
        return np.zeros(r.lens.size, np.int64)
    return r.values.take(np.minimum(r.starts, r.values.size - 1)) * (r.lens > 0)


def head_order(n: np.ndarray, max_len: int) -> EventOrder:
    """The first ``max_len`` stored events of each row (lengths ``n``)."""
    kept = np.minimum(n, max_len)
    pos = np.arange(max_len, dtype=np.int32)
    return EventOrder(np.where(pos < kept[:, None], pos, kernels.PAD), kept,
                      np.zeros_like(kept), np.ones_like(kept))


def _pair_flags(key: np.ndarray, n: np.ndarray, compare: np.ufunc) -> np.ndarray:
    """bool [max(sum(n) - 1, 0)]: ``compare(key[i + 1], key[i])`` for the adjacent event pairs
    of the concatenated rows of lengths ``n``; False for a pair that straddles two rows."""
    flags = compare(key[1:], key[:-1])
    ends = np.cumsum(n)
    flags[ends[(ends >= 1) & (ends <= flags.size)] - 1] = False
    return flags


def _pair_counts(flags: np.ndarray, n: np.ndarray) -> np.ndarray:
    """int64 [B]: per row, how many of its adjacent event pairs are flagged (``_pair_flags``)."""
    multi = n >= 2
    counts = np.zeros(n.size, dtype=np.int64)
    if multi.any():
        counts[multi] = np.add.reduceat(flags.view(np.uint8), (np.cumsum(n) - n)[multi],
                                        dtype=np.int32)
    return counts


def _stable_reverse(key: np.ndarray, n: np.ndarray, rows: np.ndarray, max_len: int
                    ) -> np.ndarray:
    """Newest-first order of ``rows`` whose keys never decrease: stored order reversed, but
    each run of equal keys kept in stored order, as a stable sort would.

    Works on the last ``L`` events of each row only: walking them backwards, a run of equal
    keys covering positions [a, z] holds the stored events [s, s + z - a], where
    ``s = n - 1 - z``, except for a run reaching back past the window, whose start ``s`` is
    found by a binary search. Returns int64 [len(rows), L] event indices, ``kernels.PAD`` after.
    """
    n_r, seg = n[rows], (np.cumsum(n) - n)[rows]
    m = np.minimum(n_r, max_len)
    p = np.arange(max_len, dtype=np.int64)
    kept = p < m[:, None]
    w = key[seg[:, None] + np.where(kept, n_r[:, None] - 1 - p, 0)]  # keys walking back
    new = ~kept  # every padding position is a run of its own
    new[:, 0] = True
    new[:, 1:] |= w[:, 1:] != w[:, :-1]
    a = np.maximum.accumulate(np.where(new, p, 0), axis=1)
    last = np.append(new[:, 1:], np.ones((len(rows), 1), dtype=bool), axis=1)
    z = np.minimum.accumulate(np.where(last, p, max_len)[:, ::-1], axis=1)[:, ::-1]
    s = n_r[:, None] - 1 - z
    cut = np.flatnonzero(m < n_r)  # the oldest kept run may start before the window
    if cut.size:
        k0 = w[cut, m[cut] - 1]
        lo, hi = np.zeros(cut.size, dtype=np.int64), n_r[cut] - m[cut]
        while (lo < hi).any():  # first stored index whose key is k0
            mid = (lo + hi) // 2
            below = key[seg[cut] + mid] < k0
            lo, hi = np.where(below, mid + 1, lo), np.where(below, hi, mid)
        edge = z[cut] == (m[cut] - 1)[:, None]
        s[cut] = np.where(edge, lo[:, None], s[cut])
    return np.where(kept, s + p - a, kernels.PAD)


def order_counts(key: np.ndarray, n: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(rises, falls): int64 [B], per row the adjacent event pairs whose key rises / falls.

    A row whose keys never fall (never rise) is stored oldest (newest) first. ``key`` and
    ``n`` as in ``recent_order``.
    """
    counts = []
    for compare in (np.greater, np.less):
        flags = _pair_flags(key, n, compare)
        counts.append(_pair_counts(flags, n) if flags.any() else np.zeros(n.size, np.int64))
    return counts[0], counts[1]


def recent_order(key: np.ndarray, n: np.ndarray, max_len: int,
                 counts: Optional[Tuple[np.ndarray, np.ndarray]] = None) -> EventOrder:
    """The ``max_len`` most recent events of each row, newest first.

    Ties keep stored order. Rows stored newest first (keys never increase) or oldest first
    with no ties are runs (``EventOrder.step`` +1 / -1) found without sorting; oldest-first
    rows with ties are reversed run by run, and the rest are sorted (``kernels.newest_first``).

    Args:
        key: int64 [sum(n)], every row's event timestamps in stored order (0 = missing).
        n: int64 [B], events per row.
        max_len: L.
        counts: ``order_counts(key, n)`` when already known.
    Returns:
        The kept events; ``idx`` is [B, L] with ``PAD`` after each row's last event.
    """
    n_rise, n_fall = order_counts(key, n) if counts is None else counts
    p = np.arange(max_len, dtype=np.int64)
    kept = np.minimum(n, max_len)
    ascending = (n_rise > 0) & (n_fall == 0)
    strict = ascending & (n_rise == n - 1)  # no ties: the plain reversal
    mixed = (n_rise > 0) & (n_fall > 0)
    step = np.where(strict, -1, np.where(ascending | mixed, 0, 1))
    first = np.where(strict, n - 1, 0)
    idx = np.where(strict[:, None], (n - 1)[:, None] - p, p)
    np.copyto(idx, kernels.PAD, where=p >= kept[:, None])
    tied = np.flatnonzero(ascending & ~strict)
    if tied.size:
        idx[tied] = _stable_reverse(key, n, tied, max_len)
    idx = idx.astype(np.int32)
    rows = np.flatnonzero(mixed)
    if rows.size:
        kernels.newest_first(key, n, rows, idx)
    return EventOrder(idx, kept, first, step)


# Hour of the week h -> hour id h % 24 + 1 and day-of-week id h // 24 + 1 (1-based: 0 is
# padding); h = 168 marks a missing timestamp or padding and maps to 0.
_NO_HOUR = 168
_HOUR_IDS = np.append(np.arange(168) % 24 + 1, 0).astype(ID_DTYPE)
_DAY_IDS = np.append(np.arange(168) // 24 + 1, 0).astype(ID_DTYPE)
# Time bucket id of a real event's age in seconds = 1 + the number of these edges below it:
# 1..63 (ages <= 5 s, negative ones too, are bucket 1; ages beyond the last edge share bucket
# 63); 0 is a missing timestamp or padding (``kernels.time_features``).
_BUCKET_EDGES = np.array(TIME_BUCKET_BOUNDARIES[:-1], dtype=np.int64)


def _window_counts(key: np.ndarray, n: np.ndarray, ts_row: np.ndarray) -> np.ndarray:
    """int64 [B, 3]: per row, events with 0 < ts_row - key <= 1, 3, 5 days (key 0 = missing).

    ``key`` holds every row's events concatenated (lengths ``n``); a scan of every event.
    """
    age = np.repeat(ts_row, n)
    age -= key
    age -= 1  # as unsigned, age - 1 < W  <=>  1 <= age <= W
    np.copyto(age, -1, where=key == 0)  # a missing timestamp is in no window
    rows = np.flatnonzero(n)
    counts = np.zeros((n.size, len(_WINDOWS)), dtype=np.int64)
    for w, window in enumerate(_WINDOWS):
        inside = age.view(np.uint64) < window
        counts[rows, w] = np.add.reduceat(inside.view(np.uint8), (np.cumsum(n) - n)[rows],
                                          dtype=np.int32)
    return counts


def _sorted_window_counts(key: np.ndarray, n: np.ndarray, ts_row: np.ndarray,
                          descending: np.ndarray) -> np.ndarray:
    """``_window_counts`` of rows whose keys are sorted, ascending or, where ``descending``,
    descending: a binary search per row and window edge, not a scan of every event.

    Within such a row the events before a time t (ascending) or at or after it (descending)
    form a prefix; a window [ts_row - W, ts_row - 1] holds the difference of two prefixes.
    """
    starts = np.cumsum(n) - n
    edges = np.concatenate([ts_row[:, None], np.maximum(ts_row[:, None] - _WINDOWS, 1)],
                           axis=1)  # [B, 4]: ts_row, then each window's first second
    flip = descending[:, None]
    lo, hi = np.zeros(edges.shape, np.int64), np.repeat(n[:, None], edges.shape[1], axis=1)
    for _ in range(int(n.max(initial=0)).bit_length()):  # halves every [lo, hi) interval
        mid = (lo + hi) >> 1
        before = (key[np.minimum(starts[:, None] + mid, max(key.size - 1, 0))] < edges) != flip
        active = lo < hi
        lo = np.where(active & before, mid + 1, lo)
        hi = np.where(active & ~before, mid, hi)
    inside = (lo[:, :1] - lo[:, 1:]) * np.where(descending, -1, 1)[:, None]
    return np.maximum(inside, 0)  # a window starting after ts_row - 1 (ts_row < 2) is empty


def _activity_counts(key: np.ndarray, n: np.ndarray, ts_row: np.ndarray,
                     counts: Tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """``_window_counts``: by binary search for the rows stored in time order (either way,
    ``counts`` = ``order_counts(key, n)``), by a scan of the others' events."""
    n_rise, n_fall = counts
    sorted_rows = (n_rise == 0) | (n_fall == 0)
    if not key.size or sorted_rows.all():
        return _sorted_window_counts(key, n, ts_row, n_rise == 0) if key.size else \
            np.zeros((n.size, len(_WINDOWS)), np.int64)
    out = np.empty((n.size, len(_WINDOWS)), np.int64)
    rows = np.flatnonzero(sorted_rows)
    out[rows] = _sorted_window_counts(*_row_events(key, n, rows), ts_row[rows],
                                      n_rise[rows] == 0)
    rows = np.flatnonzero(~sorted_rows)
    out[rows] = _window_counts(*_row_events(key, n, rows), ts_row[rows])
    return out


Rows = Union[slice, np.ndarray]
HISTORY_SUFFIXES = ("", "_time_bucket", "_hour", "_dayofweek")  # the [B, ..., L_d] tensors


class BatchConverter:
    """Converts Arrow record batches into the batch dict of numpy arrays (module docstring).

    ``converter(rb)`` returns a new batch whose histories are as long as the longest kept one
    of ``rb``; ``converter(rb, out, rows)`` writes the rows of ``rb`` into rows ``rows`` of
    the arrays of ``allocate(n)`` (how the shuffle buffer is filled without a second copy),
    zero-padded to their full length, and adds to ``out['data_stats']``.

    Args:
        layout: the feature layout (``schema.load_schema``).
        data_cfg: conversion flags (``seq_keep``, time zone, missing-time padding).
        read_labels: read ``label_type``; otherwise ``label`` is all 0.
    """

    def __init__(self, layout: FeatureLayout, data_cfg: DataConfig, read_labels: bool) -> None:
        if data_cfg.seq_keep not in ("recent", "first"):
            raise ValueError(f"seq_keep must be 'recent' or 'first', got {data_cfg.seq_keep!r}")
        specs = [*layout.user_int, *layout.item_int, *(s for d in layout.seq for s in d.side)]
        too_big = [s.column for s in specs if s.vocab_size > ID_MAX]
        if too_big:
            raise ValueError(f"vocab_size above {ID_MAX} does not fit the int32 id tensors: "
                             f"{too_big}")
        self.layout = layout
        self.keep_recent = data_cfg.seq_keep == "recent"
        self.offset_s = int(round(float(data_cfg.time_zone_offset_hours) * 3600))
        self.missing_as_padding = bool(data_cfg.user_abs_time_missing_as_padding)
        self.read_labels = read_labels
        self.columns = required_columns(layout, read_labels)
        self.stat_names = stat_names(layout)
        # {d}_len -> the history tensors of domain d, whose last axis a batch may trim
        self.histories = {f"{d.name}_len": [d.name + s for s in HISTORY_SUFFIXES]
                          for d in layout.seq}
        self._stat = {name: k for k, name in enumerate(self.stat_names)}
        self._pairs = layout.pairs
        self._activity = {s.fid: s.offset for s in layout.activity}
        # group -> (specs, vocab per position, first position per spec, oov stat or -1 per spec)
        self._int_plans = {}
        for key, specs in (("user_int_feats", layout.user_int),
                           ("item_int_feats", layout.item_int)):
            self._int_plans[key] = (
                specs, np.repeat([s.vocab_size for s in specs], [s.length for s in specs]),
                np.array([s.offset for s in specs], dtype=np.int64),
                np.array([self._stat.get(f"oov/{s.column}", -1) for s in specs], dtype=np.int64))

    def allocate(self, n_rows: int, lengths: Optional[Mapping[str, int]] = None
                 ) -> Dict[str, np.ndarray]:
        """Arrays of every batch key for ``n_rows`` rows, uninitialised but ``data_stats``
        (a conversion writes every element of its rows).

        ``lengths``: domain -> history length (default: every domain's ``max_len``).
        """
        lay, i64 = self.layout, np.int64
        shapes: Dict[str, Tuple[Tuple[int, ...], type]] = {
            "user_int_feats": ((lay.user_int_dim,), ID_DTYPE),
            "item_int_feats": ((lay.item_int_dim,), ID_DTYPE),
            "user_dense_feats": ((lay.user_dense_dim,), np.float32),
            "item_dense_feats": ((lay.item_dense_dim,), np.float32),
            "label": ((), np.float32),
            "timestamp": ((), i64), "hour": ((), ID_DTYPE), "dayofweek": ((), ID_DTYPE),
            "user_id": ((), i64),
        }
        for d in lay.seq:
            length = lengths[d.name] if lengths is not None else d.max_len
            shapes[d.name] = ((len(d.side), length), ID_DTYPE)
            shapes[f"{d.name}_len"] = ((), i64)
            for suffix in HISTORY_SUFFIXES[1:]:
                shapes[d.name + suffix] = ((length,), ID_DTYPE)
        out = {k: np.empty((n_rows,) + shape, dtype) for k, (shape, dtype) in shapes.items()}
        out["data_stats"] = np.zeros(len(self.stat_names), dtype=i64)
        return out

    def __call__(self, rb: pa.RecordBatch, out: Optional[Dict[str, np.ndarray]] = None,
                 rows: Rows = slice(None)) -> Dict[str, np.ndarray]:
        cols = {name: _ragged(rb.column(name)) for name in self.columns}
        lay = self.layout
        # events per row of each domain: its longest side column
        n = {d.name: np.max([cols[s.column].lens for s in d.side], axis=0) for d in lay.seq}
        if out is None:
            out = self.allocate(rb.num_rows, {
                d.name: max(1, min(d.max_len, int(n[d.name].max(initial=0)))) for d in lay.seq})
        stats = out["data_stats"]
        stats[0] += rb.num_rows
        for i, d in self._pairs:  # cut both lists of a pair to the shorter one
            li, ld = cols[i.column].lens, cols[d.column].lens
            stats[self._stat[f"len_mismatch/pair_{i.fid}"]] += np.count_nonzero(li != ld)
            short = np.minimum(li, ld)
            cols[i.column] = cols[i.column]._replace(lens=short)
            cols[d.column] = cols[d.column]._replace(lens=short)

        ts = cols["timestamp"].values.astype(np.int64)
        hours = kernels.hour_of_week(ts, self.offset_s)
        if self.missing_as_padding:
            hours[ts <= 0] = _NO_HOUR
            out["hour"][rows], out["dayofweek"][rows] = _HOUR_IDS[hours], _DAY_IDS[hours]
        else:
            out["hour"][rows], out["dayofweek"][rows] = hours % 24, hours // 24
        out["timestamp"][rows] = ts
        out["user_id"][rows] = cols["user_id"].values
        out["label"][rows] = (cols[LABEL_COLUMN].values == POSITIVE_LABEL_TYPE
                              if self.read_labels else 0)
        for key in ("user_int_feats", "item_int_feats"):
            self._int_group(key, cols, rb.num_rows, out[key], rows, stats)
        dense = np.zeros((rb.num_rows, lay.user_dense_dim), dtype=np.float32)
        self._dense_group(lay.user_dense, cols, dense, stats)
        for d in lay.seq:
            self._domain(d, n[d.name], cols, ts, out, rows, stats, dense)
        out["user_dense_feats"][rows] = dense
        item_dense = np.zeros((rb.num_rows, lay.item_dense_dim), dtype=np.float32)
        self._dense_group(lay.item_dense, cols, item_dense, stats)
        out["item_dense_feats"][rows] = item_dense
        return out

    def _int_group(self, key: str, cols: Mapping[str, _Ragged], n_rows: int, out: np.ndarray,
                   rows: Rows, stats: np.ndarray) -> None:
        """Gathers every feature of an int group into one block, then cleans the block at once
        against the per-position vocabulary (one clip, not one per feature)."""
        specs, vocab, first, stat = self._int_plans[key]
        if not specs:
            return
        block = np.zeros((n_rows, vocab.size), dtype=np.int64)
        for s in specs:
            r = cols[s.column]
            if s.vocab_size == 0:  # no vocabulary: the feature stays 0
                continue
            if s.length == 1:
                block[:, s.offset] = _first(r)
            else:
                block[:, s.offset:s.offset + s.length] = _take(
                    r.values, *_positions(r, np.arange(s.length)[None, :]), np.int64)
        np.clip(block, 0, vocab, out=block)  # ids <= 0 -> 0, OOV -> vocab, no vocab -> 0
        oov = np.add.reduceat(np.count_nonzero(block == vocab, axis=0), first)
        stats[stat[stat >= 0]] += oov[stat >= 0]
        out[rows] = block

    def _dense_group(self, specs: Sequence[FeatureSpec], cols: Mapping[str, _Ragged],
                     out: np.ndarray, stats: np.ndarray) -> None:
        """Fills the zeroed ``out`` (all rows of the batch) with the group's dense lists."""
        for s in specs:
            if s.kind == ACTIVITY:  # written by _domain
                continue
            r = cols[s.column]
            if not r.values.size:  # every row empty: the feature stays 0
                continue
            mask, pos = _positions(r, np.arange(s.length)[None, :])
            x = r.values.take(pos).astype(np.float32, copy=False)
            ok = mask & np.isfinite(x)
            stats[self._stat[f"nonfinite/{s.column}"]] += np.count_nonzero(mask) - \
                np.count_nonzero(ok)
            out[:, s.offset:s.offset + s.length] = np.where(ok, x, np.float32(0))

    def _domain(self, d: SeqDomainSpec, n: np.ndarray, cols: Mapping[str, _Ragged],
                ts_row: np.ndarray, out: Dict[str, np.ndarray], rows: Rows, stats: np.ndarray,
                dense: np.ndarray) -> None:
        """Writes ``d``, ``d_len``, ``d_time_bucket``, ``d_hour``, ``d_dayofweek`` and, for
        seq_a..seq_d, the activity features of ``d`` into ``dense``.

        ``n``: events per row. Only the first ``width`` (the longest kept history) columns of
        the history tensors are gathered; the rest of ``out``'s columns, if any, are zeroed.
        """
        sides = [cols[s.column] for s in d.side]
        ts_col = cols[d.ts_column] if d.ts_column else None
        lens = [r.lens for r in sides] + ([ts_col.lens] if ts_col is not None else [])
        stats[self._stat[f"len_mismatch/{d.name}"]] += np.count_nonzero(
            np.any([x != n for x in lens], axis=0))
        kept = np.minimum(n, d.max_len)
        out[f"{d.name}_len"][rows] = kept
        width = max(1, int(kept.max(initial=0)))
        activity = bool(self._activity) and d.name in ACTIVITY_DOMAINS
        key = None
        if ts_col is not None and (self.keep_recent or activity):
            key = _flat_events(ts_col, n).astype(np.int64, copy=False)
            if key.size and key.min() < 0:  # missing or <= 0 timestamps: 0, the oldest
                key = np.maximum(key, 0)
        counts = order_counts(key, n) if key is not None else None
        order = recent_order(key, n, width, counts) if key is not None and self.keep_recent \
            else head_order(n, width)

        # Every row of every history tensor is written whole (zeros after ``width``), into
        # ``out``'s rows ``rows``: a slice of the batch or the shuffle buffer's free slots.
        direct = isinstance(rows, slice)
        out_rows = None if direct else np.asarray(rows, dtype=np.int64)
        at = slice(None) if direct else out_rows  # this chunk's rows of the views below
        seq, *times = (out[d.name + s][rows] if direct else out[d.name + s]
                       for s in HISTORY_SUFFIXES)
        for s, r in zip(d.side, sides):
            if s.vocab_size == 0:  # no vocabulary: the feature is 0
                seq[at, s.offset] = 0
                continue
            stats[self._stat[f"oov/{s.column}"]] += kernels.gather_ids(
                r.values, r.starts, r.lens, order, s.vocab_size, seq[:, s.offset], out_rows)
        if ts_col is None:  # no timestamps: no time bucket, hour or day of week
            for t in times:
                t[at] = 0
        else:
            kernels.time_features(ts_col.values, ts_col.starts, ts_col.lens, order, ts_row,
                                  self.offset_s, _BUCKET_EDGES, *times, out_rows=out_rows)

        if activity:  # fid 900 + k: history length; 904 + 3k ..: the windows' counts
            k = ACTIVITY_DOMAINS.index(d.name)
            dense[:, self._activity[ACTIVITY_FIDS[k]]] = np.log1p(n)
            if key is not None:
                fids = ACTIVITY_FIDS[4 + 3 * k:4 + 3 * (k + 1)]
                dense[:, [self._activity[f] for f in fids]] = np.log1p(
                    _activity_counts(key, n, ts_row, counts))


# ----------------------------------------------------------------------------- dataset
def _shard_of_process() -> Tuple[int, int]:
    """(rank, world size) of torch.distributed, or (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class PCVRDataset(IterableDataset):
    """Streams converted batches from a list of row-group slices.

    Each (distributed rank, DataLoader worker) reads every ``n_shards``-th row group of the
    epoch's order, so every row is read once per epoch. Rows are read and converted
    ``chunk_rows`` at a time. With ``shuffle`` the row-group order is a permutation seeded by
    ``seed + epoch``, and with ``buffer_batches > 0`` rows pass through a shuffle buffer of
    that many batches (every batch of a shard is then full but its last).

    Args:
        units: row-group slices to read.
        layout: the feature layout.
        data_cfg: conversion flags.
        batch_size: rows per batch (without shuffle, the last batch of a row group may be
            shorter).
        shuffle: shuffle row groups and rows (training).
        buffer_batches: shuffle buffer size in batches (0 = row groups shuffled, rows not).
        seed: base seed.
        read_labels: read ``label_type``.
    """

    def __init__(self, units: Sequence[RowGroupSlice], layout: FeatureLayout,
                 data_cfg: DataConfig, batch_size: int, shuffle: bool = False,
                 buffer_batches: int = 0, seed: int = 0, read_labels: bool = True) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.units = list(units)
        self.layout = layout
        self.converter = BatchConverter(layout, data_cfg, read_labels)
        self.batch_size = batch_size
        self.chunk_rows = batch_size * -(-MIN_CHUNK_ROWS // batch_size)  # a multiple of it
        self.shuffle = shuffle
        self.buffer_batches = max(0, int(buffer_batches))
        self.seed = seed
        self.epoch = 0
        # Captured here, in the main process: a spawned worker would not see the process group.
        self.rank, self.world = _shard_of_process()
        self._pool: Optional[Dict[str, np.ndarray]] = None  # the shuffle pool, kept for reuse

    def __getstate__(self) -> Dict[str, Any]:
        return dict(self.__dict__, _pool=None)  # never pickle hundreds of MB of pool

    @property
    def stat_names(self) -> List[str]:
        return self.converter.stat_names

    @property
    def num_rows(self) -> int:
        return sum(u.num_rows for u in self.units)

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch's row-group order; takes effect at the next ``iter(loader)``
        (the loaders' workers are not persistent, so they start from this state)."""
        self.epoch = int(epoch)

    def epoch_units(self) -> List[RowGroupSlice]:
        """All row-group slices in this epoch's reading order (before sharding)."""
        if not self.shuffle:
            return list(self.units)
        perm = np.random.default_rng(self.seed + self.epoch).permutation(len(self.units))
        return [self.units[k] for k in perm]

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shard, n_shards = self.rank * n_workers + worker, self.world * n_workers
        units = self.epoch_units()[shard::n_shards]
        if self.shuffle and self.buffer_batches > 0:
            rng = np.random.default_rng([self.seed, self.epoch, shard])
            batches = self._shuffled(units, rng)
        else:
            batches = self._plain(units)
        for batch in batches:
            yield {k: torch.from_numpy(v) for k, v in batch.items()}

    def _plain(self, units: Sequence[RowGroupSlice]) -> Iterator[Dict[str, np.ndarray]]:
        """Batches in stored order (views of each converted chunk, histories trimmed)."""
        for rb in self._record_batches(units):
            chunk = self.converter(rb)
            del rb  # see _RELEASE
            yield from _split(chunk, self.batch_size, self.converter.histories)

    def _shuffled(self, units: Sequence[RowGroupSlice], rng: np.random.Generator
                  ) -> Iterator[Dict[str, np.ndarray]]:
        """A shuffle buffer that rows are converted straight into.

        The pool holds up to ``buffer_batches * batch_size`` rows plus one chunk of headroom;
        whenever it holds more than that, a batch of rows drawn at random leaves it, and the
        freed rows take the next rows read. The pool is kept for the next pass, so its
        hundreds of MB are not faulted in again and again.
        """
        B, cap = self.batch_size, self.buffer_batches * self.batch_size
        histories = self.converter.histories
        size = min(cap + self.chunk_rows, sum(u.num_rows for u in units))
        if size == 0:  # an idle shard (more workers than row groups)
            return
        pool, self._pool = self._pool, None  # taken, so that a concurrent pass makes its own
        if pool is None or pool["label"].shape[0] != size:
            pool = self.converter.allocate(size)
        pool["data_stats"][:] = 0
        slots = np.arange(size)  # slots[:held] hold rows, slots[held:] are free
        held = 0
        try:
            for rb in self._record_batches(units):
                while rb.num_rows:
                    n = min(rb.num_rows, size - held)
                    self.converter(rb.slice(0, n), pool, slots[held:held + n])
                    held, rb = held + n, rb.slice(n)
                    while held > cap:
                        held = yield from _draw(pool, slots, held, B, rng, histories)
                del rb  # see _RELEASE
            while held:
                held = yield from _draw(pool, slots, held, min(B, held), rng, histories)
        finally:
            self._pool = pool  # drawn batches are copies: nothing refers to the pool any more

    def _record_batches(self, units: Iterable[RowGroupSlice]) -> Iterator[pa.RecordBatch]:
        files: Dict[str, pq.ParquetFile] = {}
        columns = list(self.converter.columns)
        for u in units:
            if u.path not in files:
                files[u.path] = _open(u.path)
            pf = files[u.path]
            row = 0
            try:
                for rb in pf.iter_batches(batch_size=self.chunk_rows, row_groups=[u.row_group],
                                          columns=columns, use_threads=False):
                    lo, hi = max(u.start - row, 0), min(u.stop - row, rb.num_rows)
                    row += rb.num_rows
                    if hi > lo:
                        yield rb if (lo, hi) == (0, rb.num_rows) else rb.slice(lo, hi - lo)
                    del rb  # see _RELEASE
                    if row >= u.stop:
                        break
            except (OSError, pa.ArrowException) as exc:
                raise DataError(f"{u.path}: row group {u.row_group}: cannot decode "
                                f"{_bad_column(pf, u.row_group, columns)}({exc})") from exc


def _bad_column(pf: pq.ParquetFile, row_group: int, columns: Sequence[str]) -> str:
    """'column X ' for the first column of a row group that fails to decode, else ''."""
    for col in columns:
        try:
            pf.read_row_group(row_group, columns=[col])
        except (OSError, pa.ArrowException):
            return f"column '{col}' "
    return ""


def _trim(batch: Mapping[str, np.ndarray], histories: Mapping[str, Sequence[str]],
          take: Callable[[np.ndarray, Tuple[Any, ...]], np.ndarray]) -> Dict[str, np.ndarray]:
    """``take(array, columns)`` of every array of ``batch`` but ``data_stats``: ``columns`` is
    the index of the axes after the first, ``()`` for all of them, but for a history tensor
    ``(..., slice(width))``, ``width`` being the longest kept history (at least 1) of the rows
    taken.

    ``histories`` maps each ``{d}_len`` key to its domain's history tensors.
    """
    trimmed = {k for keys in histories.values() for k in keys}
    out = {k: take(v, ()) for k, v in batch.items() if k != "data_stats" and k not in trimmed}
    for len_key, keys in histories.items():
        columns = (Ellipsis, slice(max(1, int(out[len_key].max(initial=0)))))
        out.update({k: take(batch[k], columns) for k in keys})
    return out


def _split(batch: Dict[str, np.ndarray], batch_size: int,
           histories: Mapping[str, Sequence[str]]) -> Iterator[Dict[str, np.ndarray]]:
    """``batch_size``-row slices of a converted chunk, histories trimmed (``_trim``); its
    ``data_stats`` go with the first. A slice is a view unless trimming cuts columns."""
    n = batch["label"].shape[0]
    for lo in range(0, n, batch_size):
        part = _trim(batch, histories, lambda v, columns, lo=lo: np.ascontiguousarray(
            v[(slice(lo, lo + batch_size),) + columns]))
        part["data_stats"] = batch["data_stats"] if lo == 0 else \
            np.zeros_like(batch["data_stats"])
        yield part


def _draw(pool: Dict[str, np.ndarray], slots: np.ndarray, held: int, n: int,
          rng: np.random.Generator, histories: Mapping[str, Sequence[str]]
          ) -> Generator[Dict[str, np.ndarray], None, int]:
    """Yields ``n`` random held rows of ``pool`` as a batch (a copy, histories trimmed as in
    ``_trim``) and frees their slots; returns the new number of held rows. The pool's
    ``data_stats`` (the counts of every row converted since the last draw) go with the
    batch, so totals are kept."""
    pick = np.zeros(held, dtype=bool)
    pick[rng.choice(held, size=n, replace=False)] = True
    rows = slots[:held][pick]
    slots[:held] = np.concatenate([slots[:held][~pick], rows])  # drawn slots become free
    batch = _trim(pool, histories, lambda v, columns: v[(rows,) + columns])
    batch["data_stats"] = pool["data_stats"].copy()
    pool["data_stats"][:] = 0
    yield batch
    return held - n


# ----------------------------------------------------------------------------- loaders
class PCVRLoader(DataLoader):
    """A DataLoader over a ``PCVRDataset`` exposing ``set_epoch``, ``stat_names``, ``num_rows``."""

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    @property
    def stat_names(self) -> List[str]:
        return self.dataset.stat_names

    @property
    def num_rows(self) -> int:
        return self.dataset.num_rows


def make_loader(dataset: PCVRDataset, num_workers: int, pin_memory: Optional[bool] = None
                ) -> PCVRLoader:
    """``batch_size=None`` loader; workers are not persistent so that ``set_epoch`` reaches
    them, and ``prefetch_factor`` is only given when there are workers.

    With workers, tensors travel through the ``file_system`` sharing strategy: the default
    one keeps a file descriptor open per tensor in flight and runs out of them (a batch holds
    about 30 tensors) under the usual limit of 1024.
    """
    kwargs: Dict[str, Any] = {}
    if num_workers > 0:
        kwargs["prefetch_factor"] = 2
        torch.multiprocessing.set_sharing_strategy("file_system")
    return PCVRLoader(dataset, batch_size=None, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
                      persistent_workers=False, **kwargs)


def get_pcvr_data(data_dir: str, schema_path: Optional[str], data_cfg: DataConfig,
                  batch_size: int, num_workers: int, buffer_batches: int, train_ratio: float,
                  valid_ratio: float, seed: int, logger: Optional[logging.Logger] = None,
                  pin_memory: Optional[bool] = None
                  ) -> Tuple[PCVRLoader, Optional[PCVRLoader], FeatureLayout, Dict[str, Any]]:
    """Training and validation loaders.

    Args:
        data_dir: folder of ``*.parquet`` or one parquet file.
        schema_path: schema.json (None: ``schema.json`` beside the data).
        data_cfg: conversion flags.
        batch_size, num_workers, buffer_batches, train_ratio, valid_ratio, seed: as the flags.
        logger: where the split is logged (default this module's logger).
        pin_memory: default: when CUDA is available.
    Returns:
        (train loader, validation loader or None when ``valid_ratio == 0``, layout, info);
        ``info`` has ``files``, ``row_groups``, ``rows``, ``train_row_groups``,
        ``train_rows``, ``valid_row_groups``, ``valid_rows``, ``split`` ('row_groups' or
        'rows', the latter for a single row group) and ``stat_names``.
    """
    logger = logger or log
    files = list_parquet_files(data_dir)
    if schema_path is None:
        schema_path = os.path.join(data_dir if os.path.isdir(data_dir)
                                   else os.path.dirname(data_dir), "schema.json")
    layout, _ = load_schema(schema_path, parse_seq_max_lens(data_cfg.seq_max_lens),
                            data_cfg.use_user_activity_dense)
    columns = required_columns(layout, read_labels=True)
    units, _ = scan_parquet(files, columns)
    train, valid = split_row_groups(units, train_ratio, valid_ratio)
    train_ds = PCVRDataset(train, layout, data_cfg, batch_size, shuffle=True,
                           buffer_batches=buffer_batches, seed=seed)
    valid_ds = PCVRDataset(valid, layout, data_cfg, batch_size) if valid else None
    info = {
        "files": files,
        "row_groups": len(units),
        "rows": sum(u.num_rows for u in units),
        "train_row_groups": len(train),
        "train_rows": train_ds.num_rows,
        "valid_row_groups": len(valid),
        "valid_rows": valid_ds.num_rows if valid_ds is not None else 0,
        "split": "rows" if len(units) == 1 and valid else "row_groups",
        "stat_names": train_ds.stat_names,
    }
    logger.info("data: %d file(s), %d row groups, %d rows; train %d rows (%d row groups), "
                "valid %d rows (%d row groups), split by %s", len(files), info["row_groups"],
                info["rows"], info["train_rows"], info["train_row_groups"], info["valid_rows"],
                info["valid_row_groups"], info["split"])
    return (make_loader(train_ds, num_workers, pin_memory),
            make_loader(valid_ds, num_workers, pin_memory) if valid_ds is not None else None,
            layout, info)


def get_eval_loader(data_path: str, layout: FeatureLayout, data_cfg: DataConfig,
                    batch_size: int, num_workers: int, read_labels: bool = False,
                    logger: Optional[logging.Logger] = None, pin_memory: Optional[bool] = None
                    ) -> PCVRLoader:
    """Loader over every row of ``data_path`` (stored order within each worker).

    Labels are read only when ``read_labels`` and every file has ``label_type``; otherwise
    ``label`` is all 0.
    """
    logger = logger or log
    files = list_parquet_files(data_path)
    optional = {LABEL_COLUMN: "scalar"} if read_labels else {}
    units, present = scan_parquet(files, required_columns(layout, False), optional)
    if read_labels and not present:
        logger.warning("%s: '%s' is missing from some file; labels are all 0", data_path,
                       LABEL_COLUMN)
    read_labels = bool(present)
    if not units:
        raise DataError(f"{data_path}: the parquet files hold no rows")
    ds = PCVRDataset(units, layout, data_cfg, batch_size, read_labels=read_labels)
    logger.info("eval data: %d file(s), %d row groups, %d rows", len(files), len(units),
                ds.num_rows)
    return make_loader(ds, num_workers, pin_memory)
