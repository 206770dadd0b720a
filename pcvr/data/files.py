"""Parquet files: discovery, the columns a layout reads and their Arrow types, row groups, and
the train/validation split.

Every file's footer is checked up front (``scan_parquet``), so a missing column, a wrong Arrow
type, an empty folder or an unreadable file is a ``DataError`` naming the file and column
before any training starts; only the columns the layout needs are read later. Fixes relative
to the reference:

* split (``split_row_groups``): ``train_ratio < 1`` keeps the head fraction of the training
  row groups and never moves rows into validation; with a single row group the last
  ``ceil(valid_ratio * rows)`` rows are validation (the reference trained on nothing);
  ``valid_ratio = 0`` means no validation split;
* ``item_dense`` columns are read when the schema declares them.
"""
from __future__ import annotations

import glob
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.parquet as pq

from pcvr.errors import ConfigError, DataError
from pcvr.schema import ACTIVITY, FeatureLayout

ID_COLUMNS = ("user_id", "timestamp")
LABEL_COLUMN = "label_type"
POSITIVE_LABEL_TYPE = 2
SCHEMA_FILE = "schema.json"


def default_schema_path(data_path: str) -> str:
    """``schema.json`` beside the data: in the folder, or beside the single parquet file."""
    folder = data_path if os.path.isdir(data_path) else os.path.dirname(data_path)
    return os.path.join(folder, SCHEMA_FILE)


@dataclass(frozen=True)
class RowGroupSlice:
    """Rows ``[start, stop)`` of row group ``row_group`` of the parquet file ``path``."""
    path: str
    row_group: int
    start: int
    stop: int

    @property
    def num_rows(self) -> int:
        return self.stop - self.start


