"""Policy unit tests: synthetic snapshot sequences on a fake clock (no I/O)."""

from __future__ import annotations

import dataclasses

import pytest

from eaas.errors import ConfigError
from eaas.platform.autoscale import (
    AutoscalerConfig,
    FunctionMetrics,
    MetricsSnapshot,
    PolicyState,
    WorkerMetrics,
    WorkerState,
    decide,
)
from eaas.platform.autoscale.placement import balancedness, layer_balancedness, plan_extra_replicas, predicted_loads

SHARD = "shard-0"
BASE = AutoscalerConfig(
    min_replicas=2, max_replicas=8, upscale_delay_s=10, downscale_delay_s=30, look_back_s=0,
    panic_threshold=2.0, target_queue_tokens_per_replica=1000, target_busy_fraction=0.5,
)


def workers(n: int, load: float, config: AutoscalerConfig, now_s: float, state=WorkerState.READY, prefix="w"):
    """``n`` workers whose queues add up to ``load`` replica-equivalents."""
    q = load * config.target_queue_tokens_per_replica / max(n, 1)
    return [WorkerMetrics(f"{prefix}{i}", SHARD, state, now_s, queue_tokens=q) for i in range(n)]


def drive(config: AutoscalerConfig, load_at, duration_s: float, start_replicas: int = 2, tick_s: float = 1.0):
    """Fake mechanism: the pool follows the decision at once. Returns [(t, desired)] per tick."""
    state, n, out = PolicyState(), start_replicas, []
    t = 0.0
    while t <= duration_s:
        snap = MetricsSnapshot(now_s=t, workers=tuple(workers(n, load_at(t), config, t)))
        decision, state = decide(snap, config, state)
        n = decision.desired[SHARD]
        out.append((t, n))
        t += tick_s
    return out


def changes(series):
    return [(t, n) for (t, n), (_, prev) in zip(series[1:], series[:-1]) if n != prev]


@pytest.mark.parametrize(
    "name, config, load_at, duration_s, start, expect_final, expect_changes",
    [
        # step up 2 -> 3.5 at t=20 (below panic): applied once the proposal held for upscale_delay_s
        ("step up", BASE, lambda t: 2.0 if t < 20 else 3.5, 60, 2, 4, [(30.0, 4)]),
        # step up 2 -> 6 (3x the ready replicas): panic, at once
        ("step up, panic", BASE, lambda t: 2.0 if t < 20 else 6.0, 60, 2, 6, [(20.0, 6)]),
        # step down 6 -> 2 at t=20: waits downscale_delay_s
        ("step down", BASE, lambda t: 6.0 if t < 20 else 2.0, 90, 6, 2, [(50.0, 2)]),
        # 2-second spike to 10x: panic mode jumps to max at once, holds for the down delay
        ("spike, panic", BASE, lambda t: 10.0 if 20 <= t < 22 else 1.0, 120, 2, 2, [(20.0, 8), (52.0, 2)]),
        # same spike without panic: shorter than the upscale delay, nothing happens
        ("spike, no panic", dataclasses.replace(BASE, panic_threshold=100.0),
         lambda t: 10.0 if 20 <= t < 22 else 1.0, 120, 2, 2, []),
        # bounds: far above max and at zero load
        ("bounded above", BASE, lambda t: 100.0 if t >= 5 else 4.0, 60, 4, 8, [(5.0, 8)]),
        ("bounded below", BASE, lambda t: 0.0, 60, 4, 2, [(30.0, 2)]),
    ],
)
def test_scaling_sequences(name, config, load_at, duration_s, start, expect_final, expect_changes):
    series = drive(config, load_at, duration_s, start_replicas=start)
    assert series[-1][1] == expect_final, name
    assert changes(series) == expect_changes, name
    assert all(config.min_replicas <= n <= config.max_replicas for _, n in series)


