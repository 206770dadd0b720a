"""Where the planted signals sit: which fids carry them, the local time zone, their scales and
the storage order of histories (``--variant``).

A modelling choice tuned on the default demo data may fit that data rather than the problem:
the other variants move every planted signal to other fids, another time zone and other
scales, and store histories in another order, so that the choice can be checked on data it
was not tuned on. Every variant keeps the layout (the same schema.json and columns), the
effect names of the truth sidecar (``effect_capture`` works unchanged) and the meaning of each
effect; only where and how strongly it shows differs. The truth sidecar's
``category_<column>`` / ``type_<column>`` keys name the columns each variant links.

``default``
    fids: user segment 1, age 48, gender 49; item category 5, sub-category 6, leaf 7 and 12,
    author 8, type 13; engagement lists 62 item types (the pair effect: the fid-62 value of
    the target's type), 63 categories, 64 generic, 65 sub-categories, 66 leaves; taste
    embedding 61, profile embedding 87; history category columns (online schema) seq_a 42,
    seq_b 68, seq_c 28, seq_d 24. Time: UTC+8 (``--time_zone_offset_hours 8``). Scales:
    shares 0.20 / 0.22 / 0.10 / 0.15 / 0.15 / 0.08 / 0.10 (base, abs_time, activity,
    pair_62_66, seq_affinity, user_x_item, dense_dot), positive rate 0.096, oracle AUC 0.83,
    engagement values median ~150-200, embeddings in about [-0.7, 0.7]. Histories oldest first.
``west``
    fids: user segment 108, age 52, gender 92; item category 10, sub-category 8, leaf 7,
    author 12, type 9 (item 5, 6, 13 carry no signal); engagement lists 62 generic, 63
    categories, 64 item types (the pair effect: the fid-64 value of the target's type), 65
    sub-categories, 66 leaves; taste embedding 87, profile embedding 61; history category
    columns seq_a 43, seq_b 75, seq_c 30, seq_d 18. Time: UTC-5
    (``--time_zone_offset_hours -5``). Scales: shares 0.15 / 0.12 / 0.13 / 0.25 / 0.20 / 0.05
    / 0.10, positive rate 0.04, oracle AUC 0.80, engagement values median ~3,400,
    embeddings x4 (about [-2.7, 2.7]). Histories newest first.
``utc``
    fids: user segment 59, age 51, gender 58; item category 8, sub-category 5, leaf 6, author
    12, type 10 (item 7, 9, 13 carry no signal); engagement lists as default, but the pair
    effect is the fid-63 value of the target's category; taste embedding 61, profile
    embedding 87; history category columns seq_a 45, seq_b 77, seq_c 35, seq_d 19. Time: UTC
    (``--time_zone_offset_hours 0``). Scales: shares 0.28 / 0.08 / 0.06 / 0.12 / 0.22 / 0.14 /
    0.10, positive rate 0.15, oracle AUC 0.86, engagement values median ~15 (a fifth at the
    floor 1), embeddings x0.25. Histories unordered (``--seq_keep recent`` sorts them).

Model flags that name fids: ``--use_pair_62_66`` pools every list 62-66, so it fits all three;
``--time_zone_offset_hours`` must be the variant's zone; decoupling's
``--decouple_item_side_fids`` (default 5,6,7,11: the default's category, sub-category and leaf
plus the tag list) would be 10,8,7,11 for ``west`` and 8,5,6,11 for ``utc``; an
``ns_groups.json`` written for the default fids does not move with the signals.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

# What the ids of an engagement list stand for.
TYPE = "type"
CATEGORY = "category"
GENERIC = "generic"
SUB_CATEGORY = "sub_category"
LEAF = "leaf"

EVENT_ORDERS = ("newest_first", "oldest_first", "unordered")
# 2026-03-05 00:00 UTC: the training split ends at this date's local midnight.
TRAIN_END_DATE_UTC = 1772668800


@dataclass(frozen=True)
class Links:
    """Which column carries which latent attribute (fids); everything else is generic.

    Attributes:
        segment, age, gender: user int scalars.
        engagement: user int list fid -> what its ids stand for (``TYPE``, ``CATEGORY``, ...);
            a list declared in user_dense too gets each id's engagement value there.
        pair_fid: the engagement list whose value of the target's entity is the pair effect.
        item_category, item_sub_category, item_leaf, item_author, item_type, item_key: item
            int scalars (item_key: the item id itself).
        taste_embedding: user dense fid projecting the taste vector (dense_dot effect).
        profile_embedding: user dense fid projecting taste, segment and activity.
        seq_category_rank: which history column holds the event's category: the k-th
            narrowest (declared vocabulary) of those wider than the category count.
    """
    segment: int = 1
    age: int = 48
    gender: int = 49
    engagement: Tuple[Tuple[int, str], ...] = (
        (62, TYPE), (63, CATEGORY), (64, GENERIC), (65, SUB_CATEGORY), (66, LEAF))
    pair_fid: int = 62
    item_category: int = 5
    item_sub_category: int = 6
    item_leaf: Tuple[int, ...] = (7, 12)
    item_author: int = 8
    item_type: int = 13
    item_key: int = 16
    taste_embedding: int = 61
    profile_embedding: int = 87
    seq_category_rank: int = 0

    def list_of(self, entity: str) -> Optional[int]:
        """The engagement-list fid whose ids stand for ``entity`` (None when none does)."""
        return next((fid for fid, e in self.engagement if e == entity), None)

    @property
    def pair_entity(self) -> str:
        return dict(self.engagement)[self.pair_fid]


@dataclass(frozen=True)
class Variant:
    """Where the planted signals sit and how strong they are (module docstring).

    Attributes:
        name: the ``--variant`` value.
        links: the fids that carry the signals.
        tz_hours: the local time zone of traffic, history rhythm and the abs_time effect.
        event_order: storage order of the events inside each history list.
        shares: target share of each effect, in ``pcvr.demo.effects.EFFECTS`` order (sum 1).
        pos_rate, oracle_auc: calibration targets.
        pair_log_mean: mean of log(engagement value) (5.0: median ~150).
        embed_scale: factor on the fixed-width user dense embeddings.
    """
    name: str
    links: Links
    tz_hours: int
    event_order: str
    shares: Tuple[float, ...]
    pos_rate: float
    oracle_auc: float
    pair_log_mean: float
    embed_scale: float

    @property
    def tz_offset_s(self) -> int:
        return self.tz_hours * 3600

    @property
    def train_end(self) -> int:
        """Unix time of the local midnight that ends the training split (a Thursday)."""
        return TRAIN_END_DATE_UTC - self.tz_offset_s

    def describe(self) -> str:
        """One line: the fids, time zone and scales that a user's flags must fit."""
        lk = self.links
        return (f"variant {self.name}: UTC{self.tz_hours:+d} (--time_zone_offset_hours "
                f"{self.tz_hours}), user segment/age/gender {lk.segment}/{lk.age}/{lk.gender}, "
                f"item category/sub/type {lk.item_category}/{lk.item_sub_category}/"
                f"{lk.item_type}, pair fid {lk.pair_fid} ({lk.pair_entity}), embeddings "
                f"taste {lk.taste_embedding} profile {lk.profile_embedding}, histories "
                f"{self.event_order}, positive rate {self.pos_rate}, oracle AUC "
                f"{self.oracle_auc}")


