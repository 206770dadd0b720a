"""Synthetic PCVR demo data in the competition layout, with a known conversion probability.

The generator writes parquet files shaped like the TAAC 2026 PCVR data (pipeline_spec §1.1)
and draws every label from a documented probability, so that a model's AUC can be set against
the best attainable one (the "oracle": ranking by the true probability).

Command line (every option has a keyword twin in ``generate``)::

    python3 demo_data.py --out DIR                      # the default demo data used by run.sh

    --rows N            training rows (default 300000, about 1.1 GB)
    --eval_rows M       rows of the held-out split DIR/eval/ (default 10000; 0 = none)
    --seed S            seed of the whole world and of both splits (default 2026)
    --vocab_cap V       cap every vocab at V so that a CPU can train (default 20000;
                        0 = the online schema's real sizes)
    --seq_len_scale X   history length scale; 1.0 = competition-like lengths (default 0.04:
                        histories of ~12 to ~100 events, at most 160)
    --event_order O     storage order of the events inside each history list:
                        newest_first | oldest_first | unordered (default oldest_first, the
                        append order of an event log; the real order is undocumented)
    --files K           parquet files per split (default 4)
    --rows_per_group R  rows per parquet row group (default 0 = auto: about 16 M list values
                        per group, between 256 and 4096 rows)
    --schema PATH       layout to generate (default: the online platform schema, embedded
                        below; any schema.json with the same key fids works)

Outputs (DIR/eval/ holds the same three things for the held-out split)::

    DIR/schema.json           the layout, vocab sizes after the cap (timestamp fids: vocab 0)
    DIR/part-00000.parquet..  rows sorted by request time, files and row groups in time order
    DIR/truth.npz             sidecar, never matched by '*.parquet': user_id, p_true, label,
                              logit_<effect> (each effect's contribution to the logit, noise
                              included), and category_<column> / type_<column>: the id of
                              every latent category / item type in the columns effects link

Columns: ``user_id`` (int64, unique per row and across splits, so that predictions keyed by
user_id are unambiguous), ``item_id``, ``label_type`` (int32: 2 converted = positive, 1 clicked
but not converted; never null, both splits keep labels for local scoring), ``label_time``
(> timestamp), ``timestamp`` (request time, Unix seconds); then every fid and dim of the
schema: 46 ``user_int_feats_*`` (35 scalar, 11 lists), 10 ``user_dense_feats_*`` (61: 256-d and
87: 320-d user embeddings; 62-66 heavy-tailed values aligned element by element with the int
lists of the same fid; 89-91 ten floats aligned with int 89-91), 14 ``item_int_feats_*`` (fid 11
a tag list) and 45 ``domain_{a,b,c,d}_seq_*`` lists (every list of one domain has the same
length in a row; one column per domain is the event timestamp).

The world (fixed by --seed, shared by both splits): 50,000 persons and 8,000 items. An item has
a category (24, item fid 5), sub-category (96, fid 6), leaf (384, fids 7 and 12), author (fid 8),
type (8, fid 13) and a 4-d latent vector = its category's vector + small noise. A person has a
segment (user fid 1), age (48), gender (49), a 4-d taste vector (visible through the dense
embeddings 61 and 87 and through the categories of its histories), an activity level, and
engagement lists 62-66 whose ids stand for item types (62), categories (63), generic entities
(64), sub-categories (65) and leaves (66), each id paired with a lognormal engagement value
(median ~150, tail to ~1e7) and sorted by it. Every row draws a person, an "intent" category
from the person's taste, a target item (40 % from the intent category, else by popularity)
and, per domain, a history whose length is exponential-like (means at scale 1.0: a/b ~300,
c ~520 (p95 ~1,650), d ~2,400 (p95 4,000), capped at 4,000 x scale; at the default 0.04
a/b ~12, c ~20, d ~100, capped at 160); about a fifth of the events fall in the last five days
and lean towards the intent category. Rows of one person share its user features but draw
their histories independently. A domain's side columns are the event's category, an item id,
attributes of that item, or per-event enums (action types); item ids repeat within a history
(at scale 1.0 about 18 % of a's events repeat an earlier item, 82 % of b's, 90 % of c's and
98 % of d's; real: 25 / 95 / 98 / 99 %).

Planted effects: logit = intercept + scale * (sum of weighted standardised effects + noise).
Each effect is z-scored on a calibration batch; the weights make every effect's share hit its
target (the effects that share the taste vector are correlated); scale and intercept give an
expected oracle AUC of 0.83 and a positive rate of 0.096 (the platform's 0.0959). "Share" is
Cov(effect, explainable logit) / Var(explainable logit), which sums to 1 over the effects.

    effect        share  what raises p                                   aimed at
    base          0.20   main effects: item category, sub-category and   plain NS tokens
                         type; user segment, age (peak ~32), gender
    abs_time      0.22   request in the local (UTC+8) evening,           --use_abs_time_emb,
                         cos(2 pi (hour - 21) / 24), and at weekends     --time_zone_offset_hours 8
    activity      0.10   log1p of the events of the last 1, 3 and 5      --use_user_activity_dense
                         days and of the history length, all domains     (fids 900-915)
    pair_62_66    0.15   sqrt(log1p(value)) that the user's fid 62 list  --use_pair_62_66
                         pairs with the target's item type (fid 13);
                         0 when the type is absent (~56 % of rows)
    seq_affinity  0.15   share of the history (all domains) in the       sequence encoders,
                         target's category; last-5-day events count x3  target attention
    user_x_item   0.08   table: user segment (fid 1) x item category     NS tokenizers, RankMixer
                         group (fid 5, 4 groups)
    dense_dot     0.10   user taste (seen through dense 61 / 87) . item  user dense token x
                         latent vector (category-level)                  item tokens

Unobservable row noise adds 4 % of the total logit variance. abs_time and pair_62_66 together
carry 37 % of the explainable variance, so the baseline configuration (no absolute time, no
pairing, no activity features) is measurably worse than the seed configuration. All effects
act at category, type or segment level (no per-item-id effect) so that a model can learn them
from a few tens of thousands of rows. ``generate`` reports the measured shares per split.

Missing values: nulls and -1 codes in user scalars (101/102/103 about 90 % null), item 83/84/85
about 88 % null, item 11 about 50 % null, a few null lists and embeddings. Out of vocabulary:
2e-4 of the values of user fid 54, item fid 16 and each domain's item-id column are set to
``vocab_size .. vocab_size + 2`` to exercise OOV handling; every other id lies in
``[1, vocab_size - 1]``. With a small --vocab_cap latent categories share ids (modulo).

Determinism: the same options give byte-identical files (seeded numpy streams per world,
split and row group; no timestamps in the parquet or npz metadata; same pyarrow version).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pcvr.demo.oracle import TRUTH_FILE

# --------------------------------------------------------------------------------------------
# Options and constants
# --------------------------------------------------------------------------------------------

# One pass over this many fresh rows beats several passes over fewer (run.sh's demo trains one
# epoch; README "Demo quality").
DEFAULT_ROWS = 300000
DEFAULT_EVAL_ROWS = 10000
DEFAULT_SEED = 2026
DEFAULT_VOCAB_CAP = 20000
DEFAULT_SEQ_LEN_SCALE = 0.04
DEFAULT_FILES = 4
EVENT_ORDERS = ("newest_first", "oldest_first", "unordered")
DEFAULT_EVENT_ORDER = "oldest_first"
SCHEMA_FILE = "schema.json"
EVAL_SUBDIR = "eval"
PARQUET_COMPRESSION = "zstd"

# The online platform schema (reference/schemas/online_schema.json), embedded so that the
# project needs nothing outside itself: (fid, vocab_size, dim) / (fid, dim) / per domain
# (prefix, ts_fid, ((fid, vocab_size), ...)).
ONLINE_USER_INT = (
    (1, 6, 1), (3, 1725, 1), (4, 957, 1), (15, 1167, 26), (48, 101, 1), (49, 3, 1),
    (50, 4, 1), (51, 144, 1), (52, 177, 1), (53, 548, 1), (54, 2848, 1), (55, 40, 1),
    (56, 1423, 1), (57, 241, 1), (58, 3, 1), (59, 17, 1), (60, 3, 2), (62, 11, 6),
    (63, 49, 19), (64, 51, 26), (65, 425, 111), (66, 1403, 150), (80, 13, 6), (82, 24, 1),
    (86, 241, 1), (89, 10, 10), (90, 10, 10), (91, 10, 10), (92, 3, 1), (93, 38, 1),
    (94, 7, 1), (95, 4, 1), (96, 4, 1), (97, 4, 1), (98, 4, 1), (99, 4, 1), (100, 4, 1),
    (101, 4, 1), (102, 4, 1), (103, 4, 1), (104, 4, 1), (105, 4, 1), (106, 4, 1),
    (107, 4, 1), (108, 8, 1), (109, 8, 1))
ONLINE_ITEM_INT = (
    (5, 309, 1), (6, 912, 1), (7, 2443, 1), (8, 2131, 1), (9, 42, 1), (10, 300, 1),
    (11, 21528, 20), (12, 2443, 1), (13, 9, 1), (16, 23700, 1), (81, 3, 1), (83, 32, 1),
    (84, 234, 1), (85, 1084, 1))
ONLINE_USER_DENSE = (
    (61, 256), (62, 6), (63, 19), (64, 26), (65, 111), (66, 150), (87, 320), (89, 10),
    (90, 10), (91, 10))
ONLINE_SEQ = {
    "seq_a": ("domain_a_seq", 39, (
        (38, 745286), (39, 0), (40, 19), (41, 11), (42, 1005), (43, 3342), (44, 12735),
        (45, 7612), (46, 18))),
    "seq_b": ("domain_b_seq", 67, (
        (67, 0), (68, 28), (69, 64710562), (70, 726), (71, 2669), (72, 10203), (73, 6761),
        (74, 476333), (75, 31), (76, 132080), (77, 166), (78, 4229), (79, 11387),
        (88, 199678))),
    "seq_c": ("domain_c_seq", 27, (
        (27, 0), (28, 73), (29, 5764358), (30, 846), (31, 6805), (32, 7), (33, 5),
        (34, 1031305), (35, 2896), (36, 977479), (37, 9433), (47, 86335515))),
    "seq_d": ("domain_d_seq", 26, (
        (17, 5), (18, 966), (19, 3300), (20, 10785), (21, 4929), (22, 404398),
        (23, 606041), (24, 531), (25, 15), (26, 0))),
}

# Time: the training split covers 14 local days before TRAIN_END, the held-out split the 3
# days after it (like the platform's later test set).
TZ_OFFSET_S = 8 * 3600
DAY_S = 86400
TRAIN_END = 1772640000          # 2026-03-05 00:00 UTC+8, a Thursday
TRAIN_DAYS = 14
EVAL_DAYS = 3
# First user_id of each split: ids stay unique across splits up to 80 M training rows.
TRAIN_USER_ID0, EVAL_USER_ID0 = 10_000_000, 90_000_000
# Relative traffic per local hour: quiet nights, a lunch bump and an evening peak.
TRAFFIC_BY_HOUR = np.array([
    2.0, 1.2, 0.7, 0.5, 0.4, 0.5, 1.0, 2.0, 3.0, 3.5, 3.8, 4.2,
    4.8, 4.5, 4.0, 4.0, 4.2, 4.6, 5.2, 6.0, 6.6, 6.8, 5.8, 3.8])

# World sizes (latent entities; ids are spread over each column's vocab).
N_PERSONS = 50000
N_ITEMS = 8000
N_CATEGORIES = 24
SUBCATS_PER_CATEGORY = 4
LEAVES_PER_SUBCAT = 4
N_AUTHORS = 1200
N_ITEM_TYPES = 8
N_SEGMENTS = 5
CATEGORY_GROUPS = 4            # user_x_item acts on groups of categories (category % 4)
EMBED_NOISE_DIM = 16
N_GENERIC_ENTITIES = 50         # entities behind user fid 64
N_TAGS_PER_CATEGORY = 800       # item fid 11
LATENT_DIM = 4
TASTE_TABLE = 64                # quantile table per person for fast category draws
INTENT_TARGET_RATE = 0.4        # targets drawn from the row's intent category
INTENT_EVENT_RATE = 0.6         # recent events in the intent category

# Histories: per domain (raw mean length at scale 1.0, personal item slots per category,
# share of events on the domain's popular items). Few slots and few popular events make the
# heavy repeats of the real data (repeat rates a 0.25, b 0.95, c 0.98, d 0.99). Unknown
# domains of a custom schema get SEQ_DEFAULT_PROFILE.
SEQ_PROFILES = {"seq_a": (300.0, 400, 0.5), "seq_b": (300.0, 4, 0.05),
                "seq_c": (500.0, 3, 0.03), "seq_d": (3500.0, 2, 0.01)}
SEQ_DEFAULT_PROFILE = (300.0, 50, 0.3)
SEQ_LEN_CAP = 4000              # at scale 1.0
SEQ_ITEMS_PER_CATEGORY = 2000   # item universe of a domain = categories x this
RECENT_WINDOW_S = 5 * DAY_S
RECENT_MEAN_AGE_S = 1.2 * DAY_S
OLD_MAX_AGE_S = 365 * DAY_S
AFFINITY_RECENT_WEIGHT = 3.0   # an event of the last 5 days counts 3 times in seq_affinity
ENUM_MAX_VOCAB = 64             # side columns this small are per-event enums

OOV_RATE = 2e-4
OOV_USER_FIDS = (54,)
OOV_ITEM_FIDS = (16,)
LIST_VALUES_PER_GROUP = 16_000_000


@dataclass(frozen=True)
class Effect:
    """One planted effect: its name, what should capture it, its target variance share."""
    name: str
    target: str
    share: float


EFFECTS: Tuple[Effect, ...] = (
    Effect("base", "plain NS tokens (item 5/6/13, user 1/48/49)", 0.20),
    Effect("abs_time", "--use_abs_time_emb --time_zone_offset_hours 8", 0.22),
    Effect("activity", "--use_user_activity_dense (fids 900-915)", 0.10),
    Effect("pair_62_66", "--use_pair_62_66", 0.15),
    Effect("seq_affinity", "sequence encoders / target attention", 0.15),
    Effect("user_x_item", "NS tokenizers / RankMixer (user 1 x item 5 group)", 0.08),
    Effect("dense_dot", "user dense token (61, 87) x item tokens", 0.10),
)
NOISE_SHARE = 0.04              # of the total logit variance, unobservable
TARGET_POS_RATE = 0.096
TARGET_ORACLE_AUC = 0.83
PAIR_WEIGHTS = {62: 1.0}           # pair_62_66 effect mix over the linked fids
PAIR_LOG_MEAN, PAIR_LOG_TASTE, PAIR_LOG_NOISE = 5.0, 0.8, 3.5

# Fids the planted effects need; a custom --schema must keep them.
REQUIRED_USER_INT = (1, 48, 49, 62)
REQUIRED_USER_DENSE = (61, 62, 87)
REQUIRED_ITEM_INT = (5, 6, 13)


# --------------------------------------------------------------------------------------------
# Small numeric helpers
# --------------------------------------------------------------------------------------------

def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC of ``scores`` against binary ``labels``; tied scores share their average rank."""
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both positive and negative labels")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    starts = np.concatenate(([0], np.flatnonzero(np.diff(sorted_s)) + 1))
    ends = np.concatenate((starts[1:], [s.size]))
    ranks = np.empty(s.size)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)   # 1-based, averaged
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _expected_auc(p_by_score: np.ndarray) -> float:
    """AUC expected when labels are drawn from ``p`` (rows sorted by ascending score)."""
    neg = 1.0 - p_by_score
    below = np.cumsum(neg) - neg
    pairs = p_by_score.sum() * neg.sum() - (p_by_score * neg).sum()
    return float((p_by_score * below).sum() / pairs)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _power_index(rng: np.random.Generator, n: int, size: int, a: float) -> np.ndarray:
    """Indices in [0, n) skewed towards 0 (P(index < k) = (k/n)^(1/a)): popular values."""
    return np.minimum((n * rng.random(size) ** a).astype(np.int64), max(n - 1, 0))


