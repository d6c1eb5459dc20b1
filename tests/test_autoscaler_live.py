"""The live autoscaler: real workers, real Redis, real load through the ExpertClient."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import torch

from eaas.platform.autoscale import AutoscalerConfig
from eaas.platform.autoscale.mechanism import Autoscaler, spec_from_functions
from eaas.platform.autoscale.publish import DesiredReplicasServer
from eaas.platform.client import ExpertClient
from eaas.platform.pool import LocalPool
from eaas.registry.records import WorkerRecord, WorkerState, WorkerStats
from eaas.settings import get_settings
from eaas.testing import wait_for

# small delays so a test sees both directions in seconds; any real load is "busy"
LIVE = AutoscalerConfig(min_replicas=1, max_replicas=2, target_busy_fraction=0.02, upscale_delay_s=1.0,
                        downscale_delay_s=2.0, look_back_s=0.0, panic_threshold=50.0, metrics_stale_s=3.0)  # fmt: skip


def _ready(registry, model: str) -> list[WorkerRecord]:  # type: ignore[no-untyped-def]
    return [w for w in registry.workers(model) if w.state is WorkerState.READY]


class _Load:
    """Client threads calling layer 1 in a loop; every output checked against transformers' experts."""

    def __init__(self, registry, model: str, ref, threads: int = 2) -> None:  # type: ignore[no-untyped-def]
        self.stop = threading.Event()
        self.calls = 0
        self.failures: list[str] = []
        self.max_err = 0.0
        settings = get_settings(redis_url="unused", prefix=registry.prefix)
        self._clients = [ExpertClient(registry, model, settings, seed=i) for i in range(threads)]
        self._ref = ref
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, args=(c, i), daemon=True) for i, c in enumerate(self._clients)]

    def _loop(self, client: ExpertClient, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        while not self.stop.is_set():
            x = torch.randn(64, 64, generator=g)
            idx = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(64)])
            w = torch.rand(64, 2, generator=g)
            try:
                out = client.forward(1, x, idx, w)
                with torch.no_grad():
                    err = (out - self._ref(x, idx, w)).abs().max().item()
            except Exception as e:  # noqa: BLE001 - counted, the test asserts there are none
                with self._lock:
                    self.failures.append(repr(e))
                continue
            with self._lock:
                self.calls += 1
                self.max_err = max(self.max_err, err)

    def __enter__(self) -> "_Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(timeout=30)
        for c in self._clients:
            c.close()


def _run(scaler: Autoscaler) -> tuple[threading.Event, threading.Thread]:
    stop = threading.Event()
    t = threading.Thread(target=scaler.run, args=(stop,), daemon=True)
    t.start()
    return stop, t


def test_grows_under_load_survives_restart_and_shrinks_to_min(registry, registered, tiny_checkpoint, eaas_env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    model = registered("mixtral")
    ref = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("mixtral")).eval().model.layers[1].mlp.experts
    shards = {"shard-0": "all"}
    pool = LocalPool(registry, env=eaas_env, log_dir=tmp_path / "logs")
    pool2 = LocalPool(registry, env=eaas_env, log_dir=tmp_path / "logs2")
    try:
        scaler = Autoscaler(registry, model, LIVE, pool=pool, shards=shards, tick_s=0.2)
        stop, thread = _run(scaler)
        wait_for(lambda: len(_ready(registry, model)) == 1, timeout_s=60, what="min_replicas ready")

        with _Load(registry, model, ref) as load:
            t0 = time.monotonic()
            wait_for(lambda: len(_ready(registry, model)) == 2, timeout_s=60, what="pool grown to 2 under load")
            grow_s = time.monotonic() - t0
            assert any(r.desired.get("shard-0") == 2 for r in scaler.history)

            # the autoscaler dies; a new one (new pool object) adopts the pool as it is
            stop.set()
            thread.join(timeout=10)
            scaler2 = Autoscaler(registry, model, LIVE, pool=pool2, shards=shards, tick_s=0.2)
            first = scaler2.tick()
            assert first.started == () and first.drained == ()
            assert first.ready == {"shard-0": 2}
            stop2, thread2 = _run(scaler2)
            wait_for(lambda: load.calls >= 20, timeout_s=20, what="calls after the restart")
            assert len(registry.workers(model)) <= LIVE.max_replicas

        t1 = time.monotonic()
        wait_for(lambda: len(registry.workers(model)) == LIVE.min_replicas, timeout_s=30, what="shrunk to min_replicas")
        shrink_s = time.monotonic() - t1
        stop2.set()
        thread2.join(timeout=10)
        assert load.failures == []
        assert load.calls > 0 and load.max_err < 1e-5
        assert shrink_s >= LIVE.downscale_delay_s - 0.5  # it waited for the delay
        assert grow_s < 60
        # the drained worker was the old pool's child: it exited 0
        assert all(rc == 0 for rc in wait_for(lambda: pool.reap() or None, timeout_s=10).values())
    finally:
        pool2.stop_all(timeout_s=20)
        pool.stop_all(timeout_s=20)


