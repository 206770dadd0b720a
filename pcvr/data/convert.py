"""Arrow record batches -> ``Batch`` arrays, and the repair counters every batch carries.

The conversion never loops over rows in Python: every list column is handled through its
Arrow offsets and flattened values (``pcvr.data.events``), with numpy and, for the history
tensors, the compiled loops of ``pcvr.data.kernels`` (one read and one write per kept event;
numpy fallbacks where no C compiler exists). Histories are trimmed per batch: a column beyond
every row's history is padding only, so L_d varies from batch to batch (the model must not
assume ``max_len``).

Fixes relative to the reference:

1. Ids ``>= vocab_size`` map to the out-of-vocabulary id ``vocab_size`` (tables have
   ``vocab_size + 1`` rows) instead of to padding 0, and are counted per column
   (``oov/<column>``); the reference counted them in worker copies that were never
   reported. Ids <= 0, -1 and nulls are still 0; a vocab_size of 0 still zeroes the feature
   (not counted).
2. NaN and +-inf dense values become 0 and are counted per column (``nonfinite/<column>``);
   a null element inside a list (which made the reference raise) is treated as missing (0).
3. The user activity features 900-915 use the **full** stored history: 900-903 are ``log1p``
   of the full history length and the 1/3/5-day counts look at every stored event (the
   reference used the truncated window). ``seq[d].lens`` stays the number of kept events.
4. Paired 62-66 int/dense lists of different lengths in a row are cut to the shorter (both
   are then padded to the schema dim), so every id keeps its own value, and counted
   (``len_mismatch/pair_<fid>``). A row whose history columns differ in length inside one
   domain is counted (``len_mismatch/<domain>``); its event count is the longest side
   column, as in the reference, and missing entries are 0 (a missing timestamp sorts as
   oldest).
5. A timestamp <= 0 inside a history is missing everywhere: time bucket, hour and day of
   week are 0 (the reference gave negative timestamps a real bucket).
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa

from pcvr.batch import Batch, SeqBatch
from pcvr.config import DataConfig
from pcvr.data import kernels
from pcvr.data.events import (Ragged, activity_counts, first_values, flat_events, head_order,
                              order_counts, positions, ragged, recent_order, take)
from pcvr.data.files import LABEL_COLUMN, POSITIVE_LABEL_TYPE, required_columns
from pcvr.errors import ConfigError, SchemaError
from pcvr.schema import (ACTIVITY, ACTIVITY_DOMAINS, ACTIVITY_FIDS, TIME_BUCKET_BOUNDARIES,
                         FeatureLayout, FeatureSpec, SeqDomainSpec)

# Embedding indices (ids, time buckets, hours, days) are int32 (``pcvr.batch``).
ID_DTYPE = np.int32
ID_MAX = int(np.iinfo(ID_DTYPE).max)
# Hour of the week h -> hour id h % 24 + 1 and day-of-week id h // 24 + 1 (1-based: 0 is
# padding); h = 168 marks a missing timestamp or padding and maps to 0.
_NO_HOUR = 168
_HOUR_IDS = np.append(np.arange(168) % 24 + 1, 0).astype(ID_DTYPE)
_DAY_IDS = np.append(np.arange(168) // 24 + 1, 0).astype(ID_DTYPE)
# Time bucket id of a real event's age in seconds = 1 + the number of these edges below it:
# 1..63 (ages <= 5 s, negative ones too, are bucket 1; ages beyond the last edge share bucket
# 63); 0 is a missing timestamp or padding (``kernels.time_features``).
_BUCKET_EDGES = np.array(TIME_BUCKET_BOUNDARIES[:-1], dtype=np.int64)

# The rows of the output a conversion writes: a slice of a fresh batch, or the shuffle pool's
# free slots.
Rows = Union[slice, np.ndarray]


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
        names: ``stat_names(layout)``, e.g. ``loader.stat_names``.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.totals = np.zeros(len(self.names), dtype=np.int64)

    def add(self, batch: Batch) -> None:
        self.totals += np.asarray(batch.data_stats)

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


# ----------------------------------------------------------------------------- conversion
class BatchConverter:
    """Converts Arrow record batches into ``Batch``es of numpy arrays.

    ``converter(rb)`` returns a new batch whose histories are as long as the longest kept one
    of ``rb``; ``converter(rb, out, rows)`` writes the rows of ``rb`` into rows ``rows`` of
    ``out`` (a batch from ``allocate(n)``: how the shuffle pool is filled without a second
    copy), zero-padded to their full length, and adds to ``out.data_stats``.

    Args:
        layout: the feature layout (``schema.load_layout``).
        data_cfg: conversion flags (``seq_keep``, time zone, missing-time padding).
        read_labels: read ``label_type``; otherwise ``label`` is all 0.
    """

    def __init__(self, layout: FeatureLayout, data_cfg: DataConfig, read_labels: bool) -> None:
        if data_cfg.seq_keep not in ("recent", "first"):
            raise ConfigError(f"seq_keep must be 'recent' or 'first', got {data_cfg.seq_keep!r}")
        specs = [*layout.user_int, *layout.item_int, *(s for d in layout.seq for s in d.side)]
        too_big = [s.column for s in specs if s.vocab_size > ID_MAX]
        if too_big:
            raise SchemaError(f"vocab_size above {ID_MAX} does not fit the int32 id tensors: "
                              f"{too_big}")
        self.layout = layout
        self.offset_s = int(round(float(data_cfg.time_zone_offset_hours) * 3600))
        self.missing_as_padding = bool(data_cfg.user_abs_time_missing_as_padding)
        self.read_labels = read_labels
        self.columns = required_columns(layout, read_labels)
        self.stat_names = stat_names(layout)
        self._stat = {name: k for k, name in enumerate(self.stat_names)}
        self._user_int = _IntGroup(layout.user_int, self._stat)
        self._item_int = _IntGroup(layout.item_int, self._stat)
        activity = {s.fid: s.offset for s in layout.activity}
        self._domains = [_DomainConverter(d, data_cfg.seq_keep == "recent", self.offset_s,
                                          activity, self._stat) for d in layout.seq]

    def allocate(self, n_rows: int, lengths: Optional[Mapping[str, int]] = None) -> Batch:
        """A batch of ``n_rows`` rows, uninitialised but ``data_stats`` (a conversion writes
        every element of its rows).

        Args:
            n_rows: B.
            lengths: domain -> history length (default: every domain's ``max_len``).
        """
        lay = self.layout

        def empty(*shape: int, dtype: type = ID_DTYPE) -> np.ndarray:
            return np.empty((n_rows,) + shape, dtype)

        seq = {}
        for d in lay.seq:
            length = lengths[d.name] if lengths is not None else d.max_len
            seq[d.name] = SeqBatch(ids=empty(len(d.side), length), lens=empty(dtype=np.int64),
                                   time_bucket=empty(length), hour=empty(length),
                                   dayofweek=empty(length))
        return Batch(user_int=empty(lay.user_int_dim), item_int=empty(lay.item_int_dim),
                     user_dense=empty(lay.user_dense_dim, dtype=np.float32),
                     item_dense=empty(lay.item_dense_dim, dtype=np.float32),
                     label=empty(dtype=np.float32), timestamp=empty(dtype=np.int64),
                     user_id=empty(dtype=np.int64), hour=empty(), dayofweek=empty(), seq=seq,
                     data_stats=np.zeros(len(self.stat_names), dtype=np.int64))

    def __call__(self, rb: pa.RecordBatch, out: Optional[Batch] = None,
                 rows: Rows = slice(None)) -> Batch:
        cols = {name: ragged(rb.column(name)) for name in self.columns}
        # events per row of each domain: its longest side column
        n = {d.spec.name: d.events_per_row(cols) for d in self._domains}
        if out is None:
            out = self.allocate(rb.num_rows, {
                d.name: max(1, min(d.max_len, int(n[d.name].max(initial=0))))
                for d in self.layout.seq})
        stats = out.data_stats
        stats[0] += rb.num_rows
        self._cut_pairs(cols, stats)

        ts = cols["timestamp"].values.astype(np.int64)
        hours = kernels.hour_of_week(ts, self.offset_s)
        if self.missing_as_padding:
            hours[ts <= 0] = _NO_HOUR
            out.hour[rows], out.dayofweek[rows] = _HOUR_IDS[hours], _DAY_IDS[hours]
        else:
            out.hour[rows], out.dayofweek[rows] = hours % 24, hours // 24
        out.timestamp[rows] = ts
        out.user_id[rows] = cols["user_id"].values
        out.label[rows] = (cols[LABEL_COLUMN].values == POSITIVE_LABEL_TYPE
                           if self.read_labels else 0)
        out.user_int[rows] = self._user_int(cols, rb.num_rows, stats)
        out.item_int[rows] = self._item_int(cols, rb.num_rows, stats)
        dense = self._dense_group(self.layout.user_dense, cols, rb.num_rows, stats)
        for d in self._domains:
            d(cols, n[d.spec.name], ts, out.seq[d.spec.name], rows, stats, dense)
        out.user_dense[rows] = dense
        out.item_dense[rows] = self._dense_group(self.layout.item_dense, cols, rb.num_rows,
                                                 stats)
        return out

    def _cut_pairs(self, cols: Dict[str, Ragged], stats: np.ndarray) -> None:
        """Cuts both lists of every 62-66 pair to the shorter one, row by row (fix 4)."""
        for i, d in self.layout.pairs:
            li, ld = cols[i.column].lens, cols[d.column].lens
            stats[self._stat[f"len_mismatch/pair_{i.fid}"]] += np.count_nonzero(li != ld)
            short = np.minimum(li, ld)
            cols[i.column] = cols[i.column]._replace(lens=short)
            cols[d.column] = cols[d.column]._replace(lens=short)

    def _dense_group(self, specs: Sequence[FeatureSpec], cols: Mapping[str, Ragged],
                     n_rows: int, stats: np.ndarray) -> np.ndarray:
        """float32 ``[n_rows, dim]``: the group's dense lists, non-finite values zeroed and
        counted; the activity columns stay 0 (the domains write them)."""
        out = np.zeros((n_rows, sum(s.length for s in specs)), dtype=np.float32)
        for s in specs:
            r = cols.get(s.column)
            if s.kind == ACTIVITY or not r.values.size:  # every row empty: stays 0
                continue
            mask, pos = positions(r, np.arange(s.length)[None, :])
            x = r.values.take(pos).astype(np.float32, copy=False)
            ok = mask & np.isfinite(x)
            stats[self._stat[f"nonfinite/{s.column}"]] += np.count_nonzero(mask) - \
                np.count_nonzero(ok)
            out[:, s.offset:s.offset + s.length] = np.where(ok, x, np.float32(0))
        return out


class _IntGroup:
    """One int group (user or item) -> ``[B, dim]`` ids: every feature gathered into one
    block, then the block cleaned at once against the per-position vocabulary (one clip, not
    one per feature), out-of-vocabulary ids counted per feature."""

    def __init__(self, specs: Sequence[FeatureSpec], stat: Mapping[str, int]) -> None:
        self.specs = [s for s in specs if s.vocab_size > 0]  # no vocabulary: stays 0
        self.vocab = np.repeat([s.vocab_size for s in specs], [s.length for s in specs])
        self.first = np.array([s.offset for s in specs], dtype=np.int64)
        self.stat = np.array([stat.get(f"oov/{s.column}", -1) for s in specs], dtype=np.int64)

    def __call__(self, cols: Mapping[str, Ragged], n_rows: int, stats: np.ndarray
                 ) -> np.ndarray:
        block = np.zeros((n_rows, self.vocab.size), dtype=np.int64)
        if not self.vocab.size:
            return block
        for s in self.specs:
            r = cols[s.column]
            if s.length == 1:
                block[:, s.offset] = first_values(r)
            else:
                block[:, s.offset:s.offset + s.length] = take(
                    r.values, *positions(r, np.arange(s.length)[None, :]), np.int64)
        np.clip(block, 0, self.vocab, out=block)  # ids <= 0 -> 0, OOV -> vocab, none -> 0
        oov = np.add.reduceat(np.count_nonzero(block == self.vocab, axis=0), self.first)
        counted = self.stat >= 0
        stats[self.stat[counted]] += oov[counted]
        return block


class _DomainConverter:
    """One behaviour domain -> its ``SeqBatch`` rows and, for seq_a..seq_d, its activity
    features.

    Args:
        spec: the domain.
        keep_recent: ``seq_keep == 'recent'`` (else the first stored events).
        offset_s: the time zone offset in seconds.
        activity: activity fid -> its column in the user dense tensor (empty when off).
        stat: counter name -> index in ``data_stats``.
    """

    def __init__(self, spec: SeqDomainSpec, keep_recent: bool, offset_s: int,
                 activity: Mapping[int, int], stat: Mapping[str, int]) -> None:
        self.spec = spec
        self.keep_recent = keep_recent
        self.offset_s = offset_s
        self.activity: Optional[Tuple[int, List[int]]] = None  # (length column, window columns)
        if activity and spec.name in ACTIVITY_DOMAINS:
            k = ACTIVITY_DOMAINS.index(spec.name)  # fid 900 + k; 904 + 3k ..: the windows
            self.activity = (activity[ACTIVITY_FIDS[k]],
                             [activity[f] for f in ACTIVITY_FIDS[4 + 3 * k:4 + 3 * (k + 1)]])
        self.mismatch_stat = stat[f"len_mismatch/{spec.name}"]
        self.oov_stat = [stat.get(f"oov/{s.column}", -1) for s in spec.side]

    def events_per_row(self, cols: Mapping[str, Ragged]) -> np.ndarray:
        """int64 [B]: each row's event count, the longest of the domain's side columns."""
        return np.max([cols[s.column].lens for s in self.spec.side], axis=0)

    def __call__(self, cols: Mapping[str, Ragged], n: np.ndarray, ts_row: np.ndarray,
                 out: SeqBatch, rows: Rows, stats: np.ndarray, dense: np.ndarray) -> None:
        """Writes rows ``rows`` of ``out`` and the activity columns of ``dense``.

        ``n``: events per row. Only the first ``width`` (the longest kept history) columns of
        the history tensors are gathered; the rest of ``out``'s columns, if any, are zeroed.
        """
        d = self.spec
        sides = [cols[s.column] for s in d.side]
        ts_col = cols[d.ts_column] if d.ts_column else None
        lens = [r.lens for r in sides] + ([ts_col.lens] if ts_col is not None else [])
        stats[self.mismatch_stat] += np.count_nonzero(np.any([x != n for x in lens], axis=0))
        kept = np.minimum(n, d.max_len)
        out.lens[rows] = kept
        width = max(1, int(kept.max(initial=0)))
        key = None
        if ts_col is not None and (self.keep_recent or self.activity is not None):
            key = flat_events(ts_col, n).astype(np.int64, copy=False)
            if key.size and key.min() < 0:  # missing or <= 0 timestamps: 0, the oldest
                key = np.maximum(key, 0)
        counts = order_counts(key, n) if key is not None else None
        order = recent_order(key, n, width, counts) if key is not None and self.keep_recent \
            else head_order(n, width)

        # Every row of every history tensor is written whole (zeros after ``width``), into
        # ``out``'s rows ``rows``: a slice of the batch or the shuffle pool's free slots.
        direct = isinstance(rows, slice)
        out_rows = None if direct else np.asarray(rows, dtype=np.int64)
        at = slice(None) if direct else out_rows  # this chunk's rows of the views below
        ids, *times = (x[rows] if direct else x
                       for x in (out.ids, out.time_bucket, out.hour, out.dayofweek))
        for s, r, stat in zip(d.side, sides, self.oov_stat):
            if s.vocab_size == 0:  # no vocabulary: the feature is 0
                ids[at, s.offset] = 0
                continue
            stats[stat] += kernels.gather_ids(r.values, r.starts, r.lens, order, s.vocab_size,
                                              ids[:, s.offset], out_rows)
        if ts_col is None:  # no timestamps: no time bucket, hour or day of week
            for t in times:
                t[at] = 0
        else:
            kernels.time_features(ts_col.values, ts_col.starts, ts_col.lens, order, ts_row,
                                  self.offset_s, _BUCKET_EDGES, *times, out_rows=out_rows)

        if self.activity is not None:
            length_col, window_cols = self.activity
            dense[:, length_col] = np.log1p(n)
            if key is not None:
                dense[:, window_cols] = np.log1p(activity_counts(key, n, ts_row, counts))
