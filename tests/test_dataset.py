"""The data pipeline (pcvr/data): the golden example, vectorised conversion against a per-row
reference, bad input, splits, shuffling and workers."""
import bisect
import contextlib
import math
import os
from unittest import mock

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pcvr.data.convert as convert_module
import pcvr.data.events as events
import pcvr.data.files as files
import pcvr.data.kernels as kernels
from pcvr.data.loaders import get_eval_loader, get_pcvr_data, make_loader
from pcvr.data.stream import PCVRDataset
from _parquet_util import (flat, GOLDEN_SCHEMA, GOLDEN_SEQ_MAX_LENS, INT_LIST, T, TINY_SCHEMA,
                           TINY_SEQ_MAX_LENS, golden_table, tiny_table, varied_table,
                           write_dataset)
from pcvr.config import DataConfig, parse_seq_max_lens
from pcvr.config import TrainConfig
from pcvr.data.convert import BatchConverter, DataStats
from pcvr.data.events import recent_order
from pcvr.data.files import DataError, split_row_groups
from pcvr.schema import NUM_TIME_BUCKETS, PAIR_FIDS, TIME_BUCKET_BOUNDARIES, parse_schema

LN2, LN3, LN4 = math.log1p(1), math.log1p(2), math.log1p(3)
DOMAINS = ("seq_a", "seq_b", "seq_c", "seq_d")
HISTORY_SUFFIXES = ("", "_time_bucket", "_hour", "_dayofweek")


def layout_of(schema, seq_max_lens, activity=True):
    return parse_schema(schema, parse_seq_max_lens(seq_max_lens), activity)


def convert(table, schema, seq_max_lens, read_labels=True, **cfg):
    data_cfg = DataConfig(seq_max_lens=seq_max_lens, **cfg)
    layout = layout_of(schema, seq_max_lens, data_cfg.use_user_activity_dense)
    conv = BatchConverter(layout, data_cfg, read_labels)
    rb = table.select(list(conv.columns)).combine_chunks().to_batches()[0]
    return flat(conv(rb)), conv


def train_cfg(batch_size: int, **kw) -> TrainConfig:
    """Loader settings of the tests: no workers, no shuffle buffer, no held-out rows."""
    return TrainConfig(**dict(dict(batch_size=batch_size, num_workers=0, buffer_batches=0,
                                   train_ratio=1.0, valid_ratio=0.0, seed=0), **kw))


def stats_of(batch, conv):
    return {n: int(v) for n, v in zip(conv.stat_names, batch["data_stats"]) if v}


# ----------------------------------------------------------------------------- golden example
def test_time_buckets_are_the_reference_ones():
    assert len(TIME_BUCKET_BOUNDARIES) == 63 and NUM_TIME_BUCKETS == 64
    bucket = np.minimum(np.searchsorted(TIME_BUCKET_BOUNDARIES, [0, 5, 6, 10, 86400, 10**9]),
                        62) + 1
    assert bucket.tolist() == [1, 1, 2, 2, 47, 63]


def test_golden_example(tmp_path):
    """pipeline_spec Appendix A through the real loader; changed values name their fix."""
    write_dataset(str(tmp_path), [golden_table()], GOLDEN_SCHEMA)
    cfg = DataConfig(seq_max_lens=GOLDEN_SEQ_MAX_LENS, time_zone_offset_hours=8)
    layout = layout_of(GOLDEN_SCHEMA, GOLDEN_SEQ_MAX_LENS)
    train, valid, info = get_pcvr_data(str(tmp_path), layout, cfg, train_cfg(8, valid_ratio=0.0))
    assert valid is None and info["rows"] == 3
    (batch,) = list(train)
    b = flat(batch)
    got = {k: v.tolist() for k, v in b.items()}
    assert got["label"] == [1.0, 0.0, 0.0]
    assert got["user_id"] == [10, 11, 12]
    # Fix 2 (OOV id): 12 >= vocab 10 is now the OOV id 10, not 0.
    assert got["user_int_feats"] == [[3, 1, 2, 3], [0, 0, 10, 0], [0, 0, 0, 0]]
    # Fix 2: 7 >= vocab 7 is now the OOV id 7.
    assert got["item_int_feats"] == [[6], [7], [0]]
    assert got["timestamp"] == [T, T, 0]
    assert got["hour"] == [16, 16, 8] and got["dayofweek"] == [3, 3, 3]
    # Fix 1 (newest first): stored [T-10, T-90000, T] keeps T (id 7) then T-10 (id 5), not
    # the first two stored events; so the buckets are [1, 2] (was [2, 48]), hours [17, 17].
    assert got["seq_a"] == [[[7, 5]], [[0, 0]], [[0, 0]]]
    assert got["seq_a_len"] == [2, 0, 0]
    assert got["seq_a_time_bucket"] == [[1, 2], [0, 0], [0, 0]]
    assert got["seq_a_hour"] == [[17, 17], [0, 0], [0, 0]]
    assert got["seq_a_dayofweek"] == [[4, 4], [0, 0], [0, 0]]
    # Histories are trimmed to the batch's longest kept one: seq_b keeps 1 event of 4.
    assert got["seq_b"] == [[[1]], [[2]], [[3]]]
    assert got["seq_b_len"] == [1, 1, 1]
    assert [r[0] for r in got["seq_b_time_bucket"]] == [13, 50, 1]
    assert [r[0] for r in got["seq_b_hour"]] == [17, 17, 9]
    assert [r[0] for r in got["seq_b_dayofweek"]] == [4, 7, 4]
    assert got["seq_c"][0] == [[1, 1]] and got["seq_c_len"] == [2, 0, 0]
    assert got["seq_c_time_bucket"][0] == [1, 0]
    assert got["seq_d"][0] == [[4, 4]] and got["seq_d_len"] == [2, 0, 0]
    assert got["seq_d_time_bucket"][0] == [1, 63]
    assert got["seq_d_hour"][0] == [17, 18] and got["seq_d_dayofweek"][0] == [4, 3]
    # Fix 5 (full history): fid 900 is log1p(3 stored events) = ln4, not log1p(2) = ln3.
    expected_dense = [
        [1.5, 2.5, LN4, LN2, LN3, LN3, LN2, LN3, LN3, LN2, LN2, LN2, 0, 0, 0, LN2, LN2, LN2],
        [3.0, 0, 0, LN2, 0, 0, 0, 0, 0, 0, 0, LN2, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, LN2] + [0] * 14,
    ]
    np.testing.assert_allclose(got["user_dense_feats"], expected_dense, rtol=1e-6)
    assert b["item_dense_feats"].shape == (3, 0)
    seq_keys = {d + s for d in DOMAINS
                for s in ("", "_len", "_time_bucket", "_hour", "_dayofweek")}
    floats = {"label", "user_dense_feats", "item_dense_feats"}  # label: float32, not int64
    longs = {"timestamp", "user_id", "data_stats"} | {d + "_len" for d in DOMAINS}
    assert set(b) == seq_keys | floats | {"user_int_feats", "item_int_feats", "timestamp",
                                          "hour", "dayofweek", "user_id", "data_stats"}
    # Embedding indices are int32, what nn.Embedding takes without a cast.
    assert all(v.dtype == (torch.float32 if k in floats else torch.int64 if k in longs
                           else torch.int32) for k, v in b.items())
    assert all(v.is_contiguous() for v in b.values())
    stats = DataStats(train.stat_names)
    stats.add(batch)
    assert {k: v for k, v in stats.as_dict().items() if v} == {
        "rows": 3, "oov/user_int_feats_15": 1, "oov/item_int_feats_5": 1}
    assert stats.summary_lines() == ["3 rows", "oov: user_int_feats_15=1, item_int_feats_5=1"]


