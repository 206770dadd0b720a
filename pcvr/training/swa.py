"""Stochastic weight averaging: an equal-weight average of the weights over the last part of
the run (``--swa_start_frac``), validated beside the raw weights like the EMA."""
from __future__ import annotations

from typing import Any, Dict

import torch
import torch.nn as nn

from pcvr.training.ema import AveragedModel


class ModelSWA(AveragedModel):
    """The equal-weight average of every ``every``-th set of weights it is shown.

    ``update`` is called after every optimiser step and averages one step in ``every``;
    ``restart`` forgets the average. ``updates`` counts the averaged weight sets, ``calls``
    the steps shown (saved with the state, so that a resumed run averages the same steps).

    Args:
        model: the model to average (copied).
        every: average one step in this many.
    """

    def __init__(self, model: nn.Module, every: int = 1) -> None:
        super().__init__(model)
        self.every = max(1, int(every))
        self.calls = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.calls += 1
        if (self.calls - 1) % self.every:
            return
        avg = list(self.module.parameters())
        cur = [p.detach() for p in model.parameters()]
        if self.updates == 0:
            torch._foreach_copy_(avg, cur)
        else:
            torch._foreach_lerp_(avg, cur, 1.0 / (self.updates + 1))
        self.updates += 1

    def restart(self) -> None:
        super().restart()
        self.calls = 0

    def state_dict(self) -> Dict[str, Any]:
        return dict(super().state_dict(), calls=self.calls)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.calls = int(state.get("calls", 0))  # absent in states saved before it was kept
