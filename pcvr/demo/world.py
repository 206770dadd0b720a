"""The generative world, fixed by the seed and shared by every split: items, persons and the
item universe of each history domain, with the columns through which they are seen.

50,000 persons and 8,000 items. An item has a category (24, item fid 5), sub-category (96,
fid 6), leaf (384, fids 7 and 12), author (fid 8), type (8, fid 13) and a 4-d latent vector =
its category's vector + small noise. A person has a segment (user fid 1), age (48), gender
(49), a 4-d taste vector (visible through the dense embeddings 61 and 87 and through the
categories of its histories), an activity level, and engagement lists 62-66 whose ids stand
for item types (62), categories (63), generic entities (64), sub-categories (65) and leaves
(66), each id paired with a lognormal engagement value (median ~150, tail to ~1e7) and sorted
by it. A history domain's side columns are the event's category, an item id, attributes of
that item, or per-event enums (action types): roles given by the declared vocabulary sizes.
Rows of one person share its user features. The fids above are the default variant's: which
column carries which latent attribute is the variant's ``Links`` (``pcvr.demo.variants``), the
generator's own knowledge of the fids the planted effects read.

Missing values: nulls and -1 codes in user scalars (101/102/103 about 90 % null), item
83/84/85 about 88 % null, item 11 about 50 % null, a few null lists and embeddings. With a
small vocabulary cap, latent entities share ids (modulo).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Tuple

import numpy as np

from pcvr.demo.layout import DemoLayout
from pcvr.demo.sampling import IdMap, Ragged, categorical, matmul, power_index
from pcvr.demo.variants import CATEGORY, GENERIC, LEAF, TYPE, Links, Variant
from pcvr.schema import PAIRED, FeatureLayout, SeqDomainSpec

N_PERSONS = 50000
N_ITEMS = 8000
N_CATEGORIES = 24
SUBCATS_PER_CATEGORY = 4
LEAVES_PER_SUBCAT = 4
N_AUTHORS = 1200
N_ITEM_TYPES = 8
N_SEGMENTS = 5
CATEGORY_GROUPS = 4            # user_x_item acts on groups of categories (category % 4)
EMBED_NOISE_DIM = 16
N_GENERIC_ENTITIES = 50         # entities behind user fid 64
N_TAGS_PER_CATEGORY = 800       # item fid 11
LATENT_DIM = 4
TASTE_TABLE = 64                # quantile table per person for fast category draws
# Pair values: log(value) = variant's mean + taste * z(score of the entity) + noise * N(0, 1).
PAIR_LOG_TASTE, PAIR_LOG_NOISE = 0.8, 3.5

# Histories: per domain (raw mean length at scale 1.0, personal item slots per category,
# share of events on the domain's popular items). Few slots and few popular events make the
# heavy repeats of the real data (repeat rates a 0.25, b 0.95, c 0.98, d 0.99). Unknown
# domains of a custom schema get SEQ_DEFAULT_PROFILE.
SEQ_PROFILES = {"seq_a": (300.0, 400, 0.5), "seq_b": (300.0, 4, 0.05),
                "seq_c": (500.0, 3, 0.03), "seq_d": (3500.0, 2, 0.01)}
SEQ_DEFAULT_PROFILE = (300.0, 50, 0.3)
SEQ_LEN_CAP = 4000              # at scale 1.0
SEQ_ITEMS_PER_CATEGORY = 2000   # item universe of a domain = categories x this
ENUM_MAX_VOCAB = 64             # side columns this small are per-event enums

# Columns that are mostly null in the real data (competition_data_facts).
SPARSE_USER_FIDS = (101, 102, 103)
SPARSE_ITEM_FIDS = (83, 84, 85)

# Mean length of the engagement lists (user int fids 62-66) before the activity factor.
ENGAGEMENT_MEAN_LEN = {62: 4.0, 63: 4.0, 64: 6.0, 65: 12.0, 66: 16.0}


def check_links(layout: FeatureLayout, links: Links) -> None:
    """Raises ValueError naming the fids that the planted effects need and the schema lacks."""
    need = {"user_int": (links.segment, links.age, links.gender, links.pair_fid,
                         links.list_of(CATEGORY), links.list_of(TYPE)),
            "user_dense": (links.taste_embedding, links.profile_embedding, links.pair_fid),
            "item_int": (links.item_category, links.item_sub_category, links.item_type)}
    missing = []
    for group, fids in need.items():
        have = {s.fid for s in getattr(layout, group)}
        missing += [f"{group} {fid}" for fid in dict.fromkeys(fids) if fid not in have]
    if missing or not layout.seq:
        raise ValueError(f"the planted effects need fids missing from the schema: {missing} "
                         f"(and at least one sequence domain)")


@dataclass
class Items:
    """The target-item catalogue (latent indices 0..N_ITEMS-1)."""
    cat: np.ndarray
    sub: np.ndarray
    itype: np.ndarray
    latent: np.ndarray              # [N_ITEMS, LATENT_DIM]
    key: np.ndarray                 # the item_id column
    pop: np.ndarray                 # [N_ITEMS] global popularity (sums to 1)
    pop_cum: np.ndarray             # global popularity, cumulative
    by_cat: np.ndarray              # item indices sorted by category
    by_cat_cum: np.ndarray          # category + within-category cumulative popularity
    scalars: Dict[int, Tuple[np.ndarray, np.ndarray]]   # fid -> (ids, null)
    lists: Dict[int, Ragged]


@dataclass
class Embedding:
    """A fixed-width user dense fid: values = clip(person inputs @ proj), 1/256 resolution."""
    proj: np.ndarray
    low: float
    high: float
    null: np.ndarray

    def rows(self, inputs: np.ndarray) -> np.ndarray:
        """[N, inputs] person inputs -> [N, dim] float32 values."""
        values = np.clip(matmul(inputs, self.proj), self.low, self.high)
        return np.round(values * 256.0) / 256.0     # coarse enough for parquet to compress


@dataclass
class Persons:
    """The user pool (latent indices 0..N_PERSONS-1)."""
    segment: np.ndarray
    age: np.ndarray
    gender: np.ndarray
    taste_table: np.ndarray         # [P, TASTE_TABLE] category quantiles
    activity: np.ndarray
    visit_cum: np.ndarray
    latent: np.ndarray              # [P, LATENT_DIM]
    pair_w: np.ndarray              # [P, entities] sqrt(log1p(value)) of the pair list, 0 = absent
    scalars: Dict[int, Tuple[np.ndarray, np.ndarray]]
    lists: Dict[int, Ragged]        # int lists, with aligned dense values where they exist
    embed_inputs: np.ndarray        # [P, inputs] behind the fixed-width dense fids
    embeddings: Dict[int, Embedding]


@dataclass
class Domain:
    """One history domain: column roles and the attributes of its item universe."""
    spec: SeqDomainSpec
    mean_len: float                 # after the length scale
    cap: int
    slots: int
    popular_rate: float
    item_fid: int
    cat_fid: int
    cat_map: IdMap
    enums: Dict[int, np.ndarray]    # fid -> cumulative distribution over ids 1..vocab-1
    attrs: Dict[int, np.ndarray]    # fid -> id per universe item (item-id column included)


@dataclass
class World:
    layout: DemoLayout
    variant: Variant
    seed: int
    items: Items
    persons: Persons
    domains: List[Domain]
    tables: Dict[str, np.ndarray]
    maps: Dict[str, IdMap]           # 'item_<fid>' / 'user_<fid>' -> the map of a linked column

    def link_ids(self) -> Dict[str, np.ndarray]:
        """The id that encodes each latent category / item type (array index) in every column
        that an effect links, e.g. ``category_item_int_5`` and ``category_domain_a_seq_42``."""
        cats, types = np.arange(N_CATEGORIES), np.arange(N_ITEM_TYPES)
        lk = self.variant.links
        out = {f"category_item_int_{lk.item_category}":
               self.maps[f"item_{lk.item_category}"](cats),
               f"category_user_int_{lk.list_of(CATEGORY)}":
               self.maps[f"user_{lk.list_of(CATEGORY)}"](cats),
               f"type_item_int_{lk.item_type}": self.maps[f"item_{lk.item_type}"](types),
               f"type_user_int_{lk.list_of(TYPE)}": self.maps[f"user_{lk.list_of(TYPE)}"](types)}
        for dom in self.domains:
            out[f"category_{dom.spec.prefix}_{dom.cat_fid}"] = dom.cat_map(cats)
        return out


def _id_scalar(rng: np.random.Generator, vocab: int, n: int) -> np.ndarray:
    """Skewed ids of a generic categorical column (small vocabs: random probabilities)."""
    m = max(vocab - 1, 0)
    if m == 0:
        return np.zeros(n, dtype=np.int64)
    if m <= 8:
        return 1 + categorical(rng, np.cumsum(rng.dirichlet(np.full(m, 1.0))), n)
    return IdMap.make(rng, vocab)(power_index(rng, m, n, rng.uniform(1.5, 4.0)))


def _null_mask(rng: np.random.Generator, n: int, rate: float) -> np.ndarray:
    return rng.random(n) < rate


def _generic_list(rng: np.random.Generator, n: int, vocab: int, dim: int, mean_len: float,
                  null_rate: float) -> Ragged:
    """Multi-hot lists of distinct skewed ids, at most ``dim`` long."""
    null = _null_mask(rng, n, null_rate)
    lengths = np.where(null, 0, np.minimum(rng.poisson(mean_len, n), dim))
    rows = np.repeat(np.arange(n), lengths)
    ids = _id_scalar(rng, vocab, rows.size)
    order = np.lexsort((ids, rows))
    rows, ids = rows[order], ids[order]
    keep = np.ones(ids.size, dtype=bool)
    keep[1:] = (rows[1:] != rows[:-1]) | (ids[1:] != ids[:-1])
    return Ragged.from_lengths(np.bincount(rows[keep], minlength=n), ids[keep], null)


def _entity_lists(rng: np.random.Generator, scores: np.ndarray, mean_len: np.ndarray,
                  dim: int, null: np.ndarray, log_mean: float
                  ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-person engagement lists: the top entities by ``scores`` [P, K] + Gumbel noise.

    Returns (list lengths [P], entity, engagement value, owning person) per element, each list
    sorted by descending value; values are lognormal (median about exp(``log_mean``)), higher
    for the person's taste.
    """
    n, k = scores.shape
    lengths = np.where(null, 0, np.minimum(rng.poisson(mean_len), min(dim, k)))
    top = max(int(lengths.max()), 1)
    noisy = scores - np.log(-np.log(rng.random((n, k), dtype=np.float32) + 1e-12))
    best = np.argpartition(-noisy, top - 1, axis=1)[:, :top]      # the top entities, unsorted
    entity = best[np.arange(top)[None, :] < lengths[:, None]]
    owner = np.repeat(np.arange(n), lengths)
    z = (scores - scores.mean()) / (scores.std() + 1e-9)
    log_w = log_mean + PAIR_LOG_TASTE * z[owner, entity] \
        + PAIR_LOG_NOISE * rng.standard_normal(owner.size)
    values = np.exp(np.clip(log_w, 0.0, math.log(5e7))).astype(np.float32)
    by_value = np.lexsort((-values, owner))
    return lengths, entity[by_value], values[by_value], owner