def test_publish_only_serves_desired_replicas(registry, registered) -> None:  # type: ignore[no-untyped-def]
    model = registered("mixtral")
    fids = registry.function_ids(model)
    spec = spec_from_functions(fids)
    cfg = AutoscalerConfig(min_replicas=2, max_replicas=6, target_queue_tokens_per_replica=100, upscale_delay_s=0.0)
    scaler = Autoscaler(registry, model, cfg, pool=None, shards={"shard-0": spec, "shard-1": spec})
    # a worker of shard-0 reporting 400 queued tokens (4 replicas' worth); no process needed in publish-only mode
    now = time.time()
    registry.register_worker(WorkerRecord(id="fake-0", model=model, endpoint="tcp://127.0.0.1:1", shard=tuple(fids),
                                          state=WorkerState.READY, shard_name="shard-0", heartbeat_at_s=now), 30)  # fmt: skip
    registry.heartbeat("fake-0", 30, WorkerStats(queue_tokens=400, queue_requests=4))
    with DesiredReplicasServer(scaler, port=0) as server:
        scaler.tick()
        scaler.tick()
        with httpx.Client(base_url=server.url, timeout=5) as http:
            assert http.get("/desired").json() == {"shard-0": 4, "shard-1": 2}
            assert http.get("/desired/shard-0").json() == {"shard": "shard-0", "replicas": 4}
            assert http.get("/desired/nope").status_code == 404
            text = http.get("/metrics").text
            assert 'eaas_desired_replicas{shard="shard-0"} 4.0' in text
            assert 'eaas_desired_replicas{shard="shard-1"} 2.0' in text
    assert scaler.history[-1].started == ()  # publish-only never acts


@pytest.mark.parametrize(("env", "expected"), [({"EAAS_AUTOSCALER_MIN_REPLICAS": "3", "EAAS_AUTOSCALER_UPSCALE_DELAY_S": "0.5"},
                                                {"min_replicas": 3, "upscale_delay_s": 0.5})])  # fmt: skip
def test_config_from_env(env, expected) -> None:  # type: ignore[no-untyped-def]
    from eaas.platform.autoscale.config import config_from_env

    assert config_from_env(env) == expected
    assert AutoscalerConfig.from_mapping(config_from_env(env)).min_replicas == 3


def test_a_fresh_autoscaler_waits_for_a_full_window_before_scaling_down(registry, registered) -> None:  # type: ignore[no-untyped-def]
    """Issue 21, through the real mechanism and registry: three workers under a light steady load
    (one replica's worth) and a freshly started autoscaler (look-back 10 s). It asks for 3 until it
    has seen a full 10 s window of load; a worker that leaves and comes back at second 6 starts
    the window again, so the scale-down comes at second 17, not 10. Publish-only: the decision is
    what is tested; a clock is injected so the seconds need no waiting (the heartbeats are real)."""
    model = registered("mixtral")
    fids = registry.function_ids(model)
    spec = spec_from_functions(fids)
    cfg = AutoscalerConfig(min_replicas=1, max_replicas=6, target_queue_tokens_per_replica=100, upscale_delay_s=10,
                           downscale_delay_s=10, look_back_s=10, metrics_stale_s=1e6)
    t = [1000.0]
    scaler = Autoscaler(registry, model, cfg, pool=None, shards={"shard-0": spec}, clock=lambda: t[0])
    for i in range(3):
        registry.register_worker(WorkerRecord(id=f"fake-{i}", model=model, endpoint="tcp://127.0.0.1:1",
                                              shard=tuple(fids), state=WorkerState.READY, shard_name="shard-0",
                                              heartbeat_at_s=time.time()), 30)  # fmt: skip
    desired = []
    for second in range(22):  # bounded: 22 ticks of a fake second each
        if second in (6, 7):  # fake-2 drains at 6 and is back (a new worker) at 7
            registry.set_worker_state("fake-2", WorkerState.DRAINING if second == 6 else WorkerState.READY)
        for i in range(3):
            registry.heartbeat(f"fake-{i}", 30, WorkerStats(queue_tokens=10, queue_requests=1))
        t[0] = 1000.0 + second
        scaler.tick()
        desired.append(scaler.desired_replicas()["shard-0"])
    first_down = next(i for i, n in enumerate(desired) if n < 3)
    assert first_down == 17, desired  # 10 s after the pool last changed (second 7), not 10 s after start


