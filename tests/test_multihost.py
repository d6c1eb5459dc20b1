"""Several hosts on one machine (network namespaces, :mod:`eaas.netns`): cross-host serving.

Topology: Redis on host A, the gateway (attention client) and one worker on host B, two
workers on hosts C and D; every expert on all three workers. Every address is in
``127.100.0.0/24`` inside namespaces this test made. The test process itself stays outside:
it reaches the hosts only through ``ip netns exec``. Needs root; skips with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest
from gateway_ckpt import greedy_reference

from eaas import netns
from eaas.platform.curve import generate_keys
from eaas.registry.server import find_redis_server
from eaas.testing import wait_for

REASON = netns.unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"multi-host tests: {REASON}")

A, B, C, D = 0, 1, 2, 3
PROMPT = "The expert said"
PORT = 8000

HTTP = """
import json, sys, urllib.request, urllib.error
url, body = sys.argv[1], sys.argv[2]
req = urllib.request.Request(url, data=body.encode() if body else None,
                             headers={"Content-Type": "application/json"})
try:
    with urllib.request.urlopen(req, timeout=float(sys.argv[3])) as r:
        print(json.dumps({"status": r.status, "body": json.loads(r.read())}))
except urllib.error.HTTPError as e:
    print(json.dumps({"status": e.code, "body": json.loads(e.read() or b"null")}))
except Exception as e:
    print(json.dumps({"status": 0, "error": repr(e)}))
"""


def http(hosts: netns.Hosts, host: int, path: str, body: dict | None = None, timeout_s: float = 60) -> dict:
    """A request from ``host`` to the gateway on host B: ``{"status", "body"}`` (status 0: no answer)."""
    url = f"http://{hosts.addr(B)}:{PORT}{path}"
    r = hosts.run(host, [sys.executable, "-c", HTTP, url, json.dumps(body) if body else "", str(timeout_s)],
                  timeout_s=timeout_s + 30)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def workers_json(hosts: netns.Hosts, env: dict) -> list[dict]:
    """``eaas registry workers --json``, run on host B."""
    out = hosts.run(B, [sys.executable, "-m", "eaas.cli", "registry", "workers", "--json"], env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint, tmp_path_factory):  # type: ignore[no-untyped-def]
    ckpt = tiny_checkpoint("mixtral")
    logs = tmp_path_factory.mktemp("multihost")
    keys = generate_keys(logs / "keys")  # CURVE on every worker socket, as across real hosts
    with netns.Hosts(4) as hosts:
        redis_url = f"redis://{hosts.addr(A)}:6379/0"
        env = {**os.environ, "EAAS_REDIS_URL": redis_url, "EAAS_PREFIX": f"mh{uuid.uuid4().hex[:8]}",
               "EAAS_STATE_DIR": str(logs / "state"), "EAAS_CACHE_DIR": str(logs / "cache"),
               "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "EAAS_LEASE_TTL_S": "2", "EAAS_CURVE_KEYS_DIR": str(keys),
               "UCX_NET_DEVICES": "eth0"}  # NIXL's UCX: the hosts' one NIC (not lo, which every host has)

        def start(host: int, name: str, argv: list[str], **extra: str) -> subprocess.Popen:
            out = open(logs / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
            return hosts.popen(host, argv, env={**env, **extra}, stdout=out, stderr=subprocess.STDOUT)

        start(A, "redis", [find_redis_server(), "--bind", hosts.addr(A), "--port", "6379", "--save", "",
                           "--appendonly", "no", "--protected-mode", "no"])
        ping = [sys.executable, "-c", f"import redis; redis.Redis.from_url({redis_url!r}, socket_timeout=1).ping()"]
        wait_for(lambda: hosts.run(B, ping, env=env).returncode == 0, 30, interval_s=0.2, what="Redis on host A")
        reg = hosts.run(B, [sys.executable, "-m", "eaas.cli", "registry", "register", str(ckpt)], env=env)
        assert reg.returncode == 0, reg.stdout + reg.stderr
        for host in (B, C, D):
            start(host, f"worker-{host}", [sys.executable, "-m", "eaas.cli", "worker", "--model", ckpt.name,
                                           "--shard", "all", "--id", f"w{host}"], EAAS_BIND_HOST=hosts.addr(host))
        start(B, "gateway", [sys.executable, "-m", "eaas.cli", "gateway", "--model", str(ckpt),
                             "--host", hosts.addr(B), "--port", str(PORT)])
        wait_for(lambda: http(hosts, B, "/readyz", timeout_s=5)["status"] == 200, 180, interval_s=0.5,
                 what="the gateway on host B ready")
        yield hosts, env, ckpt, logs


@pytest.fixture(scope="module")
def reference(cluster):  # type: ignore[no-untyped-def]
    return greedy_reference(cluster[2])


def test_cross_host_serving_is_exact_and_picks_the_right_transport_per_pair(cluster, reference) -> None:  # type: ignore[no-untyped-def]
    hosts, env, ckpt, _ = cluster
    want = reference(PROMPT, 24)
    for _ in range(3):  # several completions: the client opens pairs to every worker it picks
        r = http(hosts, B, "/v1/completions", {"model": ckpt.name, "prompt": PROMPT, "max_tokens": 24,
                                             "temperature": 0, "ignore_eos": True})
        assert r["status"] == 200, r
        assert r["body"]["choices"][0]["token_ids"] == want
    # workers advertise the address they are reachable at, on their own host
    endpoints = {w["id"]: w["endpoint"] for w in workers_json(hosts, env)}
    assert {wid: ep.rsplit(":", 1)[0] for wid, ep in endpoints.items()} == {
        f"w{h}": f"tcp://{hosts.addr(h)}" for h in (B, C, D)}
    # the data plane per pair: shared memory with the worker on the gateway's host, a
    # cross-host transport with the others (NIXL over UCX when installed, else the tensor
    # bytes in ZeroMQ frames over tcp)
    transports = http(hosts, B, "/readyz")["body"]["detail"]["transports"]
    assert transports.get(f"w{B}", "shm") == "shm"
    assert {t for w, t in transports.items() if w != f"w{B}"} <= {"inline", "nixl"}
    assert any(w != f"w{B}" for w in transports), transports  # at least one pair crossed hosts


def test_a_host_cut_off_mid_stream_loses_no_token_and_serves_again_after_healing(cluster, reference) -> None:  # type: ignore[no-untyped-def]
    """Cut host C off in the middle of a 48-token stream: the stream finishes exact (failover
    to B and D); heal C: it serves again within its lease TTL + 1 s."""
    hosts, env, ckpt, logs = cluster
    want = reference(PROMPT, 48)
    stream = """
