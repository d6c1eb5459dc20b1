"""LocalPool with real `eaas worker` processes on the session Redis."""

from __future__ import annotations

import os
import signal
import time

import pytest

from eaas.functions import write_tiny_checkpoint
from eaas.functions.loader import inspect_checkpoint
from eaas.platform.pool import LocalPool, PoolError
from eaas.platform.shards import plan_pool
from eaas.registry.records import WorkerState
from eaas.testing import wait_for


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):  # type: ignore[no-untyped-def]
    return write_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("ckpt") / "tiny", layers=2, hidden=32, experts=4)


@pytest.fixture
def model(registry, tiny_dir) -> str:  # type: ignore[no-untyped-def]
    spec, fns = inspect_checkpoint(tiny_dir, "tiny")
    registry.register_model(spec.to_dict(), [f.to_dict() for f in fns])
    return "tiny"


@pytest.fixture
def pool(registry, eaas_env, tmp_path):  # type: ignore[no-untyped-def]
    p = LocalPool(registry, env=eaas_env, log_dir=tmp_path / "logs")
    yield p
    p.stop_all(timeout_s=20)


def test_start_drain_adopt(pool: LocalPool, registry, model, eaas_env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    plans = plan_pool(4, workers=2, replicas=2)
    handles = [pool.start(p.shard_name, p.spec, model) for p in plans]
    starting = pool.workers(model)
    assert {m.worker_id for m in starting} == {h.worker_id for h in handles}
    records = pool.wait_ready(handles, timeout_s=60)
    assert [r.state for r in records] == [WorkerState.READY, WorkerState.READY]
    assert {r.shard_name for r in records} == {"shard-0"}
    assert len(registry.routing_table(model)["tiny/0/0"]) == 2
    # every thread of a worker (zmq I/O, heartbeats, torch's pool) runs SCHED_BATCH: a worker
    # woken by a client's doorbell does not preempt that client (EAAS_WORKER_SCHED_BATCH)
    for h in handles:
        tids = [int(t) for t in os.listdir(f"/proc/{h.pid}/task")]
        assert len(tids) > 1 and {os.sched_getscheduler(t) for t in tids} == {os.SCHED_BATCH}
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the process that started them is left as it was

    # a second pool object (a restarted autoscaler) adopts what it finds: no duplicates
    adopter = LocalPool(registry, env=eaas_env, log_dir=tmp_path / "logs2")
    found = adopter.workers(model)
    assert sorted(m.worker_id for m in found) == sorted(h.worker_id for h in handles)
    assert all(not m.local and m.state is WorkerState.READY for m in found)
    assert set(adopter.by_shard(model)) == {"shard-0"}

    # drain an own child: exit 0, registry entry gone
    rc = pool.drain(handles[0].worker_id, timeout_s=30)
    assert rc == 0
    assert handles[0].worker_id not in registry.worker_ids()
    assert [m.worker_id for m in pool.workers(model)] == [handles[1].worker_id]

    # the adopter drains the other one through the registry; its parent reaps exit 0
    adopter.drain(handles[1].worker_id, timeout_s=30)
    assert registry.workers(model) == []
    rcs = wait_for(lambda: pool.reap() or None, timeout_s=10, what="child reaped")
    assert rcs == {handles[1].worker_id: 0}


def test_kill_and_failed_start(pool: LocalPool, registry, model) -> None:  # type: ignore[no-untyped-def]
    h = pool.start("shard-0", "*:0-1", model)
    bad = pool.start("shard-x", "*:0-99", model)  # expert 99 does not exist: the worker exits 1
    with pytest.raises(PoolError, match="before ready"):
        pool.wait_ready([bad], timeout_s=60)
    pool.wait_ready([h], timeout_s=60)
    lease_s = registry.worker(h.worker_id).lease_ttl_s
    pool.kill(h.worker_id, signal.SIGKILL)
    t_kill = time.monotonic()
    assert wait_for(lambda: pool.reap().get(h.worker_id), timeout_s=10) == -signal.SIGKILL
    # reaping a killed child deregisters it at once: clients route around it on the
    # worker_gone event, not after its lease (they would retry its dead endpoint until then)
    if time.monotonic() - t_kill < lease_s:  # (a reap slower than the lease proves nothing)
        assert h.worker_id not in registry.worker_ids()
    wait_for(lambda: h.worker_id not in registry.worker_ids(), timeout_s=10)
    assert pool.workers(model) == []
