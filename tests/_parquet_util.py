"""Small parquet fixtures for the dataset tests: the golden example and a tiny random dataset."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

T = 1772700000  # 2026-03-05 16:40 at UTC+8, a Thursday (pipeline_spec Appendix A)
INT_LIST = pa.list_(pa.int64())

# pipeline_spec Appendix A.
GOLDEN_SCHEMA: Dict[str, Any] = {
    "user_int": [[1, 5, 1], [15, 10, 3]],
    "item_int": [[5, 7, 1]],
    "user_dense": [[61, 2]],
    "seq": {
        "seq_a": {"prefix": "domain_a_seq", "ts_fid": 39, "features": [[38, 100], [39, 0]]},
        "seq_b": {"prefix": "domain_b_seq", "ts_fid": 67, "features": [[67, 0], [68, 10]]},
        "seq_c": {"prefix": "domain_c_seq", "ts_fid": 27, "features": [[27, 0], [28, 10]]},
        "seq_d": {"prefix": "domain_d_seq", "ts_fid": 26, "features": [[17, 10], [26, 0]]},
    },
}
GOLDEN_SEQ_MAX_LENS = "seq_a:2,seq_b:4,seq_c:4,seq_d:4"


def golden_table() -> pa.Table:
    return pa.table({
        "user_id": pa.array([10, 11, 12], pa.int64()),
        "item_id": pa.array([1, 2, 3], pa.int64()),
        "label_type": pa.array([2, 1, None], pa.int32()),
        "label_time": pa.array([T + 5, T + 5, 0], pa.int64()),
        "timestamp": pa.array([T, T, 0], pa.int64()),
        "user_int_feats_1": pa.array([3, -1, None], pa.int64()),
        "user_int_feats_15": pa.array([[1, 2, 3, 4], [-1, 12], None], INT_LIST),
        "item_int_feats_5": pa.array([6, 7, 0], pa.int64()),
        "user_dense_feats_61": pa.array([[1.5, 2.5], [3.0], None], pa.list_(pa.float32())),
        "domain_a_seq_38": pa.array([[5, 6, 7], [], None], INT_LIST),
        "domain_a_seq_39": pa.array([[T - 10, T - 90000, T], [], None], INT_LIST),
        "domain_b_seq_68": pa.array([[1], [2], [3]], INT_LIST),
        "domain_b_seq_67": pa.array([[T - 100], [T - 4 * 86400], [5]], INT_LIST),
        "domain_c_seq_28": pa.array([[1, 1], [], []], INT_LIST),
        "domain_c_seq_27": pa.array([[T + 50, 0], [], []], INT_LIST),
        "domain_d_seq_17": pa.array([[4, 4], [], []], INT_LIST),
        "domain_d_seq_26": pa.array([[T - 1, T - 40_000_000], [], []], INT_LIST),
    })


# A tiny schema for split/worker/shuffle tests: every value is derived from the user id, so that
# a row's features can be checked against its user_id after any shuffling.
TINY_SCHEMA: Dict[str, Any] = {
    "user_int": [[1, 1000, 1], [15, 1000, 2]],
    "item_int": [[5, 1000, 1]],
    "user_dense": [[61, 2]],
    "seq": {
        "seq_a": {"prefix": "domain_a_seq", "ts_fid": 39, "features": [[38, 1000], [39, 0]]},
        "seq_b": {"prefix": "domain_b_seq", "ts_fid": 67, "features": [[67, 0], [68, 1000]]},
        "seq_c": {"prefix": "domain_c_seq", "ts_fid": 27, "features": [[27, 0], [28, 1000]]},
        "seq_d": {"prefix": "domain_d_seq", "ts_fid": 26, "features": [[17, 1000], [26, 0]]},
    },
}
TINY_SEQ_MAX_LENS = "seq_a:3,seq_b:3,seq_c:3,seq_d:3"
# A model that fits TINY_SCHEMA (N_ns 3, T 7: no full mixer) and trains in about a second.
TINY_MODEL_FLAGS = ["--d_model", "16", "--emb_dim", "8", "--num_heads", "2", "--num_queries",
                    "1", "--ns_groups_json", "", "--user_ns_tokens", "1", "--item_ns_tokens",
                    "1", "--rank_mixer_mode", "none", "--hidden_mult", "1",
                    "--num_hyformer_blocks", "1", "--seq_max_lens", TINY_SEQ_MAX_LENS,
                    "--num_workers", "0", "--buffer_batches", "2"]


def tiny_table(user_ids: Sequence[int]) -> pa.Table:
    """Rows whose every feature is a function of the user id (``u % 997 + 1`` and friends)."""
    u = np.asarray(user_ids, dtype=np.int64)
    v = u % 997 + 1
    cols: Dict[str, pa.Array] = {
        "user_id": pa.array(u),
        "label_type": pa.array(np.where(u % 3 == 0, 2, 1).astype(np.int32)),
        "timestamp": pa.array(T + u),
        "user_int_feats_1": pa.array(v),
        "user_int_feats_15": pa.array([[x, x] for x in v.tolist()], INT_LIST),
        "item_int_feats_5": pa.array(v),
        "user_dense_feats_61": pa.array([[float(x), -float(x)] for x in v.tolist()],
                                        pa.list_(pa.float32())),
    }
    for name, dom in TINY_SCHEMA["seq"].items():
        side = [f for f, _ in dom["features"] if f != dom["ts_fid"]][0]
        cols[f"{dom['prefix']}_{side}"] = pa.array([[x, x] for x in v.tolist()], INT_LIST)
        cols[f"{dom['prefix']}_{dom['ts_fid']}"] = pa.array(
            [[T + x - 10, T + x - 20] for x in u.tolist()], INT_LIST)
    return pa.table(cols)


def write_dataset(folder: str, tables: Sequence[pa.Table], schema: Dict[str, Any],
                  rows_per_group: Optional[int] = None, name: str = "part-{}.parquet"
                  ) -> List[str]:
    """One parquet file per table (row groups of ``rows_per_group``) plus schema.json."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for k, table in enumerate(tables):
        path = os.path.join(folder, name.format(k))
        pq.write_table(table, path, row_group_size=rows_per_group or max(1, table.num_rows))
        paths.append(path)
    with open(os.path.join(folder, "schema.json"), "w", encoding="utf-8") as fh:
        json.dump(schema, fh)
    return paths