import json, sys, time, urllib.request
req = urllib.request.Request(sys.argv[1], data=sys.argv[2].encode(), headers={"Content-Type": "application/json"})
tokens, gaps, last = [], [], None
with urllib.request.urlopen(req, timeout=120) as r:
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        ids = json.loads(line[6:])["choices"][0].get("token_ids") or []
        now = time.monotonic()
        if ids and last is not None:
            gaps.append(now - last)
        if ids:
            last = now
        tokens += ids
        if len(tokens) >= 8 and len(tokens) - len(ids) < 8:
            print("EIGHT", flush=True)  # the test cuts host C off now
print(json.dumps({"tokens": tokens, "max_gap_s": max(gaps or [0])}), flush=True)
"""
    body = {"model": ckpt.name, "prompt": PROMPT, "max_tokens": 48, "temperature": 0, "ignore_eos": True,
            "stream": True}
    proc = hosts.popen(B, [sys.executable, "-c", stream, f"http://{hosts.addr(B)}:{PORT}/v1/completions",
                           json.dumps(body)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        first = proc.stdout.readline()  # blocks until 8 tokens came (or the stream ended)
        assert first.strip() == "EIGHT", first
        hosts.cut(C)
        out, _ = proc.communicate(timeout=180)
    finally:
        hosts.heal(C)
        t_heal_wall = time.time()  # wall clock: the poller below runs in another process
        if proc.poll() is None:
            proc.kill()
    result = json.loads(out.strip().splitlines()[-1])
    assert result["tokens"] == want
    print(f"longest token gap with host C cut off mid-stream: {result['max_gap_s'] * 1000:.0f} ms")
    # healed: C's worker serves again within its lease TTL + 1 s (its lease may have lapsed
    # while it was cut off); a poller on host B reads the registry every 50 ms from the heal on
    poll = f"""
import sys, time
from eaas.registry import Registry
from eaas.testing import wait_for
reg = Registry.from_url({env["EAAS_REDIS_URL"]!r}, {env["EAAS_PREFIX"]!r}, 1.0)

def ready():
    try:
        return any(w.id == "w{C}" and w.state.value == "ready" for w in reg.workers())
    except Exception:
        return False

