"""Data containers of the debiasing benchmarks (entity feature tables, rating logs, per-user
evaluation lists) and the loader of the Coat data set (Schnabel et al., ICML 2016)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np


class DataError(ValueError):
    """A data folder is missing a file or a file is not in the expected format."""


@dataclass(frozen=True)
class Field:
    """One categorical feature of an entity.

    ids: ``[n, L]`` int64, ``0`` = padding, real ids ``1 .. vocab - 1``; ``L > 1`` is a bag
        (e.g. genres, title words) pooled by its mean.
    vocab: table size, padding row included.
    """
    name: str
    ids: np.ndarray
    vocab: int


@dataclass(frozen=True)
class EntityTable:
    """The features of every user (or item): atom fields (ids) and side fields (categories)."""
    atom: Tuple[Field, ...]
    side: Tuple[Field, ...]

    @property
    def n(self) -> int:
        return self.atom[0].ids.shape[0]


def id_field(n: int, name: str = "id") -> Field:
    """The entity index as an atom field: ids ``1..n`` (``[n, 1]``), vocab ``n + 1``."""
    return Field(name, np.arange(1, n + 1, dtype=np.int64)[:, None], n + 1)


def one_hot_fields(onehot: np.ndarray, groups: Sequence[Tuple[str, int, int]],
                   path: str) -> Tuple[Field, ...]:
    """Categorical fields from one-hot column groups.

    Args:
        onehot: ``[n, F]`` 0/1 matrix.
        groups: ``(name, first column, end column)`` of each field.
        path: file named in errors.

    Returns:
        One ``[n, 1]`` field per group with ids ``1 + column - first`` (vocab ``end - first
        + 1``); a row with no column set gets the padding id 0.

    Raises:
        DataError: a row sets more than one column of a group.
    """
    out = []
    for name, lo, hi in groups:
        block = onehot[:, lo:hi]
        if (block.sum(1) > 1).any():
            raise DataError(f"{path}: field {name!r} (columns {lo}..{hi - 1}) has a row with "
                            f"more than one column set")
        ids = np.where(block.any(1), block.argmax(1) + 1, 0).astype(np.int64)
        out.append(Field(name, ids[:, None], hi - lo + 1))
    return tuple(out)


@dataclass
class EvalSet:
    """Per-user candidate lists: ``users [U]``, ``items [U, C]``, ``labels [U, C]``.

    labels: graded, ``>= 0`` (gain ``2^label - 1``); ``valid [U, C]`` marks the real
    candidates (lists shorter than C are padded with ``valid = False``).
    """
    users: np.ndarray
    items: np.ndarray
    labels: np.ndarray
    valid: np.ndarray

    def subset(self, rows: np.ndarray) -> "EvalSet":
        """The lists of ``rows`` (indices into ``users``)."""
        return EvalSet(self.users[rows], self.items[rows], self.labels[rows], self.valid[rows])


@dataclass
class RatingData:
    """An explicit-feedback log and its evaluation lists.

    train_*: ``[N]`` logged pairs with ratings ``1..5`` and the propensity of each pair
    (the probability it was logged: given for Coat, true for the simulator; used only by the
    inverse-propensity rows). evals: named ``EvalSet`` with ``labels = rating - 1``.
    """
    users: EntityTable
    items: EntityTable
    train_user: np.ndarray
    train_item: np.ndarray
    train_rating: np.ndarray
    train_propensity: np.ndarray
    evals: Dict[str, EvalSet] = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return self.users.n

    @property
    def n_items(self) -> int:
        return self.items.n


def lists_from_matrix(ratings: np.ndarray) -> EvalSet:
    """Per-user lists of the nonzero cells of a ``[n_users, n_items]`` rating matrix.

    Users without a rating are left out; lists are padded to the longest with ``valid``
    False. Labels are ``rating - 1``.
    """
    users = np.flatnonzero((ratings > 0).any(1))
    rows: List[np.ndarray] = [np.flatnonzero(ratings[u] > 0) for u in users]
    width = max(len(r) for r in rows)
    items = np.zeros((len(users), width), dtype=np.int64)
    valid = np.zeros((len(users), width), dtype=bool)
    for n, r in enumerate(rows):
        items[n, :len(r)], valid[n, :len(r)] = r, True
    labels = np.where(valid, ratings[users[:, None], items] - 1, 0).astype(np.int64)
    return EvalSet(users, items, labels, valid)


def split_users(ev: EvalSet, fraction: float, seed: int) -> Tuple[EvalSet, EvalSet]:
    """(the lists of a random ``fraction`` of the users, the others), drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(ev.users))
    n = int(round(fraction * len(perm)))
    return ev.subset(np.sort(perm[:n])), ev.subset(np.sort(perm[n:]))