# extra replicas only: the shards stay at one worker each, every delay short
HOT = AutoscalerConfig(min_replicas=1, max_replicas=1, upscale_delay_s=0.5, downscale_delay_s=1.5, look_back_s=0.0,
                       metrics_stale_s=3.0, max_hot_replicas=1, balance_target=0.95)  # fmt: skip


class _HotLoad:
    """One client thread invoking one expert function in a loop (switchable), outputs checked against transformers."""

    def __init__(self, registry, model: str, experts, fid: str) -> None:  # type: ignore[no-untyped-def]
        self.fid = fid
        self.calls = 0
        self.failures: list[str] = []
        self.stop = threading.Event()
        self._experts = experts  # transformers' experts module of layer 1
        self._client = ExpertClient(registry, model, get_settings(redis_url="unused", prefix=registry.prefix))
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        g = torch.Generator().manual_seed(0)
        while not self.stop.is_set():
            fid = self.fid
            expert = int(fid.rsplit("/", 1)[1])
            x = torch.randn(16, 64, generator=g)
            try:
                y = self._client.invoke(fid, x)
                with torch.no_grad():
                    ref = self._experts(x, torch.full((16, 1), expert), torch.ones(16, 1))
                err = (y - ref).abs().max().item()
                if err > 1e-5:
                    self.failures.append(f"{fid}: max error {err}")
            except Exception as e:  # noqa: BLE001 - counted, the test asserts there are none
                self.failures.append(repr(e))
                continue
            self.calls += 1

    def __enter__(self) -> "_HotLoad":
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self._thread.join(timeout=30)
        self._client.close()


def test_a_hot_expert_gains_a_replica_and_loses_it_when_the_load_moves(registry, registered, tiny_checkpoint, eaas_env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """All load on expert 2 of layer 1 (shard-0's worker): the autoscaler asks shard-1's worker, cold in
    that layer, to host a replica; it loads it while serving and takes rows. The load moves to expert 6
    (shard-1): the replica follows to shard-0's worker and the old one is dropped. Nothing fails."""
    from transformers import AutoModelForCausalLM

    model = registered("mixtral")
    experts = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("mixtral")).eval().model.layers[1].mlp.experts
    pool = LocalPool(registry, env=eaas_env, log_dir=tmp_path / "logs")
    hot_a, hot_b = f"{model}/1/2", f"{model}/1/6"
    scaler = Autoscaler(registry, model, HOT, pool=pool, shards={"shard-0": "*:0-3", "shard-1": "*:4-7"}, tick_s=0.25)
    stop, thread = _run(scaler)

    def worker_of(shard: str) -> WorkerRecord:
        return next(w for w in _ready(registry, model) if w.shard_name == shard)

    def serving(shard: str, fid: str) -> bool:
        w = worker_of(shard)
        return fid in w.shard and w.function_tokens.get(fid, 0) > 0

    try:
        wait_for(lambda: len(_ready(registry, model)) == 2, timeout_s=60, what="one worker per shard")
        w0, w1 = worker_of("shard-0"), worker_of("shard-1")
        assert hot_a not in w1.shard and hot_b not in w0.shard
        with _HotLoad(registry, model, experts, hot_a) as load:
            wait_for(lambda: serving("shard-1", hot_a), timeout_s=60,
                     what="shard-1's worker hosting and serving a replica of the hot expert")
            load.fid = hot_b  # the skew moves to shard-1's expert
            wait_for(lambda: serving("shard-0", hot_b), timeout_s=60,
                     what="shard-0's worker hosting and serving a replica of the new hot expert")
            wait_for(lambda: hot_a not in worker_of("shard-1").shard, timeout_s=30, what="the old replica dropped")
            calls = load.calls
            wait_for(lambda: load.calls > calls + 5, timeout_s=20, what="calls after the move")
        assert load.failures == []
        # the same two processes all along: replicas came and went while they served
        assert {w.id for w in _ready(registry, model)} == {w0.id, w1.id}
        assert registry.extra_functions(w0.id) == {hot_b} and registry.extra_functions(w1.id) == set()
    finally:
        stop.set()
        thread.join(timeout=10)
        pool.stop_all(timeout_s=20)
