"""Metrics, losses, EMA and atomic writes."""
import json
import os

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score

from pcvr.atomic import atomic_dir, atomic_write_json
from pcvr.metrics import binary_logloss, roc_auc
from pcvr.training.ema import ModelEMA
from pcvr.training.losses import sigmoid_focal_loss


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 500)
    s = rng.integers(0, 7, 500).astype(float)  # many ties
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    s = rng.normal(size=500)
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auc_single_class_is_nan():
    assert np.isnan(roc_auc(np.ones(4), np.arange(4.0)))


def test_logloss_matches_sklearn():
    rng = np.random.default_rng(0)
    y, x = rng.integers(0, 2, 300), rng.normal(scale=5, size=300)
    assert binary_logloss(y, x) == pytest.approx(log_loss(y, 1 / (1 + np.exp(-x))), rel=1e-9)


def test_focal_loss_reduces_to_weighted_bce_at_gamma_0():
    z, y = torch.randn(64), torch.randint(0, 2, (64,)).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none")
    w = 0.25 * y + 0.75 * (1 - y)
    assert torch.allclose(sigmoid_focal_loss(z, y, 0.25, 0.0), w * bce)
    assert (sigmoid_focal_loss(z, y, 0.25, 2.0) <= w * bce + 1e-7).all()


def test_ema_warmup_and_restart():
    model = torch.nn.Linear(2, 1, bias=False)
    ema = ModelEMA(model, decay=0.999)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema.update(model)  # first update copies
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # warm-up decay min(0.999, 2/11) -> mostly the new weights
    assert torch.allclose(ema.module.weight, torch.full((1, 2), 1 - 2 / 11))
    ema.restart()
    with torch.no_grad():
        model.weight.fill_(5.0)
    ema.update(model)
    assert torch.allclose(ema.module.weight, torch.full((1, 2), 5.0))


def test_atomic_writes(tmp_path):
    path = tmp_path / "a" / "x.json"
    atomic_write_json(str(path), {"k": 1})
    assert json.loads(path.read_text()) == {"k": 1}
    target = tmp_path / "ckpt"
    with pytest.raises(RuntimeError):
        with atomic_dir(str(target)) as tmp:
            open(os.path.join(tmp, "f"), "w").close()
            raise RuntimeError("boom")
    assert not target.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    with atomic_dir(str(target)) as tmp:
        open(os.path.join(tmp, "f"), "w").close()
    assert (target / "f").exists()
