"""Training and evaluation on explicit ratings logged missing-not-at-random (Coat, the
simulator): a pointwise squared-error fit of the logged ratings, naive or debiased by inverse
propensity (IPS), doubly robust joint learning (DR) or the tuning log's atom/side-distance
weights, and ranking metrics on per-user candidate lists."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn as nn

from pcvr.config import DecouplingConfig
from pcvr.debias.data import EvalSet, RatingData
from pcvr.debias.metrics import ndcg_per_user, pooled_auc
from pcvr.debias.models import HEADS, VARIANTS, MatrixFactorisation, TwoTower

WEIGHTINGS = ("none", "ips", "dr", "distance")
SSL_ENTITIES = ("batch", "unique", "uniform")
POSITIVE_LABEL = 3  # label = rating - 1: rating >= 4 is a positive for the AUC
NDCG_CUTOFF = 5


@dataclass(frozen=True)
class PointwiseSettings:
    """Everything a pointwise run needs besides the data, the decoupling config and the seed.

    model: ``"mf"`` or a two-tower variant (``models.VARIANTS``).
    weighting: ``"none"``; ``"ips"``: each logged pair weighted by ``1 / max(p, clip)``
        (normalised to mean 1 over the log); ``"dr"``: doubly robust joint learning with an
        MF imputation model and the same weights; ``"distance"``: the decoupled items'
        atom/side-distance weights (``decoupling.ipw_sample_weight``) in place of IPS.
    propensity_clip: floor of the propensities (IPS, DR).
    ssl_entities: where the decoupling losses are computed: ``"batch"``, the batch's users
        and items (popular ones count more, as in the log); ``"unique"``, each distinct user
        and item of the batch once; ``"uniform"``, as many users and items as the batch has
        rows, drawn uniformly (every entity regularised as often, whatever its exposure).
    init_std: std of the embedding rows.
    head: ranking head of the control and decoupled towers (``models.HEADS``).
    """
    model: str = "mlp_concat_head"
    epochs: int = 30
    batch_size: int = 256
    lr: float = 5e-3
    weight_decay: float = 0.1
    emb_dim: int = 16
    dim: int = 16
    init_std: float = 0.1
    weighting: str = "none"
    propensity_clip: float = 0.02
    ssl_entities: str = "batch"
    head: str = "mlp"

    def __post_init__(self) -> None:
        if self.model != "mf" and self.model not in VARIANTS:
            raise ValueError(f"model {self.model!r}: choose 'mf' or one of {VARIANTS}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting {self.weighting!r}: choose from {WEIGHTINGS}")
        if self.ssl_entities not in SSL_ENTITIES:
            raise ValueError(f"ssl_entities {self.ssl_entities!r}: choose from {SSL_ENTITIES}")
        if self.head not in HEADS:
            raise ValueError(f"head {self.head!r}: choose from {HEADS}")
        if self.weighting == "distance" and self.model != "decoupled":
            raise ValueError("distance weights need the decoupled model")


def build_model(data: RatingData, s: PointwiseSettings, cfg: DecouplingConfig) -> nn.Module:
    """The scorer named by ``s.model`` (MF factors are ``2 * s.dim`` wide, like a tower)."""
    if s.model == "mf":
        return MatrixFactorisation(data.n_users, data.n_items, 2 * s.dim, s.init_std)
    return TwoTower(data.users, data.items, s.model, s.emb_dim, s.dim, cfg, s.init_std,
                    unique_entities=s.ssl_entities == "unique", head=s.head)


def ips_weights(propensity: np.ndarray, clip: float) -> torch.Tensor:
    """``[N]`` weights ``1 / max(p, clip)`` scaled to mean 1 (so the loss scale, and thus the
    learning rate, means the same as without weights)."""
    w = 1.0 / np.maximum(propensity, clip)
    return torch.from_numpy(w / w.mean()).float()


def dr_model_loss(f_obs: torch.Tensor, r: torch.Tensor, w: torch.Tensor, g_obs: torch.Tensor,
                  f_all: torch.Tensor, g_all: torch.Tensor) -> torch.Tensor:
    """Doubly robust estimate of the mean squared error over all pairs.

    ``mean((f_all - g_all)^2) + mean(w * ((f_obs - r)^2 - (f_obs - g_obs)^2))``: the error
    against the imputed ratings ``g`` on uniformly drawn pairs, corrected on the logged pairs
    by the inverse-propensity weighted gap between the true and the imputed error. Unbiased
    if either the propensities or the imputation are right.

    Args:
        f_obs, r, w, g_obs: ``[B]`` scores, ratings, IPS weights and imputed ratings of
            logged pairs.
        f_all, g_all: ``[B']`` scores and imputed ratings of uniformly drawn pairs.
    """
    return ((f_all - g_all).pow(2).mean()
            + (w * ((f_obs - r).pow(2) - (f_obs - g_obs).pow(2))).mean())


def dr_imputation_loss(f_obs: torch.Tensor, r: torch.Tensor, w: torch.Tensor,
                       g_obs: torch.Tensor) -> torch.Tensor:
    """The imputation model's loss of DR joint learning, all ``[B]`` over logged pairs:
    ``mean(w * ((f - r)^2 - (f - g)^2)^2)``, the weighted squared error of the imputed error
    (``f`` is detached by the caller)."""
    return (w * ((f_obs - r).pow(2) - (f_obs - g_obs).pow(2)).pow(2)).mean()


def train_pointwise(data: RatingData, s: PointwiseSettings, cfg: DecouplingConfig,
                    seed: int) -> nn.Module:
    """Fits ``data``'s logged ratings from ``seed`` and returns the model (eval mode).

    Per step, over a batch of ``B`` logged pairs with ratings ``r`` and scores ``f``, and
    weights ``w`` (1, IPS or distance):

    * plain / IPS / distance: ``mean(w * (f - r)^2)``;
    * DR: ``mean_U((f - g)^2) + mean(w * ((f - r)^2 - (f - g)^2))`` where ``g`` is the
      imputation model's rating (detached) and ``U`` a batch of ``B`` uniformly drawn pairs;
      ``g`` then takes a step on ``mean(w * ((f - r)^2 - (f - g)^2)^2)`` (``f`` detached);
    * decoupled: plus ``decouple_loss_weight`` times the sum of the decoupling losses.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    cfg = dataclasses.replace(cfg, decouple_ipw=s.weighting == "distance")
    model = build_model(data, s, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    imputer: Optional[MatrixFactorisation] = None
    if s.weighting == "dr":
        imputer = MatrixFactorisation(data.n_users, data.n_items, 2 * s.dim, s.init_std)
        imp_opt = torch.optim.AdamW(imputer.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    user = torch.from_numpy(data.train_user)
    item = torch.from_numpy(data.train_item)
    rating = torch.from_numpy(data.train_rating).float()
    weight = (ips_weights(data.train_propensity, s.propensity_clip)
              if s.weighting in ("ips", "dr") else torch.ones(len(user)))
    uniform_ssl = s.model == "decoupled" and s.ssl_entities == "uniform"
    for _ in range(s.epochs):
        model.train()
        perm = torch.randperm(len(user), generator=gen)
        for b in range(0, len(perm), s.batch_size):
            rows = perm[b:b + s.batch_size]
            u, i, r, w = user[rows], item[rows], rating[rows], weight[rows]
            ssl_u = ssl_i = None
            if uniform_ssl:
                ssl_u = torch.randint(data.n_users, (len(rows),), generator=gen)
                ssl_i = torch.randint(data.n_items, (len(rows),), generator=gen)
            out = model(u, i, ssl_u, ssl_i)
            if out.weight is not None:
                w = out.weight
            if imputer is None:
                loss = (w * (out.score - r).pow(2)).mean()
            else:
                uu = torch.randint(data.n_users, (len(rows),), generator=gen)
                ui = torch.randint(data.n_items, (len(rows),), generator=gen)
                with torch.no_grad():
                    g_obs, g_all = imputer(u, i).score, imputer(uu, ui).score
                loss = dr_model_loss(out.score, r, w, g_obs, model(uu, ui).score, g_all)
            if out.losses:
                loss = loss + cfg.decouple_loss_weight * sum(out.losses.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if imputer is not None:
                imp_loss = dr_imputation_loss(out.score.detach(), r, w, imputer(u, i).score)
                imp_opt.zero_grad(set_to_none=True)
                imp_loss.backward()
                imp_opt.step()
    model.eval()
    return model


@torch.no_grad()
def evaluate_lists(scores: torch.Tensor, ev: EvalSet) -> Dict[str, float]:
    """Metrics of a ``[n_users, n_items]`` score matrix on ``ev`` (labels = rating - 1).

    ``ndcg5``/``ndcg``: NDCG@5 and NDCG over each user's whole list (gain ``2^label - 1``),
    averaged over users with a rating above 1; ``auc``: pooled exact AUC over every listed
    pair with rating >= 4 as the positive class.
    """
    s = scores[torch.from_numpy(ev.users)[:, None], torch.from_numpy(ev.items)]  # [U, C]
    labels = torch.from_numpy(ev.labels)
    valid = torch.from_numpy(ev.valid)
    return {"ndcg5": ndcg_per_user(s, labels, valid, NDCG_CUTOFF).nanmean().item(),
            "ndcg": ndcg_per_user(s, labels, valid).nanmean().item(),
            "auc": pooled_auc(s.numpy(), ev.labels >= POSITIVE_LABEL, ev.valid)}


def run_pointwise(data: RatingData, s: PointwiseSettings, cfg: DecouplingConfig, seed: int,
                  evals: Optional[Dict[str, EvalSet]] = None) -> Dict[str, Dict[str, float]]:
    """Trains from ``seed`` and returns ``{eval name: metrics}`` over ``evals`` (default
    every evaluation set of ``data``)."""
    model = train_pointwise(data, s, cfg, seed)
    scores = model.score_matrix()
    return {name: evaluate_lists(scores, ev)
            for name, ev in (data.evals if evals is None else evals).items()}