def _build_items(rng: np.random.Generator, layout: FeatureLayout, links: Links,
                 cat_z: np.ndarray, maps: Dict[str, IdMap]) -> Items:
    n = N_ITEMS
    cat_weights = rng.dirichlet(np.full(N_CATEGORIES, 3.0))
    cat = categorical(rng, np.cumsum(cat_weights), n)
    sub = cat * SUBCATS_PER_CATEGORY + rng.integers(0, SUBCATS_PER_CATEGORY, n)
    leaf = sub * LEAVES_PER_SUBCAT + power_index(rng, LEAVES_PER_SUBCAT, n, 1.5)
    author = cat + N_CATEGORIES * power_index(rng, N_AUTHORS // N_CATEGORIES, n, 2.0)
    itype = (cat + power_index(rng, N_ITEM_TYPES, n, 2.5)) % N_ITEM_TYPES
    latent = cat_z[cat] + 0.2 * rng.standard_normal((n, LATENT_DIM))
    pop = (np.arange(n) + 10.0) ** -1.1
    pop = pop[rng.permutation(n)]
    by_cat = np.lexsort((np.arange(n), cat))
    cum_within = np.empty(n)
    for c in range(N_CATEGORIES):       # 24 iterations over the catalogue, not over rows
        members = by_cat[cat[by_cat] == c]
        cum_within[cat[by_cat] == c] = np.cumsum(pop[members]) / pop[members].sum()
    key = IdMap.make(rng, 2 ** 31)(np.arange(n))

    scalars: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}
    lists: Dict[int, Ragged] = {}
    latent_of = {links.item_category: cat, links.item_sub_category: sub,
                 links.item_author: author, links.item_type: itype,
                 links.item_key: np.arange(n)}
    latent_of.update({fid: leaf for fid in links.item_leaf})
    for spec in layout.item_int:
        fid, vocab, dim = spec.fid, spec.vocab_size, spec.length
        if dim > 1:
            # Tag lists: tags of the item's category, about half of the items have none.
            null = _null_mask(rng, n, 0.5)
            lengths = np.where(null, 0, np.minimum(1 + rng.poisson(4.0, n), dim))
            owner = np.repeat(np.arange(n), lengths)
            tags = cat[owner] * N_TAGS_PER_CATEGORY + power_index(
                rng, N_TAGS_PER_CATEGORY, owner.size, 2.0)
            lists[fid] = Ragged.from_lengths(lengths, IdMap.make(rng, vocab)(tags), null)
            continue
        if fid in latent_of:
            maps[f"item_{fid}"] = IdMap.make(rng, vocab)
            ids = maps[f"item_{fid}"](latent_of[fid])
            null_rate = 0.0
        else:
            ids = _id_scalar(rng, vocab, n)
            null_rate = 0.88 if fid in SPARSE_ITEM_FIDS else rng.uniform(0.0, 0.02)
        scalars[fid] = (ids, _null_mask(rng, n, null_rate))
    return Items(cat, sub, itype, latent, key, pop / pop.sum(), np.cumsum(pop) / pop.sum(),
                 by_cat, cat[by_cat] + cum_within, scalars, lists)


