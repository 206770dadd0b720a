"""MovieLens 100K under the tuning log's protocol: the ML-100K loader, the fixed temporal split
and candidate lists, BPR training of the two-tower rows and their evaluation, including the
popularity-stratified (debiased) NDCG."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from pcvr.config import DecouplingConfig
from pcvr.debias.data import DataError, EntityTable, EvalSet, Field, id_field
from pcvr.debias.metrics import (mean_std, ndcg_per_user, pair_bpr, popularity_buckets,
                                 stratified_ndcg)
from pcvr.debias.models import TwoTower

TEST_K = 10
VALID_K = 5
EVAL_SEED = 2026
LONG_TAIL_FRACTION = 0.8
POPULARITY_BUCKETS = 5
AGE_EDGES = (18, 25, 35, 45, 50, 56)  # MovieLens-1M age groups: 7 buckets


class MovieLensError(DataError):
    """The data folder is missing a file or a file is not in the ML-100K format."""


# ----------------------------------------------------------------------------- data


@dataclass
class MovieLens:
    """ML-100K re-indexed from 0; ``n_users``/``n_items`` rows in the feature arrays."""
    user: np.ndarray        # [R] ratings: user index
    item: np.ndarray        # [R] item index
    rating: np.ndarray      # [R] 1..5
    timestamp: np.ndarray   # [R]
    user_side: np.ndarray   # [n_users, 4] gender, age bucket, occupation, zip digit
    user_side_vocab: Tuple[int, ...]
    item_title: np.ndarray  # [n_items, L] title word ids, 0 = padding
    title_vocab: int
    item_genres: np.ndarray  # [n_items, G] genre ids 1..G, 0 = padding
    genre_vocab: int

    @property
    def n_users(self) -> int:
        return self.user_side.shape[0]

    @property
    def n_items(self) -> int:
        return self.item_title.shape[0]

    def user_table(self) -> EntityTable:
        """Atom = [user id]; side = [gender, age bucket, occupation, zip digit] (ids + 1, so
        that 0 stays padding)."""
        names = ("gender", "age", "occupation", "zip")
        side = tuple(Field(n, self.user_side[:, [f]] + 1, v + 1)
                     for f, (n, v) in enumerate(zip(names, self.user_side_vocab)))
        return EntityTable((id_field(self.n_users),), side)

    def item_table(self) -> EntityTable:
        """Atom = [movie id, title words (a bag)]; side = [genres (a bag)]."""
        return EntityTable((id_field(self.n_items), Field("title", self.item_title,
                                                          self.title_vocab)),
                           (Field("genres", self.item_genres, self.genre_vocab),))


def _read(path: str, sep: str, min_cols: int, what: str) -> pd.DataFrame:
    if not os.path.isfile(path):
        raise MovieLensError(f"{path}: missing ({what}); --data_dir must be a MovieLens 100K "
                             f"folder holding u.data, u.user and u.item")
    try:  # u.item is latin-1 in the GroupLens release
        df = pd.read_csv(path, sep=sep, header=None, dtype=str, encoding="latin-1",
                         keep_default_na=False, quoting=3)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise MovieLensError(f"{path}: cannot be parsed as {what}: {e}") from e
    if df.shape[1] < min_cols:
        raise MovieLensError(f"{path}: {df.shape[1]} column(s), expected at least {min_cols} "
                             f"({what})")
    return df


def _ints(col: pd.Series, path: str, name: str) -> np.ndarray:
    values = pd.to_numeric(col.str.strip(), errors="coerce")
    if values.isna().any():
        row = int(values.isna().to_numpy().argmax())
        raise MovieLensError(f"{path}: line {row + 1}: {name} {col.iloc[row]!r} is not an "
                             f"integer")
    return values.to_numpy(np.int64)


def _index(ids: np.ndarray, known: Dict[int, int], path: str, name: str) -> np.ndarray:
    unknown = sorted(set(ids.tolist()) - set(known))
    if unknown:
        raise MovieLensError(f"{path}: {len(unknown)} {name} id(s) not listed in "
                             f"u.{name} (first {unknown[0]})")
    return np.array([known[x] for x in ids.tolist()], dtype=np.int64)


def _pad(rows: List[List[int]]) -> np.ndarray:
    out = np.zeros((len(rows), max(1, max(map(len, rows)))), dtype=np.int64)
    for r, ids in enumerate(rows):
        out[r, :len(ids)] = ids
    return out


def load_movielens(data_dir: str) -> MovieLens:
    """Reads and validates ``u.data``, ``u.user`` and ``u.item`` of an ML-100K folder.

    Raises:
        MovieLensError: a missing folder or file, a malformed line, an out-of-range rating,
            a rating of an unknown user or item, or a repeated (user, item) rating.
    """
    if not os.path.isdir(data_dir):
        raise MovieLensError(f"--data_dir {data_dir!r} is not a directory")
    p_data, p_user, p_item = (os.path.join(data_dir, f) for f in ("u.data", "u.user", "u.item"))
    # Read all three first so a missing file is reported before any format error.
    raw = _read(p_data, "\t", 4, "user, item, rating, timestamp; tab separated")
    users = _read(p_user, "|", 5, "id|age|gender|occupation|zip")
    items = _read(p_item, "|", 6, "id|title|release|video release|url|genre flags...")

    user_ids = _ints(users[0], p_user, "user id")
    item_ids = _ints(items[0], p_item, "item id")
    for ids, path in ((user_ids, p_user), (item_ids, p_item)):
        if len(set(ids.tolist())) != len(ids):
            raise MovieLensError(f"{path}: repeated ids")
    user = _index(_ints(raw[0], p_data, "user id"), {u: n for n, u in enumerate(user_ids)},
                  p_data, "user")
    item = _index(_ints(raw[1], p_data, "item id"), {i: n for n, i in enumerate(item_ids)},
                  p_data, "item")
    rating = _ints(raw[2], p_data, "rating")
    if len(rating) == 0 or rating.min() < 1 or rating.max() > 5:
        raise MovieLensError(f"{p_data}: ratings must be integers 1..5 (and at least one)")
    if len(np.unique(user * len(item_ids) + item)) != len(user):
        raise MovieLensError(f"{p_data}: a (user, item) pair is rated more than once")

    age = _ints(users[1], p_user, "age")
    gender = users[2].str.strip().str.upper()
    if not gender.isin(["M", "F"]).all():
        raise MovieLensError(f"{p_user}: gender must be M or F")
    occupation = pd.factorize(users[3].str.strip().str.lower(), sort=True)[0]
    zip_first = users[4].str.strip().str[:1]
    # Digits 0-9 are US regions; anything else (Canadian postcodes, blanks) is one bucket.
    zip_bucket = np.where(zip_first.str.isdigit(), pd.to_numeric(zip_first, errors="coerce")
                          .fillna(10), 10).astype(np.int64)
    user_side = np.stack([(gender == "F").to_numpy(np.int64),
                          np.searchsorted(AGE_EDGES, age, side="right"),
                          occupation, zip_bucket], axis=1)
    user_side_vocab = (2, len(AGE_EDGES) + 1, int(occupation.max()) + 1, 11)

    genre_flags = items.iloc[:, 5:].apply(lambda c: c.str.strip())
    if not genre_flags.isin(["0", "1"]).all().all():
        raise MovieLensError(f"{p_item}: genre flags (columns 6 onwards) must be 0 or 1")
    genres = [[g + 1 for g in np.flatnonzero(row == "1")] for row in genre_flags.to_numpy()]
    words = [re.findall(r"[a-z0-9]+", t.lower()) for t in items[1]]
    # A word of a single title is an id in disguise (the movie id already is one): dropped.
    counts = pd.Series([w for ws in words for w in set(ws)]).value_counts()
    vocab = {w: n + 1 for n, w in enumerate(sorted(counts[counts >= 2].index))}
    titles = [[vocab[w] for w in ws if w in vocab] for ws in words]
    return MovieLens(user=user, item=item, rating=rating,
                     timestamp=_ints(raw[3], p_data, "timestamp"), user_side=user_side,
                     user_side_vocab=user_side_vocab, item_title=_pad(titles),
                     title_vocab=len(vocab) + 1, item_genres=_pad(genres),
                     genre_vocab=genre_flags.shape[1] + 1)


@dataclass
class Split:
    """The fixed temporal split: train ratings, validation and test lists, item strata."""
    train_user: np.ndarray   # [N]
    train_item: np.ndarray   # [N]
    train_label: np.ndarray  # [N] 1 or 2
    valid: EvalSet
    test: EvalSet
    long_tail: np.ndarray    # [n_items] bool: the least popular LONG_TAIL_FRACTION by train count
    popularity: np.ndarray   # [n_items] popularity bucket 0..POPULARITY_BUCKETS-1 by train count


def label_of(rating: np.ndarray) -> np.ndarray:
    """The log's labels: 2 for rating >= 3, 1 below (0 is kept for unrated items)."""
    return np.where(rating >= 3, 2, 1).astype(np.int64)


