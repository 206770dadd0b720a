"""Compiled inner loops of the batch conversion, with numpy equivalents.

The conversion of a history column is memory-bound: numpy has to build a position matrix,
gather int64 values through it, clip them into an int64 temporary and cast that into the int32
output, moving about 36 bytes per kept event. The loops below read each kept value once and
write it once (12 bytes per event), and compute the time bucket, hour and day of week of an
event in the same pass that reads its timestamp.

The C source is compiled on first use with the system C compiler (``$CC``, else ``cc``) into
``$PCVR_KERNEL_DIR`` (default: a per-user folder under the temporary directory), named by the
hash of the source, and loaded with ``ctypes``: no build step, no new dependency, nothing
compiled ahead of time. Where there is no compiler, or ``PCVR_NUMPY_KERNELS=1``, the numpy
versions run instead; both give identical results (``tests/test_dataset.py`` checks).

``gather_ids`` and ``time_features`` take a column's per-row segments (``starts``, ``lens``)
and the ``EventOrder`` of the events each row keeps, and write int32 outputs whose last axis
is contiguous, into the rows ``out_rows`` when given (how the shuffle buffer is filled without
a second copy); ``newest_first`` orders the rows stored in no time order (a top-L selection,
not a full sort). The library is loaded once per process; DataLoader workers inherit it.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import sys
import tempfile
from typing import List, NamedTuple, Optional, Tuple

import numpy as np

log = logging.getLogger(__name__)

C_SOURCE = r"""
#include <stdint.h>

/* The events a row keeps: a run first, first + step, ... (m = kept[b] of them) when
   step[b] != 0, else the indices idx[b, 0 .. m) (rows sorted by other means). Every index is
   checked against the column's own length (a shorter column of the domain is padding there).
   The events of the row two ahead are prefetched: rows are short segments far apart, which
   the hardware prefetcher reaches too late. */
typedef struct {
    const int64_t *starts, *lens, *first, *step, *kept;
    const int32_t *idx;
    int64_t rows, width;
} Order;

static inline void prefetch_row(const Order *o, const int64_t *values, int64_t b) {
    if (b >= o->rows || o->kept[b] == 0) return;
    const int64_t m = o->kept[b], *v = values + o->starts[b];
    if (o->step[b] != 0) {
        const char *p = (const char *)(v + (o->step[b] > 0 ? o->first[b] : o->first[b] - m + 1));
        for (int64_t k = 0; k < m * 8; k += 64) __builtin_prefetch(p + k);
    } else {  /* every event: the row may be in any order */
        const int32_t *ix = o->idx + b * o->width;
        for (int64_t p = 0; p < m; ++p)
            if (ix[p] < o->lens[b]) __builtin_prefetch(v + ix[p]);
    }
}

/* Index of event p of row b, or -1 for padding. */
static inline int64_t event(const Order *o, int64_t b, int64_t p) {
    if (p >= o->kept[b]) return -1;
    const int64_t i = o->step[b] ? o->first[b] + o->step[b] * p : o->idx[b * o->width + p];
    return i < o->lens[b] ? i : -1;
}

static inline int64_t out_row(const int64_t *out_rows, int64_t b) {
    return out_rows ? out_rows[b] : b;
}

/* clamp(x, 0, vocab) as an id, counting the out-of-vocabulary ones (== vocab). */
static inline int32_t store_id(int64_t x, int64_t vocab, int64_t *oov) {
    x = x < 0 ? 0 : (x > vocab ? vocab : x);
    *oov += x == vocab;
    return (int32_t)x;
}

/* out[row(b), p] = clamp(value of event p of row b, 0, vocab), 0 for padding, for
   p < out_width; returns how many outputs equal vocab (the out-of-vocabulary id). */
int64_t gather_ids(const int64_t *values, Order o, int64_t vocab, int32_t *out,
                   int64_t out_stride, int64_t out_width, const int64_t *out_rows) {
    int64_t oov = 0;
    for (int64_t b = 0; b < o.rows; ++b) {
        prefetch_row(&o, values, b + 2);
        const int64_t *v = values + o.starts[b];
        int32_t *dst = out + out_row(out_rows, b) * out_stride;
        const int64_t m = o.kept[b], f = o.first[b], s = o.step[b];
        int64_t p = 0;
        if (s != 0 && (s > 0 ? f + m - 1 : f) < o.lens[b]) {  /* a run inside the column */
            const int64_t *src = v + f;
            if (s < 0) for (; p < m; ++p) dst[p] = store_id(src[-p], vocab, &oov);
            else for (; p < m; ++p) dst[p] = store_id(src[p], vocab, &oov);
        } else {
            for (; p < m; ++p) {
                const int64_t i = event(&o, b, p);
                dst[p] = store_id(i < 0 ? 0 : v[i], vocab, &oov);
            }
        }
        for (; p < out_width; ++p) dst[p] = 0;
    }
    return oov;
}