def _taste_table(taste: np.ndarray) -> np.ndarray:
    """[P, TASTE_TABLE] category quantiles of each person's softmax(taste) distribution."""
    n = taste.shape[0]
    prob = np.exp(taste - taste.max(axis=1, keepdims=True))
    cum = np.cumsum(prob / prob.sum(axis=1, keepdims=True), axis=1)
    cum[:, -1] = 1.0
    # Row p's quantiles searched in its own cumulative distribution, all rows at once.
    shift = 2.0 * np.arange(n)[:, None]
    quantiles = (np.arange(TASTE_TABLE) + 0.5) / TASTE_TABLE
    return (np.searchsorted((cum + shift).ravel(), (quantiles + shift).ravel())
            .reshape(n, TASTE_TABLE) - N_CATEGORIES * np.arange(n)[:, None])


def _entity_scores(rng: np.random.Generator, entity: str, taste: np.ndarray,
                   sub_taste: np.ndarray) -> np.ndarray:
    """[P, K] affinity of every person for every entity of a kind."""
    f32 = np.float32
    n = taste.shape[0]
    if entity == TYPE:
        return rng.standard_normal((n, N_ITEM_TYPES), dtype=f32)
    if entity == CATEGORY:
        return taste.astype(f32)
    if entity == GENERIC:
        return rng.standard_normal((n, N_GENERIC_ENTITIES), dtype=f32)
    # Sub-categories; a leaf list picks sub-categories here, then one leaf in each.
    return sub_taste + 0.7 * rng.standard_normal(sub_taste.shape, dtype=f32)


