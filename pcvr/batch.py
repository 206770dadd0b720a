"""The batch: what the data pipeline yields and the model reads, as typed dataclasses.

Inside the pipeline the fields hold numpy arrays (the shuffle pool, converted chunks); the
loader hands out the same dataclasses holding torch tensors (``Batch.from_numpy``). B rows,
F_d side features and L_d kept events in domain d (L_d = the longest kept history among the
batch's rows, at least 1):

====================  ========  ==============================================================
field                 dtype     shape
====================  ========  ==============================================================
user_int / item_int   int32     [B, layout.user_int_dim] / [B, layout.item_int_dim]
user_dense /          float32   [B, layout.user_dense_dim] / [B, layout.item_dense_dim]
item_dense
label                 float32   [B] (1.0 iff label_type == 2; 0 when labels are not read)
timestamp, user_id    int64     [B]
hour, dayofweek       int32     [B] request hour and day of week
seq[d].ids            int32     [B, F_d, L_d], position 0 = the newest event
seq[d].lens           int64     [B] kept events
seq[d].time_bucket,   int32     [B, L_d], 0 = padding
seq[d].hour,
seq[d].dayofweek
data_stats            int64     [n] repair counters (``pcvr.data.convert.stat_names``); stays
                                on the host
====================  ========  ==============================================================

Every id, bucket, hour and day is an embedding index in int32: half the bytes of int64 to
convert, shuffle and copy, and taken as it is by ``nn.Embedding`` / ``F.embedding_bag``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Union

import numpy as np
import torch

Array = Union[np.ndarray, torch.Tensor]


@dataclass
class SeqBatch:
    """One behaviour domain's kept histories (see the module table)."""
    ids: Array
    lens: Array
    time_bucket: Array
    hour: Array
    dayofweek: Array

    def map(self, fn: Callable[[Array], Array]) -> "SeqBatch":
        """A new ``SeqBatch`` of ``fn(field)`` for every field."""
        return SeqBatch(*(fn(getattr(self, name)) for name in SEQ_FIELDS))


# Fields of a SeqBatch whose last axis is the history length L_d (trimmed per batch).
HISTORY_FIELDS: Tuple[str, ...] = ("ids", "time_bucket", "hour", "dayofweek")
SEQ_FIELDS: Tuple[str, ...] = tuple(f.name for f in dataclasses.fields(SeqBatch))


@dataclass
class Batch:
    """A batch of rows (see the module table)."""
    user_int: Array
    item_int: Array
    user_dense: Array
    item_dense: Array
    label: Array
    timestamp: Array
    user_id: Array
    hour: Array
    dayofweek: Array
    seq: Dict[str, SeqBatch]
    data_stats: Array

    @property
    def size(self) -> int:
        """B, the number of rows."""
        return int(self.label.shape[0])

    def map(self, fn: Callable[[Array], Array],
            stats: Optional[Callable[[Array], Array]] = None) -> "Batch":
        """A new ``Batch`` of ``fn(field)`` for every array but ``data_stats``, which gets
        ``stats(data_stats)`` (default: kept as it is)."""
        flat = {name: fn(getattr(self, name)) for name in ROW_FIELDS}
        return Batch(**flat, seq={d: s.map(fn) for d, s in self.seq.items()},
                     data_stats=self.data_stats if stats is None else stats(self.data_stats))

    @staticmethod
    def from_numpy(arrays: "Batch") -> "Batch":
        """The same batch as torch tensors sharing the numpy memory."""
        return arrays.map(torch.from_numpy, torch.from_numpy)

    def to(self, device: Union[str, torch.device], non_blocking: bool = False) -> "Batch":
        """Every tensor but the host-side ``data_stats`` moved to ``device``."""
        return self.map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """Page-locked copies, so that ``to(cuda, non_blocking=True)`` overlaps with compute
        (called by the DataLoader's pinning thread)."""
        return self.map(lambda t: t.pin_memory())


# Fields of a Batch with one entry per row (everything but ``seq`` and ``data_stats``).
ROW_FIELDS: Tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Batch)
                                    if f.name not in ("seq", "data_stats"))