def _categorical(rng: np.random.Generator, cum: np.ndarray, size: int) -> np.ndarray:
    """Draws indices from a cumulative distribution ``cum`` (last value 1)."""
    return np.minimum(np.searchsorted(cum, rng.random(size), side="right"), cum.size - 1)


def _lengths_to_offsets(lengths: np.ndarray) -> np.ndarray:
    offsets = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def _segment_positions(offsets: np.ndarray, idx: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(new offsets, flat positions) that gather the segments ``idx`` of a ragged array."""
    starts = offsets[idx]
    lengths = offsets[idx + 1] - starts
    new_offsets = _lengths_to_offsets(lengths)
    pos = np.arange(new_offsets[-1], dtype=np.int64)
    pos += np.repeat(starts - new_offsets[:-1], lengths)
    return new_offsets, pos


@dataclass(frozen=True)
class _IdMap:
    """Affine map of latent indices onto ids 1..vocab-1 (no collision while n < vocab)."""
    m: int
    a: int
    b: int

    @staticmethod
    def make(rng: np.random.Generator, vocab: int) -> "_IdMap":
        m = max(int(vocab) - 1, 0)
        if m <= 1:
            return _IdMap(m, 1, 0)
        a = int(rng.integers(max(1, m // 3), m))
        while math.gcd(a, m) != 1:
            a = a % (m - 1) + 1
        return _IdMap(m, a, int(rng.integers(0, m)))

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        if self.m <= 0:
            return np.zeros_like(idx)
        return 1 + (self.a * (idx % self.m) + self.b) % self.m


# --------------------------------------------------------------------------------------------
# Layout (schema) handling
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SeqLayout:
    """One sequence domain: column prefix, timestamp fid, (fid, declared vocab, capped vocab)."""
    name: str
    prefix: str
    ts_fid: int
    features: Tuple[Tuple[int, int, int], ...]


@dataclass(frozen=True)
class Layout:
    """The columns to write; int vocab sizes are given as (declared, after the cap)."""
    user_int: Tuple[Tuple[int, int, int, int], ...]    # (fid, declared, vocab, dim)
    item_int: Tuple[Tuple[int, int, int, int], ...]
    user_dense: Tuple[Tuple[int, int], ...]            # (fid, dim)
    seq: Tuple[SeqLayout, ...]                         # sorted by domain name

    def schema_json(self) -> Dict[str, Any]:
        """The schema.json written next to the data (vocab sizes after the cap)."""
        return {
            "format": "raw_parquet",
            "user_int": [[f, v, d] for f, _, v, d in self.user_int],
            "item_int": [[f, v, d] for f, _, v, d in self.item_int],
            "user_dense": [[f, d] for f, d in self.user_dense],
            "seq": {s.name: {"prefix": s.prefix, "ts_fid": s.ts_fid,
                             "features": [[f, v] for f, _, v in s.features]}
                    for s in self.seq},
        }

    def arrow_schema(self) -> pa.Schema:
        """Column names and types of every parquet file (pipeline_spec §1.1)."""
        i64, ints, floats = pa.int64(), pa.list_(pa.int64()), pa.list_(pa.float32())
        fields = [pa.field("user_id", i64), pa.field("item_id", i64),
                  pa.field("label_type", pa.int32()), pa.field("label_time", i64),
                  pa.field("timestamp", i64)]
        fields += [pa.field(f"user_int_feats_{f}", i64 if d == 1 else ints)
                   for f, _, _, d in self.user_int]
        fields += [pa.field(f"user_dense_feats_{f}", floats) for f, _ in self.user_dense]
        fields += [pa.field(f"item_int_feats_{f}", i64 if d == 1 else ints)
                   for f, _, _, d in self.item_int]
        fields += [pa.field(f"{s.prefix}_{f}", ints) for s in self.seq for f, _, _ in s.features]
        return pa.schema(fields)


def _online_schema() -> Dict[str, Any]:
    return {
        "user_int": [list(e) for e in ONLINE_USER_INT],
        "item_int": [list(e) for e in ONLINE_ITEM_INT],
        "user_dense": [list(e) for e in ONLINE_USER_DENSE],
        "seq": {name: {"prefix": p, "ts_fid": ts, "features": [list(e) for e in feats]}
                for name, (p, ts, feats) in ONLINE_SEQ.items()},
    }


def load_layout(schema: Union[None, str, Mapping[str, Any]] = None,
                vocab_cap: int = DEFAULT_VOCAB_CAP) -> Layout:
    """Builds the layout from a schema.json path or dict (None = the embedded online schema).

    Vocab sizes are capped at ``vocab_cap`` (0 = no cap); timestamp fids always get vocab 0.
    Raises ValueError when the schema is malformed or lacks a fid the planted effects need.
    """
    if schema is None:
        raw: Mapping[str, Any] = _online_schema()
    elif isinstance(schema, str):
        with open(schema, "r", encoding="utf-8") as fh:
            raw = json.load(fh)
    else:
        raw = schema
    if vocab_cap < 0:
        raise ValueError(f"vocab_cap must be >= 0, got {vocab_cap}")

    def cap(v: int) -> int:
        return min(int(v), vocab_cap) if vocab_cap > 0 and v > 0 else int(v)

    try:
        user_int = tuple((int(f), int(v), cap(v), int(d)) for f, v, d in raw["user_int"])
        item_int = tuple((int(f), int(v), cap(v), int(d)) for f, v, d in raw["item_int"])
        user_dense = tuple((int(f), int(d)) for f, d in raw["user_dense"])
        seq = []
        for name in sorted(raw["seq"]):
            dom = raw["seq"][name]
            ts_fid = int(dom["ts_fid"])
            feats = tuple((int(f), int(v), 0 if int(f) == ts_fid else cap(v))
                          for f, v in dom["features"])
            if ts_fid not in [f for f, _, _ in feats] or len(feats) < 2:
                raise ValueError(f"seq domain {name!r} needs its ts fid and a side column")
            seq.append(SeqLayout(name, str(dom["prefix"]), ts_fid, feats))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"malformed schema: {exc!r}") from None
    if raw.get("item_dense"):
        raise ValueError("schemas with an item_dense group are not supported")
    missing = ([f"user_int {f}" for f in REQUIRED_USER_INT if f not in [e[0] for e in user_int]]
               + [f"user_dense {f}" for f in REQUIRED_USER_DENSE
                  if f not in [e[0] for e in user_dense]]
               + [f"item_int {f}" for f in REQUIRED_ITEM_INT if f not in [e[0] for e in item_int]])
    if missing or not seq:
        raise ValueError(f"the planted effects need fids missing from the schema: {missing} "
                         f"(and at least one sequence domain)")
    return Layout(user_int, item_int, user_dense, tuple(seq))


# --------------------------------------------------------------------------------------------
# The generative world
# --------------------------------------------------------------------------------------------

@dataclass
class _Ragged:
    """Per-entity lists (persons or items): offsets, int values, optional aligned floats."""
    offsets: np.ndarray
    values: np.ndarray
    null: np.ndarray
    dense: Optional[np.ndarray] = None

    def take(self, idx: np.ndarray) -> "_Ragged":
        offsets, pos = _segment_positions(self.offsets, idx)
        return _Ragged(offsets, self.values[pos], self.null[idx],
                       None if self.dense is None else self.dense[pos])


@dataclass
class _Items:
    """The target-item catalogue."""
    cat: np.ndarray
    sub: np.ndarray
    itype: np.ndarray
    latent: np.ndarray              # (N_ITEMS, LATENT_DIM)
    key: np.ndarray                 # the item_id column
    pop_cum: np.ndarray             # global popularity, cumulative
    by_cat: np.ndarray              # item indices sorted by category
    by_cat_cum: np.ndarray          # category + within-category cumulative popularity
    scalars: Dict[int, Tuple[np.ndarray, np.ndarray]]   # fid -> (ids, null)
    lists: Dict[int, _Ragged]


@dataclass
class _Embedding:
    """A fixed-width user dense fid: values = clip(person inputs @ proj), 1/256 resolution."""
    proj: np.ndarray
    low: float
    high: float
    null: np.ndarray

    def rows(self, inputs: np.ndarray) -> np.ndarray:
        values = np.clip(inputs @ self.proj, self.low, self.high)
        return np.round(values * 256.0) / 256.0     # coarse enough for parquet to compress


@dataclass
class _Persons:
    """The user pool."""
    segment: np.ndarray
    age: np.ndarray
    gender: np.ndarray
    taste_table: np.ndarray         # (P, TASTE_TABLE) category quantiles
    activity: np.ndarray
    visit_cum: np.ndarray
    latent: np.ndarray              # (P, LATENT_DIM)
    pair_w: Dict[int, np.ndarray]   # fid -> (P, entities) sqrt(log1p(value)), 0 = absent
    scalars: Dict[int, Tuple[np.ndarray, np.ndarray]]
    lists: Dict[int, _Ragged]       # int lists, with aligned dense values where they exist
    embed_inputs: np.ndarray        # (P, inputs) behind the fixed-width dense fids
    embeddings: Dict[int, _Embedding]


@dataclass
class _Domain:
    """One sequence domain: column roles and the attributes of its item universe."""
    layout: SeqLayout
    mean_len: float                 # after --seq_len_scale
    cap: int
    slots: int
    popular_rate: float
    item_fid: int
    cat_fid: int
    cat_map: _IdMap
    enums: Dict[int, np.ndarray]    # fid -> cumulative distribution over ids 1..vocab-1
    attrs: Dict[int, np.ndarray]    # fid -> id per universe item (item-id column included)


@dataclass
class _Calibration:
    """Standardisation, weights and scale of the logit, fixed once per world."""
    mean: Dict[str, float]
    std: Dict[str, float]
    weight: Dict[str, float]        # per standardised effect, so that shares hit the targets
    x_std: float
    scale: float
    intercept: float
    list_values_per_row: float


@dataclass
class _World:
    layout: Layout
    seed: int
    items: _Items
    persons: _Persons
    domains: List[_Domain]
    tables: Dict[str, np.ndarray]
    maps: Dict[str, _IdMap]
    calib: Optional[_Calibration] = None


def _id_scalar(rng: np.random.Generator, vocab: int, n: int) -> np.ndarray:
    """Skewed ids of a generic categorical column (small vocabs: random probabilities)."""
    m = max(vocab - 1, 0)
    if m == 0:
        return np.zeros(n, dtype=np.int64)
    if m <= 8:
        return 1 + _categorical(rng, np.cumsum(rng.dirichlet(np.full(m, 1.0))), n)
    return _IdMap.make(rng, vocab)(_power_index(rng, m, n, rng.uniform(1.5, 4.0)))


def _null_mask(rng: np.random.Generator, n: int, rate: float) -> np.ndarray:
    return rng.random(n) < rate


def _ragged_from_lengths(lengths: np.ndarray, values: np.ndarray, null: np.ndarray,
                         dense: Optional[np.ndarray] = None) -> _Ragged:
    return _Ragged(_lengths_to_offsets(lengths), values, null, dense)


def _generic_list(rng: np.random.Generator, n: int, vocab: int, dim: int, mean_len: float,
                  null_rate: float) -> _Ragged:
    """Multi-hot lists of distinct skewed ids, at most ``dim`` long."""
    null = _null_mask(rng, n, null_rate)
    lengths = np.where(null, 0, np.minimum(rng.poisson(mean_len, n), dim))
    rows = np.repeat(np.arange(n), lengths)
    ids = _id_scalar(rng, vocab, rows.size)
    order = np.lexsort((ids, rows))
    rows, ids = rows[order], ids[order]
    keep = np.ones(ids.size, dtype=bool)
    keep[1:] = (rows[1:] != rows[:-1]) | (ids[1:] != ids[:-1])
    return _ragged_from_lengths(np.bincount(rows[keep], minlength=n), ids[keep], null)


def _entity_lists(rng: np.random.Generator, scores: np.ndarray, mean_len: np.ndarray,
                  dim: int, null: np.ndarray
                  ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-person engagement lists (fids 62-66): the top entities by ``scores`` + Gumbel noise.

    Returns (list lengths, entity, engagement value, owning person) per element, each list
    sorted by descending value; values are lognormal, higher for the person's taste.
    """
    n, k = scores.shape
    lengths = np.where(null, 0, np.minimum(rng.poisson(mean_len), min(dim, k)))
    top = max(int(lengths.max()), 1)
    noisy = scores - np.log(-np.log(rng.random((n, k), dtype=np.float32) + 1e-12))
    best = np.argpartition(-noisy, top - 1, axis=1)[:, :top]      # the top entities, unsorted
    entity = best[np.arange(top)[None, :] < lengths[:, None]]
    owner = np.repeat(np.arange(n), lengths)
    z = (scores - scores.mean()) / (scores.std() + 1e-9)
    log_w = PAIR_LOG_MEAN + PAIR_LOG_TASTE * z[owner, entity] \
        + PAIR_LOG_NOISE * rng.standard_normal(owner.size)
    values = np.exp(np.clip(log_w, 0.0, math.log(5e7))).astype(np.float32)
    by_value = np.lexsort((-values, owner))
    return lengths, entity[by_value], values[by_value], owner


def _build_items(rng: np.random.Generator, layout: Layout, cat_z: np.ndarray,
                 maps: Dict[str, _IdMap]) -> _Items:
    n = N_ITEMS
    cat_weights = rng.dirichlet(np.full(N_CATEGORIES, 3.0))
    cat = _categorical(rng, np.cumsum(cat_weights), n)
    sub = cat * SUBCATS_PER_CATEGORY + rng.integers(0, SUBCATS_PER_CATEGORY, n)
    leaf = sub * LEAVES_PER_SUBCAT + _power_index(rng, LEAVES_PER_SUBCAT, n, 1.5)
    author = cat + N_CATEGORIES * _power_index(rng, N_AUTHORS // N_CATEGORIES, n, 2.0)
    itype = (cat + _power_index(rng, N_ITEM_TYPES, n, 2.5)) % N_ITEM_TYPES
    latent = cat_z[cat] + 0.2 * rng.standard_normal((n, LATENT_DIM))
    pop = (np.arange(n) + 10.0) ** -1.1
    pop = pop[rng.permutation(n)]
    by_cat = np.lexsort((np.arange(n), cat))
    cum_within = np.empty(n)
    for c in range(N_CATEGORIES):       # 24 iterations over the catalogue, not over rows
        members = by_cat[cat[by_cat] == c]
        cum_within[cat[by_cat] == c] = np.cumsum(pop[members]) / pop[members].sum()
    key = _IdMap.make(rng, 2 ** 31)(np.arange(n))

    scalars: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}
    lists: Dict[int, _Ragged] = {}
    latent_of = {5: cat, 6: sub, 7: leaf, 8: author, 12: leaf, 13: itype, 16: np.arange(n)}
    for fid, _, vocab, dim in layout.item_int:
        if dim > 1:
            # Tag lists: tags of the item's category, about half of the items have none.
            null = _null_mask(rng, n, 0.5)
            lengths = np.where(null, 0, np.minimum(1 + rng.poisson(4.0, n), dim))
            owner = np.repeat(np.arange(n), lengths)
            tags = cat[owner] * N_TAGS_PER_CATEGORY + _power_index(
                rng, N_TAGS_PER_CATEGORY, owner.size, 2.0)
            lists[fid] = _ragged_from_lengths(lengths, _IdMap.make(rng, vocab)(tags), null)
            continue
        if fid in latent_of:
            maps[f"item_{fid}"] = _IdMap.make(rng, vocab)
            ids = maps[f"item_{fid}"](latent_of[fid])
            null_rate = 0.0
        else:
            ids = _id_scalar(rng, vocab, n)
            null_rate = 0.88 if fid in (83, 84, 85) else rng.uniform(0.0, 0.02)
        scalars[fid] = (ids, _null_mask(rng, n, null_rate))
    return _Items(cat, sub, itype, latent, key, np.cumsum(pop) / pop.sum(), by_cat,
                  cat[by_cat] + cum_within, scalars, lists)


def _build_persons(rng: np.random.Generator, layout: Layout, cat_z: np.ndarray,
                   maps: Dict[str, _IdMap]) -> _Persons:
    n = N_PERSONS
    segment = _categorical(rng, np.cumsum([0.3, 0.25, 0.2, 0.15, 0.1]), n)
    age = np.clip(np.round(rng.normal(34.0, 11.0, n)), 16, 75).astype(np.int64)
    gender = rng.integers(0, 2, n)
    latent = rng.standard_normal((n, LATENT_DIM))
    taste = latent @ cat_z.T / 1.3
    prob = np.exp(taste - taste.max(axis=1, keepdims=True))
    cum = np.cumsum(prob / prob.sum(axis=1, keepdims=True), axis=1)
    cum[:, -1] = 1.0
    # Row p's quantiles searched in its own cumulative distribution, all rows at once.
    shift = 2.0 * np.arange(n)[:, None]
    quantiles = (np.arange(TASTE_TABLE) + 0.5) / TASTE_TABLE
    taste_table = (np.searchsorted((cum + shift).ravel(), (quantiles + shift).ravel())
                   .reshape(n, TASTE_TABLE) - N_CATEGORIES * np.arange(n)[:, None])
    activity = np.exp(rng.normal(0.0, 0.35, n) - 0.35 ** 2 / 2)
    visits = np.sqrt(activity)
    visit_cum = np.cumsum(visits) / visits.sum()

    scalars: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}
    lists: Dict[int, _Ragged] = {}
    pair_w: Dict[int, np.ndarray] = {}
    engaged_null = _null_mask(rng, n, 0.08)       # persons without engagement lists 62-66
    f32 = np.float32
    sub_taste = np.repeat(taste.astype(f32), SUBCATS_PER_CATEGORY, axis=1)
    entity_scores = {   # fid 66 picks sub-categories here, then one leaf in each
        62: rng.standard_normal((n, N_ITEM_TYPES), dtype=f32),
        63: taste.astype(f32),
        64: rng.standard_normal((n, N_GENERIC_ENTITIES), dtype=f32),
        65: sub_taste + 0.7 * rng.standard_normal(sub_taste.shape, dtype=f32),
        66: sub_taste + 0.7 * rng.standard_normal(sub_taste.shape, dtype=f32),
    }
    entity_mean_len = {62: 4.0, 63: 4.0, 64: 6.0, 65: 12.0, 66: 16.0}
    dense_fids = {f for f, _ in layout.user_dense}
    latent_of = {1: segment, 48: age, 49: gender}
    for fid, _, vocab, dim in layout.user_int:
        if fid in entity_scores:
            lengths, entity, values, owner = _entity_lists(
                rng, entity_scores[fid], entity_mean_len[fid] * activity ** 0.7, dim,
                engaged_null)
            if fid == 66:
                entity = entity * LEAVES_PER_SUBCAT + rng.integers(0, LEAVES_PER_SUBCAT,
                                                                   entity.size)
            if fid in PAIR_WEIGHTS:
                # Engagement on a sqrt-log scale, as the pair pooling weighs an id; 0 = absent.
                pair_w[fid] = np.zeros(entity_scores[fid].shape, dtype=f32)
                pair_w[fid][owner, entity] = np.sqrt(np.log1p(values))
            maps[f"user_{fid}"] = _IdMap.make(rng, vocab)
            lists[fid] = _ragged_from_lengths(lengths, maps[f"user_{fid}"](entity),
                                              engaged_null, values if fid in dense_fids else None)
        elif dim > 1 and fid in dense_fids:
            # Aligned int + float lists (89-91): mostly full, a few short, some null.
            null = _null_mask(rng, n, 0.12)
            lengths = np.where(null, 0, np.where(rng.random(n) < 0.8, dim,
                                                 rng.integers(1, dim + 1, n)))
            total = int(lengths.sum())
            dense = np.clip(rng.normal(0.0, 0.2, total), -0.6, 0.7).astype(f32)
            lists[fid] = _ragged_from_lengths(lengths, _id_scalar(rng, vocab, total), null, dense)
        elif dim > 1:
            lists[fid] = _generic_list(rng, n, vocab, dim, min(6.0, dim / 2.0 + 0.5),
                                       rng.uniform(0.05, 0.25))
        elif fid in latent_of:
            if fid == 48 and vocab > int(age.max()):
                ids = age.copy()                  # the age itself, like a real age column
            else:
                maps[f"user_{fid}"] = _IdMap.make(rng, vocab)
                ids = maps[f"user_{fid}"](latent_of[fid])
            ids[_null_mask(rng, n, 0.01 if fid == 48 else 0.0)] = -1
            scalars[fid] = (ids, np.zeros(n, dtype=bool))
        else:
            ids = _id_scalar(rng, vocab, n)
            if rng.random() < 0.5:
                ids[_null_mask(rng, n, rng.uniform(0.0, 0.03))] = -1
            null_rate = rng.uniform(0.88, 0.92) if fid in (101, 102, 103) \
                else rng.uniform(0.0, 0.03)
            scalars[fid] = (ids, _null_mask(rng, n, null_rate))

    # Fixed-width dense embeddings are computed per row from a few person inputs: taste (4),
    # segment (5), log activity (1) and a private noise vector (16). 61 projects taste + noise,
    # 87 taste, segment, activity + noise; other fixed-width fids of a custom schema, noise.
    inputs = np.concatenate([latent, np.eye(N_SEGMENTS)[segment], np.log(activity)[:, None],
                             rng.standard_normal((n, EMBED_NOISE_DIM))], axis=1).astype(f32)
    n_profile = inputs.shape[1] - EMBED_NOISE_DIM
    embeddings: Dict[int, _Embedding] = {}
    for fid, dim in layout.user_dense:
        if fid in lists:
            continue
        proj = np.zeros((inputs.shape[1], dim), dtype=f32)
        noise_rows = slice(n_profile, None)
        if fid == 61:
            proj[:LATENT_DIM] = 0.025 * rng.standard_normal((LATENT_DIM, dim))
            proj[noise_rows] = 0.01 * rng.standard_normal((EMBED_NOISE_DIM, dim))
            low, high = -0.25, 0.2
        elif fid == 87:
            proj[:n_profile] = 0.05 * rng.standard_normal((n_profile, dim))
            proj[noise_rows] = 0.025 * rng.standard_normal((EMBED_NOISE_DIM, dim))
            low, high = -0.68, 0.68
        else:
            proj[noise_rows] = 0.025 * rng.standard_normal((EMBED_NOISE_DIM, dim))
            low, high = -1.0, 1.0
        embeddings[fid] = _Embedding(proj, low, high, _null_mask(rng, n, 0.005))
    return _Persons(segment, age, gender, taste_table, activity, visit_cum, latent,
                    pair_w, scalars, lists, inputs, embeddings)


