"""Seeded draws and ragged-array plumbing shared by the demo-data modules.

Everything here is a pure function of its arguments and of the ``numpy.random.Generator`` it is
given, so that the same seed gives the same draws in the same order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` for ``a [..., k]`` and ``b [k]`` or ``[k, m]``, the same to the last bit on
    every machine: ``einsum`` without ``optimize`` runs numpy's own loops, while ``@`` goes to
    a multithreaded BLAS whose sums depend on the number of threads (and so would the data)."""
    return np.einsum("...k,k->..." if b.ndim == 1 else "...k,km->...m", a, b, optimize=False)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def power_index(rng: np.random.Generator, n: int, size: int, a: float) -> np.ndarray:
    """``size`` indices in [0, n) skewed towards 0 (P(index < k) = (k/n)^(1/a)): popular values."""
    return np.minimum((n * rng.random(size) ** a).astype(np.int64), max(n - 1, 0))


def categorical(rng: np.random.Generator, cum: np.ndarray, size: int) -> np.ndarray:
    """``size`` indices drawn from a cumulative distribution ``cum`` (last value 1)."""
    return np.minimum(np.searchsorted(cum, rng.random(size), side="right"), cum.size - 1)


def lengths_to_offsets(lengths: np.ndarray) -> np.ndarray:
    """[N] list lengths -> [N + 1] int64 offsets."""
    offsets = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def segment_positions(offsets: np.ndarray, idx: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(new offsets [len(idx) + 1], flat positions) that gather the segments ``idx`` of a ragged
    array given by ``offsets``."""
    starts = offsets[idx]
    lengths = offsets[idx + 1] - starts
    new_offsets = lengths_to_offsets(lengths)
    pos = np.arange(new_offsets[-1], dtype=np.int64)
    pos += np.repeat(starts - new_offsets[:-1], lengths)
    return new_offsets, pos


@dataclass(frozen=True)
class IdMap:
    """Affine map of latent indices onto ids 1..vocab-1 (no collision while n < vocab)."""
    m: int
    a: int
    b: int

    @staticmethod
    def make(rng: np.random.Generator, vocab: int) -> "IdMap":
        m = max(int(vocab) - 1, 0)
        if m <= 1:
            return IdMap(m, 1, 0)
        a = int(rng.integers(max(1, m // 3), m))
        while math.gcd(a, m) != 1:
            a = a % (m - 1) + 1
        return IdMap(m, a, int(rng.integers(0, m)))

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        if self.m <= 0:
            return np.zeros_like(idx)
        return 1 + (self.a * (idx % self.m) + self.b) % self.m


@dataclass
class Ragged:
    """Per-entity lists (persons or items): offsets [N + 1], int values, null [N], and
    optionally float values aligned element by element with the ints."""
    offsets: np.ndarray
    values: np.ndarray
    null: np.ndarray
    dense: Optional[np.ndarray] = None

    @staticmethod
    def from_lengths(lengths: np.ndarray, values: np.ndarray, null: np.ndarray,
                     dense: Optional[np.ndarray] = None) -> "Ragged":
        return Ragged(lengths_to_offsets(lengths), values, null, dense)

    def take(self, idx: np.ndarray) -> "Ragged":
        """The lists of the entities ``idx`` (in that order)."""
        offsets, pos = segment_positions(self.offsets, idx)
        return Ragged(offsets, self.values[pos], self.null[idx],
                      None if self.dense is None else self.dense[pos])
