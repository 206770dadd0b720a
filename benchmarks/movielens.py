"""MovieLens 100K benchmark of endogenous decoupling against the tuning log's two-tower baselines.

    python3 benchmarks/movielens.py --data_dir /path/to/ml-100k [--seeds 5] [--epochs N]

Protocol (fixed; the log gives none, see benchmarks/results/movielens.md):

* labels: 2 for rating >= 3, 1 for rating < 3, 0 for an item the user did not rate;
* split: per user, ratings ordered by (timestamp, item id); the last ``TEST_K`` form the test
  set, the ``VALID_K`` before them the validation set (used only for tuning, ``--split
  valid``), the rest train. Users with fewer than ``TEST_K + VALID_K + 1`` ratings are train
  only (none in ML-100K, where every user has >= 20);
* candidates: a user's held-out rated items plus as many items the user never rated, drawn
  uniformly once with the fixed ``EVAL_SEED`` (the same lists for every model and seed);
* NDCG: over the full candidate list, gain ``2^label - 1``, discount ``1 / log2(rank + 1)``,
  averaged over users. Long-tail NDCG: the same on the candidates whose item is among the
  least popular ``LONG_TAIL_FRACTION`` of items by train count, over users with a relevant
  long-tail candidate;
* BPR loss: mean of ``-log sigmoid(s_a - s_b)`` over all candidate pairs of a user with
  ``label_a > label_b``;
* training: BPR over pairs with different labels: each train rating ``(u, i)`` against a
  uniformly drawn item ``j`` that ``u`` did not rate in train (label 0), and against another
  train rating ``k`` of ``u`` when their labels differ.

Features: item atom = [movie id, title words], item side = [genres]; user atom = [user id],
user side = [gender, age bucket, occupation, first zip digit]. The score is the dot product
of a user and an item vector, each built by one tower variant:

* ``concat_mlp``: MLP(concat(side_emb, atom_emb)) (baseline 1 of the log);
* ``mlp_concat``: concat(MLP(side_emb), MLP(atom_emb)) (baseline 2);
* ``mlp_concat_head``: baseline 2 followed by a ranking-head MLP (the decoupled
  architecture with no decoupling loss: the control that isolates the losses);
* ``decoupled``: ``mlp_concat_head`` whose two MLPs are an ``EntityDecoupler`` (user and
  item); its losses, computed in-batch over the batch's users and rated items, are added
  to the BPR loss with weight ``decouple_loss_weight``. The head is needed: the losses
  spread the representations over the sphere, which a raw dot product cannot rank.

The ``decouple_*_fids`` flags belong to the PCVR model and are ignored here.
The last line printed is ``ndcg_decoupled <x> ndcg_best_baseline <y> spread <s>``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pcvr.config import DecouplingConfig, add_section_args, section_from_namespace  # noqa: E402
from pcvr.model.decoupling import EntityDecoupler, projection_mlp  # noqa: E402

TEST_K = 10
VALID_K = 5
EVAL_SEED = 2026
LONG_TAIL_FRACTION = 0.8
AGE_EDGES = (18, 25, 35, 45, 50, 56)  # MovieLens-1M age groups: 7 buckets
LOG_FIGURES = {"concat_mlp": ("0.942", "0.428"), "mlp_concat": ("0.941", "0.431"),
               "decoupled": ("0.950", "0.350")}


class MovieLensError(ValueError):
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
class EvalSet:
    """Per-user candidate lists: ``users [U]``, ``items [U, C]``, ``labels [U, C]`` in 0/1/2."""
    users: np.ndarray
    items: np.ndarray
    labels: np.ndarray


@dataclass
class Split:
    train_user: np.ndarray   # [N]
    train_item: np.ndarray   # [N]
    train_label: np.ndarray  # [N] 1 or 2
    valid: EvalSet
    test: EvalSet
    long_tail: np.ndarray    # [n_items] bool


def label_of(rating: np.ndarray) -> np.ndarray:
    return np.where(rating >= 3, 2, 1).astype(np.int64)


def make_split(data: MovieLens) -> Split:
    """The fixed temporal split and candidate lists described in the module docstring."""
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
        return EvalSet(np.array(users), np.stack(items), np.stack(labels))

    valid, test = candidates(1, VALID_K), candidates(2, TEST_K)
    train = part == 0
    counts = np.bincount(item[train], minlength=data.n_items)
    by_popularity = np.lexsort((np.arange(data.n_items), counts))  # ascending, ties by id
    long_tail = np.zeros(data.n_items, dtype=bool)
    long_tail[by_popularity[:int(LONG_TAIL_FRACTION * data.n_items)]] = True
    return Split(user[train], item[train], label[train], valid, test, long_tail)


# ----------------------------------------------------------------------------- model


class UserFeatures(nn.Module):
    """User index ``[B]`` -> atom ``[B, E]`` (id) and side ``[B, 4E]`` (demographics)."""

    def __init__(self, data: MovieLens, emb_dim: int):
        super().__init__()
        self.register_buffer("side_ids", torch.from_numpy(data.user_side))
        self.id = nn.Embedding(data.n_users, emb_dim)
        self.side = nn.ModuleList(nn.Embedding(v, emb_dim) for v in data.user_side_vocab)
        self.atom_dim, self.side_dim = emb_dim, emb_dim * len(data.user_side_vocab)

    def forward(self, users: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        ids = self.side_ids[users]
        return self.id(users), torch.cat([e(ids[:, f]) for f, e in enumerate(self.side)], -1)


class ItemFeatures(nn.Module):
    """Item index ``[B]`` -> atom ``[B, 2E]`` (id, mean title word) and side ``[B, E]``
    (mean genre)."""

    def __init__(self, data: MovieLens, emb_dim: int):
        super().__init__()
        self.register_buffer("title_ids", torch.from_numpy(data.item_title))
        self.register_buffer("genre_ids", torch.from_numpy(data.item_genres))
        self.id = nn.Embedding(data.n_items, emb_dim)
        self.title = nn.EmbeddingBag(data.title_vocab, emb_dim, mode="mean", padding_idx=0)
        self.genre = nn.EmbeddingBag(data.genre_vocab, emb_dim, mode="mean", padding_idx=0)
        self.atom_dim, self.side_dim = 2 * emb_dim, emb_dim

    def forward(self, items: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        atom = torch.cat([self.id(items), self.title(self.title_ids[items])], -1)
        return atom, self.genre(self.genre_ids[items])


TowerOut = Tuple[torch.Tensor, Dict[str, torch.Tensor], Optional[torch.Tensor]]


class Tower(nn.Module):
    """Features -> ``[B, 2 * dim]`` vector, decoupling losses and IPW weights (decoupled only).

    Args:
        features: a ``UserFeatures`` or ``ItemFeatures``.
        dim: width of each of the side and atom halves.
        variant: ``concat_mlp``, ``mlp_concat``, ``mlp_concat_head`` or ``decoupled``
            (module docstring).
        cfg: decoupling hyper-parameters (``decoupled`` only).
    """

    def __init__(self, features: nn.Module, dim: int, variant: str, cfg: DecouplingConfig):
        super().__init__()
        self.features, self.variant = features, variant
        a, s = features.atom_dim, features.side_dim
        if variant == "concat_mlp":
            self.mlp = nn.Sequential(nn.Linear(s + a, 2 * dim), nn.ReLU(),
                                     nn.Linear(2 * dim, 2 * dim))
        elif variant in ("mlp_concat", "mlp_concat_head"):
            self.side_mlp, self.atom_mlp = projection_mlp(s, dim), projection_mlp(a, dim)
        elif variant == "decoupled":
            self.decoupler = EntityDecoupler(a, s, dim, cfg)
        else:
            raise ValueError(f"unknown tower variant {variant!r}")
        # The SSL losses spread the representations over the sphere, which a raw dot product
        # cannot score (popularity needs a shared direction): a ranking head maps them.
        self.head = (projection_mlp(2 * dim, 2 * dim)
                     if variant in ("mlp_concat_head", "decoupled") else nn.Identity())

    def forward(self, idx: torch.Tensor, loss_rows: Optional[int] = None) -> TowerOut:
        """``idx [B]`` -> ``([B, 2 * dim], losses over the first loss_rows rows, [B] or None)``."""
        atom_x, side_x = self.features(idx)
        if self.variant == "concat_mlp":
            return self.mlp(torch.cat([side_x, atom_x], -1)), {}, None
        if self.variant == "decoupled":
            out = self.decoupler(atom_x, side_x, loss_rows)
            return self.head(torch.cat([out.side, out.atom], -1)), out.losses, out.sample_weight
        return self.head(torch.cat([self.side_mlp(side_x), self.atom_mlp(atom_x)], -1)), {}, None


class TwoTower(nn.Module):
    """Score = dot product of the user tower's and the item tower's vectors."""

    def __init__(self, data: MovieLens, variant: str, emb_dim: int, dim: int,
                 cfg: DecouplingConfig):
        super().__init__()
        self.n_users, self.n_items = data.n_users, data.n_items
        user_variant = ("mlp_concat_head" if variant == "decoupled" and not cfg.decouple_user
                        else variant)
        self.users = Tower(UserFeatures(data, emb_dim), dim, user_variant, cfg)
        self.items = Tower(ItemFeatures(data, emb_dim), dim, variant, cfg)


# ----------------------------------------------------------------------------- train / eval


def ndcg_per_user(scores: torch.Tensor, labels: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
    """NDCG of each user's candidate list restricted to ``mask``.

    Args:
        scores: ``[U, C]`` model scores.
        labels: ``[U, C]`` graded labels (gain ``2^label - 1``).
        mask: ``[U, C]`` bool, the candidates that take part.

    Returns:
        ``[U]`` NDCG, NaN for a user without a relevant candidate in ``mask``.
    """
    gains = (2.0 ** labels.float() - 1.0) * mask
    order = scores.masked_fill(~mask, float("-inf")).argsort(dim=1, descending=True, stable=True)
    discount = 1.0 / torch.log2(torch.arange(scores.shape[1], dtype=torch.float32) + 2.0)
    dcg = (gains.gather(1, order) * discount).sum(1)
    idcg = (gains.sort(dim=1, descending=True).values * discount).sum(1)
    return torch.where(idcg > 0, dcg / idcg.clamp_min(1e-12), torch.full_like(dcg, float("nan")))


def pair_bpr(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean ``-log sigmoid(s_a - s_b)`` over pairs of a row with ``label_a > label_b``.

    Args:
        scores, labels: ``[U, C]``.
    """
    better = labels[:, :, None] > labels[:, None, :]  # [U, C, C]
    diff = scores[:, :, None] - scores[:, None, :]
    return -F.logsigmoid(diff[better]).mean()


