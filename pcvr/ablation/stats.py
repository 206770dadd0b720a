"""Seed statistics: mean ± std, the paired delta against the base and its 95 % interval."""
from __future__ import annotations

import math
from typing import Mapping, Sequence, Tuple


# Two-sided 95 % Student-t quantiles t_{0.975, df}, df = 1..30.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (df >= 1)."""
    if df < 1:
        raise ValueError("t975 needs df >= 1")
    return _T975[df - 1] if df <= len(_T975) else 1.96 + 2.4 / df


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """(mean, sample std); std is NaN for fewer than two values, both NaN for none."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, float("nan")
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def paired_delta(base: Mapping[int, float], other: Mapping[int, float]
                 ) -> Tuple[float, float, int]:
    """(mean delta, 95 % half-width, n) of ``other[s] - base[s]`` over the seeds in both.

    The half-width is NaN with fewer than two pairs (mean NaN with none).
    """
    seeds = sorted(s for s in other if s in base and math.isfinite(other[s])
                   and math.isfinite(base[s]))
    d = [other[s] - base[s] for s in seeds]
    m, sd = mean_std(d)
    if len(d) < 2:
        return m, float("nan"), len(d)
    return m, t975(len(d) - 1) * sd / math.sqrt(len(d)), len(d)


def beyond_noise(delta: float, half_width: float) -> str:
    """'yes' when the 95 % interval excludes 0, 'no' when it holds it, 'n/a' without one."""
    if not (math.isfinite(delta) and math.isfinite(half_width)):
        return "n/a"
    return "yes" if abs(delta) > half_width else "no"
