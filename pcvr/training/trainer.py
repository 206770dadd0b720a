"""The training loop: train step, validation of the raw and EMA weights, early stopping, the
sparse re-initialisation between epochs, and checkpoints.

The trainer needs from a model only what ``pcvr.model.outputs.RankingModel`` states, and from
its loaders only that they yield ``Batch``es (and, optionally, ``set_epoch``, ``num_rows`` and
``stat_names``, which ``PCVRLoader`` has).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

from pcvr.batch import Batch
from pcvr.checkpoint import CheckpointMeta, CheckpointWriter
from pcvr.config import Config
from pcvr.data.convert import DataStats
from pcvr.errors import DataError
from pcvr.evaluation import predict, score
from pcvr.model.outputs import RankingModel
from pcvr.progress import Progress
from pcvr.training.ema import ModelEMA
from pcvr.training.losses import training_loss
from pcvr.training.optim import build_optimizers
from pcvr.training.reporting import MetricsWriter, fmt_metrics

log = logging.getLogger(__name__)

# Host syncs (loss read-out, metrics) happen only every this many steps.
LOG_EVERY_STEPS = 50


@dataclass
class TrainResult:
    """What ``Trainer.train`` returns.

    Attributes:
        best_auc: the best validation AUC (NaN without one).
        best_checkpoint: the folder recorded in ``best_checkpoint.json``, or None.
        global_step: optimiser steps done.
        history: one dict of validation metrics per epoch-end validation.
    """
    best_auc: float = float("nan")
    best_checkpoint: Optional[str] = None
    global_step: int = 0
    history: List[Dict[str, float]] = field(default_factory=list)


@dataclass
class EarlyStopping:
    """The best validation AUC so far and the validations since it last improved.

    Attributes:
        patience: stop after this many validations without a better AUC (0 = never stop).
        best_auc: the best AUC (NaN: none yet; a NaN AUC never improves).
        stale: validations since the last improvement.
    """
    patience: int
    best_auc: float = float("nan")
    stale: int = 0

    def update(self, auc: float) -> bool:
        """Records a validation AUC; returns whether it is a new best."""
        if math.isfinite(auc) and not auc <= self.best_auc:  # NaN best: the first one wins
            self.best_auc, self.stale = auc, 0
            return True
        self.stale += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.stale >= self.patience

    def state_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.__init__(**state)


class Trainer:
    """Owns the optimisers, the EMA and the loop; see ``train()``.

    Args:
        model: the model, already on ``device``.
        cfg: the run's configuration (``cfg.train`` drives the loop).
        train_loader: yields training ``Batch``es.
        valid_loader: yields validation ``Batch``es, or None (no validation).
        device: the training device.
        checkpoints: where checkpoints go, or None (benchmarks: no checkpoints).
        writer: TensorBoard / JSON-lines scalars, or None.
    """

    def __init__(self, model: RankingModel, cfg: Config, train_loader: Iterable[Batch],
                 valid_loader: Optional[Iterable[Batch]], device: torch.device,
                 checkpoints: Optional[CheckpointWriter] = None,
                 writer: Optional[MetricsWriter] = None) -> None:
        self.model, self.cfg, self.tc = model, cfg, cfg.train
        self.train_loader, self.valid_loader, self.device = train_loader, valid_loader, device
        self.checkpoints, self.writer = checkpoints, writer
        rows = getattr(train_loader, "num_rows", None)
        epoch_steps = None if rows is None else max(1, math.ceil(rows / self.tc.batch_size))
        self.dense_params = model.dense_parameters()
        self.dense_opt, self.sparse_opt, self.schedulers = build_optimizers(
            model, self.tc, epoch_steps)
        self.use_bf16 = bool(self.tc.use_bf16_train) and device.type in ("cuda", "cpu")
        self.ema: Optional[ModelEMA] = None
        self.global_step = 0
        self.stopping = EarlyStopping(self.tc.patience)
        self.result = TrainResult()
        self._last_saved: Optional[Tuple[int, str]] = None  # (step, folder)
        self._valid_repairs_logged = False
        # (step, metrics, EMA chosen) of the last validation
        self._last_validated: Optional[Tuple[int, Dict[str, float], bool]] = None

    # ------------------------------------------------------------------ one step
    def train_step(self, batch: Batch) -> Dict[str, torch.Tensor]:
        """One optimisation step on a batch already on the device; returns detached loss
        tensors (no host sync)."""
        self.model.train()
        self.dense_opt.zero_grad(set_to_none=True)
        if self.sparse_opt is not None:
            self.sparse_opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                            enabled=self.use_bf16):
            out = self.model(batch)
        total, parts = training_loss(out, batch.label, self.tc)
        total.backward()
        if self.tc.grad_clip > 0:
            # Dense only: sparse gradients have no fused norm, and Adagrad already scales
            # each row's step by its own history.
            torch.nn.utils.clip_grad_norm_(self.dense_params, self.tc.grad_clip)
        self.dense_opt.step()
        if self.sparse_opt is not None:
            self.sparse_opt.step()
        for scheduler in self.schedulers:
            scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        parts["loss/total"] = total.detach()
        return parts

    # ------------------------------------------------------------------ validation
    def validate(self, epoch: int) -> Tuple[Dict[str, float], bool]:
        """Float32 validation of the raw weights and, when EMA is on, the averaged ones.

        Returns:
            (metrics of the better of the two, whether that is the EMA); ``auc_ema`` is
            added when the EMA is on.
        """
        stat_names = getattr(self.valid_loader, "stat_names", None)
        stats = None if stat_names is None or self._valid_repairs_logged else \
            DataStats(stat_names)
        metrics = score(predict(self.model, self.valid_loader, self.device, desc="valid",
                                stats=stats))
        if stats is not None:  # the validation rows are the same every pass: logged once
            for line in stats.summary_lines():
                log.info("validation data repairs: %s", line)
            self._valid_repairs_logged = True
        use_ema = False
        if self.ema is not None:
            ema_metrics = score(predict(self.ema.module, self.valid_loader, self.device,
                                        desc="valid ema"))
            metrics["auc_ema"] = ema_metrics["auc"]
            use_ema = ema_metrics["auc"] > metrics["auc"]
            if use_ema:
                metrics.update(auc=ema_metrics["auc"], logloss=ema_metrics["logloss"])
        log.info("validation epoch %d step %d: %s%s", epoch, self.global_step,
                 fmt_metrics(metrics), " (EMA weights)" if use_ema else "")
        if self.writer is not None:
            self.writer.scalars({"AUC": metrics["auc"], "LogLoss": metrics["logloss"]},
                                self.global_step, "/valid")
        return metrics, use_ema

    def _save(self, epoch: int, use_ema: bool, valid_auc: Optional[float]) -> Optional[str]:
        """Saves the current (or EMA) weights, once per step; returns the folder."""
        if self.checkpoints is None:
            return None
        if self._last_saved is not None and self._last_saved[0] == self.global_step:
            return self._last_saved[1]  # validated twice at this step: already saved
        model = self.ema.module if use_ema else self.model
        meta = CheckpointMeta(weights="ema" if use_ema else "raw", global_step=self.global_step,
                              epoch=epoch, valid_auc=valid_auc)
        path = self.checkpoints.save(model.state_dict(), meta)
        self._last_saved = (self.global_step, path)
        return path

    def _validate_and_save(self, epoch: int, end_of_epoch: bool) -> bool:
        """Validate, track the best, save, check patience; returns whether to stop.

        Mid-epoch validations save only a new best; the end of an epoch always saves (its
        checkpoint is the epoch's weights, needed to continue from there).
        """
        if self.valid_loader is None:
            self._save(epoch, False, None)
            return False
        step = float(self.global_step)
        if self._last_validated is not None and self._last_validated[0] == self.global_step:
            # The epoch ended on a step just validated: the same weights, so the same metrics.
            _, metrics, use_ema = self._last_validated
            self.result.history.append(dict(metrics, epoch=float(epoch), step=step))
            auc = metrics["auc"] if math.isfinite(metrics["auc"]) else None
            self._save(epoch, use_ema, auc)
            return self.stopping.should_stop
        metrics, use_ema = self.validate(epoch)
        self._last_validated = (self.global_step, metrics, use_ema)
        if end_of_epoch:
            self.result.history.append(dict(metrics, epoch=float(epoch), step=step))
        improved = self.stopping.update(metrics["auc"])
        auc = metrics["auc"] if math.isfinite(metrics["auc"]) else None
        path = self._save(epoch, use_ema, auc) if improved or end_of_epoch else None
        if improved:
            self.result.best_auc, self.result.best_checkpoint = metrics["auc"], path
        if self.stopping.should_stop:
            log.info("early stopping: no better validation AUC in %d validations",
                     self.tc.patience)
        return self.stopping.should_stop

    # ------------------------------------------------------------------ re-init
    def _reinit_sparse(self, epoch: int) -> None:
        """MultiEpoch trick: fresh high-cardinality tables with a fresh Adagrad accumulator."""
        params = self.model.reinit_high_cardinality_params(self.tc.reinit_cardinality_threshold)
        if self.sparse_opt is not None:
            for p in params:
                state = self.sparse_opt.state.get(p)
                if state:
                    state["sum"].zero_()
                    state["step"].zero_()
        if self.ema is not None:
            self.ema.restart()
        log.info("epoch %d: re-initialised %d embedding tables (vocab > %d)%s", epoch,
                 len(params), self.tc.reinit_cardinality_threshold,
                 "; EMA restarted" if self.ema is not None else "")

    # ------------------------------------------------------------------ loop
    def _train_epoch(self, epoch: int) -> bool:
        """One pass over the training loader; returns whether early stopping ended it."""
        stat_names = getattr(self.train_loader, "stat_names", None)
        stats = DataStats(stat_names) if stat_names is not None else None
        sums: Dict[str, torch.Tensor] = {}
        n_batches = 0
        stop = False
        total = getattr(self.train_loader, "num_batches", None)
        epochs = self.tc.num_epochs
        progress = Progress(
            self.train_loader, f"epoch {epoch}/{epochs}", total, self.tc.batch_size,
            run_left=(lambda: (epochs - epoch) * total) if total is not None else None,
            status=lambda: {"loss": f"{float(sums['loss/total']) / max(n_batches, 1):.4f}"}
            if sums else {})
        for batch in progress:
            if stats is not None:
                stats.add(batch)
            parts = self.train_step(batch.to(self.device, non_blocking=True))
            self.global_step += 1
            n_batches += 1
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            if self.global_step % LOG_EVERY_STEPS == 0:
                if self.writer is not None:
                    self.writer.scalars({k: float(v) for k, v in parts.items()},
                                        self.global_step, "/train")
            if (self.tc.eval_every_n_steps > 0 and self.valid_loader is not None
                    and self.global_step % self.tc.eval_every_n_steps == 0):
                stop = self._validate_and_save(epoch, end_of_epoch=False)
                if stop:
                    break
        if n_batches == 0:
            raise DataError("the training loader yielded no batch: check --data_dir, "
                            "--train_ratio and --valid_ratio")
        means = {k: float(v) / n_batches for k, v in sums.items()}
        log.info("epoch %d: %d batches, mean %s", epoch, n_batches, fmt_metrics(means))
        if stats is not None:
            for line in stats.summary_lines():
                log.info("epoch %d data repairs: %s", epoch, line)
        return stop

    def train(self) -> TrainResult:
        """Runs up to ``num_epochs`` epochs; returns the best validation AUC and checkpoint.

        Each epoch: the EMA starts at ``ema_start_epoch``; a pass over the training data
        (validating every ``eval_every_n_steps`` steps when set); a validation and a
        checkpoint at its end; the sparse re-initialisation after epochs >=
        ``reinit_sparse_after_epoch`` but the last. Early stopping ends the run after
        ``patience`` validations without a better AUC.
        """
        tc = self.tc
        for epoch in range(1, tc.num_epochs + 1):
            if hasattr(self.train_loader, "set_epoch"):
                self.train_loader.set_epoch(epoch)
            if self.ema is None and tc.ema_decay > 0 and epoch >= max(1, tc.ema_start_epoch):
                self.ema = ModelEMA(self.model, tc.ema_decay)
                log.info("EMA started at epoch %d (decay %g, warm-up)", epoch, tc.ema_decay)
            if self._train_epoch(epoch) or self._validate_and_save(epoch, end_of_epoch=True):
                break
            if 0 < tc.reinit_sparse_after_epoch <= epoch < tc.num_epochs:
                self._reinit_sparse(epoch)
        self.result.global_step = self.global_step
        self._record_best()
        return self.result

    def _record_best(self) -> None:
        """Writes ``best_checkpoint.json``; without any validation AUC, the last checkpoint
        is the one recorded, and the log says so."""
        if self.checkpoints is None or self._last_saved is None:
            return
        if self.result.best_checkpoint is None:
            self.result.best_checkpoint = self._last_saved[1]
            if self.valid_loader is not None:
                log.warning("no validation AUC was ever defined (single-class validation "
                            "labels?): recording the last checkpoint, %s, as the best",
                            self.result.best_checkpoint)
        best_auc = self.result.best_auc if math.isfinite(self.result.best_auc) else None
        self.checkpoints.write_best(self.result.best_checkpoint, best_auc)