def make_split(data: MovieLens) -> Split:
    """Per user, ratings ordered by (timestamp, item id): the last ``TEST_K`` are the test, the
    ``VALID_K`` before them the validation, the rest train (users with fewer than
    ``TEST_K + VALID_K + 1`` ratings are train only). Each evaluation list holds a user's
    held-out rated items and as many items the user never rated, drawn once with
    ``EVAL_SEED``.

    Raises:
        MovieLensError: no user has enough ratings to be evaluated.
    """
    order = np.lexsort((data.item, data.timestamp, data.user))  # by user, time, item
    user, item, label = data.user[order], data.item[order], label_of(data.rating[order])
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    ends = np.r_[starts[1:], len(user)]
    part = np.zeros(len(user), dtype=np.int64)  # 0 train, 1 valid, 2 test
    for s, e in zip(starts, ends):
        if e - s >= TEST_K + VALID_K + 1:
            part[e - TEST_K - VALID_K:e - TEST_K] = 1
            part[e - TEST_K:e] = 2
    rated = np.zeros((data.n_users, data.n_items), dtype=bool)
    rated[user, item] = True
    rng = np.random.default_rng(EVAL_SEED)

    def candidates(p: int, k: int) -> EvalSet:
        users, items, labels = [], [], []
        for s, e in zip(starts, ends):
            held = np.flatnonzero(part[s:e] == p) + s
            unrated = np.flatnonzero(~rated[user[s]])
            if len(held) == 0 or len(unrated) < k:
                continue
            users.append(user[s])
            items.append(np.r_[item[held], rng.choice(unrated, k, replace=False)])
            labels.append(np.r_[label[held], np.zeros(k, dtype=np.int64)])
        if not users:
            raise MovieLensError(f"no user has more than {TEST_K + VALID_K} ratings: nothing "
                                 f"to evaluate")
        items_ = np.stack(items)
        return EvalSet(np.array(users), items_, np.stack(labels),
                       np.ones(items_.shape, dtype=bool))

    valid, test = candidates(1, VALID_K), candidates(2, TEST_K)
    train = part == 0
    counts = np.bincount(item[train], minlength=data.n_items)
    long_tail = popularity_buckets(counts, data.n_items) < int(LONG_TAIL_FRACTION * data.n_items)
    return Split(user[train], item[train], label[train], valid, test, long_tail,
                 popularity_buckets(counts, POPULARITY_BUCKETS))


