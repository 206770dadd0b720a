"""Platform inference entry: ``main()`` writes ``$EVAL_RESULT_PATH/predictions.json``.

Environment (platform contract):
    MODEL_OUTPUT_PATH  checkpoint folder (model.pt, train_config.json, schema.json, ...)
    EVAL_DATA_PATH     folder of test *.parquet (may hold schema.json)
    EVAL_RESULT_PATH   output folder (created if missing)

The model is rebuilt strictly from ``train_config.json``: every data/model flag must be there
and no unknown key may be (see ``config.from_flat_dict``), and the state dict loads strictly.
Inference always runs in float32.

Locally, ``python3 infer.py --model_dir CKPT --data_dir DIR --result_dir OUT --score`` does the
same and, when the parquet has labels, prints the AUC (and the oracle AUC when the folder holds
the demo generator's truth sidecar).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Dict, List, Optional

import numpy as np
import torch

from pcvr.config import Config, ConfigError, from_flat_dict, parse_seq_max_lens
from pcvr.data.convert import DataStats, get_eval_loader
from pcvr.model.hyformer import build_model, load_ns_groups
from pcvr.schema import NUM_TIME_BUCKETS, load_schema
from pcvr.training.trainer import Predictions, predict_loader, score_predictions
from pcvr.runtime import atomic_write_json, create_logger, resolve_device

log = logging.getLogger("infer")


def _require_env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise SystemExit(f"error: environment variable {name} is not set")
    return value


def load_checkpoint_config(model_dir: str):
    """Reads and strictly validates ``train_config.json``; returns (Config, raw dict)."""
    path = os.path.join(model_dir, "train_config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: a checkpoint must carry the "
                                f"train_config.json written by train.py")
    with open(path, "r", encoding="utf-8") as fh:
        raw = json.load(fh)
    cfg = from_flat_dict(raw, source=path)
    if cfg.train.inference_dtype != "float32":
        raise ConfigError(f"{path}: inference_dtype {cfg.train.inference_dtype!r}; only "
                          f"float32 is supported")
    expected = NUM_TIME_BUCKETS if cfg.model.use_time_buckets else 0
    if raw.get("num_time_buckets", expected) != expected:
        raise ConfigError(f"{path}: num_time_buckets {raw['num_time_buckets']} does not match "
                          f"use_time_buckets={cfg.model.use_time_buckets} (expected {expected})")
    return cfg, raw


def find_weights(model_dir: str) -> str:
    """``model.pt``, or the only ``*.pt`` in the folder; never an arbitrary one of several."""
    path = os.path.join(model_dir, "model.pt")
    if os.path.isfile(path):
        return path
    candidates = sorted(f for f in os.listdir(model_dir) if f.endswith(".pt"))
    if len(candidates) == 1:
        return os.path.join(model_dir, candidates[0])
    raise FileNotFoundError(f"{model_dir}: expected model.pt (found {sorted(os.listdir(model_dir))})")


def load_model(model_dir: str, cfg: Config, data_dir: Optional[str] = None):
    """Rebuilds the model of ``model_dir`` from ``cfg`` and loads its weights strictly.

    Returns (model in float32 eval mode on the inference device, layout, device).
    """
    schema_path = os.path.join(model_dir, "schema.json")
    if not os.path.isfile(schema_path) and data_dir:
        schema_path = os.path.join(data_dir if os.path.isdir(data_dir)
                                   else os.path.dirname(data_dir), "schema.json")
    layout, _ = load_schema(schema_path, parse_seq_max_lens(cfg.data.seq_max_lens),
                            cfg.data.use_user_activity_dense)
    ns_path = cfg.model.ns_groups_json
    if ns_path and os.path.isfile(os.path.join(model_dir, os.path.basename(ns_path))):
        ns_path = os.path.join(model_dir, os.path.basename(ns_path))
    ns_groups, _ = load_ns_groups(ns_path)
    model = build_model(layout, cfg.model, cfg.decoupling, ns_groups,
                        user_time_missing_as_padding=cfg.data.user_abs_time_missing_as_padding)
    state = torch.load(find_weights(model_dir), map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise RuntimeError(f"{model_dir}: the weights do not match the model rebuilt from "
                           f"train_config.json: {exc}") from None
    device = resolve_device("auto")
    return model.float().to(device).eval(), layout, device


def run_inference(model_dir: str, data_dir: str, result_dir: str,
                  read_labels: bool = False) -> Predictions:
    """Rebuilds the model from ``model_dir``, predicts every row of ``data_dir``, writes JSON."""
    cfg, _ = load_checkpoint_config(model_dir)
    model, layout, device = load_model(model_dir, cfg, data_dir)
    loader = get_eval_loader(data_dir, layout, cfg.data, batch_size=cfg.train.batch_size,
                             num_workers=cfg.train.num_workers, read_labels=read_labels)
    stats = DataStats(loader.stat_names) if hasattr(loader, "stat_names") else None
    pred = predict_loader(model, loader, device, desc="infer", stats=stats)
    if stats is not None:
        for line in stats.summary_lines():
            log.info("data repairs: %s", line)
    write_predictions(pred, result_dir)
    return pred


def write_predictions(pred: Predictions, result_dir: str) -> str:
    """``{"predictions": {"<user_id>": probability}}``; duplicate user ids are reported."""
    probs = pred.prob
    n_dup = pred.user_id.size - np.unique(pred.user_id).size
    if n_dup:
        log.warning("%d duplicate user_id rows: predictions.json keeps the last of each", n_dup)
    out: Dict[str, float] = {str(int(u)): float(p) for u, p in zip(pred.user_id, probs)}
    path = os.path.join(result_dir, "predictions.json")
    atomic_write_json(path, {"predictions": out})
    log.info("wrote %d predictions to %s", len(out), path)
    return path


def main() -> None:
    """Platform entry point: no arguments, three environment variables."""
    create_logger()
    model_dir = _require_env("MODEL_OUTPUT_PATH")
    data_dir = _require_env("EVAL_DATA_PATH")
    result_dir = _require_env("EVAL_RESULT_PATH")
    os.makedirs(result_dir, exist_ok=True)
    run_inference(model_dir, data_dir, result_dir)


def _local(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Local inference and scoring.")
    parser.add_argument("--model_dir", default=os.environ.get("MODEL_OUTPUT_PATH"))
    parser.add_argument("--data_dir", default=os.environ.get("EVAL_DATA_PATH"))
    parser.add_argument("--result_dir", default=os.environ.get("EVAL_RESULT_PATH"))
    parser.add_argument("--score", action="store_true",
                        help="read labels from the parquet and print the AUC")
    args = parser.parse_args(argv)
    if not (args.model_dir and args.data_dir and args.result_dir):
        parser.error("--model_dir, --data_dir and --result_dir (or the env variables) are needed")
    create_logger()
    pred = run_inference(args.model_dir, args.data_dir, args.result_dir, read_labels=args.score)
    if args.score:
        metrics = score_predictions(pred)
        line = f"auc {metrics['auc']:.6f} logloss {metrics['logloss']:.6f} rows {pred.logit.size}"
        try:
            from pcvr.demo import oracle as demo_oracle
            oracle = demo_oracle.oracle_auc(args.data_dir)
            capture = demo_oracle.effect_capture(args.data_dir, pred.user_id, pred.logit)
        except (ImportError, FileNotFoundError):  # not demo data: no truth sidecar
            print(line, flush=True)
            return
        print("planted effect -> weight in the model's logit (1 = fully used, 0 = ignored): "
              + ", ".join(f"{k} {v:.2f}" for k, v in capture.items()), flush=True)
        lift = (metrics["auc"] - 0.5) / (oracle - 0.5)
        print(f"{line} oracle_auc {oracle:.6f} oracle_lift {lift:.3f}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        _local()
    else:
        main()