def _build_domain(rng: np.random.Generator, seq: SeqLayout, seq_len_scale: float) -> _Domain:
    """Assigns column roles by vocab size and draws the attributes of the domain's items."""
    mean_len, slots, popular_rate = SEQ_PROFILES.get(seq.name, SEQ_DEFAULT_PROFILE)
    side = [(f, declared, vocab) for f, declared, vocab in seq.features if f != seq.ts_fid]
    item_fid = max(side, key=lambda e: e[1])[0]
    rest = [e for e in side if e[0] != item_fid]
    wide = [e for e in rest if e[1] > N_CATEGORIES]
    cat_fid = (min(wide, key=lambda e: e[1]) if wide
               else max(rest or side, key=lambda e: e[1]))[0]
    universe = N_CATEGORIES * SEQ_ITEMS_PER_CATEGORY
    cat_map = _IdMap.make(rng, next(v for f, _, v in side if f == cat_fid))
    enums: Dict[int, np.ndarray] = {}
    attrs: Dict[int, np.ndarray] = {}
    for fid, declared, vocab in side:
        if fid == cat_fid:
            continue
        if fid == item_fid:
            attrs[fid] = _IdMap.make(rng, vocab)(rng.permutation(universe))
        elif declared <= ENUM_MAX_VOCAB:
            m = max(vocab - 1, 1)
            enums[fid] = np.cumsum(rng.dirichlet(np.full(m, 0.7)))
        else:
            attrs[fid] = _id_scalar(rng, vocab, universe)
    return _Domain(seq, mean_len * seq_len_scale, max(1, round(SEQ_LEN_CAP * seq_len_scale)),
                   slots, popular_rate, item_fid, cat_fid, cat_map, enums, attrs)