def list_parquet_files(path: str) -> List[str]:
    """A parquet file, or every ``*.parquet`` of a folder in sorted order."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise DataError(f"{path}: no such parquet file or folder")
    files = sorted(glob.glob(os.path.join(path, "*.parquet")))
    if not files:
        raise DataError(f"{path}: the folder has no *.parquet file")
    return files


def _is_int(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) and not pa.types.is_uint64(t)


def is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


# kind -> (accepts an Arrow type, what to say when it does not)
_KINDS = {
    "scalar": (_is_int, "an integer scalar"),
    "int": (lambda t: _is_int(t) or (is_list(t) and _is_int(t.value_type)),
            "an integer scalar or list<int>"),
    "dense": (lambda t: is_list(t) and pa.types.is_floating(t.value_type),
              "list<float> or list<double>"),
    "seq": (lambda t: is_list(t) and _is_int(t.value_type), "list<int>"),
}


def required_columns(layout: FeatureLayout, read_labels: bool) -> Dict[str, str]:
    """Column name -> kind (a key of ``_KINDS``) of every column the pipeline reads."""
    cols = {c: "scalar" for c in ID_COLUMNS}
    if read_labels:
        cols[LABEL_COLUMN] = "scalar"
    cols.update({s.column: "int" for s in layout.user_int + layout.item_int})
    cols.update({s.column: "dense" for s in layout.user_dense + layout.item_dense
                 if s.kind != ACTIVITY})
    for d in layout.seq:
        cols.update({s.column: "seq" for s in d.side})
        if d.ts_column:
            cols[d.ts_column] = "seq"
    return cols


def open_parquet(path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: not a readable parquet file ({exc})") from exc


def scan_parquet(files: Sequence[str], columns: Mapping[str, str],
                 optional: Optional[Mapping[str, str]] = None
                 ) -> Tuple[List[RowGroupSlice], List[str]]:
    """Checks every file's footer (columns present, Arrow types) and lists its row groups.

    Reads parquet metadata only. Empty row groups are skipped.

    Args:
        files: parquet paths.
        columns: column -> kind (``required_columns``), required in every file.
        optional: column -> kind, type-checked where present.
    Returns:
        (row groups in file order, the optional columns present in every file).
    Raises:
        DataError: naming the file and column of the first problem found.
    """
    optional = optional or {}
    slices, present = [], set(optional)
    for path in files:
        pf = open_parquet(path)
        schema = pf.schema_arrow
        for col, kind in {**optional, **columns}.items():
            accepts, expected = _KINDS[kind]
            idx = schema.get_field_index(col)
            if idx < 0 and col in columns:
                raise DataError(f"{path}: column '{col}' is missing (expected {expected})")
            if idx < 0:
                present.discard(col)
            elif not accepts(schema.field(idx).type):
                raise DataError(f"{path}: column '{col}' has Arrow type "
                                f"{schema.field(idx).type}, expected {expected}")
        meta = pf.metadata
        slices += [RowGroupSlice(path, rg, 0, meta.row_group(rg).num_rows)
                   for rg in range(meta.num_row_groups) if meta.row_group(rg).num_rows > 0]
    return slices, sorted(present)


def split_row_groups(slices: Sequence[RowGroupSlice], train_ratio: float, valid_ratio: float
                     ) -> Tuple[List[RowGroupSlice], List[RowGroupSlice]]:
    """(train, valid) by rows: validation is the tail ``ceil(valid_ratio * rows)`` rows.

    The reference took ``int(valid_ratio * row groups)`` whole row groups, which is the same
    on evenly sized groups but wrong on a short last group (a 50,000-row demo folder kept 212
    validation rows) and empty on a single group. A boundary inside a row group splits it.
    ``train_ratio < 1`` keeps the head ``max(1, int(train_ratio * train rows))`` training rows
    and drops the rest (never into validation).
    """
    if not 0.0 < train_ratio <= 1.0:
        raise ConfigError(f"train_ratio must be in (0, 1], got {train_ratio}")
    if not 0.0 <= valid_ratio < 1.0:
        raise ConfigError(f"valid_ratio must be in [0, 1), got {valid_ratio}")
    if not slices:
        raise DataError("the parquet files hold no rows")
    total = sum(s.num_rows for s in slices)
    n_valid = math.ceil(valid_ratio * total)
    if n_valid >= total:
        raise DataError(f"{slices[0].path}: the parquet files hold {total} rows, too few to "
                        f"keep {n_valid} for validation and still train")
    train, valid = _cut_rows(slices, total - n_valid)
    if train_ratio < 1.0:
        train = _cut_rows(train, max(1, int((total - n_valid) * train_ratio)))[0]
    return train, valid


def _cut_rows(slices: Sequence[RowGroupSlice], n_head: int
              ) -> Tuple[List[RowGroupSlice], List[RowGroupSlice]]:
    """(head, tail) of ``slices``, the head holding the first ``n_head`` rows."""
    head: List[RowGroupSlice] = []
    for i, rg in enumerate(slices):
        if n_head <= 0:
            return head, list(slices[i:])
        if rg.num_rows > n_head:
            cut = rg.start + n_head
            return (head + [RowGroupSlice(rg.path, rg.row_group, rg.start, cut)],
                    [RowGroupSlice(rg.path, rg.row_group, cut, rg.stop)] + list(slices[i + 1:]))
        head.append(rg)
        n_head -= rg.num_rows
    return head, []


# ----------------------------------------------------------------------------- labels
@dataclass(frozen=True)
class LabelCounts:
    """Positives (``label_type == 2``) and negatives (any other value, null included)."""
    positives: int
    negatives: int

    @property
    def single_class(self) -> bool:
        return self.positives == 0 or self.negatives == 0


def label_counts(slices: Sequence[RowGroupSlice]) -> LabelCounts:
    """Counts the labels of ``slices``, reading only their ``label_type`` column."""
    pos = total = 0
    files: Dict[str, pq.ParquetFile] = {}
    for rg in slices:
        pf = files.setdefault(rg.path, open_parquet(rg.path))
        try:
            column = pf.read_row_group(rg.row_group, columns=[LABEL_COLUMN]).column(0)
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"{rg.path}: row group {rg.row_group}: cannot decode column "
                            f"'{LABEL_COLUMN}' ({exc})") from exc
        labels = column.slice(rg.start, rg.num_rows).to_numpy(zero_copy_only=False)
        pos += int((labels == POSITIVE_LABEL_TYPE).sum())
        total += rg.num_rows
    return LabelCounts(pos, total - pos)


# ----------------------------------------------------------------------------- damage
@dataclass(frozen=True)
class Damage:
    """A column of a row group that does not decode."""
    path: str
    row_group: int
    column: str
    error: str


def damaged_columns(pf: pq.ParquetFile, path: str, row_group: int, columns: Sequence[str]
                    ) -> List[Damage]:
    """The columns of one row group that fail to decode (each read on its own)."""
    out = []
    for col in columns:
        try:
            pf.read_row_group(row_group, columns=[col])
        except (OSError, pa.ArrowException) as exc:
            out.append(Damage(path, row_group, col, str(exc).splitlines()[0]))
    return out


def _check_file_row_groups(task: Tuple[str, List[int], List[str]]) -> List[Damage]:
    """Decodes the row groups ``task[1]`` of file ``task[0]``: whole first, column by column
    only when that fails (the usual case is clean, so one read per row group)."""
    path, row_groups, columns = task
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        return [Damage(path, -1, "(footer)", str(exc).splitlines()[0])]
    out: List[Damage] = []
    for rg in row_groups:
        try:
            pf.read_row_group(rg, columns=columns)
        except (OSError, pa.ArrowException):
            out += damaged_columns(pf, path, rg, columns)
    return out


def check_row_groups(slices: Sequence[RowGroupSlice], columns: Sequence[str],
                     workers: int) -> List[Damage]:
    """Decodes every column of every row group of ``slices`` and returns all the damage.

    The files' row groups are spread over ``workers`` processes (0: this process).
    """
    by_file: Dict[str, List[int]] = {}
    for rg in slices:
        groups = by_file.setdefault(rg.path, [])
        if rg.row_group not in groups:
            groups.append(rg.row_group)
    n = max(1, workers)
    # Round-robin chunks, so that a worker's share mixes files and row groups evenly.
    tasks = [(path, groups[k::n], list(columns)) for path, groups in by_file.items()
             for k in range(min(n, len(groups)))]
    if workers <= 0:
        results = map(_check_file_row_groups, tasks)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_check_file_row_groups, tasks))
    return sorted((d for part in results for d in part),
                  key=lambda d: (d.path, d.row_group, d.column))


def damage_table(damage: Sequence[Damage]) -> str:
    """The damage as a plain-text table, one line per damaged column."""
    lines = ["file | row group | column | error"]
    lines += [f"{d.path} | {d.row_group} | {d.column} | {d.error}" for d in damage]
    return "\n".join(lines)