@torch.no_grad()
def evaluate(model: TwoTower, ev: EvalSet, long_tail: np.ndarray) -> Dict[str, float]:
    model.eval()
    users = model.users(torch.arange(model.n_users))[0]
    items = model.items(torch.arange(model.n_items))[0]
    cand = torch.from_numpy(ev.items)
    labels = torch.from_numpy(ev.labels)
    scores = (users[torch.from_numpy(ev.users)][:, None, :] * items[cand]).sum(-1)  # [U, C]
    everything = torch.ones_like(labels, dtype=torch.bool)
    return {"ndcg": ndcg_per_user(scores, labels, everything).nanmean().item(),
            "ndcg_tail": ndcg_per_user(scores, labels,
                                       torch.from_numpy(long_tail)[cand]).nanmean().item(),
            "bpr": pair_bpr(scores, labels).item()}


@dataclass
class TrainSettings:
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
        """Yields ``(u, i, y_i, j, k, y_k)`` tensors of one shuffled epoch."""
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
    """BPR over the batch's labelled pairs plus ``loss_weight`` times the decoupling losses."""
    u, i, yi, j, k, yk = batch
    u_vec, u_losses, _ = model.users(u)
    # In-batch losses over the rated items only: the O(B^2) losses on all 3B rows would
    # triple the cost of the table for rows that are just sampled contrasts.
    i_vec, i_losses, i_weight = model.items(torch.cat([i, j, k]), loss_rows=len(u))
    vi, vj, vk = i_vec.split(len(u))
    si, sj, sk = ((u_vec * v).sum(-1) for v in (vi, vj, vk))
    sign = torch.sign(yi - yk).float()  # pair (i, k) counts only where the labels differ
    valid = sign != 0
    terms = torch.cat([-F.logsigmoid(si - sj), -F.logsigmoid(sign * (si - sk))[valid]])
    if i_weight is None:
        bpr = terms.mean()
    else:  # IPW: a pair takes the weight of its higher-labelled item
        wi, _, wk = i_weight.split(len(u))
        w = torch.cat([wi, torch.where(yi > yk, wi, wk)[valid]])
        bpr = (w * terms).sum() / w.sum()
    decoupling = sum(u_losses.values()) + sum(i_losses.values())  # 0 for the baselines
    return bpr + loss_weight * decoupling


