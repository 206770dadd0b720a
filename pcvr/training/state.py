"""What a resumable checkpoint carries beside the weights: where the run stands, the random
number generators, and the check that a resumed run is the same run.

A run stands at a ``Position``: ``epoch`` (1-based), the batches of that epoch already
trained, and whether the epoch is over (trained and validated; what follows it, the sparse
re-initialisation, is still to do). Resuming in the middle of an epoch replays that epoch's
batches up to the position without training on them (the data order is a function of the
seed, the epoch and the shard only), so the run continues on exactly the rows it would have
seen; the granularity is one batch.
"""
from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping

import numpy as np
import torch

from pcvr.config import SECTIONS, TrainConfig, to_flat_dict, Config
from pcvr.errors import ConfigError

log = logging.getLogger(__name__)

# Training flags that change which rows a step sees: a resume with other values continues,
# but not exactly where the interrupted run would have gone.
DATA_ORDER_FLAGS = ("seed", "batch_size", "buffer_batches", "num_workers", "train_ratio",
                    "valid_ratio")


@dataclass
class Position:
    """Where a run stands (module docstring)."""
    epoch: int = 1
    step_in_epoch: int = 0
    epoch_done: bool = False


def rng_state() -> Dict[str, Any]:
    """The states of every random number generator the training process draws from, in
    types that ``torch.load(weights_only=True)`` reads back (no numpy arrays)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restores ``rng_state()``'s generators."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_same_run(saved: Config, now: Config, source: str) -> None:
    """Refuses a resume whose model or data flags differ from the saved run's (naming them),
    and warns about training flags that change the order of the data.

    Raises:
        ConfigError: listing every differing model, data or decoupling flag.
    """
    old, new = to_flat_dict(saved), to_flat_dict(now)
    train_only = {f.name for f in dataclasses.fields(TrainConfig)}
    rebuild = [f.name for cls in SECTIONS if cls is not TrainConfig
               for f in dataclasses.fields(cls)]
    differ = [f"--{k} {old[k]!r} -> {new[k]!r}" for k in rebuild if old[k] != new[k]]
    if differ:
        raise ConfigError(f"{source}: cannot resume with other model or data flags than the "
                          f"run it continues: {'; '.join(differ)}")
    moved: List[str] = [f"--{k} {old[k]!r} -> {new[k]!r}" for k in DATA_ORDER_FLAGS
                        if k in train_only and old[k] != new[k]]
    if moved:
        log.warning("resuming with other data-order flags (%s): the run continues, but not "
                    "on exactly the rows the interrupted run would have seen", "; ".join(moved))
