"""Statistics the benchmarks report: pure functions, unit-tested.

- :func:`median_ci` — the median of a small sample with a distribution-free
  confidence interval from order statistics (the binomial method for quantiles;
  Conover, *Practical Nonparametric Statistics*, 3rd ed., §3.2): no normality is
  assumed, which matters for the handful of paired rounds a benchmark can afford.
- :func:`max_token_gap` — the longest silence a stream saw around a moment (the
  "recovery pause" of a failover: SGLang's elastic EP reports 6.2–6.8 s per rank
  failure, the EEP paper 11 s).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def _binom_cdf(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2)."""
    return sum(math.comb(n, i) for i in range(k + 1)) / 2**n


def median_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, tuple[float, float], float]:
    """Median of ``values`` and a distribution-free interval covering the true median.

    The interval is ``[x_(k), x_(n+1-k)]`` (1-based order statistics) for the largest
    ``k`` whose coverage ``1 - 2 * P(Binomial(n, 1/2) <= k - 1)`` is still
    ``>= confidence``. With fewer than 6 values no such ``k`` reaches 95 %: the
    interval is then the whole range, and the returned coverage says how much it is.

    Args:
        values: the sample (e.g. one throughput loss per paired round).
        confidence: wanted coverage in (0, 1).

    Returns:
        (median, (low, high), achieved coverage).

    Raises:
        ValueError: an empty sample or a confidence outside (0, 1).
    """
    if not values or not 0 < confidence < 1:
        raise ValueError(f"median_ci: need values and 0 < confidence < 1 (got {len(values)}, {confidence})")
    xs = sorted(values)
    n = len(xs)
    mid = n // 2
    median = xs[mid] if n % 2 else (xs[mid - 1] + xs[mid]) / 2
    best_k, coverage = 1, 1 - 2 * _binom_cdf(0, n)
    for k in range(1, n // 2 + 1):
        cov = 1 - 2 * _binom_cdf(k - 1, n)
        if cov >= confidence:
            best_k, coverage = k, cov
    return median, (xs[best_k - 1], xs[n - best_k]), coverage


def max_token_gap(start_s: float, token_times_s: Sequence[float], end_s: float) -> float:
    """Longest wait of one stream: request start -> first token -> ... -> last token -> end (seconds)."""
    points = [start_s, *token_times_s]
    if not token_times_s:
        points.append(end_s)
    return max((b - a for a, b in zip(points, points[1:])), default=0.0)


def load_avg_1m() -> float | None:
    """The machine's 1-minute load average, rounded (a busy neighbour on a small machine
    skews a benchmark; every benchmark records it before and after), or None."""
    import os

    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover - not Unix
        return None
