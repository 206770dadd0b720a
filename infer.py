"""Platform inference entry: ``main()`` writes ``$EVAL_RESULT_PATH/predictions.json``.

Environment (platform contract):
    MODEL_OUTPUT_PATH  checkpoint folder (model.pt, train_config.json, schema.json, ...); a
                       checkpoint root with best_checkpoint.json also works (the best is used)
    EVAL_DATA_PATH     folder of test *.parquet (may hold schema.json)
    EVAL_RESULT_PATH   output folder (created if missing)

The model is rebuilt strictly from ``train_config.json`` (``pcvr.checkpoint``): every data and
model flag must be there and no unknown key may be, and the weights load strictly. Inference
always runs in float32.

Locally, ``python3 infer.py --model_dir CKPT --data_dir DIR --result_dir OUT --score`` does the
same and, when the parquet has labels, prints the AUC (and, on demo data, the oracle AUC and
the effect capture). The upload for the platform is this file plus the ``pcvr`` package.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Dict, List, Optional

# The platform may import this file from another working folder: its package lives beside it.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from pcvr import checkpoint  # noqa: E402
from pcvr.atomic import atomic_write_json  # noqa: E402
from pcvr.config import (InferConfig, RunConfig, build_parser, env_values,  # noqa: E402
                         section_from_namespace)
from pcvr.data.convert import DataStats  # noqa: E402
from pcvr.data.files import default_schema_path  # noqa: E402
from pcvr.data.loaders import get_eval_loader  # noqa: E402
from pcvr.demo import oracle  # noqa: E402
from pcvr.errors import run_cli  # noqa: E402
from pcvr.evaluation import Predictions, predict, score  # noqa: E402
from pcvr.runtime import create_logger, resolve_device  # noqa: E402

log = logging.getLogger("infer")


def run_inference(model_dir: str, data_dir: str, result_dir: str,
                  read_labels: bool = False) -> Predictions:
    """Rebuilds the model of ``model_dir``, predicts every row of ``data_dir`` and writes
    ``result_dir/predictions.json``; returns the predictions."""
    ckpt = checkpoint.read(checkpoint.resolve_model_dir(model_dir),
                           fallback_schema=default_schema_path(data_dir))
    model, layout = checkpoint.load_model(ckpt)
    device = resolve_device("auto")
    model.to(device)
    loader = get_eval_loader(data_dir, layout, ckpt.cfg.data, ckpt.cfg.train.batch_size,
                             ckpt.cfg.train.num_workers, read_labels=read_labels)
    stats = DataStats(loader.stat_names)
    pred = predict(model, loader, device, desc="infer", stats=stats)
    for line in stats.summary_lines():
        log.info("data repairs: %s", line)
    write_predictions(pred, result_dir)
    return pred


def write_predictions(pred: Predictions, result_dir: str) -> str:
    """``{"predictions": {"<user_id>": probability}}``; duplicate user ids are reported."""
    n_dup = pred.user_id.size - np.unique(pred.user_id).size
    if n_dup:
        log.warning("%d duplicate user_id rows: predictions.json keeps the last of each", n_dup)
    out: Dict[str, float] = {str(int(u)): float(p) for u, p in zip(pred.user_id, pred.prob)}
    path = os.path.join(result_dir, "predictions.json")
    atomic_write_json(path, {"predictions": out})
    log.info("wrote %d predictions to %s", len(out), path)
    return path


def print_scores(pred: Predictions, data_dir: str) -> None:
    """Prints the AUC line; on demo data (a truth sidecar) the effect capture before it and
    the oracle AUC and lift in it."""
    metrics = score(pred)
    line = f"auc {metrics['auc']:.6f} logloss {metrics['logloss']:.6f} rows {pred.logit.size}"
    if oracle.has_truth(data_dir):
        capture = oracle.effect_capture(data_dir, pred.user_id, pred.logit)
        print("planted effect -> weight in the model's logit (1 = fully used, 0 = ignored): "
              + ", ".join(f"{k} {v:.2f}" for k, v in capture.items()), flush=True)
        best = oracle.oracle_auc(data_dir)
        line += f" oracle_auc {best:.6f} oracle_lift {oracle.oracle_lift(metrics['auc'], best):.3f}"
    print(line, flush=True)


def main(argv: Optional[List[str]] = None) -> None:
    """Platform entry point: called with no arguments, it reads the environment variables
    (never the host process's ``sys.argv``); locally, flags given win over them."""
    parser = build_parser([InferConfig, RunConfig], description="Inference and local scoring.")
    parser.set_defaults(**env_values([InferConfig]))
    ic = section_from_namespace(InferConfig, parser.parse_args([] if argv is None else argv))
    missing = [f"--{k} / {v}" for k, v in (("model_dir", "MODEL_OUTPUT_PATH"),
                                           ("data_dir", "EVAL_DATA_PATH"),
                                           ("result_dir", "EVAL_RESULT_PATH"))
               if not getattr(ic, k)]
    if missing:
        parser.error(f"missing {', '.join(missing)}")
    create_logger()
    os.makedirs(ic.result_dir, exist_ok=True)
    pred = run_inference(ic.model_dir, ic.data_dir, ic.result_dir, read_labels=ic.score)
    if ic.score:
        print_scores(pred, ic.data_dir)


if __name__ == "__main__":
    run_cli(main)