def _build_persons(rng: np.random.Generator, layout: FeatureLayout, variant: Variant,
                   cat_z: np.ndarray, maps: Dict[str, IdMap]) -> Persons:
    n = N_PERSONS
    links = variant.links
    segment = categorical(rng, np.cumsum([0.3, 0.25, 0.2, 0.15, 0.1]), n)
    age = np.clip(np.round(rng.normal(34.0, 11.0, n)), 16, 75).astype(np.int64)
    gender = rng.integers(0, 2, n)
    latent = rng.standard_normal((n, LATENT_DIM))
    taste = matmul(latent, cat_z.T) / 1.3
    taste_table = _taste_table(taste)
    activity = np.exp(rng.normal(0.0, 0.35, n) - 0.35 ** 2 / 2)
    visits = np.sqrt(activity)
    visit_cum = np.cumsum(visits) / visits.sum()

    scalars: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}
    lists: Dict[int, Ragged] = {}
    pair_w = np.zeros(0, dtype=np.float32)
    engaged_null = _null_mask(rng, n, 0.08)       # persons without engagement lists
    f32 = np.float32
    sub_taste = np.repeat(taste.astype(f32), SUBCATS_PER_CATEGORY, axis=1)
    entity_of = dict(links.engagement)
    scores = {fid: _entity_scores(rng, entity, taste, sub_taste)
              for fid, entity in sorted(entity_of.items())}
    dense = {s.fid for s in layout.user_dense}
    latent_of = {links.segment: segment, links.age: age, links.gender: gender}
    for spec in layout.user_int:
        fid, vocab, dim = spec.fid, spec.vocab_size, spec.length
        if fid in entity_of:
            lengths, entity, values, owner = _entity_lists(
                rng, scores[fid], ENGAGEMENT_MEAN_LEN[fid] * activity ** 0.7, dim, engaged_null,
                variant.pair_log_mean)
            if entity_of[fid] == LEAF:
                entity = entity * LEAVES_PER_SUBCAT + rng.integers(0, LEAVES_PER_SUBCAT,
                                                                   entity.size)
            if fid == links.pair_fid:
                # Engagement on a sqrt-log scale, as the pair pooling weighs an id; 0 = absent.
                pair_w = np.zeros(scores[fid].shape, dtype=f32)
                pair_w[owner, entity] = np.sqrt(np.log1p(values))
            maps[f"user_{fid}"] = IdMap.make(rng, vocab)
            lists[fid] = Ragged.from_lengths(lengths, maps[f"user_{fid}"](entity), engaged_null,
                                             values if spec.kind == PAIRED else None)
        elif dim > 1 and fid in dense:
            # Aligned int + float lists (89-91): mostly full, a few short, some null.
            null = _null_mask(rng, n, 0.12)
            lengths = np.where(null, 0, np.where(rng.random(n) < 0.8, dim,
                                                 rng.integers(1, dim + 1, n)))
            total = int(lengths.sum())
            values = np.clip(rng.normal(0.0, 0.2, total), -0.6, 0.7).astype(f32)
            lists[fid] = Ragged.from_lengths(lengths, _id_scalar(rng, vocab, total), null,
                                             values)
        elif dim > 1:
            lists[fid] = _generic_list(rng, n, vocab, dim, min(6.0, dim / 2.0 + 0.5),
                                       rng.uniform(0.05, 0.25))
        elif fid in latent_of:
            if fid == links.age and vocab > int(age.max()):
                ids = age.copy()                  # the age itself, like a real age column
            else:
                maps[f"user_{fid}"] = IdMap.make(rng, vocab)
                ids = maps[f"user_{fid}"](latent_of[fid])
            ids[_null_mask(rng, n, 0.01 if fid == links.age else 0.0)] = -1
            scalars[fid] = (ids, np.zeros(n, dtype=bool))
        else:
            ids = _id_scalar(rng, vocab, n)
            if rng.random() < 0.5:
                ids[_null_mask(rng, n, rng.uniform(0.0, 0.03))] = -1
            null_rate = rng.uniform(0.88, 0.92) if fid in SPARSE_USER_FIDS \
                else rng.uniform(0.0, 0.03)
            scalars[fid] = (ids, _null_mask(rng, n, null_rate))

    inputs = np.concatenate([latent, np.eye(N_SEGMENTS)[segment], np.log(activity)[:, None],
                             rng.standard_normal((n, EMBED_NOISE_DIM))], axis=1).astype(f32)
    embeddings = _build_embeddings(rng, layout, variant, lists, inputs)
    return Persons(segment, age, gender, taste_table, activity, visit_cum, latent,
                   pair_w, scalars, lists, inputs, embeddings)


