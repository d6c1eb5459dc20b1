"""The live autoscaler: gather a snapshot, call :func:`decide`, apply it through the pool.

Ray Serve's split: :func:`~eaas.platform.autoscale.policy.decide` is pure; this
module does the I/O around it, once per tick:

1. **Gather** — the model's workers from the registry (via the pool, so its
   children still loading count as ``starting``); token rates come from the
   deltas of the monotonic ``tokens_served`` / ``function_tokens`` counters
   between two heartbeats. Expired leases are reaped first.
2. **Decide** — ``decide(snapshot, config, state)``; its wall time is exported.
3. **Apply** (unless publish-only, ``pool=None``) — per shard, start workers up
   to the desired count, or drain the surplus: first workers still loading
   (they serve nothing yet), then the least loaded ready ones. Draining never
   loses a request: the worker finishes its queue before it exits. Extra
   replicas of hot experts are written per worker into the registry
   (``worker:{id}:extra``); each worker loads them while serving and joins
   their hosting sets (:class:`eaas.platform.replicas.ExtraReplicas`).

Every change is logged with the policy's reason and exported as Prometheus
metrics (``eaas_desired_replicas{shard}``, ``eaas_actual_replicas{shard,state}``,
``eaas_autoscaler_decisions_total{shard,direction}``,
``eaas_autoscaler_policy_seconds``). A restarted autoscaler starts from the
pool it finds in the registry (the policy state starts at the current size).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from eaas.errors import EaaSError
from eaas.platform.autoscale.config import AutoscalerConfig
from eaas.platform.autoscale.policy import (
    Decision,
    FunctionMetrics,
    MetricsSnapshot,
    PolicyState,
    VictimCandidate,
    WorkerMetrics,
    choose_victims,
    decide,
)
from eaas.platform.pool import LocalPool, PoolMember
from eaas.registry.records import WorkerRecord, WorkerState
from eaas.functions.spec import parse_function_id
from eaas.registry.store import Registry

log = logging.getLogger(__name__)

DEFAULT_TICK_S = 1.0


def spec_from_functions(function_ids: list[str] | tuple[str, ...]) -> str:
    """A shard SPEC hosting exactly these ``{model}/{layer}/{expert}`` ids (``L:e1,e2;...``)."""
    by_layer: dict[int, list[int]] = {}
    for fid in function_ids:
        _, layer, expert = parse_function_id(fid)
        by_layer.setdefault(layer, []).append(expert)
    return ";".join(f"{l}:{','.join(map(str, sorted(es)))}" for l, es in sorted(by_layer.items()))


@dataclass(frozen=True, slots=True)
class TickRecord:
    """What one tick saw and did (for logs, benchmarks and tests).

    Attributes:
        now_s: the clock at the tick.
        desired: replicas per shard the policy wants (hot shards included).
        ready: ready workers per shard.
        starting: launched, not yet registered, per shard.
        load: smoothed load per shard (replica-equivalents).
        started: worker ids launched at this tick.
        drained: worker ids asked to drain at this tick.
        policy_s: wall time of ``decide`` (s).
    """

    now_s: float
    desired: dict[str, int]
    ready: dict[str, int]
    starting: dict[str, int]
    load: dict[str, float]
    started: tuple[str, ...] = ()
    drained: tuple[str, ...] = ()
    policy_s: float = 0.0


@dataclass(slots=True)
class _Counters:
    heartbeat_at_s: float
    tokens_served: int
    function_tokens: dict[str, int]
    tokens_per_s: float = 0.0
    function_rates: dict[str, float] = field(default_factory=dict)


class Autoscaler:
    """Apply the autoscaling policy to one model's workers.

    Args:
        registry: the deployment's registry.
        model: registered model name.
        config: the policy's knobs.
        pool: where to start and drain workers; ``None`` = publish-only (decide, never act).
        shards: shard name -> SPEC of the shards to manage; shards found in the
            registry are added with the SPEC derived from their functions.
        clock: unix-time clock (the heartbeats' clock), injected for tests.
        tick_s: period of :meth:`run`.
        metrics: Prometheus registry to export into (default: a private one).
        history: ticks kept in :attr:`history`.
    """

    def __init__(
        self,
        registry: Registry,
        model: str,
        config: AutoscalerConfig,
        *,
        pool: LocalPool | None = None,
        shards: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
        tick_s: float = DEFAULT_TICK_S,
        metrics: CollectorRegistry | None = None,
        history: int = 100_000,
    ) -> None:
        self.registry = registry
        self.model = model
        self.config = config
        self.pool = pool
        self.shards: dict[str, str] = dict(shards or {})
        self.clock = clock
        self.tick_s = tick_s
        self.state = PolicyState()
        self.history: deque[TickRecord] = deque(maxlen=history)
        self.desired: dict[str, int] = {}
        self.extras: dict[str, frozenset[str]] = {}  # extra replicas last written per worker
        self.last_decision: Decision | None = None
        self._counters: dict[str, _Counters] = {}
        self._lock = threading.Lock()
        self.metrics = metrics or CollectorRegistry()
        self._g_desired = Gauge("eaas_desired_replicas", "replicas per shard the autoscaler wants", ["shard"], registry=self.metrics)
        self._g_actual = Gauge("eaas_actual_replicas", "workers per shard and state", ["shard", "state"], registry=self.metrics)
        self._g_load = Gauge("eaas_shard_load", "smoothed load per shard (replica-equivalents)", ["shard"], registry=self.metrics)
        self._c_decisions = Counter("eaas_autoscaler_decisions", "replica target changes", ["shard", "direction"], registry=self.metrics)
        self._c_actions = Counter("eaas_autoscaler_actions", "workers started or drained", ["action"], registry=self.metrics)
        self._h_policy = Histogram("eaas_autoscaler_policy_seconds", "wall time of one decide() call", registry=self.metrics,
                                   buckets=(1e-5, 1e-4, 1e-3, 1e-2, 1e-1))  # fmt: skip

    # --- gather ---------------------------------------------------------------

    def _members(self) -> list[PoolMember]:
        if self.pool is not None:
            return self.pool.workers(self.model)
        return [PoolMember(r.id, r.shard_name, r.state, r.pid, False, r) for r in self.registry.workers(self.model)]

    def _rates(self, rec: WorkerRecord) -> _Counters:
        """Token rates of a worker from the counter deltas between its last two heartbeats."""
        prev = self._counters.get(rec.id)
        if prev is None:
            cur = _Counters(rec.heartbeat_at_s, rec.tokens_served, dict(rec.function_tokens))
        elif rec.heartbeat_at_s > prev.heartbeat_at_s:
            dt = rec.heartbeat_at_s - prev.heartbeat_at_s
            rates = {f: max(0, n - prev.function_tokens.get(f, 0)) / dt for f, n in rec.function_tokens.items()}
            cur = _Counters(rec.heartbeat_at_s, rec.tokens_served, dict(rec.function_tokens),
                            max(0, rec.tokens_served - prev.tokens_served) / dt, rates)  # fmt: skip
        else:
            cur = prev
        self._counters[rec.id] = cur
        return cur

    def snapshot(self, members: list[PoolMember] | None = None) -> MetricsSnapshot:
        """The policy's view now: the workers (with what they host and serve) and function token rates."""
        now_s = self.clock()
        members = self._members() if members is None else members
        workers: list[WorkerMetrics] = []
        func_rates: dict[tuple[str, str], float] = {}
        live = set()
        for m in members:
            if not m.shard_name:
                continue
            if m.shard_name not in self.shards and m.record is not None:
                self.shards[m.shard_name] = spec_from_functions(m.record.shard)
                log.info("shard %s: adopted from the registry (%s)", m.shard_name, self.shards[m.shard_name])
            state = m.state
            if m.record is None:  # a child still loading: counts toward the target now
                workers.append(WorkerMetrics(m.worker_id, m.shard_name, state, now_s))
                continue
            live.add(m.worker_id)
            c = self._rates(m.record)
            r = m.record
            workers.append(WorkerMetrics(r.id, m.shard_name, state, r.heartbeat_at_s, float(r.queue_tokens),
                                         r.queue_requests, c.tokens_per_s, r.busy_fraction, frozenset(r.shard),
                                         dict(c.function_rates)))  # fmt: skip
            for fid, rate in c.function_rates.items():
                func_rates[(fid, m.shard_name)] = func_rates.get((fid, m.shard_name), 0.0) + rate
        for wid in set(self._counters) - live:
            self._counters.pop(wid)
        functions = tuple(FunctionMetrics(fid, shard, rate) for (fid, shard), rate in sorted(func_rates.items()))
        return MetricsSnapshot(now_s, tuple(workers), functions, tuple(sorted(self.shards)))

    # --- decide and apply ---------------------------------------------------------

    def tick(self) -> TickRecord:
        """One control step: reap, gather, decide, apply, export. Returns what happened."""
        try:
            self.registry.reap_expired()
        except EaaSError as e:
            log.warning("autoscaler %s: reap failed: %s", self.model, e)
        members = self._members()
        snap = self.snapshot(members)
        t0 = time.perf_counter()
        decision, self.state = decide(snap, self.config, self.state)
        policy_s = time.perf_counter() - t0
        self._h_policy.observe(policy_s)
        desired = dict(decision.desired)
        for shard, n in desired.items():
            before = self.desired.get(shard)
            if before is not None and before != n:
                self._c_decisions.labels(shard, "up" if n > before else "down").inc()
                log.info("autoscaler %s: shard %s %d -> %d: %s", self.model, shard, before, n,
                         decision.reasons.get(shard, "hot expert"))  # fmt: skip
        started: list[str] = []
        drained: list[str] = []
        if self.pool is not None:
            started, drained = self._apply(desired, members, self.shards)
            self._apply_extras(decision.extras, members, decision.reasons.get("extra replicas", ""))
        with self._lock:
            self.desired = desired
            self.last_decision = decision
        ready: dict[str, int] = {}
        starting: dict[str, int] = {}
        draining: dict[str, int] = {}
        for m in members:
            bucket = {WorkerState.READY: ready, WorkerState.STARTING: starting, WorkerState.DRAINING: draining}[m.state]
            bucket[m.shard_name] = bucket.get(m.shard_name, 0) + 1
        for shard in set(desired) | set(ready) | set(starting) | set(draining):
            self._g_desired.labels(shard).set(desired.get(shard, 0))
            for state, bucket in (("ready", ready), ("starting", starting), ("draining", draining)):
                self._g_actual.labels(shard, state).set(bucket.get(shard, 0))
        for shard, load in decision.load.items():
            self._g_load.labels(shard).set(load)
        rec = TickRecord(snap.now_s, desired, ready, starting, dict(decision.load), tuple(started), tuple(drained), policy_s)
        self.history.append(rec)
        return rec

    def _apply(self, desired: dict[str, int], members: list[PoolMember], specs: dict[str, str]) -> tuple[list[str], list[str]]:
        assert self.pool is not None
        started: list[str] = []
        drained: list[str] = []
        for shard, want in sorted(desired.items()):
            active = [m for m in members if m.shard_name == shard and m.state is not WorkerState.DRAINING]
            if len(active) < want:
                spec = specs.get(shard)
                if spec is None:
                    log.warning("autoscaler %s: shard %s has no known SPEC, cannot start workers", self.model, shard)
                    continue
                for _ in range(want - len(active)):
                    try:
                        h = self.pool.start(shard, spec, self.model)
                    except EaaSError as e:
                        log.warning("autoscaler %s: shard %s: start failed: %s", self.model, shard, e)
                        break
                    started.append(h.worker_id)
                    self._c_actions.labels("start").inc()
                    log.info("autoscaler %s: shard %s: started %s (%d -> %d)", self.model, shard, h.worker_id, len(active), want)
            elif len(active) > want:
                by_id = {m.worker_id: m for m in active}
                victims = choose_victims([VictimCandidate(
                    m.worker_id, m.record is not None, m.launched_at_s,
                    float(m.record.queue_tokens) + m.record.busy_fraction if m.record is not None else 0.0,
                ) for m in active], len(active) - want)
                for m in (by_id[v] for v in victims):
                    try:
                        self.pool.drain(m.worker_id, wait=False)
                    except EaaSError as e:
                        log.warning("autoscaler %s: drain of %s failed: %s", self.model, m.worker_id, e)
                        continue
                    drained.append(m.worker_id)
                    self._c_actions.labels("drain").inc()
                    log.info("autoscaler %s: shard %s: draining %s (%d -> %d)", self.model, shard, m.worker_id, len(active), want)
        return started, drained

    def _apply_extras(self, extras: dict[str, frozenset[str]], members: list[PoolMember], why: str) -> None:
        """Write each ready worker's wanted extra replicas into the registry (only changes)."""
        for m in members:
            if m.record is None or m.state is not WorkerState.READY:
                continue
            want = extras.get(m.worker_id, frozenset())
            if self.extras.get(m.worker_id, frozenset()) == want:
                continue
            try:
                self.registry.set_extra_functions(m.worker_id, want)
            except EaaSError as e:
                log.warning("autoscaler %s: extra replicas of %s not written: %s", self.model, m.worker_id, e)
                continue
            self.extras[m.worker_id] = want
            self._c_actions.labels("extras").inc()
            log.info("autoscaler %s: worker %s: extra replicas %s (%s)", self.model, m.worker_id, sorted(want) or "none", why)
        for wid in set(self.extras) - {m.worker_id for m in members}:
            self.extras.pop(wid)

    def desired_replicas(self) -> dict[str, int]:
        """The last desired replicas per shard (thread-safe copy)."""
        with self._lock:
            return dict(self.desired)

    def run(self, stop_event: threading.Event) -> None:
        """Tick every ``tick_s`` until ``stop_event`` is set; a failing tick is logged, not fatal."""
        log.info("autoscaler %s: running (tick %gs, %s)", self.model, self.tick_s,
                 "publish-only" if self.pool is None else "local pool")  # fmt: skip
        while not stop_event.is_set():
            try:
                self.tick()
            except EaaSError as e:
                log.warning("autoscaler %s: tick failed: %s", self.model, e)
            except Exception:  # noqa: BLE001 - the control loop outlives any one bad tick
                log.exception("autoscaler %s: tick failed", self.model)
            stop_event.wait(self.tick_s)
        log.info("autoscaler %s: stopped", self.model)
