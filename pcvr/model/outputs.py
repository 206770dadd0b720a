"""The contract between a ranking model and its users (trainer, evaluation, checkpoints).

A model returns a ``ModelOutput`` from ``forward`` and logits from ``predict``; the trainer
needs nothing else from it than ``RankingModel`` states, so any model that provides these
methods trains, validates and checkpoints with the project's machinery.
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Protocol, runtime_checkable

import torch
import torch.nn as nn

from pcvr.batch import Batch


class AuxLoss(NamedTuple):
    """An auxiliary training loss: its scalar ``value`` and the ``weight`` it enters the
    training loss with (``total = main + sum(weight * value)``; the trainer logs ``value``)."""
    value: torch.Tensor
    weight: float


class ModelOutput(NamedTuple):
    """What a model's ``forward`` returns.

    logits: ``[B, action_num]``.
    aux_losses: name -> ``AuxLoss`` (e.g. ``'item/side_ssl'``), each with its own weight;
        empty when the model has none.
    sample_weight: ``[B]`` detached per-row weights of the main loss (mean 1), or None.
    """
    logits: torch.Tensor
    aux_losses: Dict[str, AuxLoss]
    sample_weight: Optional[torch.Tensor]


@runtime_checkable
class RankingModel(Protocol):
    """What the trainer and the evaluation need from a model (an ``nn.Module``)."""

    def __call__(self, batch: Batch) -> ModelOutput:
        """Training forward pass."""

    def predict(self, batch: Batch) -> torch.Tensor:
        """Inference logits ``[B, action_num]`` (no gradient, no input dropout)."""

    def sparse_parameters(self) -> List[nn.Parameter]:
        """Embedding-table weights: the sparse (Adagrad) optimiser's group."""

    def dense_parameters(self) -> List[nn.Parameter]:
        """Every other parameter: the dense (AdamW) optimiser's group."""

    def reinit_high_cardinality_params(self, threshold: int) -> List[nn.Parameter]:
        """Re-initialises the feature tables with ``vocab_size > threshold``; returns their
        weights so that the caller can reset their optimiser state."""
