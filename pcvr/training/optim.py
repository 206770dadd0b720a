"""Optimisers and learning-rate schedules: AdamW for the dense parameters, Adagrad for the
embedding tables (sparse gradients, so a step reads and writes only the rows a batch
touched), each with a ``LambdaLR`` schedule."""
from __future__ import annotations

import math
from typing import Any, Callable, List, Optional, Tuple

import torch

from pcvr.config import TrainConfig
from pcvr.errors import ConfigError
from pcvr.model.outputs import RankingModel


def lr_factor(tc: TrainConfig, epoch_steps: Optional[int]) -> Callable[[int], float]:
    """The learning-rate multiplier of step ``s`` (0-based) for ``LambdaLR``.

    Linear warm-up over ``lr_warmup_steps``, then constant or, for 'cosine', a cosine decay
    from 1 to 0 over ``num_epochs * epoch_steps`` steps (the total of a run without early
    stopping; with several DataLoader shards an epoch has a few more, partial batches, whose
    steps stay at the floor of the decay).
    """
    if tc.lr_warmup_steps < 0:
        raise ConfigError(f"--lr_warmup_steps must be >= 0, got {tc.lr_warmup_steps}")
    if tc.lr_schedule == "cosine" and epoch_steps is None:
        raise ConfigError("--lr_schedule cosine needs a training loader that knows its rows")
    total = tc.num_epochs * (epoch_steps or 1)
    warmup = tc.lr_warmup_steps

    def factor(step: int) -> float:
        scale = min(1.0, (step + 1) / warmup) if warmup else 1.0
        if tc.lr_schedule == "cosine":
            scale *= 0.5 * (1.0 + math.cos(math.pi * min(step / total, 1.0)))
        return scale
    return factor


def dense_adamw(params: List[torch.nn.Parameter], tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW over ``params``: the fused kernel (one kernel for every tensor, no host sync)
    where every parameter is on a CUDA or CPU device and torch has it, else torch's default
    (foreach on accelerators, a loop on the CPU)."""
    kwargs = dict(lr=tc.lr, betas=(tc.adam_beta1, tc.adam_beta2), weight_decay=tc.weight_decay)
    flat = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    if flat and {p.device.type for p in flat} <= {"cuda", "cpu"}:
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except (RuntimeError, ValueError):  # an older torch or an unsupported dtype
            pass
    return torch.optim.AdamW(params, **kwargs)


def dense_groups(model: RankingModel, tc: TrainConfig) -> List[Any]:
    """The dense parameters, or, with ``--interaction_lr``, two AdamW groups: the explicit
    interactions' (``model.interactions``, pcvr/model/interactions.py) at that rate, the
    rest at ``--lr``."""
    params = list(model.dense_parameters())
    side = getattr(model, "interactions", None)
    if tc.interaction_lr <= 0 or side is None:
        return params
    own = {id(p) for p in side.parameters()}
    return [{"params": [p for p in params if id(p) not in own]},
            {"params": [p for p in params if id(p) in own], "lr": tc.interaction_lr}]


def build_optimizers(model: RankingModel, tc: TrainConfig, epoch_steps: Optional[int]
                     ) -> Tuple[torch.optim.Optimizer, Optional[torch.optim.Optimizer],
                                List[torch.optim.lr_scheduler.LambdaLR]]:
    """(dense AdamW, sparse Adagrad or None when the model has no tables, their schedulers).

    Args:
        model: the model (its ``dense_parameters`` / ``sparse_parameters``).
        tc: the training flags.
        epoch_steps: optimiser steps per epoch, when known (the cosine schedule needs it).
    """
    if tc.sparse_weight_decay != 0.0:
        # torch's Adagrad rejects weight decay on sparse gradients; decaying only the rows a
        # batch touched would be a different regulariser, so refuse instead of guessing.
        raise ConfigError("--sparse_weight_decay must be 0: embedding tables use sparse "
                          "gradients, for which Adagrad has no weight decay")
    dense = dense_adamw(dense_groups(model, tc), tc)
    sparse_params = model.sparse_parameters()
    # Adagrad builds its sparse updates from coalesced gradients; checking them again on
    # every step costs time, and saying so explicitly keeps torch from warning about it.
    torch.sparse.check_sparse_tensor_invariants.disable()
    sparse = torch.optim.Adagrad(sparse_params, lr=tc.sparse_lr) if sparse_params else None
    factor = lr_factor(tc, epoch_steps)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, factor)
                  for opt in (dense, sparse) if opt is not None]
    return dense, sparse, schedulers
