"""The training loss: the main per-row loss (BCE or focal), optional per-row weights, and the
model's auxiliary losses, each with its own name and weight."""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from pcvr.config import TrainConfig
from pcvr.model.outputs import ModelOutput


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.1,
                       gamma: float = 2.0) -> torch.Tensor:
    """Per-sample focal loss (no reduction).

    Args:
        logits: ``[B]`` float.
        targets: ``[B]`` float in {0, 1}.
    Returns:
        ``[B]`` ``alpha_t (1 - p_t)^gamma BCE(logits, targets)``.
    """
    p = torch.sigmoid(logits)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return alpha_t * (1 - p_t).pow(gamma) * bce


def training_loss(out: ModelOutput, label: torch.Tensor, tc: TrainConfig
                  ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The loss to minimise and its detached parts.

    ``total = mean(w * main_per_row) + sum_k weight_k * aux_k``, with ``w`` the model's
    sample weights (1 when it has none), in float32 whatever the autocast dtype.

    Args:
        out: the model's output (logits ``[B, action_num]``; the first action is trained).
        label: ``[B]`` float labels.
        tc: the training flags (``loss_type``, ``focal_alpha``, ``focal_gamma``).
    Returns:
        (total, {``'loss/main'``, ``'loss/<aux name>'``: detached values}), no host sync.
    """
    logits = out.logits[:, 0].float()
    label = label.float()
    if tc.loss_type == "focal":
        per_row = sigmoid_focal_loss(logits, label, tc.focal_alpha, tc.focal_gamma)
    else:
        per_row = F.binary_cross_entropy_with_logits(logits, label, reduction="none")
    if out.sample_weight is not None:
        per_row = per_row * out.sample_weight.float()
    main = per_row.mean()
    parts = {"loss/main": main.detach()}
    total = main
    for name, aux in out.aux_losses.items():
        parts[f"loss/{name}"] = aux.value.detach().float()
        total = total + aux.weight * aux.value.float()
    return total, parts
