"""The columns the demo data has: the platform's schema (embedded), the vocabulary cap, and the
Arrow schema of the parquet files.

A schema is parsed and validated by ``pcvr.schema.parse_schema``, the same parser the data
pipeline uses; this module only adds what writing needs and a ``FeatureLayout`` does not hold:
the vocabulary sizes before the cap (the generator gives columns their roles by them) and each
history domain's column order (the timestamp column keeps its place among the side columns).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, Dict, Mapping, Tuple, Union

import pyarrow as pa

from pcvr.schema import FeatureLayout, FeatureSpec, SeqDomainSpec, parse_schema

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
SCHEMA_FORMAT = "raw_parquet"


def online_schema() -> Dict[str, Any]:
    """The embedded online schema as a schema.json dict (real vocabulary sizes)."""
    return {
        "user_int": [list(e) for e in ONLINE_USER_INT],
        "item_int": [list(e) for e in ONLINE_ITEM_INT],
        "user_dense": [list(e) for e in ONLINE_USER_DENSE],
        "seq": {name: {"prefix": p, "ts_fid": ts, "features": [list(e) for e in feats]}
                for name, (p, ts, feats) in ONLINE_SEQ.items()},
    }


@dataclass(frozen=True)
class DemoLayout:
    """The layout to write.

    Attributes:
        features: the parsed layout with vocabulary sizes after the cap (what schema.json says).
        declared: column -> vocabulary size before the cap, for every id column.
        seq_fids: domain -> its fids in schema order, timestamp included.
    """
    features: FeatureLayout
    declared: Mapping[str, int]
    seq_fids: Mapping[str, Tuple[int, ...]]

    def seq_vocab(self, dom: SeqDomainSpec) -> Dict[int, int]:
        """fid -> capped vocabulary of a domain's columns (0 for the timestamp)."""
        vocab = {s.fid: s.vocab_size for s in dom.side}
        vocab[dom.ts_fid] = 0
        return vocab

    def schema_json(self) -> Dict[str, Any]:
        """The schema.json written next to the data (vocab sizes after the cap)."""
        f = self.features
        seq = {}
        for dom in f.seq:
            vocab = self.seq_vocab(dom)
            seq[dom.name] = {"prefix": dom.prefix, "ts_fid": dom.ts_fid,
                             "features": [[fid, vocab[fid]] for fid in self.seq_fids[dom.name]]}
        return {
            "format": SCHEMA_FORMAT,
            "user_int": [[s.fid, s.vocab_size, s.length] for s in f.user_int],
            "item_int": [[s.fid, s.vocab_size, s.length] for s in f.item_int],
            "user_dense": [[s.fid, s.length] for s in f.user_dense],
            "seq": seq,
        }

    def arrow_schema(self) -> pa.Schema:
        """Column names and types of every parquet file (pipeline_spec §1.1)."""
        f = self.features
        i64, ints, floats = pa.int64(), pa.list_(pa.int64()), pa.list_(pa.float32())
        fields = [pa.field("user_id", i64), pa.field("item_id", i64),
                  pa.field("label_type", pa.int32()), pa.field("label_time", i64),
                  pa.field("timestamp", i64)]
        fields += [pa.field(s.column, i64 if s.length == 1 else ints) for s in f.user_int]
        fields += [pa.field(s.column, floats) for s in f.user_dense]
        fields += [pa.field(s.column, i64 if s.length == 1 else ints) for s in f.item_int]
        fields += [pa.field(f"{d.prefix}_{fid}", ints) for d in f.seq
                   for fid in self.seq_fids[d.name]]
        return pa.schema(fields)


def _cap_specs(specs: Tuple[FeatureSpec, ...], vocab_cap: int) -> Tuple[FeatureSpec, ...]:
    if vocab_cap <= 0:
        return specs
    return tuple(replace(s, vocab_size=min(s.vocab_size, vocab_cap)) for s in specs)


def load_layout(schema: Union[None, str, Mapping[str, Any]], vocab_cap: int) -> DemoLayout:
    """Builds the layout from a schema.json path or dict (None = the embedded online schema).

    Vocab sizes are capped at ``vocab_cap`` (0 = no cap); timestamp columns get vocab 0.
    Raises:
        ValueError (``pcvr.schema.SchemaError`` included): a malformed schema, a history domain
            without a timestamp, or an ``item_dense`` group (not generated).
    """
    if vocab_cap < 0:
        raise ValueError(f"vocab_cap must be >= 0, got {vocab_cap}")
    path = "schema.json"
    if schema is None:
        raw: Mapping[str, Any] = online_schema()
        path = "<embedded online schema>"
    elif isinstance(schema, str):
        path = schema
        with open(schema, "r", encoding="utf-8") as fh:
            raw = json.load(fh)
    else:
        raw = schema
    parsed = parse_schema(raw, {}, use_activity=False, path=path)
    if parsed.item_dense:
        raise ValueError(f"{path}: schemas with an item_dense group are not supported")
    missing_ts = [d.name for d in parsed.seq if d.ts_fid is None]
    if missing_ts:
        raise ValueError(f"{path}: seq domain(s) {missing_ts} need a ts_fid")
    declared = {s.column: s.vocab_size for s in parsed.user_int + parsed.item_int}
    declared.update({s.column: s.vocab_size for d in parsed.seq for s in d.side})
    seq_fids = {d.name: tuple(int(e[0]) for e in raw["seq"][d.name]["features"])
                for d in parsed.seq}
    capped = replace(
        parsed, user_int=_cap_specs(parsed.user_int, vocab_cap),
        item_int=_cap_specs(parsed.item_int, vocab_cap),
        seq=tuple(replace(d, side=_cap_specs(d.side, vocab_cap)) for d in parsed.seq))
    return DemoLayout(capped, declared, seq_fids)
