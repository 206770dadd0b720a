"""A simulated recommendation log with known relevance and popularity-biased exposure: users
and items with side fields (demographics-like, genre-like) and atom ids, true ratings from side
factors plus an atom residual, a Zipf-like exposure whose propensity is kept for every logged
pair, and a logged-style (biased) and a uniform (unbiased) test."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np

from pcvr.debias.data import EntityTable, EvalSet, Field, RatingData, id_field, split_users

USER_SIDE = (("age", 6), ("gender", 2), ("region", 5))
ITEM_SIDE = (("genre", 8), ("style", 5), ("price", 3))
# Share of each rating 1..5 over all (user, item) pairs: Coat's uniform test (1879, 899,
# 1002, 641, 219 of 4640), so that the uniform test looks like Coat's.
RATING_SHARES = (0.405, 0.194, 0.216, 0.138, 0.047)


@dataclass(frozen=True)
class SimConfig:
    """The simulated world; the same config and seed give the same data.

    popularity_skew: Zipf exponent ``alpha`` of item exposure, ``w_i = rank_i^-alpha`` over
        a random ranking of the items that is independent of relevance (popular items are
        shown more, their ratings are not higher); 0 = uniform exposure.
    logged_per_user: expected number of logged items per user.
    side_share: share of the relevance variance carried by the side factors (the rest is the
        atom residual, a per-item quality plus a user-atom x item-atom term).
    noise: std of the per-pair rating noise (relevance has std 1).
    activity_spread: sigma of the log-normal user activity that scales exposure.
    valid_fraction: share of the users whose test lists form the validation lists.
    """
    n_users: int = 600
    n_items: int = 400
    logged_per_user: float = 20.0
    test_per_user: int = 16
    popularity_skew: float = 1.0
    side_share: float = 0.6
    noise: float = 0.5
    factor_dim: int = 4
    activity_spread: float = 0.5
    valid_fraction: float = 0.2
    seed: int = 0


@dataclass
class SimWorld:
    """The truth behind a simulated log.

    relevance: ``[n_users, n_items]`` expected latent relevance (std 1 over all pairs).
    rating: ``[n_users, n_items]`` the rating each pair gets when shown (1..5).
    propensity: ``[n_users, n_items]`` probability that the log shows the pair.
    logged: ``[n_users, n_items]`` bool, the pairs the log shows.
    """
    relevance: np.ndarray
    rating: np.ndarray
    propensity: np.ndarray
    logged: np.ndarray


def _side_fields(rng: np.random.Generator, n: int,
                 spec: Tuple[Tuple[str, int], ...]) -> Tuple[Field, ...]:
    return tuple(Field(name, rng.integers(1, v + 1, size=(n, 1)), v + 1) for name, v in spec)


def _side_vectors(rng: np.random.Generator, fields: Tuple[Field, ...],
                  dim: int) -> np.ndarray:
    """``[n, dim]``: the sum over an entity's fields of a random vector per field value."""
    return sum(rng.normal(size=(f.vocab, dim))[f.ids[:, 0]] for f in fields)


