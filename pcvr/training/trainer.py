"""The training loop: train step, validation of the raw and EMA weights, early stopping, the
sparse re-initialisation between epochs, resumable checkpoints, and several processes.

The trainer needs from a model only what ``pcvr.model.outputs.RankingModel`` states, and from
its loaders only that they yield ``Batch``es (and, optionally, ``set_epoch``, ``num_rows``,
``num_batches`` and ``stat_names``, which ``PCVRLoader`` has).

Every checkpoint can be resumed from: besides the weights it carries the optimisers, the
schedulers, the EMA, the early-stopping state, the position in the run and the random number
generators (``train_state()``; ``pcvr.training.state``). With several processes
(``pcvr.distributed``) every rank runs the same number of steps per epoch (the smallest
shard's; the batches the others drop are counted in the log), averages its gradients with the
others, and validates its shard of the validation rows, scored on all of them; only rank 0
writes checkpoints.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from pcvr import distributed
from pcvr.batch import Batch
from pcvr.checkpoint import CheckpointMeta, CheckpointWriter
from pcvr.config import Config
from pcvr.data.convert import DataStats
from pcvr.errors import ConfigError, DataError
from pcvr.evaluation import predict, score
from pcvr.model.outputs import RankingModel
from pcvr.progress import Progress
from pcvr.runtime import choose_train_precision, training_forward
from pcvr.training.ema import AveragedModel, ModelEMA
from pcvr.training.losses import training_loss
from pcvr.training.optim import build_optimizers
from pcvr.training.reporting import MetricsWriter, fmt_metrics
from pcvr.training.state import Position, rng_state, set_rng_state
from pcvr.training.swa import ModelSWA

log = logging.getLogger(__name__)

# Host syncs (loss read-out, metrics) happen only every this many steps.
LOG_EVERY_STEPS = 50
TRAIN_STATE_VERSION = 1


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


class Trainer:
    """Owns the optimisers, the EMA and the loop; see ``train()``.

    Args:
        model: the model, already on ``device``.
        cfg: the run's configuration (``cfg.train`` drives the loop).
        train_loader: yields training ``Batch``es.
        valid_loader: yields validation ``Batch``es, or None (no validation).
        device: the training device.
        checkpoints: where checkpoints go, or None (benchmarks, ranks other than 0).
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
        added = self._fit_passes_to_small_data(rows) if rows else 1
        epoch_steps = None if rows is None else max(1, math.ceil(rows / self.tc.batch_size))
        self.dense_params = list(model.dense_parameters())
        self.dense_opt, self.sparse_opt, self.schedulers = build_optimizers(
            model, self.tc, epoch_steps)
        # The explicit interactions' rate from the second pass on (None: unchanged); with two
        # AdamW groups only, the second being theirs (optim.dense_groups).
        self.repeat_interaction_lr: Optional[float] = None
        if added > 1 and self.tc.interaction_lr > self.tc.lr \
                and len(self.dense_opt.param_groups) == 2:
            # Repeated rows: at its own high rate the explicit cross memorises them within two
            # or three passes (README "Small data"), so its rate is divided by the factor the
            # passes were multiplied by, never below --lr. The first pass keeps the full rate,
            # so that it is the one-pass model and early stopping can only improve on it.
            self.repeat_interaction_lr = max(self.tc.lr, self.tc.interaction_lr / added)
            log.info("min_train_samples: --interaction_lr %g for the first pass, %g after it",
                     self.tc.interaction_lr, self.repeat_interaction_lr)
        self.grad_sync = (distributed.GradientSync(self.dense_params,
                                                   list(model.sparse_parameters()))
                          if distributed.active() else None)
        # Precision and forward pass per device (pcvr.runtime); 'auto' is replaced by the
        # choice, so that train_config.json records the precision actually used.
        self.tc.train_precision, why = choose_train_precision(
            self.tc.train_precision, self.tc.use_bf16_train, device)
        log.info("training precision: %s (%s)", self.tc.train_precision, why)
        self.use_bf16 = self.tc.train_precision == "bf16" and device.type in ("cuda", "cpu")
        self.forward = training_forward(model, device, self.tc.compile,
                                        self.tc.seq_pad_multiple)
        self.ema: Optional[AveragedModel] = None
        # --swa_start_frac: the step from which ModelSWA holds the averaging slot (or None)
        self.swa_start: Optional[int] = None
        if self.tc.swa_start_frac > 0:
            if epoch_steps is None or self.tc.ema_decay > 0:
                raise ConfigError("--swa_start_frac needs a loader that knows its rows and "
                                  "--ema_decay 0 (SWA takes the EMA's place)")
            self.swa_start = int(self.tc.swa_start_frac * self.tc.num_epochs * epoch_steps)
        self.global_step = 0
        self.position = Position()
        self.stopping = EarlyStopping(self.tc.patience)
        self.result = TrainResult()
        self._last_saved: Optional[Tuple[int, str]] = None  # (step, folder)
        self._valid_repairs_logged = False
        # (step, metrics, EMA chosen) of the last validation
        self._last_validated: Optional[Tuple[int, Dict[str, float], bool]] = None
        self._epoch_sums: Dict[str, torch.Tensor] = {}
        self._resume_rng: Optional[Dict[str, Any]] = None

    # ------------------------------------------------------------------ small data
    def _fit_passes_to_small_data(self, rows: int) -> float:
        """``--min_train_samples``: small data gets more passes (recorded in
        train_config.json); returns the factor the passes were multiplied by (1: none)."""
        tc = self.tc
        if tc.min_train_samples <= rows * tc.num_epochs:
            return 1.0
        epochs = math.ceil(tc.min_train_samples / rows)
        log.info("min_train_samples %d: %d training rows, num_epochs %d -> %d",
                 tc.min_train_samples, rows, tc.num_epochs, epochs)
        added, tc.num_epochs = epochs / tc.num_epochs, epochs
        return added

    def _slow_repeated_interactions(self) -> None:
        """From the second pass on: the interactions' group at ``repeat_interaction_lr``
        (idempotent: the group's rate is what the scheduler itself would set)."""
        scheduler = self.schedulers[0]
        scheduler.base_lrs[1] = self.repeat_interaction_lr
        self.dense_opt.param_groups[1]["lr"] = \
            self.repeat_interaction_lr * scheduler.lr_lambdas[1](scheduler.last_epoch)

    # ------------------------------------------------------------------ one step
    def _new_average(self) -> AveragedModel:
        """The weight average of this run: SWA from ``swa_start`` on, else the EMA."""
        if self.swa_start is not None:
            return ModelSWA(self.model, self.tc.swa_every_n_steps)
        return ModelEMA(self.model, self.tc.ema_decay)

    def train_step(self, batch: Batch) -> Dict[str, torch.Tensor]:
        """One optimisation step on a batch already on the device; returns detached loss
        tensors (no host sync)."""
        self.model.train()
        self.dense_opt.zero_grad(set_to_none=True)
        if self.sparse_opt is not None:
            self.sparse_opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                            enabled=self.use_bf16):
            out = self.forward(batch)
        total, parts = training_loss(out, batch.label, self.tc)
        total.backward()
        if self.grad_sync is not None:
            self.grad_sync()
        if self.tc.grad_clip > 0:
            # Dense only: sparse gradients have no fused norm, and Adagrad already scales
            # each row's step by its own history.
            torch.nn.utils.clip_grad_norm_(self.dense_params, self.tc.grad_clip)
        self.dense_opt.step()
        if self.sparse_opt is not None:
            self.sparse_opt.step()
        for scheduler in self.schedulers:
            scheduler.step()
        if self.ema is None and self.swa_start is not None \
                and self.global_step + 1 >= self.swa_start:
            self.ema = self._new_average()
            log.info("SWA started at step %d (one step in %d)", self.global_step + 1,
                     self.tc.swa_every_n_steps)
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
            # buffers are not averaged but may change in training (the id counts of
            # --emb_min_count): the averaged model reads the current ones
            for avg, cur in zip(self.ema.module.buffers(), self.model.buffers()):
                avg.copy_(cur)
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

    def _validate_and_save(self, end_of_epoch: bool) -> bool:
        """Validate, track the best, save, check patience; returns whether to stop.

        Mid-epoch validations save only a new best; the end of an epoch always saves (its
        checkpoint is where the next epoch resumes from).
        """
        epoch, step = self.position.epoch, float(self.global_step)
        if self.valid_loader is None:
            self._save(False, None)
            return False
        if self._last_validated is not None and self._last_validated[0] == self.global_step:
            # The epoch ended on a step just validated: the same weights, so the same metrics.
            _, metrics, use_ema = self._last_validated
            self.result.history.append(dict(metrics, epoch=float(epoch), step=step))
            self._save(use_ema, metrics["auc"])
            return self.stopping.should_stop
        metrics, use_ema = self.validate(epoch)
        self._last_validated = (self.global_step, metrics, use_ema)
        if end_of_epoch:
            self.result.history.append(dict(metrics, epoch=float(epoch), step=step))
        improved = self.stopping.update(metrics["auc"])
        if improved:
            self.result.best_auc = metrics["auc"]
        path = self._save(use_ema, metrics["auc"], best=improved) if improved or end_of_epoch \
            else None
        if improved:
            self.result.best_checkpoint = path
        if self.stopping.should_stop:
            log.info("early stopping: no better validation AUC in %d validations",
                     self.tc.patience)
        return self.stopping.should_stop

    # ------------------------------------------------------------------ checkpoints
    def _save(self, use_ema: bool, valid_auc: Optional[float], best: bool = False
              ) -> Optional[str]:
        """Saves the current (or EMA) weights and the training state, once per step;
        returns the folder (None on ranks that do not write)."""
        if self._last_saved is not None and self._last_saved[0] == self.global_step:
            return self._last_saved[1]
        rngs = distributed.gather_objects(rng_state())  # every rank's, so every rank resumes
        path = None
        if self.checkpoints is not None:
            model = self.ema.module if use_ema else self.model
            auc = valid_auc if valid_auc is not None and math.isfinite(valid_auc) else None
            meta = CheckpointMeta(weights="ema" if use_ema else "raw",
                                  global_step=self.global_step, epoch=self.position.epoch,
                                  valid_auc=auc)
            path = self.checkpoints.save(model.state_dict(), meta,
                                         self.train_state(use_ema, rngs))
            self._prune(keep=path if best else self.result.best_checkpoint)
        self._last_saved = (self.global_step, path)
        return path

    def _prune(self, keep: Optional[str]) -> None:
        """Deletes all but the ``keep_last`` newest checkpoints, never ``keep`` (the best)."""
        if self.tc.keep_last <= 0 or self.checkpoints is None:
            return
        for path in self.checkpoints.stale(self.tc.keep_last, keep):
            shutil.rmtree(path, ignore_errors=True)
            log.info("pruned checkpoint %s (--keep_last %d)", os.path.basename(path),
                     self.tc.keep_last)

    def train_state(self, weights_are_ema: bool, rngs: List[Dict[str, Any]]
                    ) -> Dict[str, Any]:
        """Everything but the saved weights that a resumed run needs (module docstring).

        The raw weights are stored here only when ``model.pt`` holds the EMA's, and the EMA's
        only when it holds the raw ones: never twice. ``rngs``: every rank's generators.
        """
        ema = None
        if self.ema is not None:
            ema = {"updates": self.ema.updates,
                   "module": None if weights_are_ema else self.ema.module.state_dict()}
        return {
            "version": TRAIN_STATE_VERSION,
            "position": dataclasses.asdict(self.position),
            "global_step": self.global_step,
            "model": self.model.state_dict() if weights_are_ema else None,
            "dense_opt": self.dense_opt.state_dict(),
            "sparse_opt": self.sparse_opt.state_dict() if self.sparse_opt else None,
            "schedulers": [s.state_dict() for s in self.schedulers],
            "ema": ema,
            "stopping": dataclasses.asdict(self.stopping),
            "result": dataclasses.asdict(self.result),
            "last_saved": self._last_saved,
            "epoch_sums": {k: float(v) for k, v in self._epoch_sums.items()},
            "rng": rngs,
        }

    def load_state(self, state: Dict[str, Any], saved_weights: Dict[str, torch.Tensor],
                   weights_are_ema: bool) -> None:
        """Restores a ``train_state()`` and the weights saved beside it (``model.pt``)."""
        self.model.load_state_dict(state["model"] if weights_are_ema else saved_weights)
        self.dense_opt.load_state_dict(state["dense_opt"])
        if self.sparse_opt is not None:
            self.sparse_opt.load_state_dict(state["sparse_opt"])
        for scheduler, saved in zip(self.schedulers, state["schedulers"]):
            scheduler.load_state_dict(saved)
        if state["ema"] is not None:
            self.ema = self._new_average()
            self.ema.load_state_dict(dict(state["ema"], module=saved_weights if weights_are_ema
                                          else state["ema"]["module"]))
        self.global_step = state["global_step"]
        self.position = Position(**state["position"])
        self.stopping = EarlyStopping(**state["stopping"])
        self.result = TrainResult(**state["result"])
        self._last_saved = tuple(state["last_saved"]) if state["last_saved"] else None
        self._epoch_sums = {k: torch.tensor(v) for k, v in state["epoch_sums"].items()}
        rngs = state["rng"]
        if len(rngs) != distributed.world_size():
            log.warning("resuming with %d processes instead of %d: the data is sharded "
                        "differently from here on", distributed.world_size(), len(rngs))
        self._resume_rng = rngs[distributed.rank() % len(rngs)]
        p = self.position
        log.info("resuming at step %d: epoch %d, %s", self.global_step, p.epoch,
                 "its end" if p.epoch_done else f"after {p.step_in_epoch} of its batches")

    # ------------------------------------------------------------------ re-init
    def _reinit_sparse(self, epoch: int) -> None:
        """MultiEpoch trick: fresh high-cardinality tables with a fresh Adagrad accumulator."""
        params = self.model.reinit_high_cardinality_params(self.tc.reinit_cardinality_threshold)
        # Each rank drew from its own generator: without this the ranks' tables, and so
        # their models, part ways from the second epoch on.
        distributed.broadcast_from_first(params)
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
    def _batches(self) -> Iterator[Batch]:
        """This epoch's training batches from the position on: as many as the rank with the
        fewest has; a resumed epoch's first batches are read but not trained on."""
        loader = self.train_loader
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(self.position.epoch)
        own = getattr(loader, "num_batches", None)
        steps = distributed.min_over_ranks(own, self.device) if own is not None else None
        if own is not None and steps < own:
            log.info("epoch %d: this rank drops its last %d of %d batches (ranks run the "
                     "same number of steps)", self.position.epoch, own - steps, own)
        it = iter(loader)
        for _ in range(self.position.step_in_epoch):  # replay up to the resumed position
            next(it)
        if self._resume_rng is not None:  # after the replay, which may draw worker seeds
            set_rng_state(self._resume_rng)
            self._resume_rng = None
        for k, batch in enumerate(it, start=self.position.step_in_epoch):
            if steps is not None and k >= steps:
                break
            yield batch

    def _mean_loss(self) -> float:
        """The epoch's mean training loss so far (reads it off the device)."""
        return float(self._epoch_sums["loss/total"]) / max(self.position.step_in_epoch, 1)

    def _train_epoch(self) -> bool:
        """The rest of the current epoch; returns whether early stopping ended it."""
        epoch, epochs = self.position.epoch, self.tc.num_epochs
        stat_names = getattr(self.train_loader, "stat_names", None)
        stats = DataStats(stat_names) if stat_names is not None else None
        sums = self._epoch_sums
        total = getattr(self.train_loader, "num_batches", None)
        progress = Progress(
            self._batches(), f"epoch {epoch}/{epochs}", total, self.tc.batch_size,
            run_left=(lambda: (epochs - epoch) * total) if total is not None else None,
            status=lambda: {"loss": f"{self._mean_loss():.4f}"} if sums else {})
        try:
            for batch in progress:
                if stats is not None:
                    stats.add(batch)
                parts = self.train_step(batch.to(self.device, non_blocking=True))
                self.global_step += 1
                self.position.step_in_epoch += 1
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v
                if self.global_step % LOG_EVERY_STEPS == 0 and self.writer is not None:
                    self.writer.scalars({k: float(v) for k, v in parts.items()},
                                        self.global_step, "/train")
                if (self.tc.eval_every_n_steps > 0 and self.valid_loader is not None
                        and self.global_step % self.tc.eval_every_n_steps == 0
                        and self._validate_and_save(end_of_epoch=False)):
                    return True
                if self.tc.save_every_n_steps > 0 and \
                        self.global_step % self.tc.save_every_n_steps == 0:
                    self._save(False, None)
        except DataError:
            if not distributed.active():  # ranks cannot meet in a save: torchrun stops them
                self._save(False, None)  # the run so far resumes once the data is fixed
            raise
        n = self.position.step_in_epoch
        if n == 0:
            raise DataError("the training loader yielded no batch: check --data_dir, "
                            "--train_ratio and --valid_ratio")
        log.info("epoch %d: %d batches, mean %s", epoch, n,
                 fmt_metrics({k: float(v) / n for k, v in sums.items()}))
        if stats is not None:
            for line in stats.summary_lines():
                log.info("epoch %d data repairs: %s", epoch, line)
        return False

    def train(self) -> TrainResult:
        """Runs the epochs from the current position (the first, or a resumed checkpoint's)
        up to ``num_epochs``; returns the best validation AUC and checkpoint.

        Each epoch: the EMA starts at ``ema_start_epoch``; a pass over the training data
        (validating every ``eval_every_n_steps`` steps and saving every
        ``save_every_n_steps`` when set); a validation and a checkpoint at its end; then the
        sparse re-initialisation after epochs >= ``reinit_sparse_after_epoch`` but the last.
        Early stopping ends the run after ``patience`` validations without a better AUC.
        """
        tc = self.tc
        if self._resume_rng is not None and self.position.epoch_done:
            set_rng_state(self._resume_rng)  # the re-initialisation below draws from it
            self._resume_rng = None
        while True:
            p = self.position
            if p.epoch_done:
                # --emb_min_count counts ids in the first pass only (idempotent)
                stop_counting = getattr(self.model, "stop_counting_ids", None)
                if stop_counting is not None:
                    stop_counting()
                if self.stopping.should_stop or p.epoch >= tc.num_epochs:
                    break
                if 0 < tc.reinit_sparse_after_epoch <= p.epoch < tc.num_epochs:
                    self._reinit_sparse(p.epoch)
                if self.repeat_interaction_lr is not None:
                    self._slow_repeated_interactions()
                self.position = Position(p.epoch + 1)
                self._epoch_sums = {}
                continue
            if self.ema is None and tc.ema_decay > 0 and p.epoch >= max(1, tc.ema_start_epoch):
                self.ema = self._new_average()
                log.info("EMA started at epoch %d (decay %g, warm-up)", p.epoch, tc.ema_decay)
            stop = self._train_epoch()
            if not stop:
                self.position.epoch_done = True
                stop = self._validate_and_save(end_of_epoch=True)
            if stop:
                break
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
