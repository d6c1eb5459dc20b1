"""Test helpers shared by the test suite and the benchmarks (no test framework needed)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import subprocess

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


def start_worker(
    env: dict[str, str],
    model: str,
    shard: str = "all",
    *args: str,
    log_path: "str | None" = None,
) -> "subprocess.Popen[bytes]":
    """Start ``eaas worker`` as a real child process (its output to ``log_path`` or DEVNULL).

    ``env`` must point at the registry (``EAAS_REDIS_URL``, ``EAAS_PREFIX``).
    """
    import subprocess
    import sys

    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    return subprocess.Popen(
        [sys.executable, "-m", "eaas.cli", "worker", "--model", model, "--shard", shard, *args],
        env=env, stdout=out, stderr=subprocess.STDOUT,
    )


def wait_workers_ready(registry: "Any", model: str, count: int, timeout_s: float = 60.0) -> list["Any"]:
    """Wait until ``count`` workers of ``model`` are ready in the registry; return their records."""
    from eaas.registry.records import WorkerState

    def ready() -> list[Any]:
        ws = [w for w in registry.workers(model) if w.state is WorkerState.READY]
        return ws if len(ws) >= count else []

    return wait_for(ready, timeout_s, interval_s=0.05, what=f"{count} ready worker(s) of {model}")
