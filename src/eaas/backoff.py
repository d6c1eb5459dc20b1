"""Capped exponential backoff with jitter: one policy for every retry loop.

Delay before retry ``n`` (0-based) is drawn uniformly from
``[d/2, d]`` with ``d = min(cap_s, base_s * 2**n)`` — "equal jitter" in the terms of
AWS's architecture note *Exponential Backoff and Jitter* (Brooker, 2015): waits
grow geometrically up to a cap, and the random half keeps many processes that
failed together (workers after a Redis outage, clients after a worker death) from
retrying in lock-step. Pure functions; the loops that sleep live with their owners.
"""

from __future__ import annotations

import random


def backoff_s(attempt: int, base_s: float = 0.1, cap_s: float = 2.0, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry ``attempt`` (0 for the first retry).

    Args:
        attempt: retries already made (>= 0).
        base_s: the first delay's upper bound (seconds, > 0).
        cap_s: the largest delay (seconds, >= base_s).
        rng: random source (default: the module's; pass a seeded one in tests).

    Returns:
        A delay in ``[d/2, d]``, ``d = min(cap_s, base_s * 2**attempt)``.

    Raises:
        ValueError: a negative attempt, or a non-positive base or a cap below it.
    """
    if attempt < 0 or base_s <= 0 or cap_s < base_s:
        raise ValueError(f"backoff_s: need attempt >= 0 and 0 < base_s <= cap_s, got {attempt}, {base_s}, {cap_s}")
    d = min(cap_s, base_s * (2.0 ** min(attempt, 62)))
    return d / 2 + (rng or random).random() * d / 2
