"""Ranking metrics of the debiasing benchmarks: NDCG over per-user candidate lists (optionally
cut at k, restricted to a mask or stratified by item popularity), the pairwise BPR loss of a
list, pooled AUC, and the mean ± std summary of seeds."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from pcvr.metrics import roc_auc


def ndcg_per_user(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                  k: Optional[int] = None) -> torch.Tensor:
    """NDCG of each user's candidate list restricted to ``mask``, optionally cut at rank ``k``.

    Gain ``2^label - 1``, discount ``1 / log2(rank + 1)``; ties in ``scores`` keep the list
    order (stable sort), so a constant scorer is scored by the order of the list.

    Args:
        scores: ``[U, C]`` model scores.
        labels: ``[U, C]`` graded labels (0 = no gain).
        mask: ``[U, C]`` bool, the candidates that take part.
        k: cut-off (``None`` = the whole list).

    Returns:
        ``[U]`` NDCG, NaN for a user without a candidate of positive gain in ``mask``.
    """
    c = scores.shape[1]
    k = c if k is None else min(k, c)
    gains = (2.0 ** labels.float() - 1.0) * mask
    order = scores.masked_fill(~mask, float("-inf")).argsort(dim=1, descending=True, stable=True)
    discount = 1.0 / torch.log2(torch.arange(c, dtype=torch.float32) + 2.0)
    discount[k:] = 0.0
    dcg = (gains.gather(1, order) * discount).sum(1)
    idcg = (gains.sort(dim=1, descending=True).values * discount).sum(1)
    return torch.where(idcg > 0, dcg / idcg.clamp_min(1e-12), torch.full_like(dcg, float("nan")))


def popularity_buckets(counts: np.ndarray, n_buckets: int) -> np.ndarray:
    """Item popularity buckets of equal item counts: ``[n_items]`` in ``0..n_buckets-1``.

    Items are sorted by ``counts`` ascending (ties by item index) and cut into ``n_buckets``
    consecutive runs whose sizes differ by at most one; bucket 0 is the least popular.
    """
    n = len(counts)
    order = np.lexsort((np.arange(n), counts))
    bucket = np.empty(n, dtype=np.int64)
    bucket[order] = np.arange(n) * n_buckets // n
    return bucket


def stratified_ndcg(scores: torch.Tensor, labels: torch.Tensor, bucket: torch.Tensor,
                    n_buckets: int) -> Tuple[float, np.ndarray]:
    """Popularity-stratified NDCG: the unweighted mean over buckets of each bucket's NDCG.

    A bucket's NDCG is that of every user's list restricted to the candidates in the bucket,
    averaged over users with a relevant candidate there. Within a bucket every item is about
    as popular as the others, so ranking by popularity gains nothing; the unweighted mean
    gives the long tail the same say as the head.

    Args:
        scores, labels: ``[U, C]``.
        bucket: ``[U, C]`` popularity bucket of each candidate.
        n_buckets: number of buckets.

    Returns:
        (mean over the buckets that have an evaluated user, ``[n_buckets]`` per-bucket NDCG
        with NaN for a bucket without one).
    """
    per = np.array([ndcg_per_user(scores, labels, bucket == b).nanmean().item()
                    for b in range(n_buckets)])
    return (float(np.nanmean(per)) if np.isfinite(per).any() else float("nan")), per


def pair_bpr(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean ``-log sigmoid(s_a - s_b)`` over pairs of a row with ``label_a > label_b``.

    Args:
        scores, labels: ``[U, C]``.

    Returns:
        Scalar (NaN without any such pair).
    """
    better = labels[:, :, None] > labels[:, None, :]  # [U, C, C]
    diff = scores[:, :, None] - scores[:, None, :]
    return -F.logsigmoid(diff[better]).mean()


def pooled_auc(scores: np.ndarray, positive: np.ndarray, mask: np.ndarray) -> float:
    """Exact AUC (``pcvr.metrics.roc_auc``) over every candidate of every list in ``mask``.

    Args:
        scores: ``[U, C]``; positive: ``[U, C]`` bool; mask: ``[U, C]`` bool.
    """
    return roc_auc(positive[mask], scores[mask])


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value; NaN for none)."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return math.nan, math.nan
    return float(a.mean()), (float(a.std(ddof=1)) if a.size > 1 else 0.0)
