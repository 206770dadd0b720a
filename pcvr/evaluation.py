"""Scoring a model on a loader: ``predict`` (model + loader -> logits, user ids, labels) and
``score`` (AUC and log loss). Validation, inference, the demo-data reports and the benchmarks
all go through these two functions."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, Iterable, Optional

import numpy as np
import torch

from pcvr import distributed
from pcvr.batch import Batch
from pcvr.data.convert import DataStats
from pcvr.metrics import binary_logloss, roc_auc
from pcvr.model.outputs import RankingModel
from pcvr.progress import Progress

log = logging.getLogger(__name__)


@dataclass
class Predictions:
    """What one pass of a model over a loader produced (host arrays, row order kept).

    Attributes:
        user_id: ``[N]`` int64.
        logit: ``[N]`` float64, the first action's logit.
        label: ``[N]`` float32 (0 where the data had no labels).
    """
    user_id: np.ndarray
    logit: np.ndarray
    label: np.ndarray

    @property
    def prob(self) -> np.ndarray:
        """``[N]`` sigmoid of the logits."""
        return 1.0 / (1.0 + np.exp(-self.logit))


@torch.inference_mode()
def predict(model: RankingModel, loader: Iterable[Batch], device: torch.device,
            desc: str = "predict", stats: Optional[DataStats] = None) -> Predictions:
    """Runs ``model.predict`` in float32 over every batch of ``loader``.

    The model's training mode is restored afterwards. Logits stay on the device until the
    end, so a GPU pass has no per-batch synchronisation. With several processes each predicts
    its shard of the loader and the predictions of all ranks are gathered (every rank gets
    all of them, rank order), so a metric is computed on every row.

    Args:
        model: the model (put in eval mode for the pass).
        loader: yields ``Batch``es.
        device: where the model is.
        desc: the progress bar's label.
        stats: accumulates the batches' repair counters, when given.
    Returns:
        ``Predictions`` in the loader's row order.
    """
    was_training = model.training
    model.eval()
    uids, logits, labels = [], [], []
    try:
        for batch in Progress(loader, desc, total=getattr(loader, "num_batches", None)):
            if stats is not None:
                stats.add(batch)
            out = model.predict(batch.to(device, non_blocking=True))
            logits.append(out[:, 0].float())
            uids.append(batch.user_id)
            labels.append(batch.label)
    finally:
        model.train(was_training)
    arrays = [np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.float32)]
    if logits:
        arrays = [torch.cat(uids).numpy().astype(np.int64),
                  torch.cat(logits).double().cpu().numpy(), torch.cat(labels).float().numpy()]
    return Predictions(*distributed.gather_arrays(arrays))


def score(pred: Predictions) -> Dict[str, float]:
    """AUC (exact, ties halved) and log loss; non-finite logits are counted, never dropped.

    A non-finite logit is ranked below every finite one for the AUC (a failure costs AUC
    instead of silently disappearing) and excluded from the log loss.

    Returns:
        ``auc`` (NaN for a single class), ``logloss``, ``rows``, ``nonfinite``.
    """
    finite = np.isfinite(pred.logit)
    n_bad = int((~finite).sum())
    if n_bad:
        log.error("%d of %d predictions are not finite", n_bad, finite.size)
    lowest = pred.logit[finite].min() - 1.0 if finite.any() else 0.0
    ranked = np.where(finite, pred.logit, lowest)
    return {"auc": roc_auc(pred.label, ranked),
            "logloss": binary_logloss(pred.label[finite], pred.logit[finite]),
            "rows": float(finite.size), "nonfinite": float(n_bad)}
