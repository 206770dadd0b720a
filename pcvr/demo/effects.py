"""The planted effects and their calibration: the true conversion probability of a row.

logit = intercept + scale * (sum of weighted standardised effects + noise). Each effect is
z-scored on a calibration batch; the weights make every effect's share hit its target (the
effects that share the taste vector are correlated); scale and intercept give an expected
oracle AUC of 0.83 and a positive rate of 0.096 (the platform's 0.0959). "Share" is
Cov(effect, explainable logit) / Var(explainable logit), which sums to 1 over the effects.
The table gives the default variant's fids, time zone and targets; ``pcvr.demo.variants``
moves them.

    effect        share  what raises p                                   aimed at
    base          0.20   main effects: item category, sub-category and   plain NS tokens
                         type; user segment, age (peak ~32), gender
    abs_time      0.22   request in the local (UTC+8) evening,           --use_abs_time_emb,
                         cos(2 pi (hour - 21) / 24), and at weekends     --time_zone_offset_hours 8
    activity      0.10   log1p of the events of the last 1, 3 and 5      --use_user_activity_dense
                         days and of the history length, all domains     (fids 900-915)
    pair_62_66    0.15   sqrt(log1p(value)) that the user's fid 62 list  --use_pair_62_66
                         pairs with the target's item type (fid 13);
                         0 when the type is absent (~56 % of rows)
    seq_affinity  0.15   share of the history (all domains) in the       sequence encoders,
                         target's category; last-5-day events count x3  target attention
    user_x_item   0.08   table: user segment (fid 1) x item category     NS tokenizers, RankMixer
                         group (fid 5, 4 groups)
    dense_dot     0.10   user taste (seen through dense 61 / 87) . item  user dense token x
                         latent vector (category-level)                  item tokens

Unobservable row noise adds 4 % of the total logit variance. abs_time and pair_62_66 together
carry 37 % of the explainable variance, so the baseline configuration (no absolute time, no
pairing, no activity features) is measurably worse than the seed configuration. All effects
act at category, type or segment level (no per-item-id effect) so that a model can learn them
from a few tens of thousands of rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Tuple

import numpy as np

from pcvr.demo.rows import (RECENT_WINDOW_S, TRAIN_DAYS, History, Rows, draw_histories,
                            draw_rows, local_hour_dow, train_start)
from pcvr.demo.sampling import matmul, sigmoid
from pcvr.demo.variants import CATEGORY
from pcvr.demo.world import CATEGORY_GROUPS, World
from pcvr.schema import ACTIVITY_WINDOWS_S


@dataclass(frozen=True)
class Effect:
    """One planted effect: its name and what should capture it (its target share is the
    variant's)."""
    name: str
    target: str


EFFECTS: Tuple[Effect, ...] = (
    Effect("base", "plain NS tokens (the linked item and user scalars)"),
    Effect("abs_time", "--use_abs_time_emb --time_zone_offset_hours <the variant's zone>"),
    Effect("activity", "--use_user_activity_dense (fids 900-915)"),
    Effect("pair_62_66", "--use_pair_62_66"),
    Effect("seq_affinity", "sequence encoders / target attention"),
    Effect("user_x_item", "NS tokenizers / RankMixer (user segment x item category group)"),
    Effect("dense_dot", "user dense token (taste and profile embeddings) x item tokens"),
)
NOISE_SHARE = 0.04              # of the total logit variance, unobservable
AFFINITY_RECENT_WEIGHT = 3.0    # an event of the last 5 days counts 3 times in seq_affinity
_NOISE_W = math.sqrt(NOISE_SHARE / (1.0 - NOISE_SHARE))


@dataclass
class Calibration:
    """Standardisation, weights and scale of the logit, fixed once per world."""
    mean: Dict[str, float]
    std: Dict[str, float]
    weight: Dict[str, float]        # per standardised effect, so that shares hit the targets
    x_std: float
    scale: float
    intercept: float
    list_values_per_row: float


def raw_effects(world: World, rows: Rows, hists: List[History]) -> Dict[str, np.ndarray]:
    """Each planted effect [N] before standardisation (see the module docstring's table)."""
    n = rows.ts.size
    t, it, ps = world.tables, world.items, world.persons
    cat, sub, itype = it.cat[rows.item], it.sub[rows.item], it.itype[rows.item]
    person = rows.person
    age_curve = -0.5 * ((ps.age[person] - 32.0) / 12.0) ** 2
    base = (t["cat"][cat] + t["sub"][sub] + t["type"][itype] + t["segment"][ps.segment[person]]
            + t["gender"][ps.gender[person]] + age_curve)

    hour, dow = local_hour_dow(rows.ts, world.variant.tz_offset_s)
    abs_time = np.cos(2 * np.pi * (hour - 21) / 24.0) + 0.7 * (dow >= 5)

    counts = np.zeros((len(ACTIVITY_WINDOWS_S), n))
    total = np.zeros(n)
    weighted, matched = np.zeros(n), np.zeros(n)
    for h in hists:
        total += np.diff(h.offsets)
        for k, window in enumerate(ACTIVITY_WINDOWS_S):
            counts[k] += np.bincount(h.row, weights=(h.age > 0) & (h.age <= window),
                                     minlength=n)
        w = 1.0 + (AFFINITY_RECENT_WEIGHT - 1.0) * (h.age <= RECENT_WINDOW_S)
        weighted += np.bincount(h.row, weights=w, minlength=n)
        matched += np.bincount(h.row, weights=w * (h.cat == cat[h.row]), minlength=n)
    activity = np.log1p(counts).sum(axis=0) + np.log1p(total)
    seq_affinity = matched / (weighted + 1.0)

    entity = cat if world.variant.links.pair_entity == CATEGORY else itype
    pair = ps.pair_w[person, entity].astype(np.float64)

    user_x_item = t["segment_x_group"][ps.segment[person], cat % CATEGORY_GROUPS]
    dense_dot = (ps.latent[person] * it.latent[rows.item]).sum(axis=1)
    return {"base": base, "abs_time": abs_time, "activity": activity, "pair_62_66": pair,
            "seq_affinity": seq_affinity, "user_x_item": user_x_item, "dense_dot": dense_dot}


def logit_parts(calib: Calibration, raw: Mapping[str, np.ndarray],
                noise: np.ndarray) -> Dict[str, np.ndarray]:
    """Each effect's (and the noise's) contribution [N] to the logit, intercept excluded."""
    k = calib.scale / math.sqrt(1.0 + _NOISE_W ** 2)
    parts = {e.name: k * calib.weight[e.name] * (raw[e.name] - calib.mean[e.name])
             / calib.std[e.name] / calib.x_std for e in EFFECTS}
    parts["noise"] = k * _NOISE_W * noise
    return parts


def _expected_auc(p_by_score: np.ndarray) -> float:
    """AUC expected when labels are drawn from ``p`` (rows sorted by ascending score)."""
    neg = 1.0 - p_by_score
    below = np.cumsum(neg) - neg
    pairs = p_by_score.sum() * neg.sum() - (p_by_score * neg).sum()
    return float((p_by_score * below).sum() / pairs)


def calibrate(world: World) -> Calibration:
    """Fixes standardisation, scale and intercept on a batch of training-period rows."""
    rng = np.random.default_rng(np.random.SeedSequence([world.seed, 3]))
    start = train_start(world.variant)
    probe = draw_histories(world, rng, draw_rows(world, rng, 512, start, TRAIN_DAYS))
    events_per_row = sum(h.row.size for h in probe) / 512.0
    n = int(np.clip(8_000_000 / max(events_per_row, 1.0), 2000, 16000))
    rows = draw_rows(world, rng, n, start, TRAIN_DAYS)
    hists = draw_histories(world, rng, rows)
    raw = raw_effects(world, rows, hists)
    mean = {k: float(v.mean()) for k, v in raw.items()}
    std = {k: float(v.std()) or 1.0 for k, v in raw.items()}
    # Effects that share a cause (taste drives dense_dot, pair and affinity) are correlated:
    # reweight until every Cov(effect, sum) / Var(sum) equals its target share.
    z = np.stack([(raw[e.name] - mean[e.name]) / std[e.name] for e in EFFECTS], axis=1)
    zc = z - z.mean(axis=0)
    corr = matmul(zc.T, zc) / (z.shape[0] - 1)  # np.cov, without the threaded BLAS
    target = np.array(world.variant.shares)
    w = np.sqrt(target)
    for _ in range(200):
        cw = matmul(corr, w)
        share = w * cw / matmul(w, cw)
        w = w * np.sqrt(target / np.maximum(share, 1e-6))
    weight = {e.name: float(v) for e, v in zip(EFFECTS, w)}
    calib = Calibration(mean, std, weight, float(matmul(z, w).std()), 1.0, 0.0, 0.0)
    noise = rng.standard_normal(n)
    eta = sum(logit_parts(calib, raw, noise).values())      # unit-variance logit shape
    order = np.argsort(eta)

    def intercept_for(scale: float) -> float:
        lo, hi = -20.0, 20.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if sigmoid(mid + scale * eta).mean() < world.variant.pos_rate \
                else (lo, mid)
        return (lo + hi) / 2

    lo, hi = 0.05, 8.0
    for _ in range(40):
        mid = (lo + hi) / 2
        p = sigmoid(intercept_for(mid) + mid * eta[order])
        lo, hi = (mid, hi) if _expected_auc(p) < world.variant.oracle_auc else (lo, mid)
    scale = (lo + hi) / 2
    # List values per row (for the automatic row-group size): sequences, lists, embeddings.
    layout = world.layout
    seq_values = sum(h.row.size * len(layout.seq_fids[d.spec.name])
                     for h, d in zip(hists, world.domains))
    f = layout.features
    other = sum(s.length for s in f.user_int) + sum(s.length for s in f.user_dense)
    return Calibration(mean, std, weight, calib.x_std, scale, intercept_for(scale),
                       seq_values / n + other)


def explainable_logit(truth: Mapping[str, np.ndarray]) -> np.ndarray:
    """Sum of the effects' logit contributions [N] (noise and intercept excluded)."""
    return sum(truth[f"logit_{e.name}"].astype(np.float64) for e in EFFECTS)


def variance_shares(truth: Mapping[str, np.ndarray]) -> Dict[str, float]:
    """Cov(effect, explainable logit) / Var(explainable logit) per effect, plus the noise's
    share of the total logit variance."""
    parts = {e.name: truth[f"logit_{e.name}"].astype(np.float64) for e in EFFECTS}
    explainable = sum(parts.values())
    var = explainable.var()
    shares = {k: float(np.mean((v - v.mean()) * (explainable - explainable.mean())) / var)
              for k, v in parts.items()}
    noise = truth["logit_noise"].astype(np.float64)
    shares["noise_of_total"] = float(noise.var() / (explainable + noise).var())
    return shares
