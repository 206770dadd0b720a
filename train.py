"""Train the PCVR HyFormer model: ``python3 train.py --data_dir DIR [flags]`` (see ``--help``).

Flags are declared once in ``pcvr/config.py``; ``--preset seed`` starts from the seed's
configuration (what ``run.sh`` trains). The environment variables TRAIN_DATA_PATH,
TRAIN_CKPT_PATH, TRAIN_LOG_PATH, TRAIN_TF_EVENTS_PATH and TRAIN_RESUME override the matching
flags. ``--resume`` continues an interrupted run; ``torchrun --nproc_per_node P train.py ...``
trains with P processes (``pcvr.distributed``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from typing import List, Optional

from pcvr import runtime  # first: it sets OpenMP's wait policy before torch loads
import torch

from pcvr.atomic import remove_stale
from pcvr import checkpoint, distributed
from pcvr.checkpoint import CheckpointWriter
from pcvr.config import Config, TrainConfig, parse_config, to_flat_dict
from pcvr.data.files import default_schema_path, list_parquet_files
from pcvr.errors import CheckpointError, ConfigError, run_cli
from pcvr.data.loaders import check_data, get_pcvr_data
from pcvr.model.build import build_model, load_ns_groups
from pcvr.runtime import count_params, create_logger, resolve_device, set_seed
from pcvr.schema import load_layout
from pcvr.training.reporting import MetricsWriter
from pcvr.training.state import check_same_run
from pcvr.training.trainer import Trainer, TrainResult

log = logging.getLogger("train")


def resolve_paths(cfg: Config) -> None:
    """Fills the optional folders: a missing log or events path gets a default, never a crash."""
    tc = cfg.train
    if not tc.data_dir:
        raise ConfigError("no training data: pass --data_dir or set TRAIN_DATA_PATH")
    list_parquet_files(tc.data_dir)  # a wrong data path is named before the schema beside it
    tc.ckpt_dir = tc.ckpt_dir or os.path.join("outputs", "ckpt")
    tc.log_dir = tc.log_dir or os.path.join(os.path.dirname(os.path.abspath(tc.ckpt_dir)),
                                            "logs")
    tc.tf_events_dir = tc.tf_events_dir or os.path.join(tc.log_dir, "events")
    tc.schema_path = tc.schema_path or default_schema_path(tc.data_dir)
    for d in (tc.ckpt_dir, tc.log_dir, tc.tf_events_dir):
        os.makedirs(d, exist_ok=True)


def resume_from(tc: TrainConfig) -> Optional[str]:
    """The checkpoint folder ``--resume`` names: ``latest`` = the newest resumable one in
    ``--ckpt_dir`` (None: there is none yet, the run starts afresh), else the path given.

    Raises:
        CheckpointError: a given folder that does not exist.
    """
    if tc.resume == "latest":
        path = checkpoint.latest_resumable(tc.ckpt_dir)
        if path is None:
            log.info("--resume latest: no resumable checkpoint in %s yet, starting afresh",
                     tc.ckpt_dir)
        return path
    if not os.path.isdir(tc.resume):
        raise CheckpointError(f"{tc.resume}: no such checkpoint folder to resume from")
    return tc.resume


def resume(trainer: Trainer, path: str, cfg: Config) -> None:
    """Restores the run saved in checkpoint folder ``path`` into ``trainer``.

    Raises:
        CheckpointError: a missing, truncated or foreign checkpoint, naming the file.
        ConfigError: model or data flags that differ from the saved run's, naming them.
    """
    ckpt = checkpoint.read(path)
    check_same_run(ckpt.cfg, cfg, os.path.join(path, checkpoint.CONFIG_FILE))
    state = checkpoint.load_train_state(ckpt)
    trainer.load_state(state, checkpoint.load_weights(ckpt), ckpt.meta.weights == "ema")
    log.info("resumed from %s", path)


def main(argv: Optional[List[str]] = None) -> TrainResult:
    """Trains; under ``torchrun`` one process per rank (``pcvr.distributed``)."""
    cfg = parse_config(argv)
    device = resolve_device(cfg.train.device)
    world = distributed.init_from_env(device.type)
    if device.type == "cuda" and world.size > 1:
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    finished = False
    try:
        result = run(cfg, world, device)
        finished = True
        return result
    finally:
        distributed.shutdown(finished)


def run(cfg: Config, world: distributed.World, device: torch.device) -> TrainResult:
    """One rank's training run (``main``)."""
    resolve_paths(cfg)
    tc = cfg.train
    if tc.batch_size % world.size:
        raise ConfigError(f"--batch_size {tc.batch_size} is the global batch: it must be a "
                          f"multiple of the {world.size} processes")
    set_seed(tc.seed)
    create_logger(os.path.join(tc.log_dir, "train.log") if world.is_main else None,
                  quiet=not world.is_main)
    log.info("command line: %s", " ".join(sys.argv))
    log.info("config:\n%s", json.dumps(to_flat_dict(cfg), indent=2))
    if world.size > 1:
        log.info("%d processes, %d rows per process and step", world.size,
                 tc.batch_size // world.size)
    if world.is_main:
        stale = remove_stale(tc.ckpt_dir)
        if stale:
            log.info("removed %d unfinished checkpoint write(s) of an interrupted run: %s",
                     len(stale), ", ".join(stale))

    layout, raw_schema = load_layout(tc.schema_path, cfg.data)
    if tc.check_data != "off":
        if world.is_main:
            check_data(tc.data_dir, layout, tc.num_workers)
        distributed.gather_objects(None)  # the other ranks wait for the check
        if tc.check_data == "only":
            return TrainResult()
    ns_groups = load_ns_groups(cfg.model.ns_groups_json)
    runtime.configure_threads(tc.num_workers, device)
    per_rank = dataclasses.replace(tc, batch_size=tc.batch_size // world.size)
    train_loader, valid_loader, _ = get_pcvr_data(tc.data_dir, layout, cfg.data, per_rank)
    model = build_model(cfg, layout, ns_groups).to(device)
    log.info("model: %d NS tokens, T = %d, %d parameters (%d in embedding tables)",
             model.ns.num_tokens, model.num_tokens, count_params(model.parameters()),
             count_params(model.sparse_parameters()))
    writer = MetricsWriter(tc.tf_events_dir) if world.is_main else None
    checkpoints = CheckpointWriter(tc.ckpt_dir, cfg, raw_schema, ns_groups) \
        if world.is_main else None
    trainer = Trainer(model, cfg, train_loader, valid_loader, device, checkpoints, writer)
    if tc.resume:
        path = distributed.gather_objects(resume_from(tc) if world.is_main else None)[0]
        if path is not None:
            resume(trainer, path, cfg)
    try:
        result = trainer.train()
    finally:
        if writer is not None:
            writer.close()
    log.info("done: best validation AUC %.6f, checkpoint %s", result.best_auc,
             result.best_checkpoint)
    return result


if __name__ == "__main__":
    run_cli(main)