def test_golden_example_head_truncation_and_padding_ids():
    """seq_keep='first' restores the reference's seq_a; missing-as-padding shifts user time."""
    b, _ = convert(golden_table(), GOLDEN_SCHEMA, GOLDEN_SEQ_MAX_LENS, seq_keep="first",
                   time_zone_offset_hours=8, user_abs_time_missing_as_padding=True)
    assert b["seq_a"][0].tolist() == [[5, 6]]
    assert b["seq_a_time_bucket"][0].tolist() == [2, 48]
    assert b["seq_a_hour"][0].tolist() == [17, 16] and b["seq_a_dayofweek"][0].tolist() == [4, 3]
    assert b["hour"].tolist() == [17, 17, 0] and b["dayofweek"].tolist() == [4, 4, 0]


# ----------------------------------------------------------------------------- per-row reference
PROP_SCHEMA = {
    "user_int": [[1, 5, 1], [15, 10, 3], [62, 7, 3], [80, 0, 2]],
    "item_int": [[5, 7, 1], [11, 9, 2]],
    "user_dense": [[61, 2], [62, 3]],
    "item_dense": [[70, 2]],
    "seq": {
        "seq_a": {"prefix": "domain_a_seq", "ts_fid": 39, "features": [[38, 9], [39, 0], [40, 0]]},
        "seq_b": {"prefix": "domain_b_seq", "ts_fid": 67, "features": [[67, 0], [68, 4]]},
        "seq_c": {"prefix": "domain_c_seq", "ts_fid": 27, "features": [[27, 0], [28, 6]]},
        "seq_d": {"prefix": "domain_d_seq", "ts_fid": 26, "features": [[17, 5], [26, 0]]},
        "seq_e": {"prefix": "domain_e_seq", "features": [[90, 8], [91, 3]]},
    },
}
PROP_LENS = "seq_a:3,seq_b:1,seq_c:4,seq_d:2,seq_e:3"
WINDOWS = (86400, 3 * 86400, 5 * 86400)


def clean_id(x, vocab):
    if vocab == 0 or x is None or x <= 0:
        return 0, False
    return (vocab, True) if x >= vocab else (x, False)


