"""The autoscaling policy: a pure function, no I/O, the clock passed in.

``decide(snapshot, config, state) -> (decision, state)`` turns one metrics
snapshot into desired replicas per shard and extra replicas for hot experts.
The mechanism (live autoscaler, or the simulation in ``simulate.py``) gathers
snapshots, calls it once per control tick and applies the decision.

Per shard, each tick (Ray Serve's control loop, with Knative's panic mode):

1. Only *fresh* workers count (heartbeat at most ``metrics_stale_s`` old);
   draining workers are neither capacity nor load. The load, in
   replica-equivalents, is computed from the ready ones (see ``config.py``).
2. **Panic**: if the instantaneous load is ``panic_threshold`` times the ready
   replicas or more, the target jumps to ``ceil(load)`` at once.
3. Otherwise the load is smoothed (exponential moving average, time constant
   ``look_back_s``) and the proposal is
   ``ceil(target + (load - target) * smoothing_factor)``, within
   ``[min_replicas, max_replicas]``.
4. A proposal that differs from the target is applied only once it has pointed
   the same way for ``upscale_delay_s`` / ``downscale_delay_s`` *and* that long
   has passed since the last change: an oscillating load changes a shard at
   most once per delay window (no flapping).

Hot experts (vLLM EPLB's redundant experts, placed live): the goal is EPLB's
*balancedness*, per MoE layer the mean over the max of the tokens each worker
hosting that layer serves, summed over layers (:func:`layer_balancedness`). Each
function's tokens are predicted to spread evenly over the workers hosting it;
:func:`plan_extra_replicas` adds one extra replica at a time, of a hot function
of the most loaded worker of some layer, on a cold worker of that layer, taking
the addition that raises the balancedness most, while it is below
``balance_target`` and the gain is at least ``min_balance_gain``. Rates are smoothed
over ``look_back_s``. Extra replicas
go onto existing workers, which load them while serving
(:class:`eaas.platform.replicas.ExtraReplicas`): adding *workers* cannot lift a
layer's mean over max while other workers stay cold in it. A new plan replaces
the current one only when it is better by twice ``min_balance_gain`` for
``upscale_delay_s`` (or, with fewer extras and no worse, for ``downscale_delay_s``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Mapping


from eaas.platform.autoscale.config import AutoscalerConfig
from eaas.platform.autoscale.placement import layer_balancedness, layer_of, plan_extra_replicas, predicted_loads
from eaas.registry.records import WorkerState  # the one life cycle: starting, ready, draining


@dataclass(frozen=True, slots=True)
class WorkerMetrics:
    """One worker's last heartbeat.

    Attributes:
        worker_id: registry id of the worker.
        shard: name of the shard (set of functions) it hosts.
        state: its :class:`WorkerState`.
        heartbeat_at_s: clock time of the heartbeat these numbers come from (s).
        queue_tokens: tokens queued or in service.
        queue_requests: requests queued or in service.
        tokens_per_s: tokens served per second over the last heartbeat period.
        busy_fraction: share of the last heartbeat period spent computing, 0-1.
        functions: function ids it hosts now (extra replicas included).
        function_rates: tokens/s it served per function over the last heartbeat period.
    """

    worker_id: str
    shard: str
    state: WorkerState
    heartbeat_at_s: float
    queue_tokens: float = 0.0
    queue_requests: int = 0
    tokens_per_s: float = 0.0
    busy_fraction: float = 0.0
    functions: frozenset[str] = frozenset()
    function_rates: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class FunctionMetrics:
    """Tokens routed to one expert function, summed over its replicas.

    Attributes:
        function_id: ``{model}/{layer}/{expert}``.
        shard: the shard that hosts it.
        tokens_per_s: tokens per second sent to it.
    """

    function_id: str
    shard: str
    tokens_per_s: float


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """Everything the policy sees at one tick.

    Attributes:
        now_s: the clock (injected; same clock as ``heartbeat_at_s``).
        workers: one entry per registered worker.
        functions: token rates per function (optional: only hot-expert detection uses them).
        shards: every shard that should exist, even one with no worker left;
            shards named by workers or functions are added implicitly.
    """

    now_s: float
    workers: tuple[WorkerMetrics, ...] = ()
    functions: tuple[FunctionMetrics, ...] = ()
    shards: tuple[str, ...] = ()

    def shard_names(self) -> list[str]:
        """Sorted names of every shard mentioned in the snapshot."""
        names = set(self.shards)
        names.update(w.shard for w in self.workers)
        names.update(f.shard for f in self.functions)
        return sorted(names)


@dataclass(frozen=True, slots=True)
class TargetState:
    """A replica target with its pending proposal (one per shard or hot function).

    Attributes:
        replicas: the target last applied.
        last_change_s: when it last changed (``-inf``: never).
        pending: direction of the proposal waiting out its delay (+1, -1, or 0: none).
        pending_since_s: since when that direction has been proposed without a break.
    """

    replicas: int
    last_change_s: float = -math.inf
    pending: int = 0
    pending_since_s: float = 0.0


@dataclass(frozen=True, slots=True)
class ShardState:
    """Policy memory for one shard.

    Attributes:
        target: the shard's replica target and pending proposal.
        load_ema: smoothed load (replica-equivalents); ``None`` before the first measure.
        ema_at_s: clock time of the last update of ``load_ema``.
        window_since_s: start of the current window of load samples (the first
            tick with a ready replica, or the last change of the ready count);
            ``None`` before the first measure. Scale-down waits until the window
            spans ``look_back_s``: a restarted autoscaler must not shrink the pool
            on one sample.
        ready: ready replicas at the last tick (a change restarts the window).
    """

    target: TargetState
    load_ema: float | None = None
    ema_at_s: float = 0.0
    window_since_s: float | None = None
    ready: int = 0


@dataclass(frozen=True, slots=True)
class PolicyState:
    """Everything :func:`decide` remembers between ticks (start with ``PolicyState()``)."""

    shards: Mapping[str, ShardState] = field(default_factory=dict)
    extras: Mapping[str, frozenset[str]] = field(default_factory=dict)
    extras_pending_since_s: float | None = None
    rates: Mapping[str, float] = field(default_factory=dict)
    rates_at_s: float | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """What the mechanism should make true.

    Attributes:
        desired: replicas per shard.
        extras: extra replicas (function ids) each ready worker should host beyond its shard.
        reasons: one human-readable line per shard.
        load: the smoothed load per shard, replica-equivalents (for metrics/plots).
        panic: shards that scaled in panic mode at this tick.
        balancedness: measured :func:`layer_balancedness` (``None``: no token rates).
    """

    desired: dict[str, int]
    extras: dict[str, frozenset[str]]
    reasons: dict[str, str]
    load: dict[str, float] = field(default_factory=dict)
    panic: frozenset[str] = frozenset()
    balancedness: float | None = None

    @property
    def total_replicas(self) -> int:
        """Workers the decision asks for."""
        return sum(self.desired.values())

    @property
    def hot_extra(self) -> dict[str, int]:
        """Extra replicas per hot function id."""
        out: dict[str, int] = {}
        for fids in self.extras.values():
            for fid in fids:
                out[fid] = out.get(fid, 0) + 1
        return out


def _clamp(n: int, config: AutoscalerConfig) -> int:
    return max(config.min_replicas, min(config.max_replicas, n))


def _step_target(
    ts: TargetState, proposal: int, now_s: float, config: AutoscalerConfig
) -> tuple[TargetState, str]:
    # Only the delays of ``config`` are used here; bounds are the caller's job.
    """Apply the delay rule to one target; returns the new target and a note."""
    direction = (proposal > ts.replicas) - (proposal < ts.replicas)
    if direction == 0:
        return replace(ts, pending=0), "steady"
    since_s = ts.pending_since_s if ts.pending == direction else now_s
    delay_s = config.upscale_delay_s if direction > 0 else config.downscale_delay_s
    waited_s = now_s - since_s
    if waited_s >= delay_s and now_s - ts.last_change_s >= delay_s:
        word = "up" if direction > 0 else "down"
        return TargetState(proposal, now_s, 0, now_s), f"scaled {word} {ts.replicas}->{proposal}"
    word = "up" if direction > 0 else "down"
    left_s = max(delay_s - waited_s, delay_s - (now_s - ts.last_change_s))
    return replace(ts, pending=direction, pending_since_s=since_s), (
        f"{word} to {proposal} pending ({left_s:.0f}s left)"
    )


def shard_load(workers: list[WorkerMetrics], config: AutoscalerConfig) -> float:
    """Load of a shard in replica-equivalents, from its ready, fresh workers."""
    busy = sum(min(max(w.busy_fraction, 0.0), 1.0) for w in workers)
    queue = sum(max(w.queue_tokens, 0.0) for w in workers)
    return max(busy / config.target_busy_fraction, queue / config.target_queue_tokens_per_replica)


def decide(
    snapshot: MetricsSnapshot, config: AutoscalerConfig, state: PolicyState
) -> tuple[Decision, PolicyState]:
    """One control tick: desired replicas per shard and for hot experts.

    Args:
        snapshot: metrics at ``snapshot.now_s``.
        config: the policy's knobs.
        state: what the previous call returned (``PolicyState()`` at first).

    Returns:
        The decision and the state to pass to the next call.
    """
    now_s = snapshot.now_s
    fresh = [w for w in snapshot.workers if now_s - w.heartbeat_at_s <= config.metrics_stale_s]
    desired: dict[str, int] = {}
    reasons: dict[str, str] = {}
    loads: dict[str, float] = {}
    panic: set[str] = set()
    new_shards: dict[str, ShardState] = {}

    for shard in sorted(set(snapshot.shard_names()) | set(state.shards)):
        mine = [w for w in fresh if w.shard == shard]
        ready = [w for w in mine if w.state is WorkerState.READY]
        starting = sum(1 for w in mine if w.state is WorkerState.STARTING)
        prev = state.shards.get(shard)
        ts = prev.target if prev else TargetState(_clamp(len(ready) + starting, config))
        ema = prev.load_ema if prev else None
        ema_at_s = prev.ema_at_s if prev else now_s
        window_since_s = prev.window_since_s if prev else None
        if ready and (window_since_s is None or (prev is not None and prev.ready != len(ready))):
            window_since_s = now_s  # first sample, or the pool changed: a new window of load starts

        if not ready:
            ts = replace(ts, replicas=_clamp(ts.replicas, config), pending=0)
            note = f"no ready replica with fresh metrics ({starting} starting): holding {ts.replicas}"
        else:
            raw = shard_load(ready, config)
            if ema is None or config.look_back_s == 0:
                ema = raw
            else:
                alpha = 1.0 - math.exp(-max(now_s - ema_at_s, 0.0) / config.look_back_s)
                ema += alpha * (raw - ema)
            ema_at_s = now_s
            ratio = raw / len(ready)
            jump = _clamp(math.ceil(raw - 1e-9), config)
            if ratio >= config.panic_threshold and jump > ts.replicas:
                panic.add(shard)
                note = f"panic: load {raw:.1f} on {len(ready)} ready ({ratio:.1f}x) -> {jump} at once"
                ts = TargetState(jump, now_s, 0, now_s)
                ema = max(ema, raw)
            else:
                factor = (
                    config.upscale_smoothing_factor if ema > ts.replicas else config.downscale_smoothing_factor
                )
                proposal = _clamp(math.ceil(ts.replicas + (ema - ts.replicas) * factor - 1e-9), config)
                window_s = now_s - (window_since_s if window_since_s is not None else now_s)
                if proposal < ts.replicas and window_s < config.look_back_s:
                    # the proposal keeps pending (its delay runs) but is not applied before a full window
                    since_s = ts.pending_since_s if ts.pending == -1 else now_s
                    ts = replace(ts, pending=-1, pending_since_s=since_s)
                    step_note = (f"down to {proposal} held: {window_s:.0f}s of load seen,"
                                 f" {config.look_back_s:g}s needed")
                else:
                    ts, step_note = _step_target(ts, proposal, now_s, config)
                note = f"load {ema:.2f} (now {raw:.2f}) on {len(ready)} ready: {step_note}"
            loads[shard] = ema
        desired[shard] = ts.replicas
        reasons[shard] = f"{shard}: {note}"
        new_shards[shard] = ShardState(ts, ema, ema_at_s, window_since_s, len(ready))

    rates = _smoothed_rates(snapshot, config, state)
    extras, since, balance, note = _decide_extras(snapshot, config, state, rates)
    if note:
        reasons["extra replicas"] = note
    decision = Decision(desired, extras, reasons, loads, frozenset(panic), balance)
    return decision, PolicyState(new_shards, extras, since, rates, snapshot.now_s)


def _smoothed_rates(snapshot: MetricsSnapshot, config: AutoscalerConfig, state: PolicyState) -> dict[str, float]:
    """Tokens/s per function (summed over the fresh ready workers), as an exponential moving average
    with time constant ``look_back_s`` (as the shards' load): a plan follows the traffic, not the noise
    of one heartbeat period."""
    now_s = snapshot.now_s
    raw: dict[str, float] = {}
    for w in snapshot.workers:
        if w.state is WorkerState.READY and now_s - w.heartbeat_at_s <= config.metrics_stale_s:
            for fid, r in w.function_rates.items():
                raw[fid] = raw.get(fid, 0.0) + max(r, 0.0)
    if state.rates_at_s is None or config.look_back_s == 0:
        return raw
    alpha = 1.0 - math.exp(-max(now_s - state.rates_at_s, 0.0) / config.look_back_s)
    return {f: state.rates.get(f, 0.0) + alpha * (raw.get(f, 0.0) - state.rates.get(f, 0.0))
            for f in set(raw) | set(state.rates)}


def _decide_extras(snapshot: MetricsSnapshot, config: AutoscalerConfig, state: PolicyState, rates: dict[str, float]
                   ) -> tuple[dict[str, frozenset[str]], float | None, float | None, str]:
    """Extra replicas per ready worker (see the module docstring): (extras, pending since, measured, note).

    ``rates``: smoothed tokens/s per function (:func:`_smoothed_rates`)."""
    now_s = snapshot.now_s
    ready = [w for w in snapshot.workers
             if w.state is WorkerState.READY and now_s - w.heartbeat_at_s <= config.metrics_stale_s]
    current = {w.worker_id: state.extras[w.worker_id] for w in ready if state.extras.get(w.worker_id)}
    measured_loads: dict[int, dict[str, float]] = {}
    for w in ready:
        for fid in w.functions:
            measured_loads.setdefault(layer_of(fid), {}).setdefault(w.worker_id, 0.0)
        for fid, r in w.function_rates.items():
            if fid in w.functions:
                measured_loads[layer_of(fid)][w.worker_id] += max(r, 0.0)
    if config.max_hot_replicas == 0 or not ready or sum(rates.values()) <= 0:
        return current, None, None, ""
    measured = layer_balancedness(measured_loads)
    base = {w.worker_id: frozenset(w.functions) - current.get(w.worker_id, frozenset()) for w in ready}
    fresh = plan_extra_replicas(rates, base, target=config.balance_target, min_gain=config.min_balance_gain,
                                max_per_worker=config.max_extra_per_worker, max_per_function=config.max_hot_replicas)
    if fresh == current:
        return current, None, measured, ""

    def predicted(extras: Mapping[str, frozenset[str]]) -> float:
        return layer_balancedness(predicted_loads(rates, {w: base[w] | extras.get(w, frozenset()) for w in base}))

    b_fresh, b_current = predicted(fresh), predicted(current)
    fewer = sum(map(len, fresh.values())) < sum(map(len, current.values()))
    if b_fresh >= b_current + 2 * config.min_balance_gain:  # a new plan must clearly beat the one serving
        delay_s = config.upscale_delay_s
    elif fewer and b_fresh >= b_current - 0.01:
        delay_s = config.downscale_delay_s
    else:
        return current, None, measured, ""
    since = state.extras_pending_since_s if state.extras_pending_since_s is not None else now_s
    total = sum(map(len, fresh.values()))
    if now_s - since >= delay_s:
        return fresh, None, measured, (f"measured balancedness {measured:.2f}: {total} extra replicas applied "
                                       f"(predicted {b_current:.2f} -> {b_fresh:.2f})")
    return current, since, measured, (f"measured balancedness {measured:.2f}: {total} extra replicas pending "
                                      f"({delay_s - (now_s - since):.0f}s left; predicted {b_current:.2f} -> {b_fresh:.2f})")


@dataclass(frozen=True, slots=True)
class VictimCandidate:
    """A worker of a shard that is being scaled down.

    Attributes:
        worker_id: its id (any hashable the caller uses).
        ready: it serves already (``False``: still starting, loading weights).
        launched_s: when it was started (clock of the caller).
        load: how busy it is, lower is cheaper to drain (queued tokens, or time until free).
    """

    worker_id: object
    ready: bool
    launched_s: float
    load: float = 0.0


def choose_victims(candidates: list[VictimCandidate], count: int) -> list[object]:
    """Which ``count`` workers a scale-down removes, in order.

    Starting workers go first, newest first: they serve nothing yet and have cost the
    least. Then ready workers, least loaded first (the shortest drain, the least work
    re-queued nowhere: a drain loses nothing), the newest among equals.
    Used by the live mechanism and by the simulator alike.

    Returns:
        The chosen worker ids (at most ``count``).
    """
    order = sorted(candidates, key=lambda c: (c.ready, c.load if c.ready else 0.0, -c.launched_s))
    return [c.worker_id for c in order[: max(0, count)]]
