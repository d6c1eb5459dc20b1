"""Issue 14: what real deployments throw at the serving path — drains under load, lost leases,
no replica at all, cold workers. Real Redis, real worker processes, real sockets."""

from __future__ import annotations

import re
import signal
import threading
import time

import pytest
import torch

from eaas.errors import NoReplicaAvailable
from eaas.platform.client import ExpertClient
from eaas.registry import Registry
from eaas.registry.records import WorkerState
from eaas.settings import get_settings
from eaas.testing import WaitTimeout, wait_for, wait_workers_ready


def _settings(registry: Registry, **kw):  # type: ignore[no-untyped-def]
    return get_settings(redis_url="unused", prefix=registry.prefix, **kw)


def _call(client: ExpertClient, g: torch.Generator, layer: int = 1) -> torch.Tensor:
    x = torch.randn(8, 64, generator=g)
    idx = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(8)])
    return client.forward(layer, x, idx, torch.rand(8, 2, generator=g))


def test_sigterm_under_load_drains_without_failover_or_late_sends(registry, registered, workers, eaas_env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A victim SIGTERM'd while a client streams calls: no call fails, nothing in flight to it
    is re-sent elsewhere, and it receives no new request 100 ms after it announced the drain."""
    model = registered("mixtral")
    procs = workers(model, ["all", "all"], env={**eaas_env, "EAAS_LOG_LEVEL": "INFO"})
    ready = wait_workers_ready(registry, model, 2)
    victim_proc, victim = procs[0], next(w for w in ready if w.pid == procs[0].pid)
    client = ExpertClient(registry, model, _settings(registry, request_timeout_ms=5000))
    stop, errors, calls = threading.Event(), [], [0]

    def load() -> None:
        g = torch.Generator().manual_seed(0)
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline and calls[0] < 5000:  # bounded
            try:
                _call(client, g)
                calls[0] += 1
            except Exception as e:  # noqa: BLE001 - collected and asserted on
                errors.append(e)

    t = threading.Thread(target=load)
    t.start()
    try:
        wait_for(lambda: calls[0] >= 20, 30, what="load running")
        before = client.stats.failovers
        victim_proc.send_signal(signal.SIGTERM)
        assert victim_proc.wait(30) == 0
        at_exit = calls[0]
        wait_for(lambda: calls[0] >= at_exit + 20, 30, what="load continuing on the survivor")
    finally:
        stop.set()
        t.join(30)
        client.close()
    assert not errors, errors[:3]
    assert client.stats.failovers == before, "in-flight work of the draining worker was re-sent elsewhere"
    assert victim.id not in registry.worker_ids()
    log = (tmp_path / "w0.log").read_text()
    m = re.search(r"(\d+) requests arrived more than 100 ms after the drain was announced", log)
    assert m and int(m.group(1)) == 0, log[-2000:]


def test_work_in_flight_to_a_draining_worker_is_not_failed_over(registry, registered, workers, eaas_env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Deterministic version of the drain race: the victim is stopped (SIGSTOP) while the client
    waits for its reply, an operator drains it (`eaas registry drain`), then it resumes. The client
    must keep waiting for the reply (no failover, no double compute); the victim answers, drains,
    exits 0."""
    model = registered("mixtral")
    procs = workers(model, ["all", "all"], env={**eaas_env, "EAAS_LOG_LEVEL": "INFO"})
    ready = wait_workers_ready(registry, model, 2)
    victim_proc, victim = procs[0], next(w for w in ready if w.pid == procs[0].pid)
    client = ExpertClient(registry, model, _settings(registry, request_timeout_ms=10_000, call_deadline_ms=30_000))
    g = torch.Generator().manual_seed(1)
    result: list = []
    try:
        _call(client, g)
        victim_proc.send_signal(signal.SIGSTOP)
        t = threading.Thread(target=lambda: result.append(_call(client, g)))
        t.start()  # each call sends to both replicas (least-loaded choice): one request now waits on the victim
        wait_for(lambda: client.stats.requests >= 4, 10, what="the call sent its requests")
        registry.set_worker_state(victim.id, WorkerState.DRAINING)
        wait_for(lambda: victim.id not in {w.id for reps in client.routing.table().values() for w in reps}, 5,
                 what="the client saw the drain")
        # The client's wait loop checks its in-flight requests every <= 50 ms: give it 20 checks to
        # (wrongly) fail the victim's request over while the victim cannot answer. Asserting that
        # something does not happen needs a bounded wait; this one ends early if it does happen.
        with pytest.raises(WaitTimeout):
            wait_for(lambda: client.stats.failovers > 0, 1.0, what="a failover")
        victim_proc.send_signal(signal.SIGCONT)
        t.join(30)
        assert result and result[0].shape == (8, 64)
        assert victim_proc.wait(30) == 0
    finally:
        if victim_proc.poll() is None:
            victim_proc.send_signal(signal.SIGCONT)
        client.close()
    assert client.stats.failovers == 0, "the draining worker's in-flight request was failed over"
    assert client.stats.late_replies == 0


def test_a_worker_that_lost_its_lease_comes_back_as_a_new_incarnation(registry, registered, workers, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    """The lease of a serving worker disappears (as when a stall outlives it): the worker registers
    again with a larger epoch, and the client keeps answering every call exactly once, correctly."""
    from eaas.functions import load_shard

    model = registered("mixtral")
    procs = workers(model, ["all"])
    (w,) = wait_workers_ready(registry, model, 1)
    ref = load_shard(tiny_checkpoint("mixtral"), [(0, 3)])
    client = ExpertClient(registry, model, _settings(registry, request_timeout_ms=2000))
    x = torch.randn(5, 64)
    try:
        torch.testing.assert_close(client.invoke(f"{model}/0/3", x), ref.forward(x, [((0, 3), 5)]), rtol=0, atol=1e-6)
        registry.redis.delete(registry.keys.worker(w.id))  # the lease is gone
        registry.reap_expired()
        back = wait_for(lambda: next((r for r in registry.workers(model) if r.id == w.id
                                      and r.epoch > w.epoch and r.state is WorkerState.READY), None), 20,
                        what="the worker registered again")
        assert back.pid == procs[0].pid
        wait_for(lambda: client.routing.epoch_of(w.id) == back.epoch, 10, what="the client saw the new incarnation")
        for _ in range(5):
            y = client.invoke(f"{model}/0/3", x)
            torch.testing.assert_close(y, ref.forward(x, [((0, 3), 5)]), rtol=0, atol=1e-6)
        assert client.stats.late_replies == 0  # nothing answered twice
    finally:
        client.close()


def test_concurrent_calls_with_no_replica_fail_fast_and_do_not_queue_behind_each_other(registry, registered) -> None:  # type: ignore[no-untyped-def]
    """No worker at all: four concurrent calls all get NoReplicaAvailable (HTTP 503) within
    grace + 1 s, although the call deadline is 30 s."""
    model = registered("mixtral")
    client = ExpertClient(registry, model, _settings(registry, no_replica_grace_ms=500, call_deadline_ms=30_000))
    done: list[float] = []
    failures: list[BaseException] = []
    t0 = time.monotonic()

    def one(seed: int) -> None:
        try:
            _call(client, torch.Generator().manual_seed(seed))
        except NoReplicaAvailable as e:
            failures.append(e)
        done.append(time.monotonic() - t0)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    client.close()
    assert len(failures) == 4 and all("no live replica" in str(e) for e in failures), failures
    assert max(done) <= 0.5 + 1.0, done


def test_a_new_worker_warms_up_before_it_is_ready(registry, registered, workers, eaas_env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = registered("mixtral")
    workers(model, ["0:0-3"], env={**eaas_env, "EAAS_LOG_LEVEL": "INFO"})
    (w,) = wait_workers_ready(registry, model, 1)
    assert w.warmup_ms > 0  # its record says it ran every function once before registering ready
    assert w.requests_served == 0  # ... and that run was not live traffic
    assert "warmed up 4 functions" in (tmp_path / "w0.log").read_text()


@pytest.mark.parametrize("n", [3])
def test_suspect_replicas_back_off_exponentially(registry, registered, n) -> None:  # type: ignore[no-untyped-def]
    model = registered("mixtral")
    client = ExpertClient(registry, model, _settings(registry, lease_ttl_s=3.0), seed=1)
    try:
        delays = [client.suspects.mark("w1") for _ in range(n + 4)]
        assert client.suspects.suspect("w1", time.monotonic())
        uppers = [min(12.0, 0.25 * 2**i) for i in range(len(delays))]
        assert all(u / 2 - 0.01 <= d <= u + 0.01 for d, u in zip(delays, uppers)), delays
        assert delays[-1] > 4 * delays[0]  # grows, capped at 4 lease TTLs
        client.suspects.clear("w1")  # a good reply: not suspect, and the backoff starts over
        assert not client.suspects.suspect("w1", time.monotonic()) and client.suspects.mark("w1") <= 0.25
    finally:
        client.close()


def test_gateway_metrics_show_the_pool_and_a_drained_worker_leaving(registry, registered, workers) -> None:  # type: ignore[no-untyped-def]
    from prometheus_client.parser import text_string_to_metric_families

    from eaas.gateway.metrics import GatewayMetrics

    model = registered("mixtral")
    procs = workers(model, ["all", "all"])
    ready = wait_workers_ready(registry, model, 2)
    client = ExpertClient(registry, model, _settings(registry))
    metrics = GatewayMetrics()
    metrics.bind_pool(client.pool_summary)

    def scrape() -> dict:
        out = {}
        for fam in text_string_to_metric_families(metrics.render().decode()):
            for s in fam.samples:
                if s.name.startswith("eaas_pool_"):
                    out[(s.name, s.labels.get("state", ""))] = s.value
        return out

    try:
        wait_for(lambda: scrape().get(("eaas_pool_workers", "ready")) == 2, 10, what="2 ready in /metrics")
        assert scrape()[("eaas_pool_min_replicas", "")] == 2
        victim = next(w for w in ready if w.pid == procs[0].pid)
        procs[0].send_signal(signal.SIGSTOP)  # holds it in `draining` long enough to be seen
        registry.set_worker_state(victim.id, WorkerState.DRAINING)
        wait_for(lambda: scrape().get(("eaas_pool_workers", "draining")) == 1, 10, what="draining in /metrics")
        assert scrape()[("eaas_pool_workers", "ready")] == 1 and scrape()[("eaas_pool_min_replicas", "")] == 1
        procs[0].send_signal(signal.SIGCONT)
        assert procs[0].wait(30) == 0
        wait_for(lambda: scrape().get(("eaas_pool_workers", "draining")) == 0, 10, what="the drained worker left")
        assert scrape()[("eaas_pool_workers", "ready")] == 1
    finally:
        if procs[0].poll() is None:
            procs[0].send_signal(signal.SIGCONT)
        client.close()


def test_a_frozen_serving_loop_does_not_lose_the_lease(registry, registered, workers) -> None:  # type: ignore[no-untyped-def]
    """The lease is kept by a process of its own: a worker frozen for 3 lease TTLs (SIGSTOP: harsher
    than a call holding the GIL) keeps its registration and its epoch, and serves after it resumes."""
    model = registered("mixtral")
    (proc,) = workers(model, ["all"])
    (w,) = wait_workers_ready(registry, model, 1)
    ttl = w.lease_ttl_s
    proc.send_signal(signal.SIGSTOP)
    stopped_at = time.time()
    try:
        def renewed_while_frozen() -> bool:
            rec = next(r for r in registry.workers(model) if r.id == w.id)  # StopIteration = lease lost
            return rec.heartbeat_at_s > stopped_at + 3 * ttl

        wait_for(renewed_while_frozen, 6 * ttl + 10, interval_s=0.1, what="renewals while the worker is frozen")
    finally:
        proc.send_signal(signal.SIGCONT)
    (back,) = wait_workers_ready(registry, model, 1)
    assert back.id == w.id and back.epoch == w.epoch  # the same incarnation: it never left
    client = ExpertClient(registry, model, _settings(registry))
    try:
        _call(client, torch.Generator().manual_seed(3))
    finally:
        client.close()


def test_a_worker_stalled_past_its_limit_comes_back_as_a_new_incarnation(registry, registered, workers, eaas_env) -> None:  # type: ignore[no-untyped-def]
    model = registered("mixtral")
    (proc,) = workers(model, ["all"], env={**eaas_env, "EAAS_WORKER_STALL_S": "1.0", "EAAS_LEASE_TTL_S": "1.5"})
    (w,) = wait_workers_ready(registry, model, 1)
    proc.send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: (registry.reap_expired() or True) and w.id not in registry.worker_ids(), 20,
                 interval_s=0.1, what="the stalled worker's lease expired")
    finally:
        proc.send_signal(signal.SIGCONT)
    back = wait_for(lambda: next((r for r in registry.workers(model) if r.id == w.id), None), 20,
                    what="the worker registered again")
    assert back.epoch > w.epoch and back.pid == w.pid
