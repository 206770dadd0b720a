"""Rows: who sees which target item, when, and with which history.

Every row draws a request time (quiet nights, a lunch bump and an evening peak, in the
variant's local time: UTC+8 by default), a person (active persons visit more), an "intent"
category from the person's taste, a target item (40 % from the intent category, else by
popularity) and, per domain, a history whose length is exponential-like (means at scale 1.0:
a/b ~300, c ~520 (p95 ~1,650), d ~2,400 (p95 4,000), capped at 4,000 x scale; at the default
0.04 a/b ~12, c ~20, d ~100, capped at 160). About a fifth of the events fall in the last five
days and lean towards the intent category; older events keep the daily rhythm. Rows of one
person draw their histories independently.

Exposure (``Exposure``): which target items a split shows never changes a row's true
probability, only which (row, item) pairs appear. Besides the natural draw above, a split can
over-show popular items (every item's probability times popularity^S, renormalised per row:
the Zipf exponent of popularity goes from 1.1 to 1.1 (1 + S)), or show items uniformly at
random (missing completely at random). The 1 % most popular items take 38 % of the rows
naturally, 59 % at S = 0.25, 74 % at S = 0.5, 92 % at S = 1 and 1 % when uniform. Both record
each row's propensity: the probability with which the split showed the row's item.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

from pcvr.demo.sampling import categorical, lengths_to_offsets
from pcvr.demo.variants import Variant
from pcvr.demo.world import N_CATEGORIES, N_ITEMS, TASTE_TABLE, Items, World

# Time: the training split covers 14 local days before the variant's ``train_end`` (local
# midnight, a Thursday), the held-out split the 3 days after it (like the platform's later
# test set).
DAY_S = 86400
TRAIN_DAYS = 14
EVAL_DAYS = 3
# Relative traffic per local hour: quiet nights, a lunch bump and an evening peak.
TRAFFIC_BY_HOUR = np.array([
    2.0, 1.2, 0.7, 0.5, 0.4, 0.5, 1.0, 2.0, 3.0, 3.5, 3.8, 4.2,
    4.8, 4.5, 4.0, 4.0, 4.2, 4.6, 5.2, 6.0, 6.6, 6.8, 5.8, 3.8])
INTENT_TARGET_RATE = 0.4        # targets drawn from the row's intent category
INTENT_EVENT_RATE = 0.6         # recent events in the intent category
RECENT_WINDOW_S = 5 * DAY_S
RECENT_MEAN_AGE_S = 1.2 * DAY_S
OLD_MAX_AGE_S = 365 * DAY_S


@dataclass(frozen=True)
class Exposure:
    """Which target items a split shows (module docstring).

    Attributes:
        bias: None = the natural draw, no propensities recorded; S >= 0 = the natural
            probabilities times popularity^S, renormalised per row.
        uniform: every catalogue item equally likely, whoever the person (``bias`` ignored).
    """
    bias: Optional[float] = None
    uniform: bool = False

    def describe(self) -> str:
        if self.uniform:
            return "uniform"
        return "natural" if self.bias is None else f"popularity bias {self.bias:g}"


NATURAL = Exposure()


@dataclass
class Rows:
    """Per row [N]: request time, person, intent category, target item (latent indices) and,
    unless the exposure is natural, the probability with which the split showed that item."""
    ts: np.ndarray
    person: np.ndarray
    intent: np.ndarray
    item: np.ndarray
    propensity: Optional[np.ndarray] = None

    def slice(self, lo: int, hi: int) -> "Rows":
        return Rows(self.ts[lo:hi], self.person[lo:hi], self.intent[lo:hi], self.item[lo:hi],
                    None if self.propensity is None else self.propensity[lo:hi])


@dataclass
class History:
    """One domain's events, flat in row order: offsets [N + 1], then per event its owning row,
    timestamp, age (request time - event time, seconds) and latent category."""
    offsets: np.ndarray
    row: np.ndarray
    ts: np.ndarray
    age: np.ndarray
    cat: np.ndarray


def train_start(variant: Variant) -> int:
    """Unix time at which the training split's first local day begins."""
    return variant.train_end - TRAIN_DAYS * DAY_S


def _local_hours(rng: np.random.Generator, n: int) -> np.ndarray:
    return categorical(rng, np.cumsum(TRAFFIC_BY_HOUR) / TRAFFIC_BY_HOUR.sum(), n)