# ----------------------------------------------------------------------------- train / eval


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation of one BPR run (identical for every row)."""
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    emb_dim: int
    dim: int
    max_steps_per_epoch: Optional[int]  # None = a full pass over the train ratings


class PairSampler:
    """Each train rating ``(u, i)`` with a label-0 item ``j`` (not rated by ``u`` in train)
    and another train rating ``k`` of ``u``."""

    def __init__(self, split: Split, n_users: int, n_items: int):
        self.user, self.item, self.label = (torch.from_numpy(a) for a in
                                            (split.train_user, split.train_item,
                                             split.train_label))
        self.rated = torch.zeros(n_users, n_items, dtype=torch.bool)
        self.rated[self.user, self.item] = True
        if self.rated[torch.unique(self.user)].all(dim=1).any():
            raise MovieLensError("a user rated every item: no label-0 item can be drawn")
        self.by_user = torch.argsort(self.user, stable=True)  # train rows grouped by user
        counts = torch.bincount(self.user, minlength=n_users)
        self.count, self.start = counts, torch.cumsum(counts, 0) - counts
        self.n_items = n_items

    def batches(self, batch_size: int,
                gen: torch.Generator) -> Iterator[Tuple[torch.Tensor, ...]]:
        """Yields ``(u, i, y_i, j, k, y_k)``, each ``[B]``, over one shuffled epoch."""
        perm = torch.randperm(len(self.user), generator=gen)
        for b in range(0, len(perm), batch_size):
            rows = perm[b:b + batch_size]
            u = self.user[rows]
            j = torch.randint(self.n_items, (len(rows),), generator=gen)
            while True:  # redraw label-0 items the user rated (terminates: see __init__)
                bad = self.rated[u, j]
                if not bad.any():
                    break
                j[bad] = torch.randint(self.n_items, (int(bad.sum()),), generator=gen)
            offset = (torch.rand(len(rows), generator=gen) * self.count[u]).long()
            k_rows = self.by_user[self.start[u] + offset]
            yield u, self.item[rows], self.label[rows], j, self.item[k_rows], self.label[k_rows]


def train_step_loss(model: TwoTower, batch: Sequence[torch.Tensor],
                    loss_weight: float) -> torch.Tensor:
    """BPR over the batch's labelled pairs plus ``loss_weight`` times the decoupling losses.

    The pairs are ``(i, j)`` and, where the labels differ, ``(i, k)``; with distance weights
    (``decouple_ipw``) a pair takes the weight of its higher-labelled item.
    """
    u, i, yi, j, k, yk = batch
    u_vec, u_losses, _ = model.users(u)
    # In-batch losses over the rated items only: the O(B^2) losses on all 3B rows would
    # triple the cost for rows that are just sampled contrasts.
    i_vec, i_losses, i_weight = model.items(torch.cat([i, j, k]), loss_rows=len(u))
    vi, vj, vk = i_vec.split(len(u))
    si, sj, sk = ((u_vec * v).sum(-1) for v in (vi, vj, vk))
    sign = torch.sign(yi - yk).float()  # pair (i, k) counts only where the labels differ
    valid = sign != 0
    terms = torch.cat([-F.logsigmoid(si - sj), -F.logsigmoid(sign * (si - sk))[valid]])
    if i_weight is None:
        bpr = terms.mean()
    else:
        wi, _, wk = i_weight.split(len(u))
        w = torch.cat([wi, torch.where(yi > yk, wi, wk)[valid]])
        bpr = (w * terms).sum() / w.sum()
    decoupling = sum(u_losses.values()) + sum(i_losses.values())  # 0 for the baselines
    return bpr + loss_weight * decoupling


@torch.no_grad()
def evaluate(model: TwoTower, ev: EvalSet, split: Split) -> Dict[str, float]:
    """``ndcg`` (whole list), ``ndcg_tail`` (long-tail candidates), ``ndcg_pop`` (popularity-
    stratified, ``metrics.stratified_ndcg``), ``ndcg_pop{b}`` (bucket ``b``) and ``bpr``."""
    model.eval()
    scores_all = model.score_matrix()
    cand = torch.from_numpy(ev.items)
    labels = torch.from_numpy(ev.labels)
    scores = scores_all[torch.from_numpy(ev.users)[:, None], cand]  # [U, C]
    everything = torch.ones_like(labels, dtype=torch.bool)
    pop, per_bucket = stratified_ndcg(scores, labels, torch.from_numpy(split.popularity)[cand],
                                      POPULARITY_BUCKETS)
    out = {"ndcg": ndcg_per_user(scores, labels, everything).nanmean().item(),
           "ndcg_tail": ndcg_per_user(scores, labels,
                                      torch.from_numpy(split.long_tail)[cand]).nanmean().item(),
           "ndcg_pop": pop,
           "bpr": pair_bpr(scores, labels).item()}
    out.update({f"ndcg_pop{b}": float(v) for b, v in enumerate(per_bucket)})
    return out


def run_one(data: MovieLens, split: Split, ev: EvalSet, variant: str, cfg: DecouplingConfig,
            ts: TrainSettings, seed: int) -> Dict[str, float]:
    """Trains one two-tower model from ``seed`` and returns its metrics on ``ev``."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = TwoTower(data.user_table(), data.item_table(), variant, ts.emb_dim, ts.dim, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=ts.lr, weight_decay=ts.weight_decay)
    sampler = PairSampler(split, data.n_users, data.n_items)
    for _ in range(ts.epochs):
        model.train()
        for step, batch in enumerate(sampler.batches(ts.batch_size, gen)):
            if ts.max_steps_per_epoch is not None and step >= ts.max_steps_per_epoch:
                break
            loss = train_step_loss(model, batch, cfg.decouple_loss_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return evaluate(model, ev, split)


# ----------------------------------------------------------------------------- table


@dataclass(frozen=True)
class Row:
    """One row of the MovieLens table: a tower variant and decoupling overrides."""
    key: str
    title: str
    variant: str
    overrides: Tuple[Tuple[str, float], ...] = ()


ROWS: Tuple[Row, ...] = (
    Row("concat_mlp", "two-tower, concat(side_emb, atom_emb) -> MLP", "concat_mlp"),
    Row("mlp_concat", "two-tower, concat(MLP(side_emb), MLP(atom_emb))", "mlp_concat"),
    Row("mlp_concat_head", "concat(MLP(side_emb), MLP(atom_emb)) -> head MLP, no losses",
        "mlp_concat_head"),
    Row("decoupled", "endogenous decoupling", "decoupled"),
    Row("no_side_ssl", "decoupling without side SSL", "decoupled",
        (("decouple_side_weight", 0.0),)),
    Row("no_stage1", "decoupling without stage-1", "decoupled",
        (("decouple_stage1_weight", 0.0),)),
    Row("no_atom_orth_ssl", "decoupling without atom-orth SSL", "decoupled",
        (("decouple_atom_weight", 0.0),)),
)
BASELINES = ("concat_mlp", "mlp_concat")
LOG_FIGURES = {"concat_mlp": ("0.942", "0.428"), "mlp_concat": ("0.941", "0.431"),
               "decoupled": ("0.950", "0.350")}
TABLE_METRICS = (("ndcg", "NDCG"), ("ndcg_tail", "NDCG long-tail"),
                 ("ndcg_pop", "NDCG pop-stratified"), ("bpr", "BPR loss"))

Results = Dict[str, List[Dict[str, float]]]


def markdown_table(results: Results) -> str:
    """The rows of ``results`` (mean ± std over seeds) beside the log's figures."""
    head = " | ".join(title for _, title in TABLE_METRICS)
    lines = [f"| model | {head} | log NDCG | log BPR |",
             "|---" * (len(TABLE_METRICS) + 3) + "|"]
    for row in ROWS:
        if row.key not in results:
            continue
        cells = []
        for metric, _ in TABLE_METRICS:
            m, s = mean_std([r[metric] for r in results[row.key]])
            cells.append(f"{m:.4f} ± {s:.4f}")
        log_ndcg, log_bpr = LOG_FIGURES.get(row.key, ("-", "-"))
        lines.append(f"| {row.title} | {' | '.join(cells)} | {log_ndcg} | {log_bpr} |")
    return "\n".join(lines)


def bucket_table(results: Results) -> str:
    """NDCG per item-popularity bucket (0 = least popular fifth), mean over seeds."""
    cols = [f"ndcg_pop{b}" for b in range(POPULARITY_BUCKETS)]
    lines = ["| model | " + " | ".join(f"bucket {b}" for b in range(POPULARITY_BUCKETS))
             + " |", "|---" * (POPULARITY_BUCKETS + 1) + "|"]
    for row in ROWS:
        if row.key in results:
            lines.append(f"| {row.title} | " + " | ".join(
                f"{mean_std([r[c] for r in results[row.key]])[0]:.4f}" for c in cols) + " |")
    return "\n".join(lines)


def summary_line(results: Results, metric: str = "ndcg") -> str:
    """``<metric>_decoupled <x> <metric>_best_baseline <y> spread <s>``: the best of the log's
    two baselines by mean, ``s`` the larger seed std of the two rows (NaN: a row not run)."""
    stats = {k: mean_std([r[metric] for r in v]) for k, v in results.items()}
    nan = (float("nan"), float("nan"))
    dec = stats.get("decoupled", nan)
    ran = [k for k in BASELINES if k in stats]
    best = max((stats[k] for k in ran), key=lambda ms: ms[0]) if ran else nan
    return (f"{metric}_decoupled {dec[0]:.4f} {metric}_best_baseline {best[0]:.4f} "
            f"spread {max(dec[1], best[1]):.4f}")
