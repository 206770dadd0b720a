"""What a split of demo data holds of the truth: its true probabilities, the oracle AUC, and
how much of each planted effect a model's logits carry. Torch-free, and independent of the
generator, so that inference can score demo data without importing it.

The truth sidecar (``truth.npz``, written by ``pcvr.demo.generator``) holds per row
``user_id``, ``p_true``, ``label`` and ``logit_<effect>``: each planted effect's contribution
to the true logit, in the generator's effect order, then ``logit_noise``.
"""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

import numpy as np

from pcvr.metrics import roc_auc

TRUTH_FILE = "truth.npz"
NOISE_PART = "logit_noise"


def has_truth(data_dir: str) -> bool:
    """Whether ``data_dir`` (a split's folder) carries a truth sidecar."""
    return os.path.isfile(os.path.join(data_dir, TRUTH_FILE))


def _effect_keys(files: List[str]) -> List[str]:
    return [k for k in files if k.startswith("logit_") and k != NOISE_PART]


def load_truth(data_dir: str) -> Tuple[np.ndarray, np.ndarray]:
    """(user_id int64 [N], p_true float64 [N]) of a split."""
    with np.load(os.path.join(data_dir, TRUTH_FILE)) as z:
        return z["user_id"].astype(np.int64), z["p_true"].astype(np.float64)


def oracle_auc(data_dir: str) -> float:
    """AUC of ranking a split's rows by their true probability, against its labels."""
    with np.load(os.path.join(data_dir, TRUTH_FILE)) as z:
        return roc_auc(z["label"], z["p_true"])


def oracle_lift(auc: float, oracle: float) -> float:
    """``(AUC - 0.5) / (oracle AUC - 0.5)``: the share of the attainable lift over chance."""
    return (auc - 0.5) / (oracle - 0.5)


def effect_capture(data_dir: str, user_id: np.ndarray, logit: np.ndarray) -> Dict[str, float]:
    """How much of each planted effect a model's logits carry, on one split.

    Least squares of the model's logit on the effects' logit contributions (noise excluded)
    plus a constant, over the rows of ``user_id`` (any order, all in the split). A weight of 1
    means an effect moves the model's logit as much as it moves the true one; 0 means the
    model ignores it (weights below 1 are normal: a model shrinks what it is unsure of).

    Args:
        data_dir: the split's folder (its ``truth.npz``).
        user_id: ``[N]`` row keys.
        logit: ``[N]`` the model's logits of the same rows.
    Returns:
        effect name -> weight, in the generator's effect order, plus ``'r2'``: the share of
        the model logit's variance that the effects explain.
    Raises:
        KeyError: a ``user_id`` that is not a row of the split.
    """
    with np.load(os.path.join(data_dir, TRUTH_FILE)) as z:
        keys = _effect_keys(z.files)
        order = np.argsort(z["user_id"])
        found = np.searchsorted(z["user_id"], user_id, sorter=order)
        pos = order[np.minimum(found, order.size - 1)]
        if not np.array_equal(z["user_id"][pos], user_id):
            raise KeyError(f"{data_dir}: some user_id values are not rows of this split")
        effects = np.stack([z[k][pos] for k in keys] + [np.ones(pos.size)], axis=1)
    logit = np.asarray(logit, dtype=np.float64)
    weights, *_ = np.linalg.lstsq(effects, logit, rcond=None)
    residual = logit - effects @ weights
    out = {k[len("logit_"):]: float(w) for k, w in zip(keys, weights)}
    out["r2"] = float(1.0 - residual.var() / max(logit.var(), 1e-12))
    return out
