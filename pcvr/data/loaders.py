"""DataLoaders: the training/validation pair of a data folder, and the inference loader.

Workers are not persistent so that ``set_epoch`` reaches them; validation and inference use
the workers too; ``prefetch_factor`` is only passed with workers, so ``num_workers=0`` works.
With workers, tensors travel through the ``file_system`` sharing strategy: the default
``file_descriptor`` one keeps a descriptor open per tensor in flight (a batch holds about 30)
and runs out of them under the usual limit of 1024.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader

from pcvr.config import DataConfig, TrainConfig
from pcvr.data.files import (LABEL_COLUMN, DataError, LabelCounts, check_row_groups,
                             damage_table, label_counts, list_parquet_files, required_columns,
                             scan_parquet, split_row_groups)
from pcvr.data.stream import PCVRDataset
from pcvr.schema import FeatureLayout

log = logging.getLogger(__name__)


class PCVRLoader(DataLoader):
    """A DataLoader over a ``PCVRDataset`` exposing ``set_epoch``, ``stat_names``, ``num_rows``
    and ``num_batches``."""

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    @property
    def stat_names(self) -> List[str]:
        return self.dataset.stat_names

    @property
    def num_rows(self) -> int:
        return self.dataset.num_rows

    @property
    def num_batches(self) -> int:
        """Batches this process gets in the current epoch (``PCVRDataset.num_batches``)."""
        return self.dataset.num_batches(self.num_workers)


def make_loader(dataset: PCVRDataset, num_workers: int, pin_memory: Optional[bool] = None
                ) -> PCVRLoader:
    """``batch_size=None`` loader of ``dataset`` (module docstring); pinned batches by default
    when CUDA is available."""
    kwargs: Dict[str, Any] = {}
    if num_workers > 0:
        kwargs["prefetch_factor"] = 2
        torch.multiprocessing.set_sharing_strategy("file_system")
    return PCVRLoader(dataset, batch_size=None, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
                      persistent_workers=False, **kwargs)


def get_pcvr_data(data_dir: str, layout: FeatureLayout, data_cfg: DataConfig, tc: TrainConfig,
                  pin_memory: Optional[bool] = None
                  ) -> Tuple[PCVRLoader, Optional[PCVRLoader], Dict[str, Any]]:
    """Training and validation loaders of a data folder.

    Args:
        data_dir: folder of ``*.parquet`` or one parquet file.
        layout: the feature layout (``schema.load_layout``).
        data_cfg: conversion flags.
        tc: the training flags (``batch_size``, ``num_workers``, ``buffer_batches``,
            ``train_ratio``, ``valid_ratio``, ``seed``).
        pin_memory: default: when CUDA is available.
    Returns:
        (train loader, validation loader or None when ``valid_ratio == 0``, info); ``info``
        has ``files``, ``row_groups``, ``rows``, ``train_row_groups``, ``train_rows``,
        ``valid_row_groups`` and ``valid_rows`` (a row group cut by the split counts on
        both sides).
    """
    files = list_parquet_files(data_dir)
    row_groups, _ = scan_parquet(files, required_columns(layout, read_labels=True))
    train, valid = split_row_groups(row_groups, tc.train_ratio, tc.valid_ratio)
    train_ds = PCVRDataset(train, layout, data_cfg, tc.batch_size, shuffle=True,
                           buffer_batches=tc.buffer_batches, seed=tc.seed)
    valid_ds = PCVRDataset(valid, layout, data_cfg, tc.batch_size) if valid else None
    _check_labels(label_counts(train), label_counts(valid) if valid else None)
    info = {
        "files": files,
        "row_groups": len(row_groups),
        "rows": sum(rg.num_rows for rg in row_groups),
        "train_row_groups": len(train),
        "train_rows": train_ds.num_rows,
        "valid_row_groups": len(valid),
        "valid_rows": valid_ds.num_rows if valid_ds is not None else 0,
    }
    log.info("data: %d file(s), %d row groups, %d rows; train %d rows (%d row groups), "
             "valid %d rows (%d row groups)", len(files), info["row_groups"],
             info["rows"], info["train_rows"], info["train_row_groups"], info["valid_rows"],
             info["valid_row_groups"])
    return (make_loader(train_ds, tc.num_workers, pin_memory),
            make_loader(valid_ds, tc.num_workers, pin_memory) if valid_ds is not None else None,
            info)


def check_data(data_dir: str, layout: FeatureLayout, workers: int) -> int:
    """Decodes every needed column of every row group of ``data_dir`` with ``workers``
    processes; returns the number of row groups checked.

    Raises:
        DataError: listing every damaged row group and column in one table.
    """
    files = list_parquet_files(data_dir)
    columns = required_columns(layout, read_labels=True)
    row_groups, _ = scan_parquet(files, columns)
    damage = check_row_groups(row_groups, list(columns), workers)
    if damage:
        bad = len({(d.path, d.row_group) for d in damage})
        raise DataError(f"{data_dir}: {bad} of {len(row_groups)} row groups do not decode:\n"
                        + damage_table(damage))
    log.info("check_data: all %d row groups of %d file(s) decode", len(row_groups), len(files))
    return len(row_groups)


def _check_labels(train: LabelCounts, valid: Optional[LabelCounts]) -> None:
    """Logs the label counts of both splits; a single-class training split is an error, a
    single-class validation split a warning (its AUC is undefined)."""
    log.info("labels: train %d positive / %d negative, valid %s", train.positives,
             train.negatives, f"{valid.positives} positive / {valid.negatives} negative"
             if valid is not None else "none")
    if train.single_class:
        kind = "negative" if not train.positives else "positive"
        raise DataError(f"the training split has only {kind} labels ({train.positives} "
                        f"positive, {train.negatives} negative): a ranking model cannot learn "
                        f"from it (label = label_type == 2)")
    if valid is not None and valid.single_class:
        log.warning("the validation split has a single class (%d positive, %d negative): its "
                    "AUC is undefined, so no checkpoint can be chosen by it and the last one "
                    "will be recorded as the best", valid.positives, valid.negatives)


def get_eval_loader(data_path: str, layout: FeatureLayout, data_cfg: DataConfig,
                    batch_size: int, num_workers: int, read_labels: bool = False,
                    pin_memory: Optional[bool] = None) -> PCVRLoader:
    """Loader over every row of ``data_path`` (stored order within each worker).

    Labels are read only when ``read_labels`` and every file has ``label_type``; otherwise
    ``label`` is all 0.
    """
    files = list_parquet_files(data_path)
    optional = {LABEL_COLUMN: "scalar"} if read_labels else {}
    row_groups, present = scan_parquet(files, required_columns(layout, False), optional)
    if read_labels and not present:
        log.warning("%s: '%s' is missing from some file; labels are all 0", data_path,
                    LABEL_COLUMN)
    read_labels = bool(present)
    if not row_groups:
        raise DataError(f"{data_path}: the parquet files hold no rows")
    ds = PCVRDataset(row_groups, layout, data_cfg, batch_size, read_labels=read_labels)
    log.info("eval data: %d file(s), %d row groups, %d rows", len(files), len(row_groups),
             ds.num_rows)
    return make_loader(ds, num_workers, pin_memory)