def varied_table(user_ids: Sequence[int]) -> pa.Table:
    """Like ``tiny_table``, but row u has ``u % 4`` events per domain, 10 s apart, newest first
    (the newest 10 s before the request): histories of 0..3 events."""
    base = tiny_table(user_ids)
    u = np.asarray(user_ids, dtype=np.int64)
    v = u % 997 + 1
    n = (u % 4).tolist()
    for dom in TINY_SCHEMA["seq"].values():
        side = [f for f, _ in dom["features"] if f != dom["ts_fid"]][0]
        ids = pa.array([[x] * k for x, k in zip(v.tolist(), n)], INT_LIST)
        stamps = pa.array([[T + x - 10 * (j + 1) for j in range(k)]
                           for x, k in zip(u.tolist(), n)], INT_LIST)
        for fid, arr in ((side, ids), (dom["ts_fid"], stamps)):
            name = f"{dom['prefix']}_{fid}"
            base = base.set_column(base.schema.get_field_index(name), name, arr)
    return base


def flat(batch) -> Dict[str, Any]:
    """A ``pcvr.batch.Batch`` as one flat dict with the per-row reference's key names
    (``user_int_feats``, ``seq_a``, ``seq_a_len``, ...); the arrays are shared, not copied."""
    out = {"user_int_feats": batch.user_int, "item_int_feats": batch.item_int,
           "user_dense_feats": batch.user_dense, "item_dense_feats": batch.item_dense,
           "label": batch.label, "timestamp": batch.timestamp, "user_id": batch.user_id,
           "hour": batch.hour, "dayofweek": batch.dayofweek, "data_stats": batch.data_stats}
    for d, s in batch.seq.items():
        out.update({d: s.ids, f"{d}_len": s.lens, f"{d}_time_bucket": s.time_bucket,
                    f"{d}_hour": s.hour, f"{d}_dayofweek": s.dayofweek})
    return out
