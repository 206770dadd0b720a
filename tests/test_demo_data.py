"""Tests of the demo-data generator (pcvr/demo/): layout, determinism, calibration and the
planted effects."""
from __future__ import annotations

import glob
import hashlib
import inspect
import json
import os
from typing import Dict, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pcvr.demo import columns, effects, generator, layout, oracle, variants, world
from pcvr.metrics import roc_auc

ONLINE_SCHEMA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference",
                             "schemas", "online_schema.json")
SMALL = dict(seq_len_scale=0.02, files=2, rows_per_group=1000, verbose=False)
DEFAULTS = generator.DemoOptions()
# Content fingerprint (_fingerprint) of the ``data`` fixture: any change of the default data's
# draws changes it. The same on every machine and thread count (the generator's products avoid
# the threaded BLAS: pcvr.demo.sampling.matmul).
FINGERPRINT = "7ae813b8647ce06c1e493953a485dfb948b8cfa3adb2ecae5f4b3cbdce74c893"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Tuple[str, Dict]:
    """A moderate default-world sample: 8,000 training and 2,000 held-out rows."""
    out = str(tmp_path_factory.mktemp("demo"))
    summary = generator.generate(out, 8000, 7, eval_rows=2000, **SMALL)
    return out, summary


def _table(d: str) -> pa.Table:
    files = sorted(glob.glob(os.path.join(d, "*.parquet")))
    return pa.concat_tables([pq.read_table(f) for f in files])


def _lengths(col: pa.ChunkedArray) -> np.ndarray:
    return pc.fill_null(pc.list_value_length(col), 0).to_numpy()


def _ragged(col: pa.ChunkedArray) -> Tuple[np.ndarray, np.ndarray]:
    """(owning row of each flat value, flat values) of a list column."""
    lengths = _lengths(col)
    return np.repeat(np.arange(lengths.size), lengths), pc.list_flatten(col).to_numpy()


