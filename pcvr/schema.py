"""schema.json: loading, validation, the flattened feature layout shared by data and model, and
everything the project knows about particular fids (their kinds).

The schema (pipeline_spec §1.2) lists, per group, ``[fid, vocab_size, dim]`` (int groups),
``[fid, dim]`` (dense groups) and, per sequence domain, ``{prefix, ts_fid, features}``.
``FeatureLayout`` turns it into what both the data pipeline and the model need: for every
feature its column name, vocabulary and the slice ``[offset, offset + length)`` it occupies
in the flattened batch tensor, with the synthetic user activity fids 900-915 appended to the
user dense group when they are enabled.

Feature kinds are set once, here, when the schema is parsed (``FeatureSpec.kind``):

* ``plain``: an ordinary id or dense feature;
* ``paired``: the user int and user dense lists of a fid in ``PAIR_FIDS`` (62-66), element ``k``
  of the dense list being the value of id ``k`` (both groups must declare the fid with the same
  dim; ``FeatureLayout.pairs`` lists them);
* ``activity``: the synthetic user activity dense fids 900-915, computed from the histories;
* ``dense_head``: the user dense fids that get their own token head in pair mode
  (``USER_DENSE_HEAD_FIDS``).

Vocabulary convention: ids ``1 .. vocab_size - 1`` are real, 0 is padding/missing, and
``vocab_size`` itself is the out-of-vocabulary id (tables have ``vocab_size + 1`` rows).
A ``vocab_size`` of 0 means the feature has no vocabulary and is always 0.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from pcvr.config import DataConfig, parse_seq_max_lens
from pcvr.errors import SchemaError

# Synthetic user activity dense fids (pipeline_spec §1.7): 900-903 = log1p(history length) of
# seq_a..seq_d, then per domain log1p(event counts) over 1, 3 and 5 days.
ACTIVITY_FIDS: Tuple[int, ...] = tuple(range(900, 916))
ACTIVITY_DOMAINS: Tuple[str, ...] = ("seq_a", "seq_b", "seq_c", "seq_d")
ACTIVITY_WINDOWS_S: Tuple[int, ...] = (86400, 3 * 86400, 5 * 86400)
PAIR_FIDS: Tuple[int, ...] = (62, 63, 64, 65, 66)
# User dense fids (embeddings 61/87, values of the lists 89-91) with a head of their own in the
# pair-mode user dense token (model_spec §9.2).
USER_DENSE_HEAD_FIDS: Tuple[int, ...] = (61, 87, 89, 90, 91)
PLAIN, PAIRED, ACTIVITY, DENSE_HEAD = "plain", "paired", "activity", "dense_head"
# Upper edges (seconds) of the time-since-event buckets (pipeline_spec §1.5): 63 values.
TIME_BUCKET_BOUNDARIES: Tuple[int, ...] = (
    tuple(range(5, 61, 5)) + tuple(range(120, 601, 60)) + tuple(range(900, 3601, 300))
    + tuple(range(5400, 21601, 1800)) + tuple(range(32400, 86401, 10800))
    + tuple(range(172800, 604801, 86400)) + (1123200, 1641600, 2160000, 2592000)
    + (4320000, 6048000, 7776000) + (11664000, 15552000) + (31536000,))
# Bucket ids 1..63 for real events, 0 for padding / missing timestamps: the time-bucket table
# has 64 rows (model_spec's 65 is superseded by the data spec).
NUM_TIME_BUCKETS = len(TIME_BUCKET_BOUNDARIES) + 1

DEFAULT_SEQ_LEN = 256


@dataclass(frozen=True)
class FeatureSpec:
    """One feature of a flattened group.

    Attributes:
        fid: feature id from the schema.
        column: parquet column name.
        vocab_size: ids are valid in ``[1, vocab_size)``; 0 for dense features or no vocab.
        offset: first position in the group's flattened tensor.
        length: number of positions (1 for scalars).
        kind: ``PLAIN``, ``PAIRED``, ``ACTIVITY`` or ``DENSE_HEAD`` (module docstring).
    """
    fid: int
    column: str
    vocab_size: int
    offset: int
    length: int
    kind: str = PLAIN


@dataclass(frozen=True)
class SeqDomainSpec:
    """One behaviour-sequence domain.

    Attributes:
        name: domain key, e.g. ``seq_a``.
        prefix: column prefix, e.g. ``domain_a_seq``.
        ts_fid: fid of the event timestamp column, or None when the domain has none.
        ts_column: column name of the timestamps, or None.
        side: side-info features in schema order, timestamp excluded; ``offset`` is the index on
            the feature axis of the ``[B, F, L]`` tensor and ``length`` is 1.
        max_len: L, the number of events kept per row.
    """
    name: str
    prefix: str
    ts_fid: Optional[int]
    ts_column: Optional[str]
    side: Tuple[FeatureSpec, ...]
    max_len: int


@dataclass(frozen=True)
class FeatureLayout:
    """The flattened layout of every batch tensor, derived from the schema and two data flags."""
    user_int: Tuple[FeatureSpec, ...]
    item_int: Tuple[FeatureSpec, ...]
    user_dense: Tuple[FeatureSpec, ...]  # activity fids 900-915 appended when enabled
    item_dense: Tuple[FeatureSpec, ...]
    seq: Tuple[SeqDomainSpec, ...]       # sorted by domain name

    @staticmethod
    def _dim(specs: Sequence[FeatureSpec]) -> int:
        return sum(s.length for s in specs)

    @property
    def user_int_dim(self) -> int:
        return self._dim(self.user_int)

    @property
    def item_int_dim(self) -> int:
        return self._dim(self.item_int)

    @property
    def user_dense_dim(self) -> int:
        return self._dim(self.user_dense)

    @property
    def item_dense_dim(self) -> int:
        return self._dim(self.item_dense)

    @property
    def domains(self) -> List[str]:
        return [d.name for d in self.seq]

    def domain(self, name: str) -> SeqDomainSpec:
        for d in self.seq:
            if d.name == name:
                return d
        raise KeyError(f"no sequence domain {name!r}; the schema has {self.domains}")

    @staticmethod
    def find(specs: Sequence[FeatureSpec], fid: int, group: str) -> FeatureSpec:
        for s in specs:
            if s.fid == fid:
                return s
        raise KeyError(f"fid {fid} is not in the {group} group of the schema "
                       f"(has {[s.fid for s in specs]})")

    @property
    def pairs(self) -> List[Tuple[FeatureSpec, FeatureSpec]]:
        """(user int spec, user dense spec) of every ``PAIRED`` fid, in ``PAIR_FIDS`` order."""
        dense = {s.fid: s for s in self.user_dense if s.kind == PAIRED}
        return [(s, dense[s.fid]) for s in self.user_int if s.kind == PAIRED]

    @property
    def activity(self) -> List[FeatureSpec]:
        """The synthetic activity specs of the user dense group (empty when off)."""
        return [s for s in self.user_dense if s.kind == ACTIVITY]

    def input_columns(self) -> List[str]:
        """Parquet feature columns this layout reads (labels/ids/timestamp excluded)."""
        cols = [s.column for g in (self.user_int, self.item_int, self.user_dense,
                                   self.item_dense) for s in g if s.kind != ACTIVITY]
        for d in self.seq:
            cols += [s.column for s in d.side]
            if d.ts_column:
                cols.append(d.ts_column)
        return cols


def _err(path: str, msg: str) -> SchemaError:
    return SchemaError(f"{path}: {msg}")


def _int(value: Any, path: str, where: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _err(path, f"{where}: expected an integer >= {minimum}, got {value!r}")
    return value


def _flat_group(raw: Any, path: str, group: str, prefix: str, with_vocab: bool,
                seen: Dict[str, set]) -> List[FeatureSpec]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise _err(path, f"'{group}' must be a list of entries, got {type(raw).__name__}")
    width = 3 if with_vocab else 2
    specs, offset = [], 0
    fids = seen.setdefault(group, set())
    for k, entry in enumerate(raw):
        where = f"'{group}' entry {k} {entry!r}"
        if not isinstance(entry, (list, tuple)) or len(entry) != width:
            shape = "[fid, vocab_size, dim]" if with_vocab else "[fid, dim]"
            raise _err(path, f"{where}: expected {shape}")
        fid = _int(entry[0], path, where)
        vocab = _int(entry[1], path, where) if with_vocab else 0
        dim = _int(entry[-1], path, where, minimum=1)
        if fid in fids:
            raise _err(path, f"{where}: duplicated fid {fid} in '{group}'")
        fids.add(fid)
        specs.append(FeatureSpec(fid, f"{prefix}_{fid}", vocab, offset, dim))
        offset += dim
    return specs


def parse_schema(raw: Mapping[str, Any], seq_max_lens: Mapping[str, int],
                 use_activity: bool, path: str = "schema.json") -> FeatureLayout:
    """Validates a loaded schema dict and builds the layout.

    Args:
        raw: the parsed JSON object.
        seq_max_lens: domain -> L; unlisted domains keep ``DEFAULT_SEQ_LEN``.
        use_activity: append the activity fids 900-915 to the user dense group.
        path: shown in error messages.
    Raises:
        SchemaError: naming the file and the offending entry.
    """
    if not isinstance(raw, Mapping):
        raise _err(path, "top level must be a JSON object")
    for key in ("user_int", "item_int", "user_dense", "seq"):
        if key not in raw:
            raise _err(path, f"missing required key '{key}'")
    seen: Dict[str, set] = {}
    user_int = _flat_group(raw["user_int"], path, "user_int", "user_int_feats", True, seen)
    item_int = _flat_group(raw["item_int"], path, "item_int", "item_int_feats", True, seen)
    user_dense = _flat_group(raw["user_dense"], path, "user_dense", "user_dense_feats", False,
                             seen)
    item_dense = _flat_group(raw.get("item_dense"), path, "item_dense", "item_dense_feats",
                             False, seen)

    seq_raw = raw["seq"]
    if not isinstance(seq_raw, Mapping):
        raise _err(path, "'seq' must be an object of domains")
    unknown = sorted(set(seq_max_lens) - set(seq_raw))
    if unknown:
        raise _err(path, f"--seq_max_lens names domain(s) {unknown} that the schema lacks "
                         f"(has {sorted(seq_raw)})")
    domains = []
    for name in sorted(seq_raw):
        dom = seq_raw[name]
        if not isinstance(dom, Mapping) or "prefix" not in dom or "features" not in dom:
            raise _err(path, f"seq domain '{name}' needs 'prefix' and 'features'")
        prefix = dom["prefix"]
        if not isinstance(prefix, str) or not prefix:
            raise _err(path, f"seq domain '{name}': bad prefix {prefix!r}")
        ts_fid = dom.get("ts_fid")
        if ts_fid is not None:
            ts_fid = _int(ts_fid, path, f"seq domain '{name}' ts_fid")
        feats = dom["features"]
        if not isinstance(feats, list) or not feats:
            raise _err(path, f"seq domain '{name}': 'features' must be a non-empty list")
        fids, side = set(), []
        for k, entry in enumerate(feats):
            where = f"seq domain '{name}' feature {k} {entry!r}"
            if not isinstance(entry, (list, tuple)) or len(entry) != 2:
                raise _err(path, f"{where}: expected [fid, vocab_size]")
            fid, vocab = _int(entry[0], path, where), _int(entry[1], path, where)
            if fid in fids:
                raise _err(path, f"{where}: duplicated fid {fid}")
            fids.add(fid)
            if fid != ts_fid:
                side.append(FeatureSpec(fid, f"{prefix}_{fid}", vocab, len(side), 1))
        if ts_fid is not None and ts_fid not in fids:
            raise _err(path, f"seq domain '{name}': ts_fid {ts_fid} is not in its features")
        if not side:
            raise _err(path, f"seq domain '{name}' has no side-info feature")
        domains.append(SeqDomainSpec(
            name=name, prefix=prefix, ts_fid=ts_fid,
            ts_column=f"{prefix}_{ts_fid}" if ts_fid is not None else None,
            side=tuple(side), max_len=int(seq_max_lens.get(name, DEFAULT_SEQ_LEN))))

    if use_activity:
        missing = [d for d in ACTIVITY_DOMAINS if d not in seq_raw]
        if missing:
            raise _err(path, f"user activity dense features need sequence domains "
                             f"{list(ACTIVITY_DOMAINS)}; missing {missing} "
                             f"(use --no_user_activity_dense)")
        clash = sorted({s.fid for s in user_dense} & set(ACTIVITY_FIDS))
        if clash:
            raise _err(path, f"user_dense already has fid(s) {clash}, reserved for the activity "
                             f"features 900-915 (use --no_user_activity_dense)")
        offset = sum(s.length for s in user_dense)
        user_dense = user_dense + [FeatureSpec(fid, f"activity_{fid}", 0, offset + k, 1,
                                               ACTIVITY) for k, fid in enumerate(ACTIVITY_FIDS)]
    user_int, user_dense = _mark_kinds(user_int, user_dense, path)
    return FeatureLayout(tuple(user_int), tuple(item_int), tuple(user_dense),
                         tuple(item_dense), tuple(domains))


def _mark_kinds(user_int: List[FeatureSpec], user_dense: List[FeatureSpec], path: str
                ) -> Tuple[List[FeatureSpec], List[FeatureSpec]]:
    """Sets ``PAIRED`` on the fids of ``PAIR_FIDS`` declared in both user groups (their dims
    must agree) and ``DENSE_HEAD`` on the user dense fids of ``USER_DENSE_HEAD_FIDS``."""
    dense_dims = {s.fid: s.length for s in user_dense if s.kind == PLAIN}
    paired = set()
    for s in user_int:
        if s.fid in PAIR_FIDS and s.fid in dense_dims:
            if dense_dims[s.fid] != s.length:
                raise _err(path, f"fid {s.fid}: user_int dim {s.length} != user_dense dim "
                                 f"{dense_dims[s.fid]}; paired ids and values must line up")
            paired.add(s.fid)

    def kind(spec: FeatureSpec, dense: bool) -> str:
        if spec.kind != PLAIN:
            return spec.kind
        if spec.fid in paired:
            return PAIRED
        return DENSE_HEAD if dense and spec.fid in USER_DENSE_HEAD_FIDS else PLAIN

    return ([replace(s, kind=kind(s, False)) for s in user_int],
            [replace(s, kind=kind(s, True)) for s in user_dense])


def load_layout(path: str, data_cfg: DataConfig) -> Tuple[FeatureLayout, Dict[str, Any]]:
    """``load_schema`` with the history lengths and activity flag of ``data_cfg``."""
    return load_schema(path, parse_seq_max_lens(data_cfg.seq_max_lens),
                       data_cfg.use_user_activity_dense)


def load_schema(path: str, seq_max_lens: Mapping[str, int],
                use_activity: bool) -> Tuple[FeatureLayout, Dict[str, Any]]:
    """Reads and validates ``path``; returns (layout, raw dict)."""
    if not os.path.isfile(path):
        raise SchemaError(f"{path}: schema.json not found (pass --schema_path or put "
                          f"schema.json in the data folder)")
    try:
        with open(path, "r", encoding="utf-8") as fh:
            raw = json.load(fh)
    except json.JSONDecodeError as exc:
        raise SchemaError(f"{path}: not valid JSON ({exc})") from None
    return parse_schema(raw, seq_max_lens, use_activity, path), raw
