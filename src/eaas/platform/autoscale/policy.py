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

Hot experts (EPLB's goal, balancedness = mean / max tokens per worker, reached by
adding workers instead of moving experts): a shard whose functions draw more tokens
per worker than the pool's mean is relieved by extra workers that host only its
hottest functions. :func:`plan_hot_workers` adds one at a time to the shard with
the highest tokens per worker while the predicted balancedness is below
``balance_target`` and each addition raises it by ``min_balance_gain`` or more
(at most ``max_hot_replicas`` per shard). Each such worker hosts the shard's
hottest functions until they carry ``hot_headroom`` times the share it should take
(:func:`choose_hot_functions`); the set is kept while it still carries that share
without headroom, so noise does not churn workers. Counts go through the same delays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Mapping

from eaas.platform.autoscale.config import AutoscalerConfig
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
    """

    worker_id: str
    shard: str
    state: WorkerState
    heartbeat_at_s: float
    queue_tokens: float = 0.0
    queue_requests: int = 0
    tokens_per_s: float = 0.0
    busy_fraction: float = 0.0


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
    hot: Mapping[str, TargetState] = field(default_factory=dict)
    hot_sets: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Decision:
    """What the mechanism should make true.

    Attributes:
        desired: replicas per shard (hot-expert workers not included).
        hot: per home shard with hot-expert workers, what they host and how many.
        reasons: one human-readable line per shard.
        load: the smoothed load per shard, replica-equivalents (for metrics/plots).
        panic: shards that scaled in panic mode at this tick.
        balancedness: measured mean / max tokens per worker (``None``: no token rates).
    """

    desired: dict[str, int]
    hot: dict[str, "HotWorkers"]
    reasons: dict[str, str]
    load: dict[str, float] = field(default_factory=dict)
    panic: frozenset[str] = frozenset()
    balancedness: float | None = None

    @property
    def total_replicas(self) -> int:
        """Workers the decision asks for, hot-expert workers included."""
        return sum(self.desired.values()) + sum(h.replicas for h in self.hot.values())

    @property
    def hot_extra(self) -> dict[str, int]:
        """Extra replicas per hot function id (a function on several hot workers counts each)."""
        out: dict[str, int] = {}
        for h in self.hot.values():
            for fid in h.functions:
                out[fid] = out.get(fid, 0) + h.replicas
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

    hot, new_hot, new_sets, balance = _decide_hot(snapshot, config, state, reasons)
    decision = Decision(desired, hot, reasons, loads, frozenset(panic), balance)
    return decision, PolicyState(new_shards, new_hot, new_sets)


@dataclass(frozen=True, slots=True)
class HotWorkers:
    """Extra workers that relieve one shard by hosting its hottest functions.

    Attributes:
        home: the shard whose functions they host.
        functions: the function ids they host, hottest first.
        replicas: how many such workers.
    """

    home: str
    functions: tuple[str, ...]
    replicas: int


def balancedness(loads: list[float]) -> float:
    """Mean / max of per-worker loads (vLLM EPLB's ``balancedness``); 1.0 when all idle or none."""
    top = max(loads, default=0.0)
    return sum(loads) / len(loads) / top if top > 0 else 1.0


def plan_hot_workers(shard_rates: Mapping[str, float], shard_workers: Mapping[str, int], *,
                     target: float, min_gain: float, max_per_shard: int) -> dict[str, int]:
    """How many hot-expert workers each shard gets (greedy, one at a time).

    A shard's tokens are assumed spread evenly over its ``n`` workers plus its ``h``
    hot workers (the client's replica choice balances them, see
    :func:`eaas.platform.dispatch.choose_replica`), so its per-worker load is
    ``rate / (n + h)``. While ``balancedness`` over all workers is below ``target``,
    one more worker goes to the shard with the highest per-worker load if that raises
    the balancedness by at least ``min_gain``.

    Args:
        shard_rates: tokens/s per shard (summed over its functions, wherever served).
        shard_workers: ready workers per shard (hot workers not included).
        target: balancedness above which nothing is added (0-1).
        min_gain: least improvement one more worker must bring.
        max_per_shard: most hot workers one shard gets.

    Returns:
        Shard -> hot workers (only shards with > 0).
    """
    shards = [s for s in sorted(shard_rates) if shard_workers.get(s, 0) > 0]
    hot = {s: 0 for s in shards}

    def loads(h: Mapping[str, int]) -> list[float]:
        out: list[float] = []
        for s in shards:
            n = shard_workers[s] + h[s]
            out += [shard_rates[s] / n] * n
        return out

    current = balancedness(loads(hot))
    while current < target:
        candidates = [s for s in shards if hot[s] < max_per_shard]
        if not candidates:
            break
        top = max(candidates, key=lambda s: (shard_rates[s] / (shard_workers[s] + hot[s]), s))
        trial = {**hot, top: hot[top] + 1}
        better = balancedness(loads(trial))
        if better < current + min_gain:
            break
        hot, current = trial, better
    return {s: h for s, h in hot.items() if h > 0}


def choose_hot_functions(rates: Mapping[str, float], share: float, previous: tuple[str, ...] = (),
                         headroom: float = 1.25) -> tuple[str, ...]:
    """The functions a shard's hot workers host: the hottest ones, until they carry ``share``.

    Args:
        rates: tokens/s per function of the shard.
        share: tokens/s the hot workers should take over.
        previous: the set chosen before; kept while it still carries ``share``
            (hysteresis: rates wobble, worker starts are not free).
        headroom: a new set carries ``headroom * share``, so the replica choice has
            room to balance.

    Returns:
        Function ids, hottest first (ties by id); empty when ``share <= 0``.
    """
    if share <= 0:
        return ()
    if previous and sum(rates.get(f, 0.0) for f in previous) >= share:
        return previous
    chosen: list[str] = []
    carried = 0.0
    for fid in sorted(rates, key=lambda f: (-rates[f], f)):
        if carried >= headroom * share or rates[fid] <= 0:
            break
        chosen.append(fid)
        carried += rates[fid]
    return tuple(chosen)


def _decide_hot(
    snapshot: MetricsSnapshot,
    config: AutoscalerConfig,
    state: PolicyState,
    reasons: dict[str, str],
) -> tuple[dict[str, HotWorkers], dict[str, TargetState], dict[str, tuple[str, ...]], float | None]:
    """Hot-expert workers per shard (see the module docstring)."""
    now_s = snapshot.now_s
    rates: dict[str, dict[str, float]] = {}
    for f in snapshot.functions:
        rates.setdefault(f.shard, {})[f.function_id] = max(f.tokens_per_s, 0.0)
    ready: dict[str, int] = {}
    for w in snapshot.workers:
        if w.state is WorkerState.READY and now_s - w.heartbeat_at_s <= config.metrics_stale_s:
            ready[w.shard] = ready.get(w.shard, 0) + 1
    shard_rates = {s: 0.0 for s in ready}  # an idle shard's workers count too
    shard_rates.update({s: sum(r.values()) for s, r in rates.items()})
    measured: float | None = None
    wants: dict[str, int] = {}
    if config.max_hot_replicas > 0 and sum(shard_rates.values()) > 0:
        loads = []
        for s, rate in shard_rates.items():
            n = ready.get(s, 0) + (state.hot[s].replicas if s in state.hot else 0)
            loads += [rate / n] * n if n else []
        measured = balancedness(loads)
        wants = plan_hot_workers(shard_rates, ready, target=config.balance_target,
                                 min_gain=config.min_balance_gain, max_per_shard=config.max_hot_replicas)
    hot: dict[str, HotWorkers] = {}
    new_hot: dict[str, TargetState] = {}
    new_sets: dict[str, tuple[str, ...]] = {}
    for shard in sorted(set(wants) | set(state.hot)):
        ts = state.hot.get(shard, TargetState(0))
        ts, note = _step_target(ts, wants.get(shard, 0), now_s, config)
        if ts.replicas > 0 or ts.pending:
            new_hot[shard] = ts
        if ts.replicas > 0:
            n = ready.get(shard, 0)
            share = shard_rates.get(shard, 0.0) * ts.replicas / max(1, n + ts.replicas)
            functions = choose_hot_functions(rates.get(shard, {}), share, state.hot_sets.get(shard, ()),
                                             config.hot_headroom) or state.hot_sets.get(shard, ())
            if functions:
                new_sets[shard] = functions
                hot[shard] = HotWorkers(shard, functions, ts.replicas)
        if shard in reasons:
            funcs = ",".join(f.rsplit("/", 2)[-2] + "/" + f.rsplit("/", 1)[-1] for f in new_sets.get(shard, ()))
            reasons[shard] += f"; hot workers {ts.replicas} ({note}){' hosting ' + funcs if funcs else ''}"
    return hot, new_hot, new_sets, measured


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