def _build_world(seed: int = DEFAULT_SEED, layout: Optional[Layout] = None,
                seq_len_scale: float = DEFAULT_SEQ_LEN_SCALE) -> _World:
    """The generative world of ``seed``: items, persons, domains, effect tables, calibration."""
    if seq_len_scale <= 0:
        raise ValueError(f"seq_len_scale must be > 0, got {seq_len_scale}")
    layout = layout or load_layout()
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    cat_z = rng.standard_normal((N_CATEGORIES, LATENT_DIM))
    maps: Dict[str, _IdMap] = {}
    items = _build_items(rng, layout, cat_z, maps)
    persons = _build_persons(rng, layout, cat_z, maps)
    domains = [_build_domain(rng, s, seq_len_scale) for s in layout.seq]
    tables = {
        "cat": rng.normal(0.0, 1.0, N_CATEGORIES),
        "sub": rng.normal(0.0, 0.5, N_CATEGORIES * SUBCATS_PER_CATEGORY),
        "type": rng.normal(0.0, 0.6, N_ITEM_TYPES),
        "segment": rng.normal(0.0, 0.8, N_SEGMENTS),
        "gender": np.array([-0.2, 0.2]),
        # Segment x category-group table: few strong cells, learnable from a demo.
        "segment_x_group": rng.normal(0.0, 1.0, (N_SEGMENTS, CATEGORY_GROUPS)),
    }
    world = _World(layout, seed, items, persons, domains, tables, maps)
    world.calib = _calibrate(world)
    return world


