"""Train the PCVR HyFormer model: ``python3 train.py --data_dir DIR [flags]`` (see ``--help``).

Flags are declared once in ``config.py``; the environment variables TRAIN_DATA_PATH,
TRAIN_CKPT_PATH, TRAIN_LOG_PATH and TRAIN_TF_EVENTS_PATH override the matching flags.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import List, Optional

from pcvr.config import Config, parse_config, parse_seq_max_lens, to_flat_dict
from pcvr.data.convert import DataStats, get_pcvr_data
from pcvr.model.hyformer import build_model, load_ns_groups
from pcvr.schema import NUM_TIME_BUCKETS
from pcvr.training.trainer import Trainer, TrainResult
from pcvr.runtime import MetricsWriter, count_params, create_logger, resolve_device, set_seed

log = logging.getLogger("train")


def resolve_paths(cfg: Config) -> None:
    """Fills the optional folders: a missing log or events path gets a default, never a crash."""
    t = cfg.train
    if not t.data_dir:
        raise SystemExit("error: no training data: pass --data_dir or set TRAIN_DATA_PATH")
    t.ckpt_dir = t.ckpt_dir or os.path.join("outputs", "ckpt")
    t.log_dir = t.log_dir or os.path.join(os.path.dirname(os.path.abspath(t.ckpt_dir)), "logs")
    t.tf_events_dir = t.tf_events_dir or os.path.join(t.log_dir, "events")
    t.schema_path = t.schema_path or os.path.join(
        t.data_dir if os.path.isdir(t.data_dir) else os.path.dirname(t.data_dir), "schema.json")
    for d in (t.ckpt_dir, t.log_dir, t.tf_events_dir):
        os.makedirs(d, exist_ok=True)


def main(argv: Optional[List[str]] = None) -> TrainResult:
    cfg = parse_config(argv)
    resolve_paths(cfg)
    t = cfg.train
    set_seed(t.seed)
    create_logger(os.path.join(t.log_dir, "train.log"))
    log.info("command line: %s", " ".join(sys.argv))
    log.info("config:\n%s", json.dumps(to_flat_dict(cfg), indent=2))
    device = resolve_device(t.device)

    parse_seq_max_lens(cfg.data.seq_max_lens)  # fail fast on a malformed value
    ns_groups, ns_groups_path = load_ns_groups(cfg.model.ns_groups_json)
    train_loader, valid_loader, layout, info = get_pcvr_data(
        data_dir=t.data_dir, schema_path=t.schema_path, data_cfg=cfg.data,
        batch_size=t.batch_size, num_workers=t.num_workers, buffer_batches=t.buffer_batches,
        train_ratio=t.train_ratio, valid_ratio=t.valid_ratio, seed=t.seed)
    log.info("data: %s", {k: v for k, v in info.items() if k != "stat_names"})
    with open(t.schema_path, "r", encoding="utf-8") as fh:
        raw_schema = json.load(fh)

    model = build_model(layout, cfg.model, cfg.decoupling, ns_groups,
                        user_time_missing_as_padding=cfg.data.user_abs_time_missing_as_padding).to(device)
    log.info("model: %d NS tokens, T = %d, %d parameters (%d in embedding tables)",
             model.num_ns_tokens, model.num_tokens, count_params(model.parameters()),
             count_params(model.sparse_parameters()))
    writer = MetricsWriter(t.tf_events_dir)
    extra = {"num_time_buckets": NUM_TIME_BUCKETS if cfg.model.use_time_buckets else 0}
    trainer = Trainer(model, cfg, train_loader, valid_loader, device, raw_schema,
                      ns_groups_path, extra, writer=writer,
                      make_stats=lambda: DataStats(info["stat_names"]))
    try:
        result = trainer.train()
    finally:
        writer.close()
    log.info("done: best validation AUC %.6f, checkpoint %s", result.best_auc,
             result.best_checkpoint)
    return result


if __name__ == "__main__":
    main()