wait_for(ready, 60, interval_s=0.05, what="w{C} ready")
print(time.time() - float(sys.argv[1]))
"""
    out = hosts.run(B, [sys.executable, "-c", poll, repr(t_heal_wall)], env=env, timeout_s=90)
    assert out.returncode == 0 and out.stdout.strip(), out.stderr[-2000:]
    took = float(out.stdout.strip())
    ttl = float(env["EAAS_LEASE_TTL_S"])
    print(f"host C's worker listed ready {took:.2f} s after healing (lease TTL {ttl:g} s)")
    assert took <= ttl + 1, took


def test_redis_host_cut_off_serving_goes_on_and_recovers(cluster, reference) -> None:  # type: ignore[no-untyped-def]
    """Cut Redis's host off: completions stay exact on the routing table the gateway holds (no
    hang), /readyz says the registry is unreachable; heal it: the registry is reachable again,
    the workers' leases are back (new incarnations where they lapsed), completions stay exact."""
    hosts, env, ckpt, _ = cluster
    want = reference(PROMPT, 24)
    body = {"model": ckpt.name, "prompt": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    hosts.cut(A)
    try:
        status = lambda: http(hosts, B, "/readyz", timeout_s=10)["body"]["detail"]["registry"]  # noqa: E731
        wait_for(lambda: not status()["reachable"], 30, interval_s=0.2, what="/readyz: registry unreachable")
        t0 = time.monotonic()
        r = http(hosts, B, "/v1/completions", body, timeout_s=60)
        took = time.monotonic() - t0
        assert r["status"] == 200 and r["body"]["choices"][0]["token_ids"] == want, r
        print(f"completion with Redis's host cut off: {took:.2f} s (the workers' leases lapse meanwhile)")
        assert not status()["reachable"]
    finally:
        hosts.heal(A)
    wait_for(lambda: http(hosts, B, "/readyz", timeout_s=10)["body"]["detail"]["registry"]["reachable"], 30,
             interval_s=0.2, what="/readyz: registry reachable again")
    wait_for(lambda: {w["id"] for w in workers_json(hosts, env) if w["state"] == "ready"} == {f"w{h}" for h in (B, C, D)},
             30, interval_s=0.2, what="every worker's lease back")
    r = http(hosts, B, "/v1/completions", body, timeout_s=60)
    assert r["status"] == 200 and r["body"]["choices"][0]["token_ids"] == want, r


def test_gateway_cut_off_from_one_worker_only_fails_over_without_a_hang(cluster, reference) -> None:  # type: ignore[no-untyped-def]
    """Asymmetric partition: B (gateway) and D cannot reach each other, while D still renews its
    lease with Redis on A. Nothing but the client's own timeouts can tell: calls fail over to
    B's and C's workers; completions stay exact; D is routed around, not waited for."""
    hosts, env, ckpt, _ = cluster
    want = reference(PROMPT, 24)
    body = {"model": ckpt.name, "prompt": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    hosts.cut_between(B, D)
    try:
        times = []
        for _ in range(3):
            t0 = time.monotonic()
            r = http(hosts, B, "/v1/completions", body, timeout_s=90)
            times.append(time.monotonic() - t0)
            assert r["status"] == 200 and r["body"]["choices"][0]["token_ids"] == want, r
        assert any(w["id"] == f"w{D}" and w["state"] == "ready" for w in workers_json(hosts, env))  # D's lease lives on
        print("completions with B and D cut off from each other: " + ", ".join(f"{t:.2f} s" for t in times))
    finally:
        hosts.heal_between(B, D)


def test_a_client_without_the_key_on_another_host_gets_no_answer(cluster, reference) -> None:  # type: ignore[no-untyped-def]
    """From host A, a ping to the worker on host C: answered with the deployment's keys, never
    without them (no CURVE, or a stranger's keys); the worker keeps serving."""
    hosts, env, ckpt, logs = cluster
    endpoint = next(w["endpoint"] for w in workers_json(hosts, env) if w["id"] == f"w{C}")
    ping = """
import sys, zmq
from eaas.platform.curve import connect_curve, load_keys
from eaas.platform.protocol import Header, encode_header
sock = zmq.Context.instance().socket(zmq.DEALER)
sock.setsockopt(zmq.LINGER, 0)
if sys.argv[2] != "-":
    connect_curve(sock, load_keys(sys.argv[2]))
sock.connect(sys.argv[1])
sock.send(encode_header(Header(kind="ping", id="p")))
print("answered" if sock.poll(3000) else "silent")
"""
    stranger = generate_keys(logs / "stranger")
    got = {name: hosts.run(A, [sys.executable, "-c", ping, endpoint, d], env=env).stdout.strip()
           for name, d in (("keys", str(env["EAAS_CURVE_KEYS_DIR"])), ("none", "-"), ("stranger", str(stranger)))}
    assert got == {"keys": "answered", "none": "silent", "stranger": "silent"}, got
    r = http(hosts, B, "/v1/completions", {"model": ckpt.name, "prompt": PROMPT, "max_tokens": 8, "temperature": 0,
                                         "ignore_eos": True})
    assert r["status"] == 200 and r["body"]["choices"][0]["token_ids"] == reference(PROMPT, 8)