@pytest.mark.parametrize("look_back_s", [0.0, 10.0])
@pytest.mark.parametrize("period_s", [2.0, 6.0, 20.0])
def test_oscillation_around_threshold_does_not_flap(look_back_s, period_s):
    config = dataclasses.replace(BASE, look_back_s=look_back_s)
    # load 3.6 <-> 4.4 around the 4-replica threshold
    series = drive(config, lambda t: 3.6 if int(t // (period_s / 2)) % 2 == 0 else 4.4, 600, start_replicas=4)
    ch = changes(series)
    gaps = [b[0] - a[0] for a, b in zip(ch, ch[1:])]
    assert all(g >= config.upscale_delay_s for g in gaps), ch
    # at most one change per (shortest) delay window
    assert len(ch) <= 600 / config.upscale_delay_s
    if period_s < 2 * config.upscale_delay_s:  # faster than the delay: no change at all
        assert len(ch) <= 1, ch


def test_stale_workers_not_counted():
    now = 100.0
    fresh = workers(2, 2.0, BASE, now)
    stale = workers(2, 50.0, BASE, now - BASE.metrics_stale_s - 0.1, prefix="old")
    decision, state = decide(MetricsSnapshot(now, tuple(fresh + stale)), BASE, PolicyState())
    assert decision.desired[SHARD] == 2 and decision.load[SHARD] == pytest.approx(2.0)
    assert not decision.panic
    # only stale workers: nothing measured, the target is held (never below min)
    decision, _ = decide(MetricsSnapshot(now + 1, tuple(stale)), BASE, state)
    assert decision.desired[SHARD] == 2 and SHARD not in decision.load
    assert "no ready replica" in decision.reasons[SHARD]


def test_draining_workers_not_capacity_nor_load():
    now = 10.0
    ready = workers(2, 1.0, BASE, now)
    draining = workers(3, 40.0, BASE, now, state=WorkerState.DRAINING, prefix="d")
    decision, _ = decide(MetricsSnapshot(now, tuple(ready + draining)), BASE, PolicyState())
    assert decision.load[SHARD] == pytest.approx(1.0)
    assert decision.desired[SHARD] == 2  # initial target = ready + starting, drainers excluded


def test_starting_workers_count_toward_target_not_load():
    now = 10.0
    ready = workers(2, 3.0, BASE, now)
    starting = [WorkerMetrics(f"s{i}", SHARD, WorkerState.STARTING, now) for i in range(2)]
    decision, _ = decide(MetricsSnapshot(now, tuple(ready + starting)), BASE, PolicyState())
    assert decision.desired[SHARD] == 4  # 3 needed, 4 already on the way: no churn up
    assert decision.load[SHARD] == pytest.approx(3.0)


def test_busy_fraction_signal():
    config = dataclasses.replace(BASE, upscale_delay_s=0)
    ws = [WorkerMetrics(f"w{i}", SHARD, WorkerState.READY, 0.0, busy_fraction=0.9) for i in range(4)]
    decision, _ = decide(MetricsSnapshot(0.0, tuple(ws)), config, PolicyState())
    assert decision.load[SHARD] == pytest.approx(4 * 0.9 / 0.5)
    assert decision.desired[SHARD] == 8


def _skewed_snapshot(now_s, hot_fid, extras=None):  # type: ignore[no-untyped-def]
    """Two workers, A hosting experts 0-3 and B 4-7 of layer 0; 600 tokens/s on ``hot_fid``, 100 on the rest.

    ``extras``: worker -> extra function ids it already hosts (and serves an even share of)."""
    extras = extras or {}
    hosts = {"A": {f"m/0/{e}" for e in range(4)} | set(extras.get("A", ())),
             "B": {f"m/0/{e}" for e in range(4, 8)} | set(extras.get("B", ()))}
    rate = {f"m/0/{e}": (600.0 if f"m/0/{e}" == hot_fid else 100.0) for e in range(8)}
    n = {f: sum(f in h for h in hosts.values()) for f in rate}
    ws = tuple(WorkerMetrics(w, f"s{w}", WorkerState.READY, now_s, functions=frozenset(h),
                             function_rates={f: rate[f] / n[f] for f in h}) for w, h in sorted(hosts.items()))
    return MetricsSnapshot(now_s, ws)


def test_balancedness_is_eplbs_sum_of_means_over_sum_of_maxes():
    assert balancedness([300, 300, 100, 100]) == pytest.approx(200 / 300)
    assert balancedness([]) == 1.0 and balancedness([0, 0]) == 1.0
    # layer 0: 300 / 100 (mean 200, max 300); layer 1: 50 / 50
    assert layer_balancedness({0: {"A": 300.0, "B": 100.0}, 1: {"A": 50.0, "B": 50.0}}) == pytest.approx(250 / 350)
    assert layer_balancedness({}) == 1.0


def test_predicted_loads_split_each_function_evenly_over_its_hosts():
    loads = predicted_loads({"m/0/0": 90.0, "m/1/0": 10.0}, {"A": frozenset({"m/0/0", "m/1/0"}), "B": frozenset({"m/0/0"}),
                                                              "C": frozenset({"m/0/0"})})
    assert loads == {0: {"A": 30.0, "B": 30.0, "C": 30.0}, 1: {"A": 10.0}}


def test_plan_extra_replicas_puts_the_hot_expert_on_the_cold_worker():
    rates = {f"m/0/{e}": (600.0 if e == 1 else 100.0) for e in range(8)}
    base = {"A": frozenset(f"m/0/{e}" for e in range(4)), "B": frozenset(f"m/0/{e}" for e in range(4, 8))}
    kw = dict(target=0.95, min_gain=0.02, max_per_worker=8, max_per_function=2)
    # before: A 900, B 400 (0.72); m/0/1 on B too: A 600, B 700 (0.93) -- the hot expert, on the cold worker;
    # then m/0/4 on A: 650 / 650 (1.0)
    plan = plan_extra_replicas(rates, base, **kw)
    assert plan == {"B": frozenset({"m/0/1"}), "A": frozenset({"m/0/4"})}
    loads = predicted_loads(rates, {w: base[w] | plan.get(w, frozenset()) for w in base})
    assert layer_balancedness(loads) == pytest.approx(1.0)
    assert plan_extra_replicas(rates, base, **{**kw, "max_per_function": 0}) == {}
    assert plan_extra_replicas(rates, base, **{**kw, "target": 0.7}) == {}  # already above the target
    uniform = {f: 100.0 for f in rates}
    assert plan_extra_replicas(uniform, base, **kw) == {}


def test_extra_replicas_follow_the_skew_through_the_delays():
    config = dataclasses.replace(BASE, upscale_delay_s=5, downscale_delay_s=30, max_hot_replicas=2, balance_target=0.95)
    d, state = decide(_skewed_snapshot(0.0, "m/0/1"), config, PolicyState())
    assert d.extras == {} and d.balancedness == pytest.approx((1300 / 2) / 900)
    for t in range(1, 5):
        d, state = decide(_skewed_snapshot(float(t), "m/0/1"), config, state)
        assert d.extras == {}, t  # the upscale delay
    d, state = decide(_skewed_snapshot(5.0, "m/0/1"), config, state)
    assert "m/0/1" in d.extras["B"] and d.hot_extra["m/0/1"] == 1
    applied = {w: set(f) for w, f in d.extras.items()}
    for t in range(6, 9):  # served as planned: the plan holds
        d, state = decide(_skewed_snapshot(float(t), "m/0/1", applied), config, state)
        assert {w: set(f) for w, f in d.extras.items()} == applied, t
    # the load moves to m/0/6 (on B): after the upscale delay the extras follow it to A
    for t in range(9, 14):
        d, state = decide(_skewed_snapshot(float(t), "m/0/6", applied), config, state)
        assert {w: set(f) for w, f in d.extras.items()} == applied, t
    d, state = decide(_skewed_snapshot(14.0, "m/0/6", applied), config, state)
    assert "m/0/6" in d.extras.get("A", set()) and "m/0/1" not in d.extras.get("B", set())


def test_decide_is_pure():
    snap = MetricsSnapshot(5.0, tuple(workers(2, 6.0, BASE, 5.0)))
    state = PolicyState()
    a = decide(snap, BASE, state)
    b = decide(snap, BASE, state)
    assert a == b and state == PolicyState()


def test_shard_without_workers_gets_min_replicas():
    d, _ = decide(MetricsSnapshot(0.0, shards=("lonely",)), BASE, PolicyState())
    assert d.desired == {"lonely": 2}


@pytest.mark.parametrize(
    "bad",
    [dict(min_replicas=3, max_replicas=2), dict(target_busy_fraction=0.0), dict(upscale_delay_s=-1.0),
     dict(panic_threshold=1.0), dict(downscale_smoothing_factor=0.0), dict(metrics_stale_s=0.0)],
)
def test_config_rejects_bad_values(bad):
    with pytest.raises(ConfigError) as info:
        AutoscalerConfig(**bad)
    assert repr(next(iter(bad.values()))) in str(info.value)


def test_config_from_mapping():
    assert AutoscalerConfig.from_mapping({"max_replicas": 16, "min_replicas": None}).max_replicas == 16
    with pytest.raises(ConfigError, match="unknown"):
        AutoscalerConfig.from_mapping({"max_replica": 3})


def _first_scale_down(config, ready_at, start_s=100.0, ticks=40):
    """Drive a fresh policy (a restarted autoscaler) under steady load 0.5 with ``ready_at(t)``
    ready workers; return the first time it asks for fewer than 3."""
    state = PolicyState()
    for tick in range(ticks):
        t = start_s + tick
        decision, state = decide(MetricsSnapshot(now_s=t, workers=tuple(workers(ready_at(t), 0.5, config, t))),
                                 config, state)
        if decision.desired[SHARD] < 3:
            return t - start_s
    return None


@pytest.mark.parametrize("restart_at", [None, 5.0])
def test_a_fresh_autoscaler_does_not_scale_down_before_a_full_window(restart_at):
    """Issue 21: a restarted autoscaler (look_back 10 s, downscale delay 10 s) under steady load that
    fits one replica holds 3 until it has seen 10 s of load; a worker that restarts (ready 3 -> 2 -> 3)
    restarts that window, so the scale-down waits 10 s from the change too."""
    config = AutoscalerConfig(min_replicas=1, max_replicas=8, upscale_delay_s=10, downscale_delay_s=10,
                              look_back_s=10, target_queue_tokens_per_replica=1000, panic_threshold=2.0)
    if restart_at is None:
        assert _first_scale_down(config, lambda t: 3) == 10.0
    else:
        first = _first_scale_down(config, lambda t: 2 if t - 100.0 == restart_at else 3)
        assert first == restart_at + 1 + 10.0, first  # the window restarts when 3 are ready again


def test_the_window_restarts_when_the_pool_changes():
    config = AutoscalerConfig(min_replicas=1, max_replicas=8, downscale_delay_s=5, look_back_s=5,
                              target_queue_tokens_per_replica=1000)
    state = PolicyState()
    for t in range(6):  # 3 ready for 6 s: window full
        _, state = decide(MetricsSnapshot(now_s=float(t), workers=tuple(workers(3, 2.9, config, float(t)))), config, state)
    assert state.shards[SHARD].window_since_s == 0.0
    _, state = decide(MetricsSnapshot(now_s=6.0, workers=tuple(workers(2, 0.2, config, 6.0))), config, state)
    assert state.shards[SHARD].window_since_s == 6.0 and state.shards[SHARD].ready == 2


def test_config_refuses_a_downscale_delay_shorter_than_the_window():
    with pytest.raises(ConfigError, match="downscale_delay_s=3.0 must be >= look_back_s=10.0"):
        AutoscalerConfig(look_back_s=10.0, downscale_delay_s=3.0)
    AutoscalerConfig(look_back_s=10.0, downscale_delay_s=10.0)  # equal is fine


@pytest.mark.parametrize(
    "candidates, count, expect",
    [
        # starting workers first, newest first; then ready ones, least loaded first
        ([("r1", True, 1.0, 5.0), ("s1", False, 2.0, 0.0), ("s2", False, 3.0, 0.0), ("r2", True, 4.0, 1.0)], 3,
         ["s2", "s1", "r2"]),
        # among equally loaded ready workers, the newest goes
        ([("old", True, 1.0, 2.0), ("new", True, 9.0, 2.0), ("busy", True, 5.0, 7.0)], 2, ["new", "old"]),
        # never more than asked, never a negative count
        ([("a", True, 1.0, 0.0)], 0, []),
        ([("a", True, 1.0, 0.0)], -1, []),
        ([("a", True, 1.0, 0.0), ("b", False, 0.5, 0.0)], 5, ["b", "a"]),
    ],
)
def test_choose_victims(candidates, count, expect):
    from eaas.platform.autoscale.policy import VictimCandidate, choose_victims

    assert choose_victims([VictimCandidate(*c) for c in candidates], count) == expect
