"""The trainer: the learning-rate schedule of both optimisers, and the step."""
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pcvr.config import TrainConfig, parse_config
from pcvr.model.outputs import ModelOutput, RankingModel
from pcvr.training.optim import lr_factor
from pcvr.training.trainer import Trainer


def test_constant_schedule_with_warmup():
    f = lr_factor(TrainConfig(lr_warmup_steps=4), epoch_steps=None)
    assert [f(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(TrainConfig(), None)(123) == 1.0  # the reference: constant


def test_cosine_schedule_decays_to_zero_over_every_epoch():
    f = lr_factor(TrainConfig(lr_schedule="cosine", num_epochs=2), epoch_steps=50)
    assert f(0) == 1.0 and f(50) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)
    assert f(150) == pytest.approx(0.0)  # partial batches past the estimate stay at the floor
    values = [f(s) for s in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    warm = lr_factor(TrainConfig(lr_schedule="cosine", lr_warmup_steps=10, num_epochs=1), 100)
    assert warm(4) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 0.04)))


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError, match="lr_warmup_steps"):
        lr_factor(TrainConfig(lr_warmup_steps=-1), 10)
    with pytest.raises(ValueError, match="knows its rows"):
        lr_factor(TrainConfig(lr_schedule="cosine"), None)


class _Tiny(nn.Module):
    """An embedding table (sparse) and a linear head: the two optimisers' parameter sets."""

    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(10, 4, sparse=True)
        self.head = nn.Linear(4, 1)

    def sparse_parameters(self):
        return [self.table.weight]

    def dense_parameters(self):
        return list(self.head.parameters())

    def forward(self, batch):
        return ModelOutput(self.head(self.table(batch.ids)), {}, None)

    def predict(self, batch):
        return self.forward(batch).logits

    def reinit_high_cardinality_params(self, threshold):
        return []


class _Loader(list):
    num_rows = 40  # 10 steps per epoch at batch 4


def test_trainer_steps_both_optimisers_along_the_schedule():
    cfg = parse_config(["--lr", "0.01", "--sparse_lr", "0.1", "--batch_size", "4",
                        "--num_epochs", "2", "--lr_schedule", "cosine", "--lr_warmup_steps",
                        "2"], environ={})
    model = _Tiny()
    assert isinstance(model, RankingModel)  # what the trainer needs, and nothing more
    trainer = Trainer(model, cfg, _Loader(), None, torch.device("cpu"))
    batch = SimpleNamespace(ids=torch.tensor([1, 2, 3, 4]),
                            label=torch.tensor([0.0, 1.0, 0.0, 1.0]))
    factor = lr_factor(cfg.train, 10)
    for step in range(12):
        assert trainer.dense_opt.param_groups[0]["lr"] == pytest.approx(0.01 * factor(step))
        assert trainer.sparse_opt.param_groups[0]["lr"] == pytest.approx(0.1 * factor(step))
        trainer.train_step(batch)