# --------------------------------------------------------------------------------------------
# Rows: who sees what, when, with which history
# --------------------------------------------------------------------------------------------

@dataclass
class _Rows:
    """Per row: request time, person, intent category and target item (latent indices)."""
    ts: np.ndarray
    person: np.ndarray
    intent: np.ndarray
    item: np.ndarray

    def slice(self, lo: int, hi: int) -> "_Rows":
        return _Rows(self.ts[lo:hi], self.person[lo:hi], self.intent[lo:hi], self.item[lo:hi])


@dataclass
class _History:
    """One domain's events, flat in row order: owning row, timestamp, age, latent category."""
    offsets: np.ndarray
    row: np.ndarray
    ts: np.ndarray
    age: np.ndarray
    cat: np.ndarray


def _local_hours(rng: np.random.Generator, n: int) -> np.ndarray:
    return _categorical(rng, np.cumsum(TRAFFIC_BY_HOUR) / TRAFFIC_BY_HOUR.sum(), n)


def _draw_rows(world: _World, rng: np.random.Generator, n: int, start: int, days: int) -> _Rows:
    """Requests in ``days`` local days from ``start`` (sorted by time) and their targets."""
    ts = (start + rng.integers(0, days, n) * DAY_S + _local_hours(rng, n) * 3600
          + rng.integers(0, 3600, n))
    ts.sort()
    p = world.persons
    person = _categorical(rng, p.visit_cum, n)
    intent = p.taste_table[person, rng.integers(0, TASTE_TABLE, n)]
    it = world.items
    from_intent = rng.random(n) < INTENT_TARGET_RATE
    pos = np.searchsorted(it.by_cat_cum, intent + rng.random(n))
    in_cat = it.by_cat[np.minimum(pos, N_ITEMS - 1)]
    item = np.where(from_intent, in_cat, _categorical(rng, it.pop_cum, n))
    return _Rows(ts.astype(np.int64), person, intent, item)