def run_one(data: MovieLens, split: Split, ev: EvalSet, variant: str, cfg: DecouplingConfig,
            ts: TrainSettings, seed: int) -> Dict[str, float]:
    """Trains one model from ``seed`` and returns its metrics on ``ev``."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = TwoTower(data, variant, ts.emb_dim, ts.dim, cfg)
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
    return evaluate(model, ev, split.long_tail)


# ----------------------------------------------------------------------------- table


@dataclass
class Row:
    key: str
    title: str
    variant: str
    overrides: Dict[str, float]


ROWS: Tuple[Row, ...] = (
    Row("concat_mlp", "two-tower, concat(side_emb, atom_emb) -> MLP", "concat_mlp", {}),
    Row("mlp_concat", "two-tower, concat(MLP(side_emb), MLP(atom_emb))", "mlp_concat", {}),
    Row("mlp_concat_head", "concat(MLP(side_emb), MLP(atom_emb)) -> head MLP, no losses",
        "mlp_concat_head", {}),
    Row("decoupled", "endogenous decoupling", "decoupled", {}),
    Row("no_side_ssl", "decoupling without side SSL", "decoupled",
        {"decouple_side_weight": 0.0}),
    Row("no_stage1", "decoupling without stage-1", "decoupled",
        {"decouple_stage1_weight": 0.0}),
    Row("no_atom_orth_ssl", "decoupling without atom-orth SSL", "decoupled",
        {"decouple_atom_weight": 0.0}),
)
BASELINES = ("concat_mlp", "mlp_concat")


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), (float(a.std(ddof=1)) if len(a) > 1 else 0.0)


def markdown_table(results: Dict[str, List[Dict[str, float]]]) -> str:
    lines = ["| model | NDCG | NDCG long-tail | BPR loss | log NDCG | log BPR |",
             "|---|---|---|---|---|---|"]
    for row in ROWS:
        if row.key not in results:
            continue
        cells = []
        for metric in ("ndcg", "ndcg_tail", "bpr"):
            m, s = mean_std([r[metric] for r in results[row.key]])
            cells.append(f"{m:.4f} ± {s:.4f}")
        log_ndcg, log_bpr = LOG_FIGURES.get(row.key, ("-", "-"))
        lines.append(f"| {row.title} | {' | '.join(cells)} | {log_ndcg} | {log_bpr} |")
    return "\n".join(lines)


def summary_line(results: Dict[str, List[Dict[str, float]]]) -> str:
    """``ndcg_decoupled <x> ndcg_best_baseline <y> spread <s>``: the best of the log's two
    baselines by mean NDCG, ``s`` the larger seed std of the two rows (NaN: a row not run)."""
    stats = {k: mean_std([r["ndcg"] for r in v]) for k, v in results.items()}
    nan = (float("nan"), float("nan"))
    dec = stats.get("decoupled", nan)
    ran = [k for k in BASELINES if k in stats]
    best = max((stats[k] for k in ran), key=lambda ms: ms[0]) if ran else nan
    return (f"ndcg_decoupled {dec[0]:.4f} ndcg_best_baseline {best[0]:.4f} "
            f"spread {max(dec[1], best[1]):.4f}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", required=True, help="folder holding u.data, u.user, u.item")
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 per row")
    p.add_argument("--epochs", type=int, default=15, help="passes over the train ratings")
    p.add_argument("--quick", action="store_true",
                   help="tiny run for tests: 1 epoch of at most 5 steps")
    p.add_argument("--split", default="test", choices=("test", "valid"),
                   help="evaluate on the test lists (the table) or the validation lists "
                        "(tuning)")
    p.add_argument("--rows", default=",".join(r.key for r in ROWS),
                   help="comma list of rows to run")
    p.add_argument("--batch_size", type=int, default=512, help="train ratings per step")
    p.add_argument("--lr", type=float, default=5e-3, help="AdamW learning rate")
    p.add_argument("--weight_decay", type=float, default=0.1, help="AdamW weight decay")
    p.add_argument("--emb_dim", type=int, default=32, help="width of every embedding table")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    add_section_args(p, DecouplingConfig)
    # The log decouples both the item and the user; --decouple_dim is the width of each
    # tower half (side, atom) in every row, baselines included.
    p.set_defaults(decouple_user=True, decouple_dim=32)
    return p


def main(argv: Optional[List[str]] = None) -> Dict[str, List[Dict[str, float]]]:
    args = build_parser().parse_args(argv)
    keys = [k for k in args.rows.split(",") if k]
    unknown = sorted(set(keys) - {r.key for r in ROWS})
    if unknown:
        raise SystemExit(f"error: unknown --rows {unknown}; choose from "
                         f"{[r.key for r in ROWS]}")
    torch.set_num_threads(args.threads)
    try:
        data = load_movielens(args.data_dir)
        split = make_split(data)
    except MovieLensError as e:
        raise SystemExit(f"error: {e}") from e
    cfg = section_from_namespace(DecouplingConfig, args)
    ts = TrainSettings(epochs=1 if args.quick else args.epochs, batch_size=args.batch_size,
                       lr=args.lr, weight_decay=args.weight_decay, emb_dim=args.emb_dim,
                       dim=cfg.decouple_dim, max_steps_per_epoch=5 if args.quick else None)
    ev = split.valid if args.split == "valid" else split.test
    print(f"# {data.n_users} users, {data.n_items} items, {len(split.train_user)} train "
          f"ratings, {len(ev.users)} {args.split} users; {ts}", file=sys.stderr)
    results: Dict[str, List[Dict[str, float]]] = {}
    t0 = time.time()
    for row in ROWS:
        if row.key not in keys:
            continue
        row_cfg = dataclasses.replace(cfg, **row.overrides)
        for seed in range(args.seeds):
            t = time.time()
            r = run_one(data, split, ev, row.variant, row_cfg, ts, seed)
            results.setdefault(row.key, []).append(r)
            print(f"{row.key} seed {seed}: " + " ".join(f"{k} {v:.4f}" for k, v in r.items())
                  + f" ({time.time() - t:.1f}s)", file=sys.stderr)
    print(f"# total {time.time() - t0:.0f}s with {args.threads} thread(s)", file=sys.stderr)
    print(f"MovieLens 100K, {args.split} split, {args.seeds} seed(s), {ts.epochs} epoch(s); "
          f"mean ± std over seeds\n")
    print(markdown_table(results))
    print(summary_line(results))
    return results


if __name__ == "__main__":
    main()
