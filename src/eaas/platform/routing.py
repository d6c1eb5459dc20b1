"""The attention client's view of the pool: which replicas may take new work, which are still
owed replies, and since when a function has had no replica at all.

Kept fresh by a watch thread: re-read from the registry (:meth:`Registry.routing`, one read of
the workers) on every membership event and at least every ``routing_refresh_s``; expired
leases are reaped on the periodic pass. Everything here is read under one lock by the
calling thread of :class:`~eaas.platform.client.ExpertClient`.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any

from eaas.backoff import backoff_s
from eaas.errors import EaaSError
from eaas.registry.records import WorkerRecord
from eaas.registry.store import Registry

log = logging.getLogger(__name__)


class RoutingView:
    """Function id -> ready replicas, the epochs of live workers (ready or draining), and outages.

    Args:
        registry: the deployment's registry.
        model: registered model name.
        refresh_s: the longest time between two full re-reads (seconds).

    New work goes to *ready* replicas only; a *draining* worker stays live, so the
    requests already sent to it keep waiting for its reply (no failover, no double
    compute). A worker id seen with a new epoch is a new incarnation.
    """

    def __init__(self, registry: Registry, model: str, refresh_s: float) -> None:
        self.registry, self.model, self.refresh_s = registry, model, refresh_s
        self._lock = threading.Lock()
        self._table: dict[str, list[WorkerRecord]] = {}
        self._live: dict[str, int] = {}  # worker id -> epoch, ready or draining
        self._draining: frozenset[str] = frozenset()
        self._missing_since: dict[str, float] = {}  # function id -> first seen with no replica (monotonic)
        self._refresh_now = threading.Event()
        self._stop = threading.Event()
        self._registry_error: str | None = None  # the watch's last failure, until a pass succeeds
        self._failing_since: float | None = None  # monotonic
        self.refresh()
        self._thread = threading.Thread(target=self._watch, name=f"eaas-routing-{model}", daemon=True)
        self._thread.start()

    def refresh(self) -> None:
        """Re-read the table from the registry (2 round trips)."""
        table, draining = self.registry.routing(self.model)
        live = {w.id: w.epoch for reps in table.values() for w in reps}
        live.update({wid: w.epoch for wid, w in draining.items()})
        with self._lock:
            self._table = table
            self._live = live
            self._draining = frozenset(draining)
            for fid in [f for f in self._missing_since if table.get(f)]:
                del self._missing_since[fid]

    def request_refresh(self) -> None:
        """Ask the watch thread for a re-read at its next wake-up (<= 0.1 s)."""
        self._refresh_now.set()

    def _watch(self) -> None:
        """Background: refresh on membership events and periodically; reap expired leases.
        Survives any failure of one pass (logged, retried after 0.5 s)."""
        last_full = time.monotonic()
        while not self._stop.is_set():
            try:
                for ev in self.registry.events(timeout_s=0.1, stop=self._stop):
                    self._registry_error = self._failing_since = None  # the registry answered
                    now = time.monotonic()
                    due = now - last_full >= self.refresh_s
                    if ev is not None or due or self._refresh_now.is_set():
                        self._refresh_now.clear()
                        if due:
                            self.registry.reap_expired()
                            last_full = now
                        self.refresh()
            except EaaSError as e:
                self._failed(str(e))
                log.warning("client %s: routing watch failed (%s); retrying", self.model, e)
                self._stop.wait(0.5)
            except Exception as e:  # noqa: BLE001 - the watch thread never dies of one bad pass
                self._failed(repr(e))
                log.exception("client %s: routing watch failed; retrying", self.model)
                self._stop.wait(0.5)

    def _failed(self, error: str) -> None:
        self._registry_error = error
        if self._failing_since is None:
            self._failing_since = time.monotonic()

    def registry_status(self) -> dict[str, Any]:
        """``{"reachable", "error", "unreachable_for_s"}``: whether the watch's last pass reached
        the registry. While it does not, calls keep routing with the table last read."""
        since = self._failing_since
        return {"reachable": self._registry_error is None, "error": self._registry_error,
                "unreachable_for_s": None if since is None else round(time.monotonic() - since, 3)}

    # --- reads ---------------------------------------------------------------------

    def table(self) -> dict[str, list[WorkerRecord]]:
        """The current table (replaced, never mutated, on refresh: safe to read without the lock)."""
        with self._lock:
            return self._table

    def live_epochs(self) -> dict[str, int]:
        """Worker id -> epoch of every live worker (ready or draining)."""
        with self._lock:
            return dict(self._live)

    def epoch_of(self, wid: str) -> int | None:
        """The live incarnation of ``wid``, or None when it is gone."""
        with self._lock:
            return self._live.get(wid)

    def ready_replicas(self, fid: str) -> list[WorkerRecord]:
        """Ready replicas of a function."""
        with self._lock:
            return list(self._table.get(fid, ()))

    def missing_functions(self) -> list[str]:
        """Functions of the model with no ready replica right now."""
        with self._lock:
            return [f for f, reps in self._table.items() if not reps]

    def without_replica_since(self, fids: set[str] | list[str], now: float) -> tuple[list[str], float | None]:
        """Of ``fids``, those with no replica in the table, and since when the oldest of them has had
        none (monotonic; first noticed now if never before). ``([], None)`` when all have one."""
        with self._lock:
            missing = sorted({f for f in fids if not self._table.get(f)})
            since = [self._missing_since.setdefault(f, now) for f in missing]
        return missing, (min(since) if since else None)

    def pool_summary(self) -> dict[str, Any]:
        """``{"model", "ready", "draining", "min_replicas"}``: worker counts, and the fewest ready
        replicas of any function of the model."""
        with self._lock:
            ready = len(set(self._live) - self._draining)
            mins = min((len(reps) for reps in self._table.values()), default=0)
            return {"model": self.model, "ready": ready, "draining": len(self._draining), "min_replicas": mins}

    def close(self) -> None:
        """Stop the watch thread."""
        self._stop.set()
        self._thread.join(timeout=2)


class Suspects:
    """Replicas to route around for a while after they failed (timeout, bad reply, lost connection).

    Each failure in a row extends the worker's suspension by a capped exponential backoff
    with jitter (:func:`eaas.backoff.backoff_s`: 0.25 s doubling up to ``cap_s``); its next
    good reply clears it. A suspect replica is still used when no healthy one is left.
    """

    def __init__(self, cap_s: float, rng: random.Random | None = None) -> None:
        self.cap_s, self._rng = cap_s, rng
        self._until: dict[str, float] = {}  # worker id -> monotonic time
        self._strikes: dict[str, int] = {}  # worker id -> failures in a row

    def mark(self, wid: str) -> float:
        """One more failure of ``wid``; returns how long it is routed around (s)."""
        strikes = self._strikes.get(wid, 0)
        self._strikes[wid] = strikes + 1
        delay = backoff_s(strikes, 0.25, self.cap_s, self._rng)
        self._until[wid] = time.monotonic() + delay
        return delay

    def clear(self, wid: str) -> None:
        """``wid`` answered well: no longer suspect, and its backoff starts over."""
        if self._strikes.pop(wid, None) is not None:
            self._until.pop(wid, None)

    def suspect(self, wid: str, now: float) -> bool:
        """``wid`` is being routed around at monotonic time ``now``."""
        return self._until.get(wid, 0.0) > now
