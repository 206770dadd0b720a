"""Stochastic weight averaging: an equal-weight average of the weights over the last part of
the run (``--swa_start_frac``), validated beside the raw weights like the EMA."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from pcvr.training.ema import ModelEMA


class ModelSWA(ModelEMA):
    """The equal-weight average of every ``every``-th set of weights it is shown.

    Same interface as ``ModelEMA`` (the trainer holds either in its averaging slot):
    ``update`` is called after every optimiser step and averages one step in ``every``;
    ``restart`` forgets the average. ``updates`` counts the averaged weight sets.

    Args:
        model: the model to average (copied).
        every: average one step in this many.
    """

    def __init__(self, model: nn.Module, every: int = 1) -> None:  # noqa: D107 - no decay
        self.decay = 0.0
        self.every = max(1, int(every))
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        self.updates = 0
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
        self.updates = 0
        self.calls = 0
