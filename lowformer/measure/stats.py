"""Summary statistics for timings: percentiles, spread, paired ratios and rank correlations.

Pure functions over plain sequences of floats; no torch, no scipy. Percentiles interpolate
linearly between order statistics (numpy's default, "type 7"), so a p50 of an even count is
the mean of the two middle values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

PERCENTILES = (10, 50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0..100) of `values`, linear interpolation between order statistics."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def std(values: Sequence[float]) -> float:
    """Sample standard deviation (n - 1 in the denominator); 0.0 for fewer than two values."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def summarize_ms(samples_s: Sequence[float], prefix: str = "latency_ms") -> dict[str, float]:
    """Per-call times in seconds -> `{prefix}_p50, _p10, _p90, _p99, _min, _max, _mean, _std` in ms."""
    ms = [s * 1e3 for s in samples_s]
    out = {f"{prefix}_p{q}": percentile(ms, q) for q in (50, 10, 90, 99)}
    out[f"{prefix}_min"] = min(ms)
    out[f"{prefix}_max"] = max(ms)
    out[f"{prefix}_mean"] = sum(ms) / len(ms)
    out[f"{prefix}_std"] = std(ms)
    return out


def ratio_summary(ratios: Sequence[float]) -> dict[str, float]:
    """min / median / max of per-round ratios."""
    return {"min": min(ratios), "median": median(ratios), "max": max(ratios)}


def rankdata(values: Sequence[float]) -> list[float]:
    """Ranks starting at 1; tied values share the mean of the ranks they span (as scipy's default)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson correlation; None when either side has no variance or fewer than 2 points."""
    if len(x) != len(y):
        raise ValueError(f"length mismatch: {len(x)} vs {len(y)}")
    n = len(x)
    if n < 2:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho: the Pearson correlation of the ranks (ties get mean ranks)."""
    return pearson(rankdata(x), rankdata(y))


def kendall(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Kendall's tau-b (corrects for ties, as scipy.stats.kendalltau's default); None if undefined."""
    if len(x) != len(y):
        raise ValueError(f"length mismatch: {len(x)} vs {len(y)}")
    concordant = discordant = ties_x = ties_y = 0
    n = len(x)
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue  # tied in both: counts in neither denominator term
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    denom = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    if denom == 0:
        return None
    return (concordant - discordant) / denom
