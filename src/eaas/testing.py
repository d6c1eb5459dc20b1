"""Test helpers shared by the test suite and the benchmarks (no test framework needed)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """A condition did not become true before its deadline."""


def wait_for(predicate: Callable[[], T], timeout_s: float = 10.0, interval_s: float = 0.02, what: str = "") -> T:
    """Poll ``predicate`` until it returns a truthy value; return that value.

    This is how tests wait: on a condition with a deadline, never a fixed sleep.

    Raises:
        WaitTimeout: ``timeout_s`` seconds passed first.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out after {timeout_s:g}s waiting for {what or getattr(predicate, '__name__', predicate)}")
        time.sleep(interval_s)
