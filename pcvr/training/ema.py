"""An exponential moving average of a model's weights, validated beside the raw weights."""
from __future__ import annotations

import copy
from typing import Any, Dict

import torch
import torch.nn as nn

from pcvr.errors import ConfigError


class AveragedModel:
    """A copy of a model whose parameters follow an average of the model's; the trainer
    validates it beside the raw weights. Subclasses define ``update``.

    Args:
        model: the model to average (copied).
    """

    def __init__(self, model: nn.Module) -> None:
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        self.updates = 0

    def update(self, model: nn.Module) -> None:
        raise NotImplementedError

    def restart(self) -> None:
        """Forgets the average; the next update copies the current weights."""
        self.updates = 0

    def state_dict(self) -> Dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])


class ModelEMA(AveragedModel):
    """Exponential moving average of a model's parameters.

    Fixes relative to the reference's EMA:

    * warm-up: the effective decay is ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates,
      so early averages are not dominated by the initial weights;
    * ``restart()`` after a sparse re-initialisation: the average starts again from the
      current weights, since dense weights averaged across a re-init were tuned for embeddings
      that no longer exist;
    * the trainer validates both the raw and the averaged weights and keeps the better one.

    The update is one ``torch._foreach_lerp_`` over all parameters. The update count is a
    host integer: the warm-up decay is computed without reading anything from the device, so
    an update never waits for the GPU (``swa_utils.AveragedModel`` tests its device counter
    on every update, a host sync per step). Buffers are constants here and are not averaged.

    Args:
        model: the model to average (copied).
        decay: the decay in (0, 1).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"ema_decay must be in (0, 1), got {decay}")
        super().__init__(model)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Moves the average towards ``model``'s current parameters."""
        avg = list(self.module.parameters())
        cur = [p.detach() for p in model.parameters()]
        if self.updates == 0:
            torch._foreach_copy_(avg, cur)
        else:
            n = self.updates
            torch._foreach_lerp_(avg, cur, 1.0 - min(self.decay, (1.0 + n) / (10.0 + n)))
        self.updates += 1