def slow_convert(rows, layout, cfg, read_labels):
    """Obviously correct, one row and one element at a time."""
    off = int(round(cfg.time_zone_offset_hours * 3600))
    names = convert_module.stat_names(layout)
    stats = dict.fromkeys(names, 0)
    stats["rows"] = len(rows)
    out = {k: [] for k in ("user_int_feats", "item_int_feats", "user_dense_feats",
                           "item_dense_feats", "label", "timestamp", "hour", "dayofweek",
                           "user_id")}
    for d in layout.seq:
        for suffix in ("", "_len", "_time_bucket", "_hour", "_dayofweek"):
            out[d.name + suffix] = []
    dense_fids = {s.fid for s in layout.user_dense}
    pair_fids = [s.fid for s in layout.user_int if s.fid in PAIR_FIDS and s.fid in dense_fids]
    for row in rows:
        T_ = row["timestamp"] or 0
        pairs = {}
        for fid in pair_fids:
            li = row[f"user_int_feats_{fid}"]
            ld = row[f"user_dense_feats_{fid}"]
            li, ld = len(li or []), len(ld or [])
            stats[f"len_mismatch/pair_{fid}"] += li != ld
            pairs[fid] = min(li, ld)

        def as_list(v, fid, group):
            v = [v] if not isinstance(v, (list, type(None))) else (v or [])
            if group.startswith("user") and fid in pairs:
                v = v[:pairs[fid]]
            return v

        for group, specs in (("user_int_feats", layout.user_int),
                             ("item_int_feats", layout.item_int)):
            vec = []
            for s in specs:
                vals = as_list(row[s.column], s.fid, group)[:s.length]
                vals = vals + [0] * (s.length - len(vals))
                for x in vals:
                    y, oov = clean_id(x, s.vocab_size)
                    stats[f"oov/{s.column}"] = stats.get(f"oov/{s.column}", 0) + oov
                    vec.append(y)
            out[group].append(vec)
        for group, specs in (("user_dense_feats", layout.user_dense),
                             ("item_dense_feats", layout.item_dense)):
            vec = []
            for s in specs:
                if s.fid >= 900:
                    vec += [None] * s.length  # filled below
                    continue
                vals = as_list(row[s.column], s.fid, group)[:s.length]
                for x in vals:
                    bad = x is not None and not math.isfinite(x)
                    stats[f"nonfinite/{s.column}"] += bad
                    vec.append(0.0 if x is None or bad else float(np.float32(x)))
                vec += [0.0] * (s.length - len(vals))
            out[group].append(vec)
        out["label"].append(1.0 if read_labels and row.get("label_type") == 2 else 0.0)
        out["timestamp"].append(T_)
        hour, dow = ((T_ + off) // 3600) % 24, ((T_ + off) // 86400 + 3) % 7
        if cfg.user_abs_time_missing_as_padding:
            hour, dow = (hour + 1, dow + 1) if T_ > 0 else (0, 0)
        out["hour"].append(hour)
        out["dayofweek"].append(dow)
        out["user_id"].append(row["user_id"])
        for d in layout.seq:
            sides = [row[s.column] or [] for s in d.side]
            ts = (row[d.ts_column] or []) if d.ts_column else None
            n = max(len(x) for x in sides)
            stats[f"len_mismatch/{d.name}"] += any(
                len(x) != n for x in sides + ([ts] if ts is not None else []))
            key = [(ts[j] if j < len(ts) and ts[j] is not None and ts[j] > 0 else 0)
                   for j in range(n)] if ts is not None else None
            order = list(range(n))
            if key is not None and cfg.seq_keep == "recent":
                order = sorted(order, key=lambda j: -key[j])  # stable: ties keep stored order
            kept = order[:d.max_len]
            pad = d.max_len - len(kept)
            seq = []
            for s, lst in zip(d.side, sides):
                vals = []
                for j in kept:
                    y, oov = clean_id(lst[j] if j < len(lst) else 0, s.vocab_size)
                    stats[f"oov/{s.column}"] = stats.get(f"oov/{s.column}", 0) + oov
                    vals.append(y)
                seq.append(vals + [0] * pad)
            out[d.name].append(seq)
            out[d.name + "_len"].append(len(kept))
            tb, hr, dw = [], [], []
            for j in kept:
                t = key[j] if key is not None else 0
                if t <= 0:  # padding and missing timestamps
                    tb.append(0)
                    hr.append(0)
                    dw.append(0)
                    continue
                delta = max(T_ - t, 0)
                tb.append(min(bisect.bisect_left(TIME_BUCKET_BOUNDARIES, delta), 62) + 1)
                hr.append(((t + off) // 3600) % 24 + 1)
                dw.append(((t + off) // 86400 + 3) % 7 + 1)
            out[d.name + "_time_bucket"].append(tb + [0] * pad)
            out[d.name + "_hour"].append(hr + [0] * pad)
            out[d.name + "_dayofweek"].append(dw + [0] * pad)
            if layout.activity and d.name in ("seq_a", "seq_b", "seq_c", "seq_d"):
                k = "abcd".index(d.name[-1])
                dense = out["user_dense_feats"][-1]
                base = [s.offset for s in layout.user_dense if s.fid == 900][0]
                dense[base + k] = math.log1p(n)
                for w, W in enumerate(WINDOWS):
                    c = sum(1 for t in key if t > 0 and 0 < T_ - t <= W)
                    dense[base + 4 + 3 * k + w] = math.log1p(c)
    res = {k: np.asarray(v) for k, v in out.items()}
    res["data_stats"] = np.asarray([stats[n] for n in names])
    return res


ids = st.one_of(st.none(), st.sampled_from([0, -1, -7]), st.integers(1, 12))
floats = st.one_of(st.none(), st.floats(width=32), st.sampled_from([float("nan"), float("inf")]))
stamps = st.one_of(st.none(), st.sampled_from([0, -5, T, T - 1, T + 30, T - 86400, T - 86401,
                                               T - 3 * 86400, T - 5 * 86400, T - 400 * 86400]),
                   st.integers(T - 6 * 86400, T + 100))


@st.composite
def prop_rows(draw):
    rows = []
    for _ in range(draw(st.integers(1, 6))):
        row = {"user_id": draw(st.integers(0, 10**12)),
               "timestamp": draw(st.one_of(st.none(), st.sampled_from([0, T, T + 7]))),
               "label_type": draw(st.one_of(st.none(), st.integers(0, 3)))}
        for group, specs in (("user_int", PROP_SCHEMA["user_int"]),
                             ("item_int", PROP_SCHEMA["item_int"])):
            for fid, _, dim in specs:
                lst = st.one_of(st.none(), st.lists(ids, max_size=dim + 2))
                row[f"{group}_feats_{fid}"] = draw(ids if dim == 1 else lst)
        for group in ("user_dense", "item_dense"):
            for fid, dim in PROP_SCHEMA[group]:
                row[f"{group}_feats_{fid}"] = draw(st.one_of(st.none(),
                                                             st.lists(floats, max_size=dim + 2)))
        for dom in PROP_SCHEMA["seq"].values():
            n = draw(st.integers(0, 7))
            for fid, _ in dom["features"]:
                values = stamps if fid == dom.get("ts_fid") else ids
                size = draw(st.integers(0, 7)) if draw(st.integers(0, 3)) == 0 else n
                null = draw(st.integers(0, 9)) == 0
                row[f"{dom['prefix']}_{fid}"] = None if null else draw(
                    st.lists(values, min_size=size, max_size=size))
        rows.append(row)
    return rows


def to_table(rows):
    types = {"user_id": pa.int64(), "timestamp": pa.int64(), "label_type": pa.int32()}
    for group in ("user_int", "item_int"):
        for fid, _, dim in PROP_SCHEMA[group]:
            types[f"{group}_feats_{fid}"] = pa.int64() if dim == 1 else INT_LIST
    for group in ("user_dense", "item_dense"):
        for fid, _ in PROP_SCHEMA[group]:
            types[f"{group}_feats_{fid}"] = pa.list_(pa.float32())
    for dom in PROP_SCHEMA["seq"].values():
        for fid, _ in dom["features"]:
            types[f"{dom['prefix']}_{fid}"] = INT_LIST
    return pa.table({c: pa.array([r[c] for r in rows], t) for c, t in types.items()})


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=prop_rows(), keep=st.sampled_from(["recent", "first"]), pad=st.booleans(),
       tz=st.sampled_from([0.0, 8.0, -3.5]), labels=st.booleans(), compiled=st.booleans())
def test_conversion_matches_per_row_reference(rows, keep, pad, tz, labels, compiled):
    """Both the compiled kernels and their numpy fallback (``compiled=False``)."""
    with kernel_mode(compiled):
        check_conversion(rows, keep, pad, tz, labels)


@contextlib.contextmanager
def kernel_mode(compiled):
    """The conversion with the compiled kernels, or with their numpy fallback."""
    if compiled:
        assert kernels.library() is not None, \
            "the compiled kernels are unavailable (no C compiler, or PCVR_NUMPY_KERNELS=1)"
        yield
    else:
        with mock.patch.object(kernels, "library", lambda: None):
            yield


def check_conversion(rows, keep, pad, tz, labels):
    cfg = dict(seq_keep=keep, user_abs_time_missing_as_padding=pad, time_zone_offset_hours=tz)
    table = to_table(rows)
    got, conv = convert(table, PROP_SCHEMA, PROP_LENS, read_labels=labels, **cfg)
    want = slow_convert(rows, conv.layout, DataConfig(seq_max_lens=PROP_LENS, **cfg), labels)
    assert set(got) == set(want)
    # Histories come trimmed to the longest kept one (at least 1): the rest is padding.
    want = trim_histories(want, conv.layout)
    for k in want:
        if k == "user_dense_feats" or k == "item_dense_feats":
            np.testing.assert_allclose(got[k], want[k].reshape(got[k].shape), rtol=1e-6,
                                       err_msg=k)
        else:
            np.testing.assert_array_equal(got[k], want[k].reshape(got[k].shape), err_msg=k)
    # Converting into scattered rows of a shared buffer (the shuffle path) gives the same rows,
    # zero-padded to max_len.
    perm = np.random.default_rng(len(rows)).permutation(2 * len(rows))[:len(rows)]
    pool = conv.allocate(2 * len(rows))
    buf = flat(pool)
    for k in history_keys(conv.layout):
        buf[k][:] = 99  # stale rows of an earlier pass: overwritten up to max_len
    conv(table.select(list(conv.columns)).combine_chunks().to_batches()[0], pool, perm)
    for k in want:
        if k != "data_stats":
            width = got[k].shape[-1] if k in history_keys(conv.layout) else None
            np.testing.assert_array_equal(buf[k][perm][..., :width], got[k], err_msg=k)
            if width is not None:
                assert not buf[k][perm][..., width:].any(), k
    np.testing.assert_array_equal(buf["data_stats"], got["data_stats"])


def random_order(rng, n, width):
    """An EventOrder over rows of lengths ``n``: runs both ways and explicit index rows."""
    kept = np.minimum(n, width)
    step = rng.choice([-1, 0, 1], size=n.size)
    first = np.where(step < 0, n - 1, 0)
    p = np.arange(width)
    idx = np.where(step[:, None] < 0, (n - 1)[:, None] - p, p)
    for b in np.flatnonzero(step == 0):  # any distinct events of the row
        idx[b, :kept[b]] = rng.permutation(n[b])[:kept[b]]
    idx = np.where(p < kept[:, None], idx, kernels.PAD).astype(np.int32)
    return kernels.EventOrder(idx, kept, first, step)


@pytest.mark.parametrize("seed", range(4))
def test_compiled_kernels_match_numpy(seed):
    """Large ragged rows (prefetching, runs both ways, explicit indices), columns shorter than
    the domain, out-of-range ids, timestamps <= 0, scattered output rows over stale values."""
    assert kernels.library() is not None, "the C kernels must compile where the tests run"
    rng = np.random.default_rng(seed)
    B, width, vocab, now = 40, 64, 50, 1_700_000_000
    n = rng.integers(0, 300, B)
    n[:3] = [0, 1, width]
    order = random_order(rng, n, width)
    lens = np.where(rng.random(B) < 0.2, rng.integers(0, 300, B) % (n + 1), n)
    starts = np.cumsum(lens) - lens
    values = rng.integers(-3, vocab + 5, int(lens.sum()))
    ts = np.where(rng.random(values.size) < 0.1, rng.integers(-9, 1, values.size),
                  now - rng.integers(0, 400 * 86400, values.size))
    ts_row = now + rng.integers(-100, 100, B)
    rows = rng.permutation(2 * B)[:B]
    results = []
    for compiled in (True, False):
        with kernel_mode(compiled):
            ids = np.full((2 * B, width + 3), 77, np.int32)
            times = [np.full((2 * B, width + 3), 77, np.int32) for _ in range(3)]
            oov = kernels.gather_ids(values, starts, lens, order, vocab, ids, rows)
            kernels.time_features(ts, starts, lens, order, ts_row, 8 * 3600,
                                  convert_module._BUCKET_EDGES, *times, out_rows=rows)
            results.append((oov, ids, *times))
    assert results[0][0] == results[1][0] > 0
    for got, want in zip(results[0][1:], results[1][1:]):
        np.testing.assert_array_equal(got, want)
    assert (results[0][1][np.setdiff1d(np.arange(2 * B), rows)] == 77).all()  # untouched
    assert not results[0][1][rows, width:].any()  # zeroed beyond the kept width


def test_kernels_fall_back_to_numpy_without_a_compiler(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PCVR_KERNEL_DIR", str(tmp_path / "kernels"))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    assert kernels.library.__wrapped__() is None
    assert "using numpy" in caplog.text
    assert not list((tmp_path / "kernels").iterdir())  # no leftovers
    monkeypatch.setenv("CC", "cc")
    assert kernels.library.__wrapped__() is not None  # compiled into the new folder
    assert any(p.suffix == ".so" for p in (tmp_path / "kernels").iterdir())


@pytest.mark.parametrize("seed", range(3))
def test_newest_first_of_long_unsorted_rows_is_a_stable_sort(seed):
    """Rows long enough for the compiled selection and merge sort, with many ties; rows not
    listed are left alone."""
    rng = np.random.default_rng(seed)
    B = 30
    n = rng.integers(0, 700, B)
    key = rng.integers(0, 40, int(n.sum()))
    rows = np.flatnonzero(rng.random(B) < 0.7)
    seg = np.cumsum(n) - n
    for width in (1, 17, 64, 800):
        for compiled in (True, False):
            idx = np.full((B, width), 5, np.int32)
            with kernel_mode(compiled):
                kernels.newest_first(key, n, rows, idx)
            for r in range(B):
                if r not in rows:
                    assert (idx[r] == 5).all()
                    continue
                k = key[seg[r]:seg[r] + n[r]]
                want = sorted(range(n[r]), key=lambda j: (-k[j], j))[:width]
                assert idx[r].tolist() == want + [kernels.PAD] * (width - len(want))


def history_keys(layout):
    return {d.name + s for d in layout.seq for s in HISTORY_SUFFIXES}


def trim_histories(batch, layout):
    """The reference's max_len histories cut to the longest kept one (at least 1), checking
    that only padding is cut."""
    out = dict(batch)
    for d in layout.seq:
        width = max(1, int(np.max(batch[d.name + "_len"], initial=0)))
        for k in (d.name + s for s in HISTORY_SUFFIXES):
            full = np.asarray(batch[k])
            assert not full[..., width:].any(), k
            out[k] = full[..., :width]
    return out


def test_recent_order_classes():
    """Newest-first rows are kept, strictly oldest-first rows reversed, the rest sorted; ties
    and missing timestamps (0) keep stored order, after every real timestamp."""
    rows = [[9, 7, 7, 3], [1, 2, 3], [5, 0, 8, 5, 0, 9], [], [4], [0, 0, 2, 2],
            [5, 5, 5, 6, 7], [1, 2, 2, 3]]
    n = np.array([len(r) for r in rows])
    key = np.array([x for r in rows for x in r], dtype=np.int64)
    idx = recent_order(key, n, 4).idx
    want = [[0, 1, 2, 3], [2, 1, 0], [5, 2, 0, 3], [], [0], [2, 3, 0, 1], [4, 3, 0, 1],
            [3, 1, 2, 0]]
    for got_row, w in zip(idx.tolist(), want):
        assert got_row[:len(w)] == w and all(x == kernels.PAD for x in got_row[len(w):])


@st.composite
def event_rows(draw):
    """Rows of small keys (many ties) stored newest first, oldest first or in any order."""
    rows = []
    for _ in range(draw(st.integers(1, 8))):
        keys = draw(st.lists(st.integers(0, 4), max_size=9))
        order = draw(st.sampled_from(["asc", "desc", "any"]))
        rows.append(sorted(keys) if order == "asc" else
                    sorted(keys, reverse=True) if order == "desc" else keys)
    return rows


@settings(max_examples=50, deadline=None)
@given(rows=event_rows(), max_len=st.integers(1, 6))
def test_recent_order_is_a_stable_sort(rows, max_len):
    n = np.array([len(r) for r in rows], dtype=np.int64)
    key = np.array([x for r in rows for x in r], dtype=np.int64)
    idx = recent_order(key, n, max_len).idx
    for got_row, r in zip(idx.tolist(), rows):
        want = sorted(range(len(r)), key=lambda j: -r[j])[:max_len]
        assert got_row == want + [kernels.PAD] * (max_len - len(want))


@st.composite
def stamp_rows(draw):
    """Rows of timestamps around the activity windows' edges, in any of the three orders."""
    edges = [0, -3, T - 5 * 86400 - 1, T - 5 * 86400, T - 3 * 86400, T - 86401, T - 86400,
             T - 1, T, T + 9]
    rows = []
    for _ in range(draw(st.integers(1, 8))):
        keys = draw(st.lists(st.sampled_from(edges), max_size=12))
        order = draw(st.sampled_from(["asc", "desc", "any"]))
        rows.append(sorted(keys) if order == "asc" else
                    sorted(keys, reverse=True) if order == "desc" else keys)
    return rows


@settings(max_examples=100, deadline=None)
@given(rows=stamp_rows(), ts_row=st.sampled_from([T, T + 1, 0, 1, 2 * 86400]))
def test_activity_counts_search_sorted_rows_like_a_scan(rows, ts_row):
    """Rows stored in time order (either way) are counted by binary search, the rest by a
    scan; both must count what a scan of every event counts."""
    n = np.array([len(r) for r in rows], dtype=np.int64)
    key = np.maximum(np.array([x for r in rows for x in r], dtype=np.int64), 0)
    ts = np.full(len(rows), ts_row, dtype=np.int64)
    got = events.activity_counts(key, n, ts, events.order_counts(key, n))
    for got_row, r in zip(got.tolist(), rows):
        assert got_row == [sum(1 for t in r if t > 0 and 0 < ts_row - t <= w) for w in WINDOWS]


def test_domain_without_timestamps_keeps_stored_order():
    rows = [{"domain_e_seq_90": [3, 1, 2, 5], "domain_e_seq_91": [1, 2, 1, 2]}]
    schema = {"user_int": [], "item_int": [], "user_dense": [], "seq": {
        "seq_e": {"prefix": "domain_e_seq", "features": [[90, 3], [91, 3]]}}}
    table = pa.table({"user_id": [1], "timestamp": [T], "label_type": [2],
                      **{c: pa.array([v], INT_LIST) for c, v in rows[0].items()}})
    b, conv = convert(table, schema, "seq_e:3", use_user_activity_dense=False)
    assert b["seq_e"].tolist() == [[[3, 1, 2], [1, 2, 1]]]
    assert b["seq_e_time_bucket"].tolist() == [[0, 0, 0]]
    assert stats_of(b, conv) == {"rows": 1, "oov/domain_e_seq_90": 1}


# ----------------------------------------------------------------------------- repairs
def test_repairs_are_counted():
    table = golden_table()
    table = table.set_column(table.schema.get_field_index("user_dense_feats_61"),
                             "user_dense_feats_61",
                             pa.array([[float("nan"), 1.0], [None, float("-inf")], [2.0]],
                                      pa.list_(pa.float32())))
    table = table.set_column(table.schema.get_field_index("domain_a_seq_38"), "domain_a_seq_38",
                             pa.array([[5, None, 700], [1], None], INT_LIST))
    b, conv = convert(table, GOLDEN_SCHEMA, GOLDEN_SEQ_MAX_LENS)
    assert b["user_dense_feats"][:, :2].tolist() == [[0, 1], [0, 0], [2, 0]]
    # seq_a row 0 keeps the events at T (id 700 -> OOV 100) and T-10 (id 5); row 1 has an id
    # but no timestamp: kept, with time bucket 0, and counted as a length mismatch.
    assert b["seq_a"][:2, 0].tolist() == [[100, 5], [1, 0]]
    assert b["seq_a_time_bucket"][1].tolist() == [0, 0]
    assert stats_of(b, conv) == {"rows": 3, "oov/user_int_feats_15": 1,
                                 "oov/item_int_feats_5": 1, "nonfinite/user_dense_feats_61": 2,
                                 "oov/domain_a_seq_38": 1, "len_mismatch/seq_a": 1}


def test_pair_lists_are_cut_to_the_shorter():
    schema = {"user_int": [[62, 100, 4]], "item_int": [], "user_dense": [[62, 4]], "seq": {}}
    table = pa.table({"user_id": [1, 2], "timestamp": [T, T], "label_type": [1, 2],
                      "user_int_feats_62": pa.array([[5, 6, 7], [8]], INT_LIST),
                      "user_dense_feats_62": pa.array([[0.5, 0.25], [1.0]],
                                                      pa.list_(pa.float64()))})
    b, conv = convert(table, schema, "", use_user_activity_dense=False)
    assert b["user_int_feats"].tolist() == [[5, 6, 0, 0], [8, 0, 0, 0]]
    assert b["user_dense_feats"].tolist() == [[0.5, 0.25, 0, 0], [1.0, 0, 0, 0]]
    assert stats_of(b, conv) == {"rows": 2, "len_mismatch/pair_62": 1}


def test_int32_scalars_and_large_lists_are_accepted(tmp_path):
    table = golden_table()
    for name in ("user_int_feats_1", "item_int_feats_5"):
        i = table.schema.get_field_index(name)
        table = table.set_column(i, name, table.column(name).cast(pa.int32()))
    i = table.schema.get_field_index("domain_d_seq_17")
    table = table.set_column(i, "domain_d_seq_17",
                             table.column("domain_d_seq_17").cast(pa.large_list(pa.int32())))
    write_dataset(str(tmp_path), [table], GOLDEN_SCHEMA)
    cfg = DataConfig(seq_max_lens=GOLDEN_SEQ_MAX_LENS)
    layout = layout_of(GOLDEN_SCHEMA, GOLDEN_SEQ_MAX_LENS)
    train, _, _ = get_pcvr_data(str(tmp_path), layout, cfg, train_cfg(8))
    (b,) = list(train)
    assert b.item_int.tolist() == [[6], [7], [0]]
    assert b.seq["seq_d"].ids[0, 0, :2].tolist() == [4, 4]


# ----------------------------------------------------------------------------- bad input
def tiny_cfg():
    return DataConfig(seq_max_lens=TINY_SEQ_MAX_LENS)


def load(folder, **kw):
    args = dict(batch_size=4, num_workers=0, buffer_batches=2, train_ratio=1.0, valid_ratio=0.25,
                seed=0)
    args.update(kw)
    layout = layout_of(TINY_SCHEMA, TINY_SEQ_MAX_LENS)
    train, valid, info = get_pcvr_data(str(folder), layout, tiny_cfg(), TrainConfig(**args))
    return train, valid, layout, info


def test_empty_folder_and_missing_path(tmp_path):
    with pytest.raises(DataError, match="no \\*.parquet"):
        load(tmp_path)
    with pytest.raises(DataError, match="no such parquet file or folder"):
        load(tmp_path / "nope")


def test_missing_column_names_file_and_column(tmp_path):
    paths = write_dataset(str(tmp_path), [tiny_table(range(8)), tiny_table(range(8, 16))
                                          .drop_columns(["domain_c_seq_28"])], TINY_SCHEMA)
    with pytest.raises(DataError) as err:
        load(tmp_path)
    assert paths[1] in str(err.value) and "'domain_c_seq_28' is missing" in str(err.value)


@pytest.mark.parametrize("column,array,expected", [
    ("user_int_feats_1", pa.array(["a"] * 8), "an integer scalar or list<int>"),
    ("user_dense_feats_61", pa.array([[1]] * 8, INT_LIST), "list<float> or list<double>"),
    ("domain_b_seq_68", pa.array(range(8), pa.int64()), "list<int>"),
    ("timestamp", pa.array([1.5] * 8), "an integer scalar"),
])
def test_wrong_arrow_type_names_file_column_and_types(tmp_path, column, array, expected):
    table = tiny_table(range(8))
    table = table.set_column(table.schema.get_field_index(column), column, array)
    (path,) = write_dataset(str(tmp_path), [table], TINY_SCHEMA)
    with pytest.raises(DataError) as err:
        load(tmp_path)
    msg = str(err.value)
    assert path in msg and f"column '{column}' has Arrow type" in msg and expected in msg


def test_truncated_file_is_named(tmp_path):
    (path,) = write_dataset(str(tmp_path), [tiny_table(range(8))], TINY_SCHEMA)
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)
    with pytest.raises(DataError, match=f"{path}: not a readable parquet file"):
        load(tmp_path)


def test_corrupt_row_group_names_file_row_group_and_column(tmp_path):
    (path,) = write_dataset(str(tmp_path), [tiny_table(range(16))], TINY_SCHEMA,
                            rows_per_group=8)
    meta = pq.ParquetFile(path).metadata
    col = meta.row_group(1).column(meta.schema.names.index("item_int_feats_5"))
    with open(path, "r+b") as fh:  # garble the page header of one column chunk
        fh.seek(col.data_page_offset)
        fh.write(b"\xff" * 24)
    train, _, _, _ = load(tmp_path, valid_ratio=0.0, buffer_batches=0)
    with pytest.raises(DataError) as err:
        list(train)
    assert f"{path}: row group 1: cannot decode column 'item_int_feats_5'" in str(err.value)


# ------------------------------------------------------------------------ split, shuffle, workers
def user_ids(loader, epoch=0):
    loader.set_epoch(epoch)
    return [u for b in loader for u in b.user_id.tolist()]


def assert_aligned(batch):
    """Every feature of the tiny dataset is a function of the row's user id."""
    batch = flat(batch)
    u = batch["user_id"]
    v = u % 997 + 1
    assert torch.equal(batch["user_int_feats"], torch.stack([v, v, v], 1))
    assert torch.equal(batch["user_dense_feats"][:, :2], torch.stack([v, -v], 1).float())
    assert torch.equal(batch["label"], (u % 3 == 0).float())
    assert torch.equal(batch["timestamp"], T + u)
    for d in DOMAINS:
        for k in (d + s for s in HISTORY_SUFFIXES):  # trimmed from max_len 3 to 2 events
            assert batch[k].shape[-1] == 2 and batch[k].is_contiguous(), k
            assert batch[k].dtype == torch.int32, k
        assert torch.equal(batch[d][:, 0, :2], torch.stack([v, v], 1))
        assert torch.equal(batch[d + "_len"], torch.full_like(u, 2))
        assert torch.equal(batch[d + "_time_bucket"][:, :2],
                           torch.tensor([[2, 4]]).expand(len(u), 2))  # 10 s and 20 s ago


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """3 files, 10 row groups of 6 rows (one file has a short last group): 57 rows."""
    folder = tmp_path_factory.mktemp("tiny")
    write_dataset(str(folder), [tiny_table(range(0, 24)), tiny_table(range(24, 48)),
                                tiny_table(range(48, 57))], TINY_SCHEMA, rows_per_group=6)
    return folder


def test_split_takes_the_tail_rows_cutting_a_row_group(tiny):
    # 57 rows in groups of 6, 6, 6, 6 | 6, 6, 6, 6 | 6, 3: the tail ceil(0.2 * 57) = 12 rows
    # are the last two groups and half of the one before (the reference's int(0.2 * 10) = 2
    # whole groups would hold 9 rows).
    train, valid, _, info = load(tiny, valid_ratio=0.2)
    assert (info["train_rows"], info["valid_rows"]) == (45, 12)
    assert (info["train_row_groups"], info["valid_row_groups"]) == (8, 3)
    assert sorted(user_ids(valid)) == list(range(45, 57))
    assert sorted(user_ids(train)) == list(range(45))
    half, valid_half, _, info_half = load(tiny, valid_ratio=0.2, train_ratio=0.5)
    assert sorted(user_ids(half)) == list(range(22)) and info_half["train_rows"] == 22
    assert sorted(user_ids(valid_half)) == list(range(45, 57))  # unused rows stay out
    none_train, none_valid, _, _ = load(tiny, valid_ratio=0.0)
    assert none_valid is None and sorted(user_ids(none_train)) == list(range(57))


def test_short_last_row_group_does_not_shrink_validation(tmp_path):
    # Demo folders end in a short remainder group; the reference kept only it for validation.
    write_dataset(str(tmp_path), [tiny_table(range(41))], TINY_SCHEMA, rows_per_group=10)
    train, valid, _, info = load(tmp_path, valid_ratio=0.1)
    assert (info["row_groups"], info["valid_rows"]) == (5, 5)
    assert sorted(user_ids(valid)) == list(range(36, 41))
    assert sorted(user_ids(train)) == list(range(36))


def test_single_row_group_splits_rows(tmp_path):
    write_dataset(str(tmp_path), [tiny_table(range(10))], TINY_SCHEMA)
    train, valid, _, info = load(tmp_path, valid_ratio=0.25)
    assert (info["train_rows"], info["valid_rows"]) == (7, 3)
    assert sorted(user_ids(train)) == list(range(7)) and user_ids(valid) == [7, 8, 9]
    half, valid_half, _, _ = load(tmp_path, valid_ratio=0.25, train_ratio=0.5)
    assert sorted(user_ids(half)) == [0, 1, 2] and user_ids(valid_half) == [7, 8, 9]
    for train_ratio, valid_ratio in ((0.0, 0.1), (1.5, 0.1), (1.0, 1.0), (1.0, -0.1)):
        with pytest.raises(ValueError, match="_ratio must be in"):
            load(tmp_path, train_ratio=train_ratio, valid_ratio=valid_ratio)
    with pytest.raises(DataError, match="too few"):
        split_row_groups([files.RowGroupSlice("one_row.parquet", 0, 0, 1)], 1.0, 0.5)


def test_shuffle_keeps_rows_aligned_and_batches_full(tiny):
    train, _, _, _ = load(tiny, valid_ratio=0.0, batch_size=5, buffer_batches=2)
    batches = list(train)
    assert [b.size for b in batches] == [5] * 11 + [2]
    got = [u for b in batches for u in b.user_id.tolist()]
    assert sorted(got) == list(range(57)) and got != sorted(got)
    for b in batches:
        assert_aligned(b)
    stats = DataStats(train.stat_names)
    for b in batches:
        stats.add(b)
    assert stats.as_dict()["rows"] == 57 and sum(stats.totals) == 57


def test_set_epoch_reshuffles_deterministically(tiny):
    train, _, _, _ = load(tiny, valid_ratio=0.0)
    ds = train.dataset
    orders = []
    for epoch in (0, 1, 0):
        train.set_epoch(epoch)
        orders.append([(rg.path, rg.row_group) for rg in ds.epoch_row_groups()])
    assert orders[0] == orders[2] and orders[0] != orders[1]
    assert sorted(orders[0]) == sorted(orders[1])
    assert user_ids(train, 3) == user_ids(train, 3) != user_ids(train, 4)


@pytest.mark.parametrize("shuffle", [True, False])
def test_two_workers_read_every_row_once(tiny, shuffle):
    cfg = tiny_cfg()
    layout = layout_of(TINY_SCHEMA, TINY_SEQ_MAX_LENS)
    units, _ = files.scan_parquet(files.list_parquet_files(str(tiny)),
                                  files.required_columns(layout, True))
    ds = PCVRDataset(units, layout, cfg, 4, shuffle=shuffle, buffer_batches=3, seed=1)
    loader = make_loader(ds, num_workers=2, pin_memory=False)
    batches = list(loader)
    got = [u for b in batches for u in b.user_id.tolist()]
    assert sorted(got) == list(range(57))
    for b in batches:
        assert_aligned(b)
    assert sum(int(b.data_stats[0]) for b in batches) == 57


def test_eval_loader_reads_all_rows_and_labels_only_when_asked(tiny, tmp_path):
    layout = layout_of(TINY_SCHEMA, TINY_SEQ_MAX_LENS)
    loader = get_eval_loader(str(tiny), layout, tiny_cfg(), 4, 0, read_labels=True)
    batches = list(loader)
    assert [u for b in batches for u in b.user_id.tolist()] == list(range(57))  # stored order
    assert [b.size for b in batches] == [4, 2] * 9 + [3]  # row groups of 6, 6, .., 3
    for b in batches:
        assert_aligned(b)
    assert sum(float(b.label.sum()) for b in batches) == 19
    no_labels = get_eval_loader(str(tiny), layout, tiny_cfg(), 8, 0, read_labels=False)
    assert all(float(b.label.sum()) == 0 for b in no_labels)
    # A test set without label_type (or with only nulls) works, with labels all 0.
    write_dataset(str(tmp_path), [tiny_table(range(5)).drop_columns(["label_type"])],
                  TINY_SCHEMA)
    (b,) = list(get_eval_loader(str(tmp_path), layout, tiny_cfg(), 8, 0, read_labels=True))
    assert b.label.tolist() == [0.0] * 5 and b.user_id.tolist() == list(range(5))


@pytest.mark.parametrize("shuffle", [True, False])
def test_histories_are_trimmed_to_each_batch(tmp_path, shuffle):
    """Each batch's history tensors end at its longest kept history (at least one column),
    through the shuffle buffer and the plain path alike; the rows are unchanged."""
    write_dataset(str(tmp_path), [varied_table(range(40))], TINY_SCHEMA, rows_per_group=10)
    layout = layout_of(TINY_SCHEMA, TINY_SEQ_MAX_LENS)
    units, _ = files.scan_parquet(files.list_parquet_files(str(tmp_path)),
                                  files.required_columns(layout, True))
    ds = PCVRDataset(units, layout, tiny_cfg(), 4, shuffle=shuffle, buffer_batches=2, seed=3)
    widths, seen = set(), []
    for b in map(flat, ds):
        u = b["user_id"]
        seen += u.tolist()
        n = u % 4  # events per row, all kept (max_len 3)
        width = max(1, int(n.max()))
        widths.add(width)
        j = torch.arange(width)
        kept = j < n[:, None]
        for d in DOMAINS:
            assert torch.equal(b[d + "_len"], n)
            for k in (d + s for s in HISTORY_SUFFIXES):
                assert b[k].shape[-1] == width and b[k].is_contiguous(), k
            assert torch.equal(b[d][:, 0], (u % 997 + 1)[:, None] * kept)
            # ages 10, 20, 30 s: buckets 2, 4, 6
            assert torch.equal(b[d + "_time_bucket"], (2 * j + 2) * kept)
    assert sorted(seen) == list(range(40)) and len(widths) > 1


def test_vocabularies_must_fit_int32_ids():
    schema = {"user_int": [[1, 2**31, 1]], "item_int": [], "user_dense": [], "seq": {}}
    with pytest.raises(ValueError, match="int32"):
        BatchConverter(layout_of(schema, "", activity=False), DataConfig(seq_max_lens=""), True)