static inline int64_t floor_div(int64_t a, int64_t b) {
    const int64_t q = a / b;
    return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

/* Time bucket, hour and day-of-week ids of every kept event of timestamp column ts: 0 for
   padding and timestamps <= 0; else bucket = 1 + #(edges < ts_row[b] - t) and, with h the
   hour of the week of t + shift seconds (shift: time zone + 3 days, as 1970-01-01 was a
   Thursday), hour = h % 24 + 1 and day = h / 24 + 1. */
void time_features(const int64_t *ts, Order o, const int64_t *ts_row, int64_t shift,
                   const int64_t *edges, int64_t n_edges, int32_t *bucket, int32_t *hour,
                   int32_t *day, int64_t out_stride, int64_t out_width,
                   const int64_t *out_rows) {
    for (int64_t b = 0; b < o.rows; ++b) {
        prefetch_row(&o, ts, b + 2);
        const int64_t *v = ts + o.starts[b];
        const int64_t now = ts_row[b], r = out_row(out_rows, b) * out_stride;
        for (int64_t p = 0; p < out_width; ++p) {
            const int64_t i = p < o.width ? event(&o, b, p) : -1;
            const int64_t t = i < 0 ? 0 : v[i];
            if (t <= 0) {
                bucket[r + p] = hour[r + p] = day[r + p] = 0;
                continue;
            }
            const int64_t age = now - t;
            int64_t lo = 0, hi = n_edges;
            while (lo < hi) {
                const int64_t mid = (lo + hi) >> 1;
                if (edges[mid] < age) lo = mid + 1; else hi = mid;
            }
            int64_t h = floor_div(t + shift, 3600);
            h -= floor_div(h, 168) * 168;
            bucket[r + p] = (int32_t)(lo + 1);
            hour[r + p] = (int32_t)(h % 24 + 1);
            day[r + p] = (int32_t)(h / 24 + 1);
        }
    }
}
/* Newest-first order of unsorted rows: for each row r of rows, idx[r, 0 .. m) = the indices of
   its m = min(n[r], width) most recent events (key descending, ties in stored order), PAD
   after. Keys are compared as (key descending, index ascending), a total order, so a
   quickselect of the m first then a sort of those m gives exactly the stable sort's head.
   scratch: room for 2 * max(n) int64. */
typedef struct { int64_t key, i; } Event;

static inline int before(Event a, Event b) {  /* a sorts before b */
    return a.key > b.key || (a.key == b.key && a.i < b.i);
}

static void select_head(Event *e, int64_t n, int64_t m) {  /* e[0 .. m) = the m first */
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        const int64_t mid = lo + ((hi - lo) >> 1);
        Event a = e[lo], b = e[mid], c = e[hi], pivot;  /* median of three */
        if (before(a, b)) pivot = before(b, c) ? b : (before(a, c) ? c : a);
        else pivot = before(a, c) ? a : (before(b, c) ? c : b);
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (before(e[i], pivot)) ++i;
            while (before(pivot, e[j])) --j;
            if (i <= j) { Event t = e[i]; e[i] = e[j]; e[j] = t; ++i; --j; }
        }
        if (m - 1 <= j) hi = j; else if (m - 1 >= i) lo = i; else return;
    }
}

static void sort_events(Event *e, Event *tmp, int64_t n) {  /* merge sort */
    if (n < 2) return;
    if (n <= 16) {
        for (int64_t i = 1; i < n; ++i) {
            Event x = e[i];
            int64_t j = i;
            for (; j > 0 && before(x, e[j - 1]); --j) e[j] = e[j - 1];
            e[j] = x;
        }
        return;
    }
    const int64_t h = n >> 1;
    sort_events(e, tmp, h);
    sort_events(e + h, tmp, n - h);
    int64_t a = 0, b = h, k = 0;
    while (a < h && b < n) tmp[k++] = before(e[b], e[a]) ? e[b++] : e[a++];
    while (a < h) tmp[k++] = e[a++];
    while (b < n) tmp[k++] = e[b++];
    for (k = 0; k < n; ++k) e[k] = tmp[k];
}

