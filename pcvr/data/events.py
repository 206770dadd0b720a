"""Ragged list columns and the order of the events a history keeps.

A list column of a record batch is handled as per-row segments (``starts``, ``lens``) of one
flat value array (``ragged``), never row by row in Python. For every history this module
decides which events are kept and in what order (``recent_order``, ``head_order``, as an
``EventOrder`` that ``pcvr.data.kernels`` gathers through), and counts the events of the
last 1, 3 and 5 days (``activity_counts``).

Fixes relative to the reference:

* histories keep the L **most recent** events by timestamp, newest first (position 0 = most
  recent; ties keep stored order; events whose timestamp is missing or <= 0 count as the
  oldest). The reference keeps the first L stored events, whatever their order (``--seq_keep
  first``, ``head_order``, still does that);
* the activity counts look at every stored event of a row (the full history), not at the
  truncated window, so they do not depend on the storage order.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import numpy as np
import pyarrow as pa

from pcvr.data import kernels
from pcvr.data.files import is_list
from pcvr.data.kernels import EventOrder
from pcvr.schema import ACTIVITY_WINDOWS_S

_WINDOWS = np.asarray(ACTIVITY_WINDOWS_S, dtype=np.int64)


class Ragged(NamedTuple):
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


def ragged(arr: pa.Array) -> Ragged:
    if is_list(arr.type):
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
    return Ragged(starts, lens, vals)


def positions(r: Ragged, idx: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(mask [B, W], flat positions [B, W]) of event ``idx[b, j]`` of each row of ``r``.

    ``idx`` is [B, W] or [1, W]; ``mask`` is ``idx < lens``; masked-out positions are clamped
    into range, so they can be gathered and then zeroed.
    """
    pos = np.minimum(r.starts[:, None] + idx, max(r.values.size - 1, 0))
    return np.less(idx, r.lens[:, None]), pos


def take(values: np.ndarray, mask: np.ndarray, pos: np.ndarray, dtype: type,
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


def flat_events(r: Ragged, n: np.ndarray) -> np.ndarray:
    """Row segments of ``r`` cut or zero-padded to lengths ``n``, concatenated: [sum(n)]."""
    seg = np.cumsum(n) - n
    start = r.starts[0] if n.size else 0
    if np.array_equal(r.lens, n) and np.array_equal(r.starts, start + seg):
        return r.values[start:start + int(n.sum())]  # already contiguous: a view
    rows = np.repeat(np.arange(n.size), n)
    j = np.arange(rows.size, dtype=np.int64) - seg[rows]
    pos = np.minimum(r.starts[rows] + j, max(r.values.size - 1, 0))
    return take(r.values, j < r.lens[rows], pos, r.values.dtype)


def _row_events(values: np.ndarray, n: np.ndarray, rows: np.ndarray
                ) -> Tuple[np.ndarray, np.ndarray]:
    """(the segments of ``rows`` concatenated, their lengths) of ``values`` [sum(n)], whose
    rows have lengths ``n``."""
    n_r = n[rows]
    shift = (np.cumsum(n) - n)[rows] - (np.cumsum(n_r) - n_r)  # segment start, old - new
    return values[np.repeat(shift, n_r) + np.arange(int(n_r.sum()))], n_r


def first_values(r: Ragged) -> np.ndarray:
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


def activity_counts(key: np.ndarray, n: np.ndarray, ts_row: np.ndarray,
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
