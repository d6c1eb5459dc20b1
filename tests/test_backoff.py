"""The one backoff policy: capped, growing, jittered."""

from __future__ import annotations

import random

import pytest

from eaas.backoff import backoff_s


def test_delays_grow_geometrically_up_to_the_cap_with_half_jitter() -> None:
    rng = random.Random(0)
    for attempt, upper in [(0, 0.1), (1, 0.2), (2, 0.4), (3, 0.8), (4, 1.6), (5, 2.0), (40, 2.0), (10_000, 2.0)]:
        draws = [backoff_s(attempt, 0.1, 2.0, rng) for _ in range(200)]
        assert all(upper / 2 <= d <= upper for d in draws), (attempt, min(draws), max(draws))
        assert max(draws) - min(draws) > upper / 4  # really jittered, not a constant


def test_bad_arguments_are_refused() -> None:
    for args in [(-1, 0.1, 1.0), (0, 0.0, 1.0), (0, 1.0, 0.5)]:
        with pytest.raises(ValueError):
            backoff_s(*args)
