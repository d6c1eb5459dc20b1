"""Registry on a real Redis: schema, atomicity, leases, events, round trips."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import redis

from eaas.errors import ConfigError, NotFound, RegistryError, RegistryUnavailable
from eaas.registry import Event, EventKind, Keys, Registry, WorkerRecord, WorkerState, WorkerStats
from eaas.registry.keys import KEY_PATTERN
from eaas.registry.server import RedisServer, free_port
from eaas.testing import wait_for


def model_spec(name: str, layers: int = 2, experts: int = 4) -> tuple[dict, list[dict]]:
    model = {"name": name, "model_type": "mixtral", "num_layers": layers, "moe_layers": list(range(layers)),
             "num_experts": experts, "top_k": 2, "hidden_size": 8, "dtype": "float32"}
    fns = [{"id": f"{name}/{l}/{e}", "model": name, "layer": l, "expert": e, "dtype": "float32"}
           for l in range(layers) for e in range(experts)]
    return model, fns


def worker(wid: str, shard: list[str], model: str = "m", state: WorkerState = WorkerState.READY) -> WorkerRecord:
    return WorkerRecord(id=wid, model=model, endpoint=f"ipc:///tmp/{wid}", shard=tuple(shard), state=state,
                        host_id="h", pid=1, started_at_s=1.0, heartbeat_at_s=1.0, lease_ttl_s=1.0)


def test_every_key_matches_one_pattern() -> None:
    k = Keys("eaas")
    built = [k.models, k.workers, k.events, k.model("mixtral-8x7b"), k.model_functions("m.v1"),
             k.function("m/0/3"), k.function_replicas("org/model/12/7"), k.worker("w-1"), k.worker_shard("w_2"), k.worker_extra("w3")]
    for key in built:
        assert KEY_PATTERN.match(key), key
    assert k.model("m").startswith("eaas:model:")
    with pytest.raises(ConfigError):
        k.model("bad:name")
    with pytest.raises(ConfigError):
        Keys("two words")


def test_register_model_is_idempotent_and_replaces(registry: Registry) -> None:
    model, fns = model_spec("m")
    assert registry.register_model(model, fns) == 8
    assert registry.register_model(model, fns) == 8
    assert registry.model_names() == ["m"]
    assert [f["id"] for f in registry.functions("m")] == [f["id"] for f in fns]
    # re-registering with fewer experts removes the ones that disappeared
    model2, fns2 = model_spec("m", layers=2, experts=2)
    registry.register_model(model2, fns2)
    assert registry.function_ids("m") == ["m/0/0", "m/0/1", "m/1/0", "m/1/1"]
    with pytest.raises(NotFound):
        registry.function("m/0/3")
    assert registry.models()[0]["num_functions"] == 4


def test_remove_model_removes_functions_and_hosting(registry: Registry) -> None:
    model, fns = model_spec("m")
    registry.register_model(model, fns)
    registry.register_worker(worker("w1", ["m/0/0", "m/0/1"]), ttl_s=10)
    assert registry.function("m/0/0")["replicas"] == ["w1"]
    assert registry.remove_model("m") == 8
    assert registry.model_names() == []
    assert not list(registry.redis.scan_iter(f"{registry.prefix}:function:*"))
    with pytest.raises(NotFound):
        registry.remove_model("m")


def test_worker_for_unknown_function_is_refused(registry: Registry) -> None:
    registry.register_model(*model_spec("m"))
    with pytest.raises(RegistryError, match="unknown function"):
        registry.register_worker(worker("w1", ["m/0/0", "m/9/9"]), ttl_s=10)
    assert registry.worker_ids() == []


def test_listing_10000_functions_takes_bounded_round_trips(registry: Registry, monkeypatch) -> None:
    model, fns = model_spec("big", layers=100, experts=100)
    registry.register_model(model, fns)
    sends = []
    orig = redis.connection.Connection.send_packed_command

    def counting(self, command, check_health=True):  # type: ignore[no-untyped-def]
        sends.append(1)
        return orig(self, command, check_health)

    monkeypatch.setattr(redis.connection.Connection, "send_packed_command", counting)
    listed = registry.functions("big")
    assert len(listed) == 10_000
    assert len(sends) <= 25, f"{len(sends)} round trips for 10,000 functions"


def test_lease_expiry_removes_worker_and_publishes_event(registry: Registry) -> None:
    registry.register_model(*model_spec("m"))
    events: list[Event] = []
    stop = threading.Event()
    subscribed = threading.Event()

    def listen() -> None:
        for ev in registry.events(timeout_s=0.05, stop=stop):
            subscribed.set()
            if ev is not None:
                events.append(ev)

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    wait_for(subscribed.is_set, 5, what="events subscription")
    registry.register_worker(worker("w1", ["m/0/0", "m/1/2"]), ttl_s=0.3)
    registry.register_worker(worker("w2", ["m/0/0"]), ttl_s=30)
    assert registry.function("m/0/0")["replicas"] == ["w1", "w2"]
    # no heartbeat: the lease runs out, the reaper removes w1 everywhere
    gone = wait_for(lambda: registry.reap_expired(), 5, what="lease expiry")
    assert gone == ["w1"]
    assert registry.worker_ids() == ["w2"]
    assert registry.function("m/0/0")["replicas"] == ["w2"]
    assert registry.function("m/1/2")["replicas"] == []
    assert not registry.redis.exists(registry.keys.worker_shard("w1"))
    wait_for(lambda: any(e.kind is EventKind.WORKER_GONE and e.worker == "w1" for e in events), 5, what="event")
    stop.set()
    t.join(5)


def test_heartbeat_renews_lease_and_reports_admin_drain(registry: Registry) -> None:
    registry.register_model(*model_spec("m"))
    registry.register_worker(worker("w1", ["m/0/0"]), ttl_s=0.5)
    stats = WorkerStats(queue_tokens=7, queue_requests=2, tokens_served=100, busy_fraction=0.5,
                        function_tokens={"m/0/0": 100})
    assert registry.heartbeat("w1", 30, stats) is WorkerState.READY
    rec = registry.worker("w1")
    assert (rec.queue_tokens, rec.queue_requests, rec.tokens_served, rec.function_tokens) == (7, 2, 100, {"m/0/0": 100})
    assert registry.redis.pttl(registry.keys.worker("w1")) > 10_000
    registry.set_worker_state("w1", WorkerState.DRAINING)
    assert registry.heartbeat("w1", 30) is WorkerState.DRAINING
    assert registry.routing_table("m")["m/0/0"] == []
    registry.deregister_worker("w1")
    assert registry.heartbeat("w1", 30) is None  # gone: the worker must register again
    with pytest.raises(NotFound):
        registry.set_worker_state("w1", WorkerState.READY)


def test_routing_table_has_only_ready_replicas(registry: Registry) -> None:
    registry.register_model(*model_spec("m"))
    registry.register_worker(worker("a", ["m/0/0", "m/0/1"]), ttl_s=30)
    registry.register_worker(worker("b", ["m/0/0"], state=WorkerState.STARTING), ttl_s=30)
    table = registry.routing_table("m")
    assert [w.id for w in table["m/0/0"]] == ["a"]
    assert table["m/1/3"] == []
    assert len(table) == 8



def test_a_live_worker_gains_and_loses_hosted_functions(registry: Registry) -> None:
    registry.register_model(*model_spec("m"))
    registry.register_worker(worker("a", ["m/0/0"]), ttl_s=30)
    events = registry.events(timeout_s=0.05)
    next(events)  # subscribed
    assert registry.update_hosting("a", add=["m/1/3"]) == 1
    assert [w.id for w in registry.routing_table("m")["m/1/3"]] == ["a"]
    assert set(registry.worker("a").shard) == {"m/0/0", "m/1/3"}
    assert wait_for(lambda: next(events), timeout_s=5).kind is EventKind.WORKER_REGISTERED  # clients re-read routing
    assert registry.update_hosting("a", add=["m/1/3"]) == 0  # already so: no change, no event
    assert registry.update_hosting("a", remove=["m/1/3"]) == 1
    assert registry.routing_table("m")["m/1/3"] == []
    with pytest.raises(RegistryError, match="unknown function"):
        registry.update_hosting("a", add=["m/9/9"])
    assert registry.update_hosting("ghost", add=["m/0/1"]) == -1  # no lease: nothing written
    assert registry.routing_table("m")["m/0/1"] == []
    registry.set_extra_functions("a", ["m/1/1", "m/1/2"])
    assert registry.extra_functions("a") == {"m/1/1", "m/1/2"}
    registry.set_extra_functions("a", [])
    assert registry.extra_functions("a") == set()
    registry.set_extra_functions("a", ["m/1/1"])
    registry.deregister_worker("a")
    assert registry.extra_functions("a") == set()  # cleaned with the worker


_RACER = r"""
import sys
from eaas.registry import Registry, WorkerRecord, WorkerState
reg = Registry.from_url(sys.argv[1], sys.argv[2])
me = sys.argv[3]
for i in range(40):
    model = {"name": "shared", "num_experts": 4}
    fns = [{"id": f"shared/{l}/{e}"} for l in range(3) for e in range(4)]
    reg.register_model(model, fns)
    try:
        reg.register_worker(WorkerRecord(id=f"{me}-{i}", model="shared", endpoint="x", shard=("shared/0/0", "shared/2/3"),
                                         state=WorkerState.READY), ttl_s=0.05 if i % 2 else 30)
    except Exception:
        pass  # the other process removed the model in between: refused, consistent
    try:
        reg.remove_model("shared")
    except Exception:
        pass
