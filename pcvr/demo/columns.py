"""The columns of a split and its parquet files: rows -> Arrow tables, labels and the truth.

A split is written row group by row group; each row group draws its histories, its labels
(from the true probability of ``pcvr.demo.effects``) and its columns from a random stream of
its own, so that the same options give byte-identical files (no timestamps in the parquet or
npz metadata; same pyarrow version).

Columns: ``user_id`` (int64, unique per row and across splits, so that predictions keyed by
user_id are unambiguous), ``item_id``, ``label_type`` (int32: 2 converted = positive, 1 clicked
but not converted; never null, every split keeps labels for local scoring), ``label_time``
(> timestamp), ``timestamp`` (request time, Unix seconds); then every fid and dim of the
schema. Every list of one history domain has the same length in a row; item ids repeat within
a history (at scale 1.0 about 18 % of a's events repeat an earlier item, 82 % of b's, 90 % of
c's and 98 % of d's; real: 25 / 95 / 98 / 99 %).

Out of vocabulary: 2e-4 of the values of user fid 54, item fid 16 and each domain's item-id
column are set to ``vocab_size .. vocab_size + 2`` to exercise OOV handling; every other id
lies in ``[1, vocab_size - 1]``.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pcvr.demo.effects import (Calibration, explainable_logit, logit_parts, raw_effects,
                               variance_shares)
from pcvr.demo.oracle import TRUTH_FILE
from pcvr.demo.rows import NATURAL, Exposure, History, Rows, draw_histories, draw_rows
from pcvr.demo.sampling import categorical, lengths_to_offsets, power_index, sigmoid
from pcvr.demo.world import (N_CATEGORIES, N_ITEMS, SEQ_ITEMS_PER_CATEGORY, Items, Persons,
                             World)
from pcvr.metrics import roc_auc
from pcvr.schema import FeatureSpec

SCHEMA_FILE = "schema.json"
PARQUET_COMPRESSION = "zstd"
OOV_RATE = 2e-4
OOV_USER_FIDS = (54,)
OOV_ITEM_FIDS = (16,)


def _list_array(offsets: np.ndarray, values: np.ndarray, null: Optional[np.ndarray],
                value_type: pa.DataType) -> pa.Array:
    mask = None if null is None or not null.any() else pa.array(null)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)),
                                    pa.array(values, type=value_type), mask=mask)


def _sprinkle_oov(rng: np.random.Generator, ids: np.ndarray, vocab: int) -> np.ndarray:
    """Sets a tiny fraction of ids to vocab .. vocab + 2 (out of vocabulary)."""
    if vocab <= 0:
        return ids
    hit = rng.random(ids.size) < OOV_RATE
    ids = ids.copy()
    ids[hit] = vocab + rng.integers(0, 3, int(hit.sum()))
    return ids


def _int_columns(specs: Sequence[FeatureSpec], entities: Union[Persons, Items],
                 index: np.ndarray, oov_fids: Tuple[int, ...], rng: np.random.Generator,
                 cols: Dict[str, pa.Array]) -> None:
    """The int feature columns ``specs`` of the rows' ``entities`` (persons or items) at
    ``index``: scalars (with out-of-vocabulary ids sprinkled into ``oov_fids``) and lists."""
    for spec in specs:
        fid = spec.fid
        if spec.length == 1:
            ids, null = entities.scalars[fid]
            values = ids[index]
            if fid in oov_fids:
                values = _sprinkle_oov(rng, values, spec.vocab_size)
            cols[spec.column] = pa.array(values, type=pa.int64(), mask=null[index])
        else:
            lst = entities.lists[fid].take(index)
            cols[spec.column] = _list_array(lst.offsets, lst.values, lst.null, pa.int64())


def _user_columns(world: World, rng: np.random.Generator, person: np.ndarray,
                  cols: Dict[str, pa.Array]) -> None:
    ps = world.persons
    _int_columns(world.layout.features.user_int, ps, person, OOV_USER_FIDS, rng, cols)
    n = person.size
    for spec in world.layout.features.user_dense:
        fid, dim = spec.fid, spec.length
        if fid in ps.embeddings:
            emb = ps.embeddings[fid]
            null = emb.null[person]
            offsets = lengths_to_offsets(np.where(null, 0, dim))
            values = emb.rows(ps.embed_inputs[person[~null]]).ravel()
            cols[spec.column] = _list_array(offsets, values, null, pa.float32())
        elif fid in ps.lists and ps.lists[fid].dense is not None:
            lst = ps.lists[fid].take(person)
            cols[spec.column] = _list_array(lst.offsets, lst.dense, lst.null, pa.float32())
        else:   # a dense list fid of a custom schema without an int twin
            cols[spec.column] = _list_array(np.zeros(n + 1, dtype=np.int64),
                                            np.zeros(0, dtype=np.float32), None, pa.float32())


def _event_order(rng: np.random.Generator, h: History, order: str) -> np.ndarray:
    """Permutation of a domain's flat events that applies ``order`` within each row."""
    if order == "unordered":
        key = rng.random(h.row.size)
    else:
        key = h.age.astype(np.float64) if order == "newest_first" else -h.age.astype(np.float64)
    return np.lexsort((key, h.row))