def _draw_histories(world: _World, rng: np.random.Generator, rows: _Rows) -> List[_History]:
    """Per domain: lengths, event times (a fifth in the last 5 days) and categories."""
    n = rows.ts.size
    recent_rate = rng.beta(0.8, 3.2, n)            # the row's recent burst, all domains
    out = []
    for dom in world.domains:
        raw = dom.mean_len * world.persons.activity[rows.person] * rng.exponential(1.0, n)
        lengths = np.minimum(raw.astype(np.int64), dom.cap)
        row = np.repeat(np.arange(n), lengths)
        recent = rng.random(row.size) < recent_rate[row]
        u = rng.random(row.size)
        recent_age = np.ceil(-RECENT_MEAN_AGE_S * np.log1p(
            -u * (1.0 - math.exp(-RECENT_WINDOW_S / RECENT_MEAN_AGE_S))))
        old_age = RECENT_WINDOW_S * np.exp(u * math.log(OLD_MAX_AGE_S / RECENT_WINDOW_S))
        age = np.maximum(np.where(recent, recent_age, old_age), 1).astype(np.int64)
        ts = rows.ts[row] - age
        # Events older than a day move to a time of day drawn from the traffic profile (same
        # local day), so that event hours follow the daily rhythm too.
        old = np.flatnonzero(age > DAY_S)
        local_day = (ts[old] + TZ_OFFSET_S) // DAY_S
        ts[old] = (local_day * DAY_S - TZ_OFFSET_S + _local_hours(rng, old.size) * 3600
                   + rng.integers(0, 3600, old.size))
        person = rows.person[row]
        taste_cat = world.persons.taste_table[person, rng.integers(0, TASTE_TABLE, row.size)]
        intent = recent & (rng.random(row.size) < INTENT_EVENT_RATE)
        cat = np.where(intent, rows.intent[row], taste_cat)
        out.append(_History(_lengths_to_offsets(lengths), row, ts, rows.ts[row] - ts, cat))
    return out


# --------------------------------------------------------------------------------------------
# Planted effects
# --------------------------------------------------------------------------------------------