def _build_embeddings(rng: np.random.Generator, layout: FeatureLayout, variant: Variant,
                      lists: Mapping[int, Ragged], inputs: np.ndarray) -> Dict[int, Embedding]:
    """Fixed-width user dense fids, computed per row from a few person inputs: taste (4),
    segment (5), log activity (1) and a private noise vector (16). The taste embedding projects
    taste + noise, the profile embedding taste, segment, activity + noise; other fixed-width
    fids of a custom schema, noise. Values and bounds scale with the variant's
    ``embed_scale``."""
    links, scale = variant.links, variant.embed_scale
    f32 = np.float32
    n_profile = inputs.shape[1] - EMBED_NOISE_DIM
    noise_rows = slice(n_profile, None)
    embeddings: Dict[int, Embedding] = {}
    for spec in layout.user_dense:
        fid, dim = spec.fid, spec.length
        if fid in lists:
            continue
        proj = np.zeros((inputs.shape[1], dim), dtype=f32)
        if fid == links.taste_embedding:
            proj[:LATENT_DIM] = 0.025 * rng.standard_normal((LATENT_DIM, dim))
            proj[noise_rows] = 0.01 * rng.standard_normal((EMBED_NOISE_DIM, dim))
            low, high = -0.25, 0.2
        elif fid == links.profile_embedding:
            proj[:n_profile] = 0.05 * rng.standard_normal((n_profile, dim))
            proj[noise_rows] = 0.025 * rng.standard_normal((EMBED_NOISE_DIM, dim))
            low, high = -0.68, 0.68
        else:
            proj[noise_rows] = 0.025 * rng.standard_normal((EMBED_NOISE_DIM, dim))
            low, high = -1.0, 1.0
        embeddings[fid] = Embedding(scale * proj, scale * low, scale * high,
                                    _null_mask(rng, inputs.shape[0], 0.005))
    return embeddings


