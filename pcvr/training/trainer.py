"""Training loop: optimisers, train step, validation, early stopping, re-init, EMA, checkpoints.

Two optimisers, as in the reference: AdamW for dense parameters and Adagrad for embedding
tables. The tables use sparse gradients, so an Adagrad step reads and writes only the rows that
the batch touched instead of all ~240M weights.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pcvr.config import Config, TrainConfig, to_flat_dict
from pcvr.metrics import binary_logloss, roc_auc
from pcvr.runtime import (MetricsWriter, ModelEMA, atomic_dir, atomic_write_json, fmt_metrics,
                          sigmoid_focal_loss)

log = logging.getLogger(__name__)

# Keys of a batch that stay on the host (repair counters; the model never reads them).
HOST_KEYS = ("data_stats",)
CKPT_NAME_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-=.")


def batch_to_device(batch: Mapping[str, Any], device: torch.device) -> Dict[str, Any]:
    """Moves every tensor except the host-side counters to ``device`` (non-blocking)."""
    return {k: (v.to(device, non_blocking=True)
                if isinstance(v, torch.Tensor) and k not in HOST_KEYS else v)
            for k, v in batch.items()}


@dataclass
class Predictions:
    """What one pass of a model over a loader produced (host numpy arrays, row order kept)."""
    user_id: np.ndarray   # (N,) int64
    logit: np.ndarray     # (N,) float64, first action
    label: np.ndarray     # (N,) float32

    @property
    def prob(self) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.logit))


@torch.inference_mode()
def predict_loader(model: torch.nn.Module, loader: Iterable[Mapping[str, Any]],
                   device: torch.device, desc: str = "predict",
                   stats: Optional[Any] = None) -> Predictions:
    """Runs ``model.predict`` in float32 over every batch of ``loader``.

    Args:
        model: a model in eval mode with ``predict(batch) -> (B, action_num)`` logits.
        loader: yields batch dicts (``user_id`` (B,), ``label`` (B,), feature tensors).
        stats: optional ``dataset.DataStats`` that accumulates the batches' repair counters.
    Returns:
        ``Predictions`` with the first action's logit per row.
    """
    uids, logits, labels = [], [], []
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        if stats is not None:
            stats.add(batch)
        out = model.predict(batch_to_device(batch, device))
        logits.append(out[:, 0].float().cpu())
        uids.append(batch["user_id"].cpu())
        labels.append(batch["label"].cpu())
    if not logits:
        return Predictions(np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.float32))
    return Predictions(torch.cat(uids).numpy().astype(np.int64),
                       torch.cat(logits).double().numpy(),
                       torch.cat(labels).float().numpy())


def score_predictions(pred: Predictions) -> Dict[str, float]:
    """AUC (exact, ties halved) and logloss; non-finite logits are counted, never dropped.

    A non-finite logit is ranked below every finite one for the AUC (a failure costs AUC
    instead of silently disappearing) and excluded from the logloss.
    """
    finite = np.isfinite(pred.logit)
    n_bad = int((~finite).sum())
    if n_bad:
        log.error("%d of %d predictions are not finite", n_bad, finite.size)
    lowest = pred.logit[finite].min() - 1.0 if finite.any() else 0.0
    ranked = np.where(finite, pred.logit, lowest)
    return {"auc": roc_auc(pred.label, ranked),
            "logloss": binary_logloss(pred.label[finite], pred.logit[finite]),
            "rows": float(finite.size), "nonfinite": float(n_bad)}


def checkpoint_name(step: int, epoch: int, cfg: Config) -> str:
    """Platform rule: starts with 'global_step', <= 300 chars of [A-Za-z0-9_-=.]."""
    m = cfg.model
    name = (f"global_step{step}.epoch{epoch}.layer={m.num_hyformer_blocks}"
            f".head={m.num_heads}.hidden={m.d_model}")
    assert len(name) <= 300 and set(name) <= CKPT_NAME_CHARS, name
    return name


def save_checkpoint(path: str, state_dict: Mapping[str, torch.Tensor], cfg: Config,
                    raw_schema: Mapping[str, Any], ns_groups_path: Optional[str],
                    extra: Mapping[str, Any]) -> None:
    """Writes model.pt, schema.json, ns_groups.json (when used) and train_config.json atomically.

    ``extra`` holds derived keys (e.g. num_time_buckets) recorded next to the flags.
    """
    train_config = dict(to_flat_dict(cfg), **extra)
    with atomic_dir(path) as tmp:
        torch.save({k: v.detach().cpu() for k, v in state_dict.items()},
                   os.path.join(tmp, "model.pt"))
        with open(os.path.join(tmp, "schema.json"), "w", encoding="utf-8") as fh:
            json.dump(raw_schema, fh)
        if ns_groups_path:
            shutil.copyfile(ns_groups_path, os.path.join(tmp, "ns_groups.json"))
            train_config["ns_groups_json"] = "ns_groups.json"
        with open(os.path.join(tmp, "train_config.json"), "w", encoding="utf-8") as fh:
            json.dump(train_config, fh, indent=2)


@dataclass
class TrainResult:
    best_auc: float = float("nan")
    best_checkpoint: Optional[str] = None
    global_step: int = 0
    history: List[Dict[str, float]] = field(default_factory=list)


def _epoch_steps(loader: Iterable, batch_size: int) -> Optional[int]:
    """Optimiser steps per epoch, when the loader knows its rows (``PCVRLoader.num_rows``)."""
    rows = getattr(loader, "num_rows", None)
    return None if rows is None else max(1, math.ceil(rows / batch_size))


def lr_factor(t: TrainConfig, epoch_steps: Optional[int]) -> Callable[[int], float]:
    """The learning-rate multiplier of step ``s`` (0-based) for ``LambdaLR``.

    Linear warm-up over ``lr_warmup_steps``, then constant or, for 'cosine', a cosine decay
    from 1 to 0 over ``num_epochs * epoch_steps`` steps (the total of a run without early
    stopping; with several DataLoader shards an epoch has a few more, partial batches, whose
    steps stay at the floor of the decay).
    """
    if t.lr_warmup_steps < 0:
        raise ValueError(f"--lr_warmup_steps must be >= 0, got {t.lr_warmup_steps}")
    if t.lr_schedule == "cosine" and epoch_steps is None:
        raise ValueError("--lr_schedule cosine needs a training loader that knows its rows")
    total = t.num_epochs * (epoch_steps or 1)
    warmup = t.lr_warmup_steps

    def factor(step: int) -> float:
        scale = min(1.0, (step + 1) / warmup) if warmup else 1.0
        if t.lr_schedule == "cosine":
            scale *= 0.5 * (1.0 + math.cos(math.pi * min(step / total, 1.0)))
        return scale
    return factor


class Trainer:
    """Owns the optimisers and the loop; see ``train()``."""

    def __init__(self, model: torch.nn.Module, cfg: Config, train_loader: Iterable,
                 valid_loader: Optional[Iterable], device: torch.device,
                 raw_schema: Mapping[str, Any], ns_groups_path: Optional[str],
                 extra_config: Mapping[str, Any], writer: Optional[MetricsWriter] = None,
                 make_stats: Optional[Any] = None) -> None:
        t = cfg.train
        self.model, self.cfg, self.t = model, cfg, t
        self.train_loader, self.valid_loader, self.device = train_loader, valid_loader, device
        self.raw_schema, self.ns_groups_path = raw_schema, ns_groups_path
        self.extra_config = dict(extra_config)
        self.writer = writer
        self.make_stats = make_stats
        if t.sparse_weight_decay != 0.0:
            # torch's Adagrad rejects weight decay on sparse gradients; decaying only the rows
            # a batch touched would be a different regulariser, so refuse instead of guessing.
            raise ValueError("--sparse_weight_decay must be 0: embedding tables use sparse "
                             "gradients, for which Adagrad has no weight decay")
        self.sparse_params = list(model.sparse_parameters())
        self.dense_params = list(model.dense_parameters())
        self.dense_opt = torch.optim.AdamW(self.dense_params, lr=t.lr, betas=(0.9, 0.98),
                                           weight_decay=0.01)
        # Adagrad builds its sparse updates from coalesced gradients; checking them again on
        # every step costs time, and saying so explicitly keeps torch from warning about it.
        torch.sparse.check_sparse_tensor_invariants.disable()
        self.sparse_opt = (torch.optim.Adagrad(self.sparse_params, lr=t.sparse_lr)
                           if self.sparse_params else None)
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(t, _epoch_steps(
            train_loader, t.batch_size))) for opt in (self.dense_opt, self.sparse_opt) if opt]
        self.use_bf16 = bool(t.use_bf16_train) and device.type in ("cuda", "cpu")
        self.ema: Optional[ModelEMA] = None
        self.global_step = 0

    # ------------------------------------------------------------------ one step
    def _loss(self, batch: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                            enabled=self.use_bf16):
            out = self.model(batch)
        logits = out.logits[:, 0].float()
        label = batch["label"].float()
        if self.t.loss_type == "focal":
            per_row = sigmoid_focal_loss(logits, label, self.t.focal_alpha, self.t.focal_gamma)
        else:
            per_row = F.binary_cross_entropy_with_logits(logits, label, reduction="none")
        if out.sample_weight is not None:
            per_row = per_row * out.sample_weight.float()
        main = per_row.mean()
        parts = {"loss/main": main.detach()}
        total = main
        if out.aux_losses:
            weight = self.cfg.decoupling.decouple_loss_weight
            for name, value in out.aux_losses.items():
                parts[f"loss/{name}"] = value.detach().float()
                total = total + weight * value.float()
        return total, parts

    def train_step(self, batch: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """One optimisation step; returns detached loss tensors (no host sync)."""
        self.model.train()
        self.dense_opt.zero_grad(set_to_none=True)
        if self.sparse_opt is not None:
            self.sparse_opt.zero_grad(set_to_none=True)
        total, parts = self._loss(batch)
        total.backward()
        if self.t.grad_clip > 0:
            # Dense only: sparse gradients have no fused norm, and Adagrad already scales
            # each row's step by its own history.
            torch.nn.utils.clip_grad_norm_(self.dense_params, self.t.grad_clip)
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
    def evaluate(self, model: Optional[torch.nn.Module] = None) -> Dict[str, float]:
        """Float32 validation of ``model`` (default: the live model) on the valid loader."""
        model = self.model if model is None else model
        was_training = model.training
        model.eval()
        try:
            pred = predict_loader(model, self.valid_loader, self.device, desc="valid")
        finally:
            model.train(was_training)
        return score_predictions(pred)

    def _validate(self, epoch: int) -> Tuple[Dict[str, float], bool]:
        """Validates the raw weights and, when EMA is on, the averaged ones; keeps the better."""
        metrics = self.evaluate()
        use_ema = False
        if self.ema is not None:
            ema_metrics = self.evaluate(self.ema.module)
            metrics["auc_ema"] = ema_metrics["auc"]
            use_ema = ema_metrics["auc"] > metrics["auc"]
            if use_ema:
                metrics.update(auc=ema_metrics["auc"], logloss=ema_metrics["logloss"])
        log.info("validation epoch %d step %d: %s%s", epoch, self.global_step,
                 fmt_metrics(metrics), " (EMA weights)" if use_ema else "")
        if self.writer is not None:
            self.writer.scalar("AUC/valid", metrics["auc"], self.global_step)
            self.writer.scalar("LogLoss/valid", metrics["logloss"], self.global_step)
        return metrics, use_ema

    def _save(self, epoch: int, use_ema: bool) -> str:
        model = self.ema.module if use_ema else self.model
        path = os.path.join(self.t.ckpt_dir, checkpoint_name(self.global_step, epoch, self.cfg))
        save_checkpoint(path, model.state_dict(), self.cfg, self.raw_schema,
                        self.ns_groups_path, self.extra_config)
        log.info("saved checkpoint %s", path)
        return path

    # ------------------------------------------------------------------ re-init
    def _reinit_sparse(self, epoch: int) -> None:
        """MultiEpoch trick: fresh high-cardinality tables with a fresh Adagrad accumulator."""
        params = self.model.reinit_high_cardinality_params(self.t.reinit_cardinality_threshold)
        if self.sparse_opt is not None:
            for p in params:
                state = self.sparse_opt.state.get(p)
                if state:
                    state["sum"].zero_()
                    state["step"].zero_()
        if self.ema is not None:
            self.ema.restart()
        log.info("epoch %d: re-initialised %d embedding tables (vocab > %d)%s", epoch,
                 len(params), self.t.reinit_cardinality_threshold,
                 "; EMA restarted" if self.ema is not None else "")

    # ------------------------------------------------------------------ loop
    def train(self) -> TrainResult:
        t = self.t
        result = TrainResult()
        stale = 0
        stop = False
        for epoch in range(1, t.num_epochs + 1):
            if hasattr(self.train_loader, "set_epoch"):
                self.train_loader.set_epoch(epoch)
            elif hasattr(getattr(self.train_loader, "dataset", None), "set_epoch"):
                self.train_loader.dataset.set_epoch(epoch)
            if self.ema is None and t.ema_decay > 0 and epoch >= max(1, t.ema_start_epoch):
                self.ema = ModelEMA(self.model, t.ema_decay)
                log.info("EMA started at epoch %d (decay %g, warm-up)", epoch, t.ema_decay)
            stats = self.make_stats() if self.make_stats is not None else None
            sums: Dict[str, torch.Tensor] = {}
            n_batches = 0
            bar = tqdm(self.train_loader, desc=f"epoch {epoch}", dynamic_ncols=True)
            for batch in bar:
                if stats is not None:
                    stats.add(batch)
                parts = self.train_step(batch_to_device(batch, self.device))
                self.global_step += 1
                n_batches += 1
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v
                if self.global_step % 50 == 0:  # host syncs only every 50 steps
                    loss = float(parts["loss/total"])
                    bar.set_postfix(loss=f"{loss:.4f}")
                    if self.writer is not None:
                        for k, v in parts.items():
                            self.writer.scalar(f"{k}/train", float(v), self.global_step)
                if (t.eval_every_n_steps > 0 and self.valid_loader is not None
                        and self.global_step % t.eval_every_n_steps == 0):
                    metrics, use_ema = self._validate(epoch)
                    stale, improved = self._track(result, metrics, stale)
                    if improved:
                        result.best_checkpoint = self._save(epoch, use_ema)
                    if t.patience > 0 and stale >= t.patience:
                        stop = True
                        break
            if n_batches == 0:
                raise RuntimeError("the training loader yielded no batch: check --data_dir, "
                                   "--train_ratio and --valid_ratio")
            means = {k: float(v) / n_batches for k, v in sums.items()}
            log.info("epoch %d: %d batches, mean %s", epoch, n_batches, fmt_metrics(means))
            if stats is not None:
                for line in stats.summary_lines():
                    log.info("epoch %d data repairs: %s", epoch, line)
            if stop:
                log.info("early stopping: no better validation AUC in %d validations", t.patience)
                break
            if self.valid_loader is not None:
                metrics, use_ema = self._validate(epoch)
                result.history.append(dict(metrics, epoch=float(epoch),
                                           step=float(self.global_step)))
                stale, improved = self._track(result, metrics, stale)
                path = self._save(epoch, use_ema)
                if improved:
                    result.best_checkpoint = path
                if t.patience > 0 and stale >= t.patience:
                    log.info("early stopping: no better validation AUC in %d validations",
                             t.patience)
                    break
            else:
                result.best_checkpoint = self._save(epoch, False)
            if 0 < t.reinit_sparse_after_epoch <= epoch < t.num_epochs:
                self._reinit_sparse(epoch)
        result.global_step = self.global_step
        if result.best_checkpoint:
            atomic_write_json(os.path.join(t.ckpt_dir, "best_checkpoint.json"),
                              {"checkpoint": os.path.basename(result.best_checkpoint),
                               "valid_auc": result.best_auc}, indent=2)
        return result

    @staticmethod
    def _track(result: TrainResult, metrics: Mapping[str, float], stale: int) -> Tuple[int, bool]:
        auc = metrics["auc"]
        if math.isfinite(auc) and not (auc <= result.best_auc):  # NaN best -> first wins
            result.best_auc = auc
            return 0, True
        return stale + 1, False