def _local_hour_dow(ts: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Hour and day of week (Monday = 0) at UTC+8, as the pipeline derives them."""
    t = ts + TZ_OFFSET_S
    return (t // 3600) % 24, (t // DAY_S + 3) % 7


def _raw_effects(world: _World, rows: _Rows, hists: List[_History]) -> Dict[str, np.ndarray]:
    """Each planted effect before standardisation (see the module docstring's table)."""
    n = rows.ts.size
    t, it, ps = world.tables, world.items, world.persons
    cat, sub, itype = it.cat[rows.item], it.sub[rows.item], it.itype[rows.item]
    person = rows.person
    age_curve = -0.5 * ((ps.age[person] - 32.0) / 12.0) ** 2
    base = (t["cat"][cat] + t["sub"][sub] + t["type"][itype] + t["segment"][ps.segment[person]]
            + t["gender"][ps.gender[person]] + age_curve)

    hour, dow = _local_hour_dow(rows.ts)
    abs_time = np.cos(2 * np.pi * (hour - 21) / 24.0) + 0.7 * (dow >= 5)

    counts = np.zeros((3, n))
    total = np.zeros(n)
    weighted, matched = np.zeros(n), np.zeros(n)
    for h in hists:
        total += np.diff(h.offsets)
        for k, days in enumerate((1, 3, 5)):
            counts[k] += np.bincount(h.row, weights=(h.age > 0) & (h.age <= days * DAY_S),
                                     minlength=n)
        w = 1.0 + (AFFINITY_RECENT_WEIGHT - 1.0) * (h.age <= RECENT_WINDOW_S)
        weighted += np.bincount(h.row, weights=w, minlength=n)
        matched += np.bincount(h.row, weights=w * (h.cat == cat[h.row]), minlength=n)
    activity = np.log1p(counts).sum(axis=0) + np.log1p(total)
    seq_affinity = matched / (weighted + 1.0)

    pair = np.zeros(n)
    pair_entity = {62: itype}
    for fid, weight in PAIR_WEIGHTS.items():
        pair += weight * ps.pair_w[fid][person, pair_entity[fid]]

    user_x_item = t["segment_x_group"][ps.segment[person], cat % CATEGORY_GROUPS]
    dense_dot = (ps.latent[person] * it.latent[rows.item]).sum(axis=1)
    return {"base": base, "abs_time": abs_time, "activity": activity, "pair_62_66": pair,
            "seq_affinity": seq_affinity, "user_x_item": user_x_item, "dense_dot": dense_dot}


_NOISE_W = math.sqrt(NOISE_SHARE / (1.0 - NOISE_SHARE))


def _logit_parts(calib: _Calibration, raw: Mapping[str, np.ndarray],
                 noise: np.ndarray) -> Dict[str, np.ndarray]:
    """Each effect's (and the noise's) contribution to the logit, intercept excluded."""
    k = calib.scale / math.sqrt(1.0 + _NOISE_W ** 2)
    parts = {e.name: k * calib.weight[e.name] * (raw[e.name] - calib.mean[e.name])
             / calib.std[e.name] / calib.x_std for e in EFFECTS}
    parts["noise"] = k * _NOISE_W * noise
    return parts


def _calibrate(world: _World) -> _Calibration:
    """Fixes standardisation, scale and intercept on a batch of training-period rows."""
    rng = np.random.default_rng(np.random.SeedSequence([world.seed, 3]))
    probe = _draw_histories(world, rng, _draw_rows(world, rng, 512, TRAIN_END - TRAIN_DAYS
                                                   * DAY_S, TRAIN_DAYS))
    events_per_row = sum(h.row.size for h in probe) / 512.0
    n = int(np.clip(8_000_000 / max(events_per_row, 1.0), 2000, 16000))
    rows = _draw_rows(world, rng, n, TRAIN_END - TRAIN_DAYS * DAY_S, TRAIN_DAYS)
    hists = _draw_histories(world, rng, rows)
    raw = _raw_effects(world, rows, hists)
    mean = {k: float(v.mean()) for k, v in raw.items()}
    std = {k: float(v.std()) or 1.0 for k, v in raw.items()}
    # Effects that share a cause (taste drives dense_dot, pair and affinity) are correlated:
    # reweight until every Cov(effect, sum) / Var(sum) equals its target share.
    z = np.stack([(raw[e.name] - mean[e.name]) / std[e.name] for e in EFFECTS], axis=1)
    corr = np.cov(z, rowvar=False)
    target = np.array([e.share for e in EFFECTS])
    w = np.sqrt(target)
    for _ in range(200):
        share = w * (corr @ w) / (w @ corr @ w)
        w = w * np.sqrt(target / np.maximum(share, 1e-6))
    weight = {e.name: float(v) for e, v in zip(EFFECTS, w)}
    calib = _Calibration(mean, std, weight, float((z @ w).std()), 1.0, 0.0, 0.0)
    noise = rng.standard_normal(n)
    eta = sum(_logit_parts(calib, raw, noise).values())      # unit-variance logit shape
    order = np.argsort(eta)

    def intercept_for(scale: float) -> float:
        lo, hi = -20.0, 20.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if _sigmoid(mid + scale * eta).mean() < TARGET_POS_RATE \
                else (lo, mid)
        return (lo + hi) / 2

    lo, hi = 0.05, 8.0
    for _ in range(40):
        mid = (lo + hi) / 2
        p = _sigmoid(intercept_for(mid) + mid * eta[order])
        lo, hi = (mid, hi) if _expected_auc(p) < TARGET_ORACLE_AUC else (lo, mid)
    scale = (lo + hi) / 2
    # List values per row (for the automatic row-group size): sequences, lists, embeddings.
    seq_values = sum(h.row.size * len(d.layout.features) for h, d in zip(hists, world.domains))
    other = sum(d for _, _, _, d in world.layout.user_int) + sum(
        d for _, d in world.layout.user_dense)
    return _Calibration(mean, std, weight, calib.x_std, scale, intercept_for(scale),
                        seq_values / n + other)


# --------------------------------------------------------------------------------------------
# Columns
# --------------------------------------------------------------------------------------------

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


def _user_columns(world: _World, rng: np.random.Generator, person: np.ndarray,
                  cols: Dict[str, pa.Array]) -> None:
    ps = world.persons
    for fid, _, vocab, dim in world.layout.user_int:
        name = f"user_int_feats_{fid}"
        if dim == 1:
            ids, null = ps.scalars[fid]
            values = ids[person]
            if fid in OOV_USER_FIDS:
                values = _sprinkle_oov(rng, values, vocab)
            cols[name] = pa.array(values, type=pa.int64(), mask=null[person])
        else:
            lst = ps.lists[fid].take(person)
            cols[name] = _list_array(lst.offsets, lst.values, lst.null, pa.int64())
    n = person.size
    for fid, dim in world.layout.user_dense:
        name = f"user_dense_feats_{fid}"
        if fid in ps.embeddings:
            emb = ps.embeddings[fid]
            null = emb.null[person]
            offsets = _lengths_to_offsets(np.where(null, 0, dim))
            values = emb.rows(ps.embed_inputs[person[~null]]).ravel()
            cols[name] = _list_array(offsets, values, null, pa.float32())
        elif fid in ps.lists and ps.lists[fid].dense is not None:
            lst = ps.lists[fid].take(person)
            cols[name] = _list_array(lst.offsets, lst.dense, lst.null, pa.float32())
        else:   # a dense list fid of a custom schema without an int twin
            cols[name] = _list_array(np.zeros(n + 1, dtype=np.int64),
                                     np.zeros(0, dtype=np.float32), None, pa.float32())


def _item_columns(world: _World, rng: np.random.Generator, item: np.ndarray,
                  cols: Dict[str, pa.Array]) -> None:
    it = world.items
    for fid, _, vocab, dim in world.layout.item_int:
        name = f"item_int_feats_{fid}"
        if dim == 1:
            ids, null = it.scalars[fid]
            values = ids[item]
            if fid in OOV_ITEM_FIDS:
                values = _sprinkle_oov(rng, values, vocab)
            cols[name] = pa.array(values, type=pa.int64(), mask=null[item])
        else:
            lst = it.lists[fid].take(item)
            cols[name] = _list_array(lst.offsets, lst.values, lst.null, pa.int64())


def _event_order(rng: np.random.Generator, h: _History, order: str) -> np.ndarray:
    """Permutation of a domain's flat events that applies --event_order within each row."""
    if order == "unordered":
        key = rng.random(h.row.size)
    else:
        key = h.age.astype(np.float64) if order == "newest_first" else -h.age.astype(np.float64)
    return np.lexsort((key, h.row))


def _seq_columns(world: _World, rng: np.random.Generator, hists: List[_History], n: int,
                 event_order: str, cols: Dict[str, pa.Array]) -> None:
    for dom, h in zip(world.domains, hists):
        perm = _event_order(rng, h, event_order)
        row, ts, cat = h.row[perm], h.ts[perm], h.cat[perm]
        # Which item of the event's category: one of the domain's popular items, or one of
        # the row's few favourites in that category (the repeats seen in real histories).
        m = SEQ_ITEMS_PER_CATEGORY
        salt = rng.integers(0, m, n)
        popular = _power_index(rng, m, row.size, 4.0)
        personal = (salt[row] + _power_index(rng, dom.slots, row.size, 2.0)) % m
        slot = np.where(rng.random(row.size) < dom.popular_rate, popular, personal)
        universe_item = cat + N_CATEGORIES * slot
        for fid, _, vocab in dom.layout.features:
            if fid == dom.layout.ts_fid:
                values = ts
            elif fid == dom.cat_fid:
                values = dom.cat_map(cat)
            elif fid in dom.enums:
                values = 1 + _categorical(rng, dom.enums[fid], row.size) if vocab > 1 \
                    else np.zeros(row.size, dtype=np.int64)
            else:
                values = dom.attrs[fid][universe_item]
                if fid == dom.item_fid:
                    values = _sprinkle_oov(rng, values, vocab)
            cols[f"{dom.layout.prefix}_{fid}"] = _list_array(h.offsets, values, None,
                                                             pa.int64())


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------

def _chunk(world: _World, rows: _Rows, rng: np.random.Generator, user_id0: int,
           event_order: str) -> Tuple[pa.Table, Dict[str, np.ndarray]]:
    """One row group: its table and its truth (user_id, p_true, label, logit parts)."""
    n = rows.ts.size
    hists = _draw_histories(world, rng, rows)
    parts = _logit_parts(world.calib, _raw_effects(world, rows, hists), rng.standard_normal(n))
    p_true = _sigmoid(world.calib.intercept + sum(parts.values()))
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
    _item_columns(world, rng, rows.item, cols)
    _seq_columns(world, rng, hists, n, event_order, cols)
    schema = world.layout.arrow_schema()
    table = pa.Table.from_arrays([cols[f.name] for f in schema], schema=schema)
    truth = {"user_id": user_id, "p_true": p_true, "label": label.astype(np.int8)}
    truth.update({f"logit_{k}": v.astype(np.float32) for k, v in parts.items()})
    return table, truth


def _clear_split(out_dir: str) -> None:
    """Removes a previous run's outputs (only the files this module writes)."""
    if not os.path.isdir(out_dir):
        return
    for name in os.listdir(out_dir):
        if (name.startswith("part-") and name.endswith(".parquet")) or name in (
                SCHEMA_FILE, TRUTH_FILE):
            os.remove(os.path.join(out_dir, name))


def _variance_shares(truth: Mapping[str, np.ndarray]) -> Dict[str, float]:
    """Cov(effect, explainable logit) / Var(explainable logit) per effect, plus the noise's
    share of the total logit variance."""
    parts = {e.name: truth[f"logit_{e.name}"].astype(np.float64) for e in EFFECTS}
    explainable = sum(parts.values())
    var = explainable.var()
    shares = {k: float(np.mean((v - v.mean()) * (explainable - explainable.mean())) / var)
              for k, v in parts.items()}
    noise = truth["logit_noise"].astype(np.float64)
    shares["noise_of_total"] = float(noise.var() / (explainable + noise).var())
    return shares


def _explainable_logit(truth: Mapping[str, np.ndarray]) -> np.ndarray:
    return sum(truth[f"logit_{e.name}"].astype(np.float64) for e in EFFECTS)


def _links(world: _World) -> Dict[str, np.ndarray]:
    """The id that encodes each latent category / item type (array index) in every column
    that an effect links, e.g. ``category_item_int_5`` and ``category_domain_a_seq_42``."""
    cats, types = np.arange(N_CATEGORIES), np.arange(N_ITEM_TYPES)
    links = {"category_item_int_5": world.maps["item_5"](cats),
             "category_user_int_63": world.maps["user_63"](cats),
             "type_item_int_13": world.maps["item_13"](types),
             "type_user_int_62": world.maps["user_62"](types)}
    for dom in world.domains:
        links[f"category_{dom.layout.prefix}_{dom.cat_fid}"] = dom.cat_map(cats)
    return links


def _write_split(world: _World, out_dir: str, split: str, rows: int, start: int, days: int,
                 user_id0: int, files: int, rows_per_group: int,
                 event_order: str) -> Dict[str, Any]:
    """Writes one split (schema, parquet files, truth sidecar) and returns its summary."""
    t0 = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    _clear_split(out_dir)
    split_id = 0 if split == "train" else 1
    plan = _draw_rows(world, np.random.default_rng(np.random.SeedSequence(
        [world.seed, 1, split_id])), rows, start, days)
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
                table, truth = _chunk(world, plan.slice(lo, hi), rng, user_id0 + lo,
                                      event_order)
                writer.write_table(table, row_group_size=hi - lo)
                truths.append(truth)
                n_groups += 1
    truth = {k: np.concatenate([t[k] for t in truths]) for k in truths[0]}
    np.savez(os.path.join(out_dir, TRUTH_FILE), **truth, **_links(world))
    summary = {
        "split": split, "dir": out_dir, "rows": rows, "files": bounds.size - 1,
        "row_groups": n_groups, "rows_per_group": rows_per_group,
        "pos_rate": float(truth["label"].mean()),
        "oracle_auc": auc(truth["label"], truth["p_true"]),
        "explainable_auc": auc(truth["label"], _explainable_logit(truth)),
        "shares": _variance_shares(truth),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return summary


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def generate(out_dir: str, rows: int = DEFAULT_ROWS, seed: int = DEFAULT_SEED, *,
             eval_rows: int = DEFAULT_EVAL_ROWS, vocab_cap: int = DEFAULT_VOCAB_CAP,
             seq_len_scale: float = DEFAULT_SEQ_LEN_SCALE,
             event_order: str = DEFAULT_EVENT_ORDER, files: int = DEFAULT_FILES,
             rows_per_group: int = 0, schema: Union[None, str, Mapping[str, Any]] = None,
             verbose: bool = True) -> Dict[str, Any]:
    """Writes the training split to ``out_dir`` (and the held-out one to ``out_dir/eval``).

    Returns a summary: per split rows, positive rate, oracle AUC, the effects' variance
    shares, files, row groups and seconds; plus the options and the calibration.
    """
    if rows < 1 or eval_rows < 0 or files < 1 or rows_per_group < 0:
        raise ValueError("need rows >= 1, eval_rows >= 0, files >= 1, rows_per_group >= 0")
    if event_order not in EVENT_ORDERS:
        raise ValueError(f"event_order must be one of {EVENT_ORDERS}, got {event_order!r}")
    t0 = time.perf_counter()
    world = _build_world(seed, load_layout(schema, vocab_cap), seq_len_scale)
    if rows_per_group == 0:
        auto = LIST_VALUES_PER_GROUP / max(world.calib.list_values_per_row, 1.0)
        rows_per_group = int(np.clip(auto // 64 * 64, 256, 4096))
    common = dict(files=files, rows_per_group=rows_per_group, event_order=event_order)
    splits = [_write_split(world, out_dir, "train", rows, TRAIN_END - TRAIN_DAYS * DAY_S,
                           TRAIN_DAYS, TRAIN_USER_ID0, **common)]
    eval_dir = os.path.join(out_dir, EVAL_SUBDIR)
    if eval_rows > 0:
        splits.append(_write_split(world, eval_dir, "eval", eval_rows, TRAIN_END, EVAL_DAYS,
                                   EVAL_USER_ID0, **common))
    elif os.path.isdir(eval_dir):
        _clear_split(eval_dir)
    summary = {
        "splits": {s["split"]: s for s in splits},
        "effects": [{"name": e.name, "target": e.target, "target_share": e.share}
                    for e in EFFECTS],
        "options": dict(rows=rows, eval_rows=eval_rows, seed=seed, vocab_cap=vocab_cap,
                        seq_len_scale=seq_len_scale, event_order=event_order, files=files,
                        rows_per_group=rows_per_group,
                        schema=schema if isinstance(schema, str) else None),
        "calibration": {"intercept": world.calib.intercept, "scale": world.calib.scale},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if verbose:
        for s in splits:
            print(f"demo_data: {s['split']}: rows={s['rows']} pos_rate={s['pos_rate']:.4f} "
                  f"oracle_auc={s['oracle_auc']:.4f} files={s['files']} "
                  f"row_groups={s['row_groups']} -> {s['dir']} ({s['seconds']:.1f}s)")
    return summary


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(
        description="Write synthetic PCVR demo data (competition layout, known p_true).")
    parser.add_argument("--out", required=True, help="output folder (eval split in OUT/eval)")
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS, help="training rows")
    parser.add_argument("--eval_rows", type=int, default=DEFAULT_EVAL_ROWS,
                        help="held-out rows, later in time (0 = none)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--vocab_cap", type=int, default=DEFAULT_VOCAB_CAP,
                        help="cap every vocab (0 = the online schema's sizes)")
    parser.add_argument("--seq_len_scale", type=float, default=DEFAULT_SEQ_LEN_SCALE,
                        help="history length scale (1.0 = competition-like)")
    parser.add_argument("--event_order", choices=EVENT_ORDERS, default=DEFAULT_EVENT_ORDER,
                        help="storage order of events inside the history lists")
    parser.add_argument("--files", type=int, default=DEFAULT_FILES, help="files per split")
    parser.add_argument("--rows_per_group", type=int, default=0,
                        help="rows per parquet row group (0 = auto)")
    parser.add_argument("--schema", default=None,
                        help="schema.json to follow (default: the online schema)")
    a = parser.parse_args(argv)
    return generate(a.out, a.rows, a.seed, eval_rows=a.eval_rows, vocab_cap=a.vocab_cap,
                    seq_len_scale=a.seq_len_scale, event_order=a.event_order, files=a.files,
                    rows_per_group=a.rows_per_group, schema=a.schema)


if __name__ == "__main__":
    main()
