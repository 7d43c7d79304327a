"""Small statistics on measured samples: medians and percentiles.

Percentiles use the nearest-rank method on sorted samples, so every reported
latency is one that was actually observed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["median", "percentile", "summarize_ns"]


def median(values: Sequence[float]) -> float:
    """The median; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return float(ordered[mid])
    return (ordered[mid - 1] + ordered[mid]) / 2


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values (``fraction`` in 0..1)."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(fraction * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])


def summarize_ns(samples_ns: Sequence[int]) -> dict[str, float]:
    """p50, p99, p99.9 and max of latencies given in nanoseconds, in milliseconds."""
    ordered = sorted(samples_ns)
    return {
        "count": len(ordered),
        "p50_ms": percentile(ordered, 0.50) / 1e6,
        "p99_ms": percentile(ordered, 0.99) / 1e6,
        "p999_ms": percentile(ordered, 0.999) / 1e6,
        "max_ms": (ordered[-1] / 1e6) if ordered else math.nan,
    }
