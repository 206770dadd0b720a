"""Train the PCVR HyFormer model: ``python3 train.py --data_dir DIR [flags]`` (see ``--help``).

Flags are declared once in ``pcvr/config.py``; ``--preset seed`` starts from the seed's
configuration (what ``run.sh`` trains). The environment variables TRAIN_DATA_PATH,
TRAIN_CKPT_PATH, TRAIN_LOG_PATH and TRAIN_TF_EVENTS_PATH override the matching flags.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import List, Optional

from pcvr.atomic import remove_stale
from pcvr.checkpoint import CheckpointWriter
from pcvr.config import Config, parse_config, to_flat_dict
from pcvr.data.files import default_schema_path, list_parquet_files
from pcvr.errors import ConfigError, run_cli
from pcvr.data.loaders import check_data, get_pcvr_data
from pcvr.model.build import build_model, load_ns_groups
from pcvr.runtime import count_params, create_logger, resolve_device, set_seed
from pcvr.schema import load_layout
from pcvr.training.reporting import MetricsWriter
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


def main(argv: Optional[List[str]] = None) -> TrainResult:
    cfg = parse_config(argv)
    resolve_paths(cfg)
    tc = cfg.train
    set_seed(tc.seed)
    create_logger(os.path.join(tc.log_dir, "train.log"))
    log.info("command line: %s", " ".join(sys.argv))
    log.info("config:\n%s", json.dumps(to_flat_dict(cfg), indent=2))
    stale = remove_stale(tc.ckpt_dir)
    if stale:
        log.info("removed %d unfinished checkpoint write(s) of an interrupted run: %s",
                 len(stale), ", ".join(stale))
    device = resolve_device(tc.device)

    layout, raw_schema = load_layout(tc.schema_path, cfg.data)
    if tc.check_data != "off":
        check_data(tc.data_dir, layout, tc.num_workers)
        if tc.check_data == "only":
            return TrainResult()
    ns_groups = load_ns_groups(cfg.model.ns_groups_json)
    train_loader, valid_loader, _ = get_pcvr_data(tc.data_dir, layout, cfg.data, tc)
    model = build_model(cfg, layout, ns_groups).to(device)
    log.info("model: %d NS tokens, T = %d, %d parameters (%d in embedding tables)",
             model.ns.num_tokens, model.num_tokens, count_params(model.parameters()),
             count_params(model.sparse_parameters()))
    writer = MetricsWriter(tc.tf_events_dir)
    checkpoints = CheckpointWriter(tc.ckpt_dir, cfg, raw_schema, ns_groups)
    trainer = Trainer(model, cfg, train_loader, valid_loader, device, checkpoints, writer)
    try:
        result = trainer.train()
    finally:
        writer.close()
    log.info("done: best validation AUC %.6f, checkpoint %s", result.best_auc,
             result.best_checkpoint)
    return result


if __name__ == "__main__":
    run_cli(main)