"""


def test_concurrent_register_and_remove_stay_consistent(registry: Registry, redis_url: str) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, redis_url, registry.prefix, f"p{n}"]) for n in range(2)]
    for p in procs:
        assert p.wait(60) == 0
    registry.reap_expired()
    r, k = registry.redis, registry.keys
    models = set(registry.model_names())
    live = set(registry.worker_ids())
    for key in r.scan_iter(f"{registry.prefix}:function:*"):
        fid = key.split(":function:")[1].removesuffix(":replicas")
        model = fid.split("/")[0]
        assert model in models, f"{key} exists without its model"
        if key.endswith(":replicas"):
            for wid in r.smembers(key):
                if wid not in live:
                    # a worker whose lease is still held but whose functions were removed is fine;
                    # a hosting entry for a worker that is gone is not
                    pytest.fail(f"{key} lists dead worker {wid}")
    for name in models:
        assert r.scard(k.model_functions(name)) == 12


def test_unreachable_and_wrong_password_are_clear_errors() -> None:
    reg = Registry.from_url(f"redis://127.0.0.1:{free_port()}/0", "x", timeout_s=0.5)
    with pytest.raises(RegistryUnavailable, match="cannot reach redis"):
        reg.ping()
    with RedisServer(password="s3cret") as server:
        bad = Registry.from_url(server.url.replace("s3cret", "wrong"), "x")
        with pytest.raises(RegistryUnavailable, match="credentials"):
            bad.model_names()
        good = Registry.from_url(server.url, "x")
        assert good.model_names() == []