void newest_first(const int64_t *key, const int64_t *seg, const int64_t *n,
                  const int64_t *rows, int64_t n_rows, int64_t width, int32_t pad,
                  int32_t *idx, Event *scratch) {
    for (int64_t k = 0; k < n_rows; ++k) {
        const int64_t r = rows[k], len = n[r], m = len < width ? len : width;
        const int64_t *v = key + seg[r];
        Event *e = scratch, *tmp = scratch + len;
        for (int64_t i = 0; i < len; ++i) { e[i].key = v[i]; e[i].i = i; }
        if (m < len) select_head(e, len, m);
        sort_events(e, tmp, m);
        int32_t *out = idx + r * width;
        for (int64_t p = 0; p < width; ++p) out[p] = p < m ? (int32_t)e[p].i : pad;
    }
}
"""

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
PAD = np.int32(np.iinfo(np.int32).max)  # event index of a padding position (>= any length)


class EventOrder(NamedTuple):
    """The events each of B rows keeps, in output order, W positions at most.

    ``idx[b, p]`` is the index of the event at position ``p`` within row ``b``'s segment,
    ``PAD`` after its ``kept[b]`` events. Where ``step[b]`` is +1 or -1 the row's indices
    are also the run ``first[b] + step[b] * p`` (a row stored in time order), which the
    compiled loops copy without reading ``idx``.
    """
    idx: np.ndarray    # int32 [B, W]
    kept: np.ndarray   # int64 [B], <= W
    first: np.ndarray  # int64 [B]
    step: np.ndarray   # int64 [B]: +1, -1, or 0 (only idx describes the row)


class _Order(ctypes.Structure):
    _fields_ = [("starts", _PTR), ("lens", _PTR), ("first", _PTR), ("step", _PTR),
                ("kept", _PTR), ("idx", _PTR), ("rows", _I64), ("width", _I64)]


def _kernel_dir() -> str:
    default = os.path.join(tempfile.gettempdir(), f"pcvr_kernels_{os.getuid()}")
    return os.environ.get("PCVR_KERNEL_DIR") or default


@functools.lru_cache(maxsize=None)
def library() -> Optional[ctypes.CDLL]:
    """The compiled kernels, or None (numpy fallback) when disabled or nothing compiles.

    Compiled at most once per source version: concurrent processes each write a private file
    and rename it into place, so a reader never sees a half-written library.
    """
    if os.environ.get("PCVR_NUMPY_KERNELS") == "1":
        return None
    digest = hashlib.sha256(C_SOURCE.encode()).hexdigest()[:16]
    folder = _kernel_dir()
    path = os.path.join(folder, f"conversion_{platform.machine()}_{digest}.so")
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        info = os.stat(folder)
        if info.st_uid != os.getuid() or info.st_mode & 0o022:
            raise OSError(f"{folder} is not a folder of this user's alone")
        if not os.path.isfile(path):
            src = os.path.join(folder, f"conversion_{digest}.{os.getpid()}.c")
            tmp = src[:-2] + ".so"
            try:
                with open(src, "w", encoding="utf-8") as fh:
                    fh.write(C_SOURCE)
                cmd = [os.environ.get("CC", "cc"), "-O3", "-shared", "-fPIC", "-o", tmp, src]
                subprocess.run(cmd, check=True, capture_output=True, timeout=120)
                os.replace(tmp, path)
            finally:
                for leftover in (src, tmp):
                    if os.path.exists(leftover):
                        os.remove(leftover)
        lib = ctypes.CDLL(path)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        log.warning("compiled conversion kernels unavailable (%s%s); using numpy", exc,
                    ": " + detail.decode(errors="replace")[-300:] if detail else "")
        return None
    lib.gather_ids.restype = _I64
    lib.gather_ids.argtypes = [_PTR, _Order, _I64, _PTR, _I64, _I64, _PTR]
    lib.newest_first.restype = None
    lib.newest_first.argtypes = [_PTR, _PTR, _PTR, _PTR, _I64, _I64, ctypes.c_int32, _PTR, _PTR]
    lib.time_features.restype = None
    lib.time_features.argtypes = [_PTR, _Order, _PTR, _I64, _PTR, _I64, _PTR, _PTR, _PTR, _I64,
                                  _I64, _PTR]
    return lib


def hour_of_week(ts: np.ndarray, offset_s: int) -> np.ndarray:
    """int64: the hour of the week 0..167 (0 = Monday 00:00) of Unix seconds ``ts`` shifted by
    ``offset_s`` (1970-01-01 was a Thursday)."""
    return (np.asarray(ts, dtype=np.int64) + (int(offset_s) + 3 * 86400)) // 3600 % 168


def _i64(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.int64)


def _c_order(order: EventOrder, starts: np.ndarray, lens: np.ndarray
             ) -> Tuple[_Order, List[np.ndarray]]:
    """The C view of ``order`` for a column, and the arrays it points into (keep them alive
    through the call)."""
    idx = order.idx
    if idx.dtype != np.int32 or not idx.flags.c_contiguous:
        raise ValueError("EventOrder.idx must be a C-contiguous int32 [B, W] array")
    arrays = [_i64(a) for a in (starts, lens, order.first, order.step, order.kept)]
    if any(a.shape != (idx.shape[0],) for a in arrays):
        raise ValueError("starts, lens and the EventOrder fields must have one entry per row")
    return _Order(*(a.ctypes.data for a in arrays), idx.ctypes.data, idx.shape[0],
                  idx.shape[1]), arrays


def _target(out: np.ndarray, out_rows: Optional[np.ndarray], rows: int) -> int:
    """Row stride, in elements, of an int32 [R, W'] output with a contiguous last axis."""
    if out.dtype != np.int32 or out.ndim != 2 or (out.shape[1] > 1 and out.strides[1] != 4):
        raise ValueError(f"outputs must be int32 [R, W] with a contiguous last axis, got "
                         f"{out.dtype} {out.shape} strides {out.strides}")
    if out_rows is None and out.shape[0] != rows:
        raise ValueError(f"output has {out.shape[0]} rows for {rows} input rows")
    if out_rows is not None and (out_rows.shape != (rows,) or (
            rows and not 0 <= out_rows.min() <= out_rows.max() < out.shape[0])):
        raise ValueError("out_rows must hold one valid output row per input row")
    return out.strides[0] // 4


def _gathered(values: np.ndarray, starts: np.ndarray, lens: np.ndarray, idx: np.ndarray
              ) -> np.ndarray:
    """numpy: int64 [B, W], the value of each kept event (0 for padding)."""
    if not values.size:
        return np.zeros(idx.shape, np.int64)
    pos = np.minimum(starts[:, None] + idx, values.size - 1)
    return values.take(pos) * (idx < lens[:, None])


def _store(out: np.ndarray, out_rows: Optional[np.ndarray], block: np.ndarray) -> None:
    """numpy: ``block`` [B, W] into the first W columns of the output rows, zeros after."""
    w = block.shape[1]
    rows = slice(None) if out_rows is None else out_rows
    out[rows, :w] = block
    if out.shape[1] > w:
        out[rows, w:] = 0


def gather_ids(values: np.ndarray, starts: np.ndarray, lens: np.ndarray, order: EventOrder,
               vocab: int, out: np.ndarray, out_rows: Optional[np.ndarray] = None) -> int:
    """Writes ``clip(value, 0, vocab)`` of each kept event into ``out``, 0 for padding.

    Args:
        values: integer [N], the column's flat values (nested nulls already 0).
        starts, lens: int64 [B], each row's segment of ``values``.
        order: the kept events (positions >= ``lens[b]`` are padding too).
        vocab: vocabulary size (> 0): ids <= 0 become 0, ids >= vocab become vocab.
        out: int32 [R, W'] with W' >= W and a contiguous last axis; columns W.. are zeroed.
        out_rows: int64 [B], the row of ``out`` for each input row (default: row b).
    Returns:
        How many ids were out of vocabulary (written as ``vocab``).
    """
    B = order.idx.shape[0]
    stride = _target(out, out_rows, B)
    lib = library()
    if lib is None:
        block = np.clip(_gathered(values, _i64(starts), _i64(lens), order.idx), 0, vocab)
        _store(out, out_rows, block.astype(np.int32))
        return int(np.count_nonzero(block == vocab))
    values = _i64(values)
    rows = None if out_rows is None else _i64(out_rows)
    c, _held = _c_order(order, starts, lens)
    return int(lib.gather_ids(values.ctypes.data, c, int(vocab), out.ctypes.data, stride,
                              out.shape[1], None if rows is None else rows.ctypes.data))


def newest_first(key: np.ndarray, n: np.ndarray, rows: np.ndarray, idx: np.ndarray) -> None:
    """Writes the newest-first order of rows stored in no time order into ``idx``.

    Args:
        key: int64 [sum(n)], every row's event timestamps in stored order.
        n: int64 [B], events per row.
        rows: int64 [R], the rows to order.
        idx: int32 [B, W]; row r gets the indices of its min(n[r], W) most recent events,
            newest first, ties in stored order, then ``PAD``.
    """
    key, n, rows = _i64(key), _i64(n), _i64(rows)
    width = idx.shape[1]
    if idx.dtype != np.int32 or not idx.flags.c_contiguous or idx.shape[0] != n.size:
        raise ValueError("idx must be a C-contiguous int32 [B, W] array")
    seg = np.cumsum(n) - n
    lib = library()
    if lib is None:
        n_o = n[rows]
        row_of = np.repeat(rows, n_o)
        j = np.arange(int(n_o.sum()), dtype=np.int64) - np.repeat(np.cumsum(n_o) - n_o, n_o)
        order = np.lexsort((-key[seg[row_of] + j], row_of))  # newest first, stable
        sel = j < width  # rank within the row equals j: rows keep their segment layout
        idx[rows] = PAD
        idx[row_of[sel], j[sel]] = j[order[sel]]
        return
    scratch = np.empty(4 * int(n[rows].max(initial=0)), np.int64)  # 2 * max(n) events
    lib.newest_first(key.ctypes.data, seg.ctypes.data, n.ctypes.data, rows.ctypes.data,
                     rows.size, width, int(PAD), idx.ctypes.data, scratch.ctypes.data)


def time_features(ts: np.ndarray, starts: np.ndarray, lens: np.ndarray, order: EventOrder,
                  ts_row: np.ndarray, offset_s: int, edges: np.ndarray, bucket: np.ndarray,
                  hour: np.ndarray, day: np.ndarray, out_rows: Optional[np.ndarray] = None
                  ) -> None:
    """Writes the time bucket, hour and day-of-week ids of each kept event.

    Args:
        ts, starts, lens, order, out_rows: the timestamp column and its kept events, as in
            ``gather_ids``.
        ts_row: int64 [B], each row's request timestamp.
        offset_s: time-zone offset in seconds.
        edges: int64 [E], sorted: bucket = 1 + the number of edges below the age
            ``ts_row - t``.
        bucket, hour, day: int32 outputs as ``out`` of ``gather_ids`` (one row stride): 0
            where the event is padding or its timestamp is <= 0, else hour = hour of the day
            + 1 and day = day of the week + 1 (Monday = 1).
    """
    B = order.idx.shape[0]
    stride = _target(bucket, out_rows, B)
    if _target(hour, out_rows, B) != stride or _target(day, out_rows, B) != stride or \
            not bucket.shape == hour.shape == day.shape:
        raise ValueError("bucket, hour and day must have one shape and row stride")
    ts_row, edges = _i64(ts_row), _i64(edges)
    lib = library()
    if lib is None:
        t = _gathered(ts, _i64(starts), _i64(lens), order.idx)
        real = t > 0
        h = hour_of_week(t, offset_s)
        for out, ids in ((bucket, 1 + np.searchsorted(edges, ts_row[:, None] - t)),
                         (hour, h % 24 + 1), (day, h // 24 + 1)):
            _store(out, out_rows, np.where(real, ids, 0).astype(np.int32))
        return
    ts = _i64(ts)
    rows = None if out_rows is None else _i64(out_rows)
    c, _held = _c_order(order, starts, lens)
    shift = int(offset_s) + 3 * 86400  # as in hour_of_week
    lib.time_features(ts.ctypes.data, c, ts_row.ctypes.data, shift, edges.ctypes.data,
                      edges.size, bucket.ctypes.data, hour.ctypes.data, day.ctypes.data,
                      stride, bucket.shape[1], None if rows is None else rows.ctypes.data)


if __name__ == "__main__":  # python3 kernels.py: compile now and say where
    logging.basicConfig(level=logging.INFO)
    print("compiled kernels:", library() is not None, "in", _kernel_dir(), file=sys.stderr)