def _standardise(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / max(x.std(), 1e-12)


def exposure_propensity(activity: np.ndarray, weight: np.ndarray,
                        per_user: float) -> np.ndarray:
    """``p_ui = min(1, c * activity_u * weight_i)`` with ``c`` set (bisection) so that the
    expected number of shown items per user is ``per_user``: ``[n_users, n_items]``."""
    base = activity[:, None] * weight[None, :]
    target = per_user * len(activity)
    lo, hi = 0.0, 1.0
    while np.minimum(1.0, hi * base).sum() < target:
        hi *= 2.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if np.minimum(1.0, mid * base).sum() < target else (lo, mid)
    return np.minimum(1.0, hi * base)


def _draw_lists(rng: np.random.Generator, weights: np.ndarray, k: int,
                rating: np.ndarray) -> EvalSet:
    """Per user, ``k`` distinct items drawn with probability proportional to ``weights``
    (``[n_users, n_items]``, 0 = excluded), labelled ``rating - 1``."""
    n_users = weights.shape[0]
    items = np.stack([rng.choice(weights.shape[1], k, replace=False, p=w / w.sum())
                      for w in weights])
    users = np.arange(n_users)
    return EvalSet(users, items, rating[users[:, None], items] - 1,
                   np.ones((n_users, k), dtype=bool))


def simulate(cfg: SimConfig) -> Tuple[RatingData, SimWorld]:
    """Draws the world of ``cfg`` and its log.

    * Side fields: ``USER_SIDE`` and ``ITEM_SIDE``, uniform categories; atoms: the ids.
    * Relevance: ``sqrt(side_share) * S + sqrt(1 - side_share) * A`` with ``S`` (side user
      vector . side item vector + a side item quality) and ``A`` (user atom vector . item
      atom vector + an item atom quality), each standardised over all pairs.
    * Ratings: ``relevance + noise * N(0, 1)`` cut at the quantiles that give
      ``RATING_SHARES`` over all pairs.
    * Exposure: ``exposure_propensity`` with Zipf weights over a random item ranking and
      log-normal user activity; each pair is logged independently with its propensity,
      which is kept for every logged pair (``RatingData.train_propensity``).
    * Tests (``test_per_user`` unlogged items per user): ``uniform`` draws them uniformly,
      ``logged`` with probability proportional to the propensity (a second log of the same
      system); the uniform lists of ``valid_fraction`` of the users form ``valid`` (tuning
      only) and those users are left out of both tests.

    Returns:
        (the log and its evaluation lists, the truth).
    """
    rng = np.random.default_rng(cfg.seed)
    u_side = _side_fields(rng, cfg.n_users, USER_SIDE)
    i_side = _side_fields(rng, cfg.n_items, ITEM_SIDE)
    k = cfg.factor_dim
    side = (_side_vectors(rng, u_side, k) @ _side_vectors(rng, i_side, k).T / np.sqrt(k)
            + _side_vectors(rng, i_side, 1).T)
    atom = (rng.normal(size=(cfg.n_users, k)) @ rng.normal(size=(cfg.n_items, k)).T
            / np.sqrt(k) + rng.normal(size=(1, cfg.n_items)))
    relevance = _standardise(np.sqrt(cfg.side_share) * _standardise(side)
                             + np.sqrt(1.0 - cfg.side_share) * _standardise(atom))
    latent = relevance + cfg.noise * rng.normal(size=relevance.shape)
    cuts = np.quantile(latent, np.cumsum(RATING_SHARES)[:-1])
    rating = (1 + np.searchsorted(cuts, latent, side="right")).astype(np.int64)

    popularity = np.empty(cfg.n_items)
    popularity[rng.permutation(cfg.n_items)] = np.arange(1, cfg.n_items + 1, dtype=np.float64)
    weight = popularity ** -cfg.popularity_skew
    activity = np.exp(cfg.activity_spread * rng.normal(size=cfg.n_users))
    propensity = exposure_propensity(activity / activity.mean(), weight, cfg.logged_per_user)
    logged = rng.random(propensity.shape) < propensity

    unlogged = ~logged
    if (unlogged.sum(1) < cfg.test_per_user).any():
        raise ValueError("a user was shown too many items to draw its test lists: lower "
                         "logged_per_user or raise n_items")
    uniform = _draw_lists(rng, unlogged.astype(np.float64), cfg.test_per_user, rating)
    biased = _draw_lists(rng, np.where(unlogged, propensity, 0.0) + 1e-12 * unlogged,
                         cfg.test_per_user, rating)
    valid, uniform_test = split_users(uniform, cfg.valid_fraction, cfg.seed)
    biased_test = biased.subset(np.setdiff1d(np.arange(cfg.n_users), valid.users))
    u, i = np.nonzero(logged)
    data = RatingData(EntityTable((id_field(cfg.n_users),), u_side),
                      EntityTable((id_field(cfg.n_items),), i_side),
                      u.astype(np.int64), i.astype(np.int64), rating[u, i].astype(np.float32),
                      propensity[u, i], {"valid": valid, "test": uniform_test,
                                         "test_logged": biased_test})
    return data, SimWorld(relevance, rating, propensity, logged)