def _seq_columns(world: World, rng: np.random.Generator, hists: List[History], n: int,
                 event_order: str, cols: Dict[str, pa.Array]) -> None:
    layout = world.layout
    for dom, h in zip(world.domains, hists):
        perm = _event_order(rng, h, event_order)
        row, ts, cat = h.row[perm], h.ts[perm], h.cat[perm]
        # Which item of the event's category: one of the domain's popular items, or one of
        # the row's few favourites in that category (the repeats seen in real histories).
        m = SEQ_ITEMS_PER_CATEGORY
        salt = rng.integers(0, m, n)
        popular = power_index(rng, m, row.size, 4.0)
        personal = (salt[row] + power_index(rng, dom.slots, row.size, 2.0)) % m
        slot = np.where(rng.random(row.size) < dom.popular_rate, popular, personal)
        universe_item = cat + N_CATEGORIES * slot
        vocab = layout.seq_vocab(dom.spec)
        for fid in layout.seq_fids[dom.spec.name]:
            if fid == dom.spec.ts_fid:
                values = ts
            elif fid == dom.cat_fid:
                values = dom.cat_map(cat)
            elif fid in dom.enums:
                values = 1 + categorical(rng, dom.enums[fid], row.size) if vocab[fid] > 1 \
                    else np.zeros(row.size, dtype=np.int64)
            else:
                values = dom.attrs[fid][universe_item]
                if fid == dom.item_fid:
                    values = _sprinkle_oov(rng, values, vocab[fid])
            cols[f"{dom.spec.prefix}_{fid}"] = _list_array(h.offsets, values, None, pa.int64())


def _chunk(world: World, calib: Calibration, rows: Rows, rng: np.random.Generator,
           user_id0: int, event_order: str) -> Tuple[pa.Table, Dict[str, np.ndarray]]:
    """One row group: its table and its truth (user_id, p_true, label, logit parts; with a
    non-natural exposure also each row's propensity and its item's popularity)."""
    n = rows.ts.size
    hists = draw_histories(world, rng, rows)
    parts = logit_parts(calib, raw_effects(world, rows, hists), rng.standard_normal(n))
    p_true = sigmoid(calib.intercept + sum(parts.values()))
    label = rng.random(n) < p_true
    delay = np.where(label, 60 + rng.exponential(8 * 3600.0, n), 1 + rng.exponential(1800.0, n))
    user_id = user_id0 + np.arange(n, dtype=np.int64)
    cols: Dict[str, pa.Array] = {
        "user_id": pa.array(user_id),
        "item_id": pa.array(world.items.key[rows.item], type=pa.int64()),
        "label_type": pa.array(np.where(label, 2, 1).astype(np.int32)),
        "label_time": pa.array(rows.ts + delay.astype(np.int64)),
        "timestamp": pa.array(rows.ts),
    }
    _user_columns(world, rng, rows.person, cols)
    _int_columns(world.layout.features.item_int, world.items, rows.item, OOV_ITEM_FIDS, rng,
                 cols)
    _seq_columns(world, rng, hists, n, event_order, cols)
    schema = world.layout.arrow_schema()
    table = pa.Table.from_arrays([cols[f.name] for f in schema], schema=schema)
    truth = {"user_id": user_id, "p_true": p_true, "label": label.astype(np.int8)}
    truth.update({f"logit_{k}": v.astype(np.float32) for k, v in parts.items()})
    if rows.propensity is not None:
        truth["propensity"] = rows.propensity
        truth["item_popularity"] = world.items.pop[rows.item]
    return table, truth