def _biased_items(rng: np.random.Generator, it: Items, intent: np.ndarray, bias: float
                  ) -> Tuple[np.ndarray, np.ndarray]:
    """(item, propensity) per row: the natural draw with every item's probability times
    popularity^bias, renormalised per row; the same random draws as the natural one."""
    n = intent.size
    w = it.pop ** (1.0 + bias)                     # natural weight pop_i, tilted by pop_i^bias
    pop_c = np.bincount(it.cat, weights=it.pop, minlength=N_CATEGORIES)
    w_c = np.bincount(it.cat, weights=w, minlength=N_CATEGORIES)
    # Mass of each branch after tilting: intent category (per category) and global.
    mass_intent = INTENT_TARGET_RATE * w_c / pop_c
    mass_global = (1.0 - INTENT_TARGET_RATE) * w.sum()
    from_intent = rng.random(n) < (mass_intent / (mass_intent + mass_global))[intent]
    sorted_cat = it.cat[it.by_cat]
    within = np.cumsum(w[it.by_cat]) - np.r_[0.0, np.cumsum(w_c)][sorted_cat]
    pos = np.searchsorted(sorted_cat + within / w_c[sorted_cat], intent + rng.random(n))
    in_cat = it.by_cat[np.minimum(pos, N_ITEMS - 1)]
    item = np.where(from_intent, in_cat, categorical(rng, np.cumsum(w) / w.sum(), n))
    same = it.cat[item] == intent
    propensity = ((INTENT_TARGET_RATE * same * w[item] / pop_c[intent]
                   + (1.0 - INTENT_TARGET_RATE) * w[item])
                  / (mass_intent[intent] + mass_global))
    return item, propensity


def draw_rows(world: World, rng: np.random.Generator, n: int, start: int, days: int,
              exposure: Exposure = NATURAL) -> Rows:
    """``n`` requests in ``days`` local days from ``start`` (sorted by time) and their targets,
    shown as ``exposure`` says."""
    ts = (start + rng.integers(0, days, n) * DAY_S + _local_hours(rng, n) * 3600
          + rng.integers(0, 3600, n))
    ts.sort()
    p = world.persons
    person = categorical(rng, p.visit_cum, n)
    intent = p.taste_table[person, rng.integers(0, TASTE_TABLE, n)]
    ts = ts.astype(np.int64)
    it = world.items
    if exposure.uniform:
        return Rows(ts, person, intent, rng.integers(0, N_ITEMS, n), np.full(n, 1.0 / N_ITEMS))
    if exposure.bias is not None:
        return Rows(ts, person, intent, *_biased_items(rng, it, intent, exposure.bias))
    from_intent = rng.random(n) < INTENT_TARGET_RATE
    pos = np.searchsorted(it.by_cat_cum, intent + rng.random(n))
    in_cat = it.by_cat[np.minimum(pos, N_ITEMS - 1)]
    item = np.where(from_intent, in_cat, categorical(rng, it.pop_cum, n))
    return Rows(ts, person, intent, item)


def draw_histories(world: World, rng: np.random.Generator, rows: Rows) -> List[History]:
    """Per domain: lengths, event times (a fifth in the last 5 days) and categories."""
    n = rows.ts.size
    tz_s = world.variant.tz_offset_s
    recent_rate = rng.beta(0.8, 3.2, n)            # the row's recent burst, all domains
    out = []
    for dom in world.domains:
        raw = dom.mean_len * world.persons.activity[rows.person] * rng.exponential(1.0, n)
        lengths = np.minimum(raw.astype(np.int64), dom.cap)
        row = np.repeat(np.arange(n), lengths)
        recent = rng.random(row.size) < recent_rate[row]
        u = rng.random(row.size)
        recent_age = np.ceil(-RECENT_MEAN_AGE_S * np.log1p(
            -u * (1.0 - math.exp(-RECENT_WINDOW_S / RECENT_MEAN_AGE_S))))
        old_age = RECENT_WINDOW_S * np.exp(u * math.log(OLD_MAX_AGE_S / RECENT_WINDOW_S))
        age = np.maximum(np.where(recent, recent_age, old_age), 1).astype(np.int64)
        ts = rows.ts[row] - age
        # Events older than a day move to a time of day drawn from the traffic profile (same
        # local day), so that event hours follow the daily rhythm too.
        old = np.flatnonzero(age > DAY_S)
        local_day = (ts[old] + tz_s) // DAY_S
        ts[old] = (local_day * DAY_S - tz_s + _local_hours(rng, old.size) * 3600
                   + rng.integers(0, 3600, old.size))
        person = rows.person[row]
        taste_cat = world.persons.taste_table[person, rng.integers(0, TASTE_TABLE, row.size)]
        intent = recent & (rng.random(row.size) < INTENT_EVENT_RATE)
        cat = np.where(intent, rows.intent[row], taste_cat)
        out.append(History(lengths_to_offsets(lengths), row, ts, rows.ts[row] - ts, cat))
    return out


def local_hour_dow(ts: np.ndarray, tz_offset_s: int) -> Tuple[np.ndarray, np.ndarray]:
    """Hour and day of week (Monday = 0) at UTC + ``tz_offset_s``, as the pipeline derives
    them."""
    t = ts + tz_offset_s
    return (t // 3600) % 24, (t // DAY_S + 3) % 7