# ----------------------------------------------------------------------------- Coat

COAT_USER_FIELDS = (("gender", 0, 2), ("age", 2, 8), ("location", 8, 11),
                    ("fashion_interest", 11, 14))
COAT_ITEM_FIELDS = (("gender", 0, 2), ("jacket_type", 2, 18), ("colour", 18, 31),
                    ("front_page", 31, 33))
COAT_VALID_FRACTION = 0.2
COAT_VALID_SEED = 2026


def _matrix(path: str, shape: Optional[Tuple[int, int]]) -> np.ndarray:
    if not os.path.isfile(path):
        raise DataError(f"{path}: missing; the Coat folder must hold train.ascii, test.ascii, "
                        f"propensities.ascii and user_item_features/")
    try:
        m = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as e:
        raise DataError(f"{path}: not a whitespace-separated numeric matrix: {e}") from e
    if shape is not None and m.shape != shape:
        raise DataError(f"{path}: shape {m.shape}, expected {shape}")
    return m


def load_coat(data_dir: str) -> RatingData:
    """Reads Coat: self-selected train ratings, uniformly random test ratings, the authors'
    propensities and the one-hot user/item features.

    Atoms are the user and item ids, sides the one-hot field groups (``COAT_*_FIELDS``).
    The uniform test lists are split by user (``COAT_VALID_FRACTION``, seed
    ``COAT_VALID_SEED``) into ``evals['valid']`` (tuning only) and ``evals['test']``.

    Raises:
        DataError: a missing file, a wrong shape, ratings outside 0..5 or a logged pair
            without a positive propensity.
    """
    train = _matrix(os.path.join(data_dir, "train.ascii"), None)
    shape = train.shape
    test = _matrix(os.path.join(data_dir, "test.ascii"), shape)
    prop = _matrix(os.path.join(data_dir, "propensities.ascii"), shape)
    feat_dir = os.path.join(data_dir, "user_item_features")
    u_path = os.path.join(feat_dir, "user_features.ascii")
    i_path = os.path.join(feat_dir, "item_features.ascii")
    user_onehot = _matrix(u_path, None)
    item_onehot = _matrix(i_path, None)
    for m, path in ((train, "train.ascii"), (test, "test.ascii")):
        if not np.isin(m, np.arange(6)).all():
            raise DataError(f"{os.path.join(data_dir, path)}: ratings must be integers 0..5 "
                            f"(0 = not rated)")
    for m, path, n, groups in ((user_onehot, u_path, shape[0], COAT_USER_FIELDS),
                               (item_onehot, i_path, shape[1], COAT_ITEM_FIELDS)):
        if m.shape != (n, groups[-1][2]):
            raise DataError(f"{path}: shape {m.shape}, expected {(n, groups[-1][2])}")
    u, i = np.nonzero(train)
    p = prop[u, i]
    if not (p > 0).all():
        raise DataError(f"{os.path.join(data_dir, 'propensities.ascii')}: a logged pair has "
                        f"no positive propensity")
    users = EntityTable((id_field(shape[0]),), one_hot_fields(user_onehot, COAT_USER_FIELDS,
                                                              u_path))
    items = EntityTable((id_field(shape[1]),), one_hot_fields(item_onehot, COAT_ITEM_FIELDS,
                                                              i_path))
    valid, test_lists = split_users(lists_from_matrix(test), COAT_VALID_FRACTION,
                                    COAT_VALID_SEED)
    return RatingData(users, items, u.astype(np.int64), i.astype(np.int64),
                      train[u, i].astype(np.float32), p.astype(np.float64),
                      {"valid": valid, "test": test_lists})