def clear_split(out_dir: str) -> None:
    """Removes a previous run's outputs (only the files this module writes)."""
    if not os.path.isdir(out_dir):
        return
    for name in os.listdir(out_dir):
        if (name.startswith("part-") and name.endswith(".parquet")) or name in (
                SCHEMA_FILE, TRUTH_FILE):
            os.remove(os.path.join(out_dir, name))


def write_split(world: World, calib: Calibration, out_dir: str, split: str, split_id: int,
                rows: int, start: int, days: int, user_id0: int, files: int,
                rows_per_group: int, event_order: str,
                exposure: Exposure = NATURAL) -> Dict[str, Any]:
    """Writes one split (schema, parquet files, truth sidecar) and returns its summary.

    Args:
        split, split_id: the split's name and the number that seeds its random streams.
        rows, start, days: ``rows`` requests in ``days`` local days from Unix time ``start``.
        user_id0: the first row's user_id.
        files, rows_per_group, event_order: as the command-line options.
        exposure: which target items the split shows.
    Returns:
        rows, files, row groups, the exposure and the share of rows showing one of the 1 %
        most popular items, positive rate, oracle AUC, AUC of the explainable logit, the
        effects' variance shares and seconds.
    """
    t0 = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    clear_split(out_dir)
    plan = draw_rows(world, np.random.default_rng(np.random.SeedSequence(
        [world.seed, 1, split_id])), rows, start, days, exposure)
    with open(os.path.join(out_dir, SCHEMA_FILE), "w", encoding="utf-8") as fh:
        json.dump(world.layout.schema_json(), fh, indent=2)
        fh.write("\n")
    truths: List[Dict[str, np.ndarray]] = []
    n_groups = 0
    bounds = np.linspace(0, rows, min(files, rows) + 1).astype(np.int64)
    for k in range(bounds.size - 1):
        path = os.path.join(out_dir, f"part-{k:05d}.parquet")
        with pq.ParquetWriter(path, world.layout.arrow_schema(),
                              compression=PARQUET_COMPRESSION) as writer:
            for lo in range(int(bounds[k]), int(bounds[k + 1]), rows_per_group):
                hi = min(lo + rows_per_group, int(bounds[k + 1]))
                rng = np.random.default_rng(np.random.SeedSequence(
                    [world.seed, 2, split_id, n_groups]))
                table, truth = _chunk(world, calib, plan.slice(lo, hi), rng, user_id0 + lo,
                                      event_order)
                writer.write_table(table, row_group_size=hi - lo)
                truths.append(truth)
                n_groups += 1
    truth = {k: np.concatenate([t[k] for t in truths]) for k in truths[0]}
    np.savez(os.path.join(out_dir, TRUTH_FILE), **truth, **world.link_ids())
    popular = np.argsort(-world.items.pop, kind="stable")[:N_ITEMS // 100]
    return {
        "split": split, "dir": out_dir, "rows": rows, "files": bounds.size - 1,
        "row_groups": n_groups, "rows_per_group": rows_per_group,
        "exposure": exposure.describe(),
        "popular_share": float(np.isin(plan.item, popular).mean()),
        "pos_rate": float(truth["label"].mean()),
        "oracle_auc": roc_auc(truth["label"], truth["p_true"]),
        "explainable_auc": roc_auc(truth["label"], explainable_logit(truth)),
        "shares": variance_shares(truth),
        "seconds": round(time.perf_counter() - t0, 2),
    }