def _hashes(root: str) -> Dict[str, str]:
    out = {}
    for base, _, names in os.walk(root):
        for name in names:
            path = os.path.join(base, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _fingerprint(root: str) -> str:
    """sha256 of every file's content (parquet: row groups and column values, npz: arrays,
    others: bytes), independent of the pyarrow and zstd versions that wrote the bytes."""
    h = hashlib.sha256()
    for base, dirs, names in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(base, name)
            h.update(os.path.relpath(path, root).encode())
            if name.endswith(".parquet"):
                meta = pq.ParquetFile(path).metadata
                h.update(np.array([meta.row_group(k).num_rows
                                   for k in range(meta.num_row_groups)]).tobytes())
                table = pq.read_table(path)
                for col_name, col in zip(table.column_names, table.columns):
                    arr = col.combine_chunks()
                    # the value type only: the list field's name ('item', 'element')
                    # depends on the pyarrow version that reads the file
                    kind = (f"list<{arr.type.value_type}>" if pa.types.is_list(arr.type)
                            else str(arr.type))
                    h.update(f"{col_name}:{kind}".encode())
                    h.update(arr.is_null().to_numpy(zero_copy_only=False).tobytes())
                    if pa.types.is_list(arr.type):
                        h.update(arr.offsets.to_numpy().astype(np.int64).tobytes())
                        arr = arr.values
                    h.update(arr.fill_null(0).to_numpy().tobytes())
            elif name.endswith(".npz"):
                with np.load(path) as z:
                    for k in sorted(z.files):
                        h.update(f"{k}:{z[k].dtype.str}".encode())
                        h.update(np.ascontiguousarray(z[k]).tobytes())
            else:
                with open(path, "rb") as fh:
                    h.update(fh.read())
    return h.hexdigest()


# ------------------------------------------------------------------------------- basics

def test_embedded_layout_matches_online_schema():
    if not os.path.isfile(ONLINE_SCHEMA):
        pytest.skip("the shared online schema is not available")
    with open(ONLINE_SCHEMA, encoding="utf-8") as fh:
        online = json.load(fh)
    assert layout.load_layout(None, vocab_cap=0).schema_json() == online


def test_same_options_give_identical_bytes_and_the_recorded_data(data, tmp_path):
    out, summary = data
    again = generator.generate(str(tmp_path), **summary["options"], verbose=False)
    assert again["options"] == summary["options"]
    first, second = _hashes(out), _hashes(str(tmp_path))
    assert len(first) == 2 * (2 + 2) and first == second    # 2 parquet + schema + truth per split
    assert _fingerprint(out) == FINGERPRINT


def test_generate_defaults_are_the_options_defaults():
    params = inspect.signature(generator.generate).parameters
    for name, value in vars(DEFAULTS).items():
        if name != "out":
            assert params[name].default == value, name


# ------------------------------------------------------------------------------- layout

def test_schema_and_columns_follow_the_online_layout(data):
    out, _ = data
    with open(os.path.join(out, "schema.json"), encoding="utf-8") as fh:
        schema = json.load(fh)
    cap = DEFAULTS.vocab_cap
    assert schema["user_int"] == [[f, min(v, cap), d] for f, v, d in layout.ONLINE_USER_INT]
    assert schema["item_int"] == [[f, min(v, cap), d] for f, v, d in layout.ONLINE_ITEM_INT]
    assert schema["user_dense"] == [list(e) for e in layout.ONLINE_USER_DENSE]
    assert sorted(schema["seq"]) == ["seq_a", "seq_b", "seq_c", "seq_d"]
    for name, (prefix, ts_fid, feats) in layout.ONLINE_SEQ.items():
        dom = schema["seq"][name]
        assert (dom["prefix"], dom["ts_fid"]) == (prefix, ts_fid)
        assert dom["features"] == [[f, 0 if f == ts_fid else min(v, cap)] for f, v in feats]

    table = _table(out)
    types = {f.name: f.type for f in table.schema}
    assert len(types) == 120
    expected = {"user_id": pa.int64(), "item_id": pa.int64(), "label_type": pa.int32(),
                "label_time": pa.int64(), "timestamp": pa.int64()}
    ints, floats = pa.list_(pa.int64()), pa.list_(pa.float32())
    for group in ("user_int", "item_int"):
        for fid, _, dim in schema[group]:
            expected[f"{group}_feats_{fid}"] = pa.int64() if dim == 1 else ints
    expected.update({f"user_dense_feats_{fid}": floats for fid, _ in schema["user_dense"]})
    for dom in schema["seq"].values():
        expected.update({f"{dom['prefix']}_{fid}": ints for fid, _ in dom["features"]})
    assert types == expected
    assert sum(1 for _, _, d in schema["user_int"] if d == 1) == 35
    assert sum(1 for _, _, d in schema["user_int"] if d > 1) == 11
    assert len(schema["user_dense"]) == 10 and len(schema["item_int"]) == 14
    assert sum(len(d["features"]) for d in schema["seq"].values()) == 45
    for name in ("user_id", "item_id", "label_type", "label_time", "timestamp"):
        assert table[name].null_count == 0
    assert np.unique(table["user_id"].to_numpy()).size == table.num_rows
    assert set(np.unique(table["label_type"].to_numpy())) == {1, 2}
    assert (table["label_time"].to_numpy() > table["timestamp"].to_numpy()).all()
    files = sorted(glob.glob(os.path.join(out, "*.parquet")))
    assert len(files) == 2 and sum(pq.ParquetFile(f).num_row_groups for f in files) == 8


def test_ids_lie_in_vocab_and_lists_fit_their_dims(data):
    out, _ = data
    with open(os.path.join(out, "schema.json"), encoding="utf-8") as fh:
        schema = json.load(fh)
    table = _table(out)
    # Documented OOV columns: user 54, item 16 and each domain's widest (item-id) column.
    oov_cols = ({f"user_int_feats_{f}" for f in columns.OOV_USER_FIDS}
                | {f"item_int_feats_{f}" for f in columns.OOV_ITEM_FIDS}
                | {f"{p}_{max((v, f) for f, v in feats if f != ts)[1]}"
                   for p, ts, feats in layout.ONLINE_SEQ.values()})
    checks = [(f"{g}_feats_{f}", v, d) for g in ("user_int", "item_int")
              for f, v, d in schema[g]]
    for dom in schema["seq"].values():
        checks += [(f"{dom['prefix']}_{f}", v, None) for f, v in dom["features"]
                   if f != dom["ts_fid"]]
    n_oov = 0
    for col, vocab, dim in checks:
        c = table[col]
        if pa.types.is_list(c.type):
            values = pc.list_flatten(c).to_numpy()
            if dim is not None:
                assert _lengths(c).max() <= dim, col
        else:
            values = c.drop_null().to_numpy()
        real = values[values != -1]
        assert (real >= 1).all(), col
        oov = real >= vocab
        if oov.any():
            assert col in oov_cols, col
            assert oov.mean() < 2e-3 and real.max() < vocab + 3, col
            n_oov += int(oov.sum())
    assert n_oov > 0                                  # OOV handling gets exercised
    assert table["user_int_feats_101"].null_count / table.num_rows > 0.8
    for fid in (83, 84, 85):
        assert 0.8 < table[f"item_int_feats_{fid}"].null_count / table.num_rows < 0.95
    assert 0.4 < table["item_int_feats_11"].null_count / table.num_rows < 0.6
    dense62 = pc.list_flatten(table["user_dense_feats_62"]).to_numpy()
    assert dense62.min() >= 1 and dense62.max() > 1e6 and np.median(dense62) > 100
    for fid, dim in ((61, 256), (87, 320)):
        lengths = pc.list_value_length(table[f"user_dense_feats_{fid}"]).drop_null().to_numpy()
        assert (lengths == dim).all()


def test_domain_lists_share_lengths_and_pairs_align(data):
    out, _ = data
    table = _table(out)
    for prefix, ts_fid, feats in layout.ONLINE_SEQ.values():
        ts_len = _lengths(table[f"{prefix}_{ts_fid}"])
        for fid, _ in feats:
            assert (_lengths(table[f"{prefix}_{fid}"]) == ts_len).all(), (prefix, fid)
        assert ts_len.max() > 0
    for fid in (62, 63, 64, 65, 66, 89, 90, 91):
        ints, dense = table[f"user_int_feats_{fid}"], table[f"user_dense_feats_{fid}"]
        assert (_lengths(ints) == _lengths(dense)).all(), fid
        assert (pc.is_null(ints).to_numpy() == pc.is_null(dense).to_numpy()).all(), fid


def test_eval_split_is_later_and_shares_the_world(data):
    out, summary = data
    train, held = _table(out), _table(os.path.join(out, "eval"))
    assert held.num_rows == 2000
    assert held["timestamp"].to_numpy().min() >= train["timestamp"].to_numpy().max()
    assert not set(held["user_id"].to_numpy()) & set(train["user_id"].to_numpy())
    with open(os.path.join(out, "schema.json")) as a, \
            open(os.path.join(out, "eval", "schema.json")) as b:
        assert json.load(a) == json.load(b)
    # Same catalogue: most held-out items were seen in training.
    assert np.isin(held["item_id"].to_numpy(), train["item_id"].to_numpy()).mean() > 0.7
    assert set(summary["splits"]) == {"train", "eval"}


def test_rows_are_time_ordered_and_events_oldest_first(data):
    out, _ = data
    table = _table(out)
    assert (np.diff(table["timestamp"].to_numpy()) >= 0).all()
    row, ts = _ragged(table["domain_d_seq_26"])
    same_row = row[1:] == row[:-1]
    assert (np.diff(ts)[same_row] >= 0).all()
    assert (ts < table["timestamp"].to_numpy()[row]).all()       # history is in the past


# ------------------------------------------------------------------------------- truth

def test_sidecar_truth_and_calibration(data):
    out, summary = data
    parquet = glob.glob(os.path.join(out, "*.parquet"))
    assert not [p for p in parquet if "truth" in p]
    assert os.path.isfile(os.path.join(out, oracle.TRUTH_FILE))
    user_id, p_true = oracle.load_truth(out)
    table = _table(out)
    assert user_id.dtype == np.int64 and p_true.dtype == np.float64
    assert (user_id == table["user_id"].to_numpy()).all()
    assert ((p_true > 0) & (p_true < 1)).all()
    with np.load(os.path.join(out, oracle.TRUTH_FILE)) as z:
        assert (z["label"] == (table["label_type"].to_numpy() == 2)).all()
    train = summary["splits"]["train"]
    assert 0.08 <= train["pos_rate"] <= 0.115
    assert 0.80 <= oracle.oracle_auc(out) <= 0.86
    assert train["oracle_auc"] == pytest.approx(oracle.oracle_auc(out))
    assert 0.80 <= oracle.oracle_auc(os.path.join(out, "eval")) <= 0.86
    shares = train["shares"]
    for effect, target in zip(effects.EFFECTS, variants.VARIANTS["default"].shares):
        assert shares[effect.name] == pytest.approx(target, abs=0.05), effect.name
    assert shares["abs_time"] + shares["pair_62_66"] > 0.3
    assert 0.03 < shares["noise_of_total"] < 0.1


# ------------------------------------------------------------------------------- effects

def test_effect_capture_recovers_the_weights_of_a_known_logit(data):
    out, _ = data
    with np.load(os.path.join(out, oracle.TRUTH_FILE)) as z:
        user_id = z["user_id"]
        logit = 2.0 * z["logit_abs_time"] + 0.5 * z["logit_pair_62_66"] - 1.0
    perm = np.random.default_rng(0).permutation(user_id.size)  # row order does not matter
    capture = oracle.effect_capture(out, user_id[perm], logit[perm])
    assert list(capture) == [e.name for e in effects.EFFECTS] + ["r2"]
    expected = {"abs_time": 2.0, "pair_62_66": 0.5}
    for name, weight in capture.items():
        if name != "r2":
            assert weight == pytest.approx(expected.get(name, 0.0), abs=1e-6), name
    assert capture["r2"] == pytest.approx(1.0)
    with pytest.raises(KeyError, match="not rows of this split"):
        oracle.effect_capture(out, user_id[:3] + 10**12, logit[:3])


def test_every_planted_effect_moves_the_labels(data):
    out, _ = data
    with np.load(os.path.join(out, oracle.TRUTH_FILE)) as z:
        for effect in effects.EFFECTS:
            assert roc_auc(z["label"], z[f"logit_{effect.name}"]) > 0.53, effect.name


def _effects_from_columns(out: str, var: variants.Variant
                          ) -> Tuple[np.ndarray, Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """(labels, four effects recomputed from the parquet columns alone, the truth sidecar)."""
    table = _table(out)
    label = table["label_type"].to_numpy() == 2
    ts = table["timestamp"].to_numpy()
    n = ts.size
    with np.load(os.path.join(out, oracle.TRUTH_FILE)) as z:
        truth = {k: z[k] for k in z.files}
    links = var.links

    def latent(column: str, link: str) -> np.ndarray:
        ids = table[column].to_numpy()
        return np.argmax(truth[link][None, :] == ids[:, None], axis=1)

    # abs_time: hour and day of week in the variant's time zone.
    local = ts + var.tz_hours * 3600
    hour, dow = (local // 3600) % 24, (local // 86400 + 3) % 7
    found = {"abs_time": np.cos(2 * np.pi * (hour - 21) / 24) + 0.7 * (dow >= 5)}

    # activity and seq_affinity: event counts and the share of the target's category.
    cat = f"category_item_int_{links.item_category}"
    latent_cat = latent(f"item_int_feats_{links.item_category}", cat)
    counts, weighted, matched = np.zeros((4, n)), np.zeros(n), np.zeros(n)
    for prefix, ts_fid, _ in layout.ONLINE_SEQ.values():
        row, ev = _ragged(table[f"{prefix}_{ts_fid}"])
        age = ts[row] - ev
        counts[0] += _lengths(table[f"{prefix}_{ts_fid}"])
        for k, days in enumerate((1, 3, 5)):
            counts[k + 1] += np.bincount(row, weights=(age > 0) & (age <= days * 86400),
                                         minlength=n)
        key = next(k for k in truth if k.startswith(f"category_{prefix}_"))
        _, cats = _ragged(table[key[len("category_"):]])
        w = np.where(age <= 5 * 86400, 3.0, 1.0)
        weighted += np.bincount(row, weights=w, minlength=n)
        matched += np.bincount(row, weights=w * (cats == truth[key][latent_cat[row]]),
                               minlength=n)
    found["activity"] = np.log1p(counts).sum(axis=0)
    found["seq_affinity"] = matched / (weighted + 1.0)

    # pair_62_66: sqrt(log1p(value)) that the pair list pairs with the target's type (or
    # category), 0 when it is absent.
    fid = links.pair_fid
    row, ids = _ragged(table[f"user_int_feats_{fid}"])
    _, values = _ragged(table[f"user_dense_feats_{fid}"])
    if links.pair_entity == variants.TYPE:
        target = latent(f"item_int_feats_{links.item_type}", f"type_item_int_{links.item_type}")
    else:
        target = latent_cat
    hit = ids == truth[f"{links.pair_entity}_user_int_{fid}"][target[row]]
    found["pair_62_66"] = np.zeros(n)
    found["pair_62_66"][row[hit]] = np.sqrt(np.log1p(values[hit]))
    for name, value in found.items():
        assert np.corrcoef(value, truth[f"logit_{name}"])[0, 1] > 0.999, name
    return label, found, truth


def test_planted_effects_are_visible_in_the_parquet(data):
    """Four effects recomputed from the columns alone match the sidecar and move the labels."""
    label, found, _ = _effects_from_columns(data[0], variants.VARIANTS["default"])
    for name, min_auc in (("abs_time", 0.6), ("activity", 0.55), ("seq_affinity", 0.6),
                          ("pair_62_66", 0.6)):
        assert roc_auc(label, found[name]) > min_auc, name
    present = found["pair_62_66"] > 0                       # the value matters, not the id only
    assert roc_auc(label[present], found["pair_62_66"][present]) > 0.52
    hour = (_table(data[0])["timestamp"].to_numpy() + 8 * 3600) // 3600 % 24
    assert label[hour >= 18].mean() > label[(hour >= 2) & (hour < 10)].mean() + 0.03


# ------------------------------------------------------------------------------- options

def test_custom_schema_uncapped_vocab_and_the_command_line(tmp_path, capsys):
    schema = layout.load_layout(None, vocab_cap=0).schema_json()
    schema["user_int"] = [[f, v, 4 if f == 63 else d] for f, v, d in schema["user_int"]]
    schema["user_dense"] = [[f, 4 if f == 63 else d] for f, d in schema["user_dense"]]
    path = tmp_path / "schema_in.json"
    path.write_text(json.dumps(schema))
    out = str(tmp_path / "out")
    summary = generator.main(["--out", out, "--rows", "300", "--eval_rows", "100",
                              "--seq_len_scale", "0.02", "--files", "1", "--seed", "2",
                              "--vocab_cap", "0", "--schema", str(path),
                              "--event_order", "newest_first"])
    assert summary["splits"]["eval"]["rows"] == 100
    assert summary["options"]["event_order"] == "newest_first"
    assert (_order_steps(out) <= 0).all()
    assert len(glob.glob(os.path.join(out, "eval", "*.parquet"))) == 1
    with open(os.path.join(out, "schema.json")) as fh:
        assert json.load(fh) == schema
    table = _table(out)
    assert _lengths(table["user_int_feats_63"]).max() <= 4
    assert pc.max(pc.list_flatten(table["domain_c_seq_47"])).as_py() > DEFAULTS.vocab_cap

    with pytest.raises(SystemExit) as exit_help:
        generator.main(["--help"])
    assert exit_help.value.code == 0 and "--exposure_bias" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_no_out:
        generator.main(["--rows", "10"])
    assert exit_no_out.value.code == 2 and "--out" in capsys.readouterr().err
    del schema["user_int"][0]                                      # drops fid 1
    with pytest.raises(ValueError, match="user_int 1"):
        world.check_links(layout.load_layout(schema, 0).features, variants.Links())
    schema["seq"]["seq_a"]["features"].append([40, 9])             # duplicated fid
    with pytest.raises(ValueError, match="duplicated fid 40"):
        layout.load_layout(schema, 0)


def test_full_scale_history_lengths(tmp_path):
    summary = generator.generate(str(tmp_path), 300, 5, eval_rows=0, seq_len_scale=1.0,
                                 files=1, verbose=False)
    table = _table(str(tmp_path))
    means = {}
    for name, (prefix, ts_fid, _) in layout.ONLINE_SEQ.items():
        lengths = _lengths(table[f"{prefix}_{ts_fid}"])
        assert lengths.max() <= world.SEQ_LEN_CAP
        means[name] = lengths.mean()
    assert 200 < means["seq_a"] < 420 and 200 < means["seq_b"] < 420
    assert 380 < means["seq_c"] < 680
    assert 2000 < means["seq_d"] < 2900
    assert summary["splits"]["train"]["row_groups"] >= 1


def _order_steps(out: str) -> np.ndarray:
    """Time steps between consecutive events of one history (domain d)."""
    row, ts = _ragged(_table(out)["domain_d_seq_26"])
    return np.diff(ts)[row[1:] == row[:-1]]


# ------------------------------------------------------------------------------- variants

def test_variants_are_complete_and_fit_the_online_schema():
    online = layout.load_layout(None, vocab_cap=0).features
    assert list(variants.VARIANTS)[0] == variants.DEFAULT_VARIANT == DEFAULTS.variant
    for var in variants.VARIANTS.values():
        assert len(var.shares) == len(effects.EFFECTS), var.name
        assert sum(var.shares) == pytest.approx(1.0), var.name
        assert var.event_order in variants.EVENT_ORDERS, var.name
        world.check_links(online, var.links)
        assert f"--time_zone_offset_hours {var.tz_hours}" in var.describe()
    assert len({v.links for v in variants.VARIANTS.values()}) == len(variants.VARIANTS)
    assert len({v.tz_hours for v in variants.VARIANTS.values()}) == len(variants.VARIANTS)


@pytest.fixture(scope="module", params=[v for v in variants.VARIANTS if v != "default"])
def variant_data(request, tmp_path_factory) -> Tuple[str, variants.Variant, Dict]:
    """3,000 training rows of a non-default variant, written over a stale held-out split."""
    out = str(tmp_path_factory.mktemp(f"variant_{request.param}"))
    os.makedirs(os.path.join(out, "eval"))
    with open(os.path.join(out, "eval", "schema.json"), "w") as fh:
        fh.write("{}")
    summary = generator.generate(out, 3000, 7, eval_rows=0, variant=request.param, **SMALL)
    return out, variants.VARIANTS[request.param], summary


def test_variant_moves_the_signals_and_keeps_the_layout(variant_data, data):
    out, var, summary = variant_data
    assert summary["options"]["variant"] == var.name
    assert not os.path.exists(os.path.join(out, "eval", "schema.json"))
    with open(os.path.join(out, "schema.json")) as a, \
            open(os.path.join(data[0], "schema.json")) as b:
        assert a.read() == b.read()                         # same columns as the default
    label, found, truth = _effects_from_columns(out, var)   # the variant's fids and zone
    assert "category_item_int_5" not in truth and "type_item_int_13" not in truth
    train = summary["splits"]["train"]
    for effect, target in zip(effects.EFFECTS, var.shares):
        assert train["shares"][effect.name] == pytest.approx(target, abs=0.05), effect.name
    assert train["pos_rate"] == pytest.approx(var.pos_rate, rel=0.25)
    assert train["oracle_auc"] == pytest.approx(var.oracle_auc, abs=0.04)
    capture = oracle.effect_capture(out, truth["user_id"], 2.0 * truth["logit_abs_time"])
    assert capture["abs_time"] == pytest.approx(2.0, abs=1e-6)

    table = _table(out)
    values = pc.list_flatten(table[f"user_dense_feats_{var.links.pair_fid}"]).to_numpy()
    assert abs(np.log(np.median(values)) - var.pair_log_mean) < 1.0
    profile = np.abs(pc.list_flatten(
        table[f"user_dense_feats_{var.links.profile_embedding}"]).to_numpy()).max()
    assert 0.5 * 0.68 * var.embed_scale < profile <= 0.68 * var.embed_scale + 1 / 512
    step = _order_steps(out)
    if var.event_order == "newest_first":
        assert (step <= 0).all()
    else:
        assert (step > 0).any() and (step < 0).any()


# ------------------------------------------------------------------------------- exposure bias

@pytest.fixture(scope="module")
def biased(tmp_path_factory) -> Tuple[str, Dict]:
    """The ``data`` fixture's options with popular items over-shown in training."""
    out = str(tmp_path_factory.mktemp("biased"))
    return out, generator.generate(out, 8000, 7, eval_rows=2000, exposure_bias=0.5, **SMALL)


def _truth(out: str) -> Dict[str, np.ndarray]:
    with np.load(os.path.join(out, oracle.TRUTH_FILE)) as z:
        return {k: z[k] for k in z.files}


def test_exposure_bias_over_shows_popular_items_without_changing_p(data, biased):
    splits = biased[1]["splits"]
    assert splits["train"]["exposure"] == "popularity bias 0.5"
    assert splits["train"]["popular_share"] > data[1]["splits"]["train"]["popular_share"] + 0.2
    assert splits["eval"]["exposure"] == "uniform" and splits["eval"]["popular_share"] < 0.03

    # The same requests; only the shown items differ, and a row that shows the same item as
    # in the unbiased run has the same true probability.
    natural, logged = _table(data[0]), _table(biased[0])
    for name in ("user_id", "timestamp"):
        assert natural[name].equals(logged[name]), name
    same = natural["item_id"].to_numpy() == logged["item_id"].to_numpy()
    assert 0.1 < same.mean() < 0.9
    truth_n, truth_b = _truth(data[0]), _truth(biased[0])
    np.testing.assert_array_equal(truth_n["p_true"][same], truth_b["p_true"][same])
    assert "propensity" not in truth_n                      # the default format is unchanged

    # Propensities: inverse-propensity weights give the popular items their uniform share.
    ranked = (np.arange(world.N_ITEMS) + 10.0) ** -1.1
    threshold = (ranked / ranked.sum())[world.N_ITEMS // 100 - 1]
    popular = truth_b["item_popularity"] >= threshold * (1 - 1e-9)
    assert 0 < truth_b["propensity"].min() and truth_b["propensity"].max() <= 1
    weights = 1.0 / (world.N_ITEMS * truth_b["propensity"])
    assert np.mean(weights * popular) == pytest.approx(0.01, abs=0.003)

    # The unbiased held-out split: uniform propensities, and popularity does not predict p.
    held = _truth(os.path.join(biased[0], "eval"))
    np.testing.assert_allclose(held["propensity"], 1.0 / world.N_ITEMS)
    rank = [np.argsort(np.argsort(held[k])) for k in ("item_popularity", "p_true")]
    assert abs(np.corrcoef(*rank)[0, 1]) < 0.1
    capture = oracle.effect_capture(os.path.join(biased[0], "eval"), held["user_id"],
                                    held["logit_base"])
    assert capture["base"] == pytest.approx(1.0, abs=1e-6)