VARIANTS: Dict[str, Variant] = {v.name: v for v in (
    Variant("default", Links(), tz_hours=8, event_order="oldest_first",
            shares=(0.20, 0.22, 0.10, 0.15, 0.15, 0.08, 0.10), pos_rate=0.096,
            oracle_auc=0.83, pair_log_mean=5.0, embed_scale=1.0),
    Variant("west", Links(
        segment=108, age=52, gender=92,
        engagement=((62, GENERIC), (63, CATEGORY), (64, TYPE), (65, SUB_CATEGORY),
                    (66, LEAF)),
        pair_fid=64, item_category=10, item_sub_category=8, item_leaf=(7,), item_author=12,
        item_type=9, taste_embedding=87, profile_embedding=61, seq_category_rank=1),
        tz_hours=-5, event_order="newest_first",
        shares=(0.15, 0.12, 0.13, 0.25, 0.20, 0.05, 0.10), pos_rate=0.04, oracle_auc=0.80,
        pair_log_mean=8.0, embed_scale=4.0),
    Variant("utc", Links(
        segment=59, age=51, gender=58, pair_fid=63, item_category=8, item_sub_category=5,
        item_leaf=(6,), item_author=12, item_type=10, seq_category_rank=2),
        tz_hours=0, event_order="unordered",
        shares=(0.28, 0.08, 0.06, 0.12, 0.22, 0.14, 0.10), pos_rate=0.15, oracle_auc=0.86,
        pair_log_mean=2.0, embed_scale=0.25),
)}
DEFAULT_VARIANT = "default"