def _build_domain(rng: np.random.Generator, layout: DemoLayout, spec: SeqDomainSpec,
                  seq_len_scale: float, category_rank: int) -> Domain:
    """Gives the columns their roles by declared vocabulary size (the widest is the item id,
    the ``category_rank``-th narrowest of those wider than the category count is the category,
    the small ones are per-event enums) and draws the attributes of the domain's items."""
    mean_len, slots, popular_rate = SEQ_PROFILES.get(spec.name, SEQ_DEFAULT_PROFILE)
    side = [(s.fid, layout.declared[s.column], s.vocab_size) for s in spec.side]
    item_fid = max(side, key=lambda e: e[1])[0]
    rest = [e for e in side if e[0] != item_fid]
    wide = sorted((e for e in rest if e[1] > N_CATEGORIES), key=lambda e: e[1])
    cat_fid = (wide[min(category_rank, len(wide) - 1)] if wide
               else max(rest or side, key=lambda e: e[1]))[0]
    universe = N_CATEGORIES * SEQ_ITEMS_PER_CATEGORY
    cat_map = IdMap.make(rng, next(v for f, _, v in side if f == cat_fid))
    enums: Dict[int, np.ndarray] = {}
    attrs: Dict[int, np.ndarray] = {}
    for fid, declared, vocab in side:
        if fid == cat_fid:
            continue
        if fid == item_fid:
            attrs[fid] = IdMap.make(rng, vocab)(rng.permutation(universe))
        elif declared <= ENUM_MAX_VOCAB:
            m = max(vocab - 1, 1)
            enums[fid] = np.cumsum(rng.dirichlet(np.full(m, 0.7)))
        else:
            attrs[fid] = _id_scalar(rng, vocab, universe)
    return Domain(spec, mean_len * seq_len_scale, max(1, round(SEQ_LEN_CAP * seq_len_scale)),
                  slots, popular_rate, item_fid, cat_fid, cat_map, enums, attrs)


def build_world(seed: int, layout: DemoLayout, seq_len_scale: float, variant: Variant) -> World:
    """The world of ``seed`` and ``variant``: items, persons, domains and the tables of the base
    effects.

    Raises:
        ValueError: a non-positive ``seq_len_scale``, or a schema without a linked fid.
    """
    if seq_len_scale <= 0:
        raise ValueError(f"seq_len_scale must be > 0, got {seq_len_scale}")
    check_links(layout.features, variant.links)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    cat_z = rng.standard_normal((N_CATEGORIES, LATENT_DIM))
    maps: Dict[str, IdMap] = {}
    items = _build_items(rng, layout.features, variant.links, cat_z, maps)
    persons = _build_persons(rng, layout.features, variant, cat_z, maps)
    domains = [_build_domain(rng, layout, s, seq_len_scale, variant.links.seq_category_rank)
               for s in layout.features.seq]
    tables = {
        "cat": rng.normal(0.0, 1.0, N_CATEGORIES),
        "sub": rng.normal(0.0, 0.5, N_CATEGORIES * SUBCATS_PER_CATEGORY),
        "type": rng.normal(0.0, 0.6, N_ITEM_TYPES),
        "segment": rng.normal(0.0, 0.8, N_SEGMENTS),
        "gender": np.array([-0.2, 0.2]),
        # Segment x category-group table: few strong cells, learnable from a demo.
        "segment_x_group": rng.normal(0.0, 1.0, (N_SEGMENTS, CATEGORY_GROUPS)),
    }
    return World(layout, variant, seed, items, persons, domains, tables, maps)
