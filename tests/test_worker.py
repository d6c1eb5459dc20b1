"""Expert workers as real processes on real sockets, against a real Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import msgpack
import pytest
import torch
import zmq

from eaas.functions import load_shard
from eaas.platform.protocol import encode_header, invoke_header, now_ms, tensor_buffer
from eaas.registry import Registry
from eaas.testing import start_worker, wait_for, wait_workers_ready


def _dealer(endpoint: str) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    return s


def _recv_header(sock: zmq.Socket, timeout_ms: int = 10_000) -> tuple[dict, list[bytes]]:
    assert sock.poll(timeout_ms), "no reply from the worker"
    frames = sock.recv_multipart()
    return msgpack.unpackb(frames[0], raw=False), frames[1:]


def _assert_answers(endpoint: str, fid: str, rid: str) -> None:
    """A fresh DEALER sends one invoke of 3 rows to ``endpoint``; the worker answers it."""
    sock = _dealer(endpoint)
    try:
        sock.send_multipart(_invoke(fid, torch.randn(3, 64), rid))
        reply, _ = _recv_header(sock)
        assert reply["kind"] == "reply" and reply["id"] == rid, reply
    finally:
        sock.close()


def _invoke(fid: str, x: torch.Tensor, rid: str, deadline_ms: int | None = None) -> list:
    h = invoke_header(rid, [(fid, x.shape[0])], dtype=x.dtype, hidden=x.shape[1],
                      deadline_ms=deadline_ms or now_ms() + 10_000, transport="inline")
    return [encode_header(h), tensor_buffer(x)]


@pytest.fixture
def one_worker(registry: Registry, registered, eaas_env, tmp_path):  # type: ignore[no-untyped-def]
    model = registered("mixtral")
    proc = start_worker(eaas_env, model, "all", log_path=str(tmp_path / "worker.log"))
    try:
        (w,) = wait_workers_ready(registry, model, 1)
        yield model, w, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


_CLIENT = r"""
import sys, torch
torch.set_num_threads(1)
from eaas.registry import Registry
from eaas.platform.client import ExpertClient
from eaas.functions import load_shard
url, prefix, model, ckpt, seed = sys.argv[1:6]
reg = Registry.from_url(url, prefix)
ref = load_shard(ckpt, [(l, e) for l in (0, 1) for e in range(8)])
client = ExpertClient(reg, model, transport=sys.argv[6])
g = torch.Generator().manual_seed(int(seed))
for i in range(150):
    T = 1 + (i * 7) % 48
    x = torch.randn(T, 64, generator=g)
    idx = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(T)])
    w = torch.rand(T, 2, generator=g)
    out = client.forward(i % 2, x, idx, w)
    expect = torch.zeros_like(x)
    for k in range(2):
        for t in range(T):
            expect[t] += w[t, k] * ref.forward(x[t:t+1], [((i % 2, int(idx[t, k])), 1)])[0]
    err = (out - expect).abs().max().item()
    assert err <= 1e-5 * max(1.0, expect.abs().max().item()), (i, err)
client.close()
print("OK", client.stats.requests)
"""


@pytest.mark.parametrize("transport", ["shm", "inline"])
def test_two_clients_interleaved_are_correct_and_batched_together(one_worker, registry, redis_url, tiny_checkpoint, transport) -> None:  # type: ignore[no-untyped-def]
    model, w, _ = one_worker
    ckpt = str(tiny_checkpoint("mixtral"))
    procs = [subprocess.Popen([sys.executable, "-c", _CLIENT, redis_url, registry.prefix, model, ckpt, str(s), transport],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for s in (1, 2)]
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-2000:]
        assert out.startswith("OK")
    rec = wait_for(lambda: (r := registry.worker(w.id)).requests_served >= 300 and r, 10, what="heartbeat counters")
    assert rec.tokens_served > 0 and rec.batches <= rec.requests_served
    assert rec.cross_client_batches >= 1, "the worker never batched requests of both clients together"


def test_malformed_inputs_get_errors_and_the_worker_keeps_serving(one_worker, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    model, w, proc = one_worker
    sock = _dealer(w.endpoint)
    fid = f"{model}/0/3"
    x = torch.randn(4, 64)
    good = _invoke(fid, x, "good")
    hdr = msgpack.unpackb(good[0], raw=False)

    def variant(**changes: object) -> bytes:
        return msgpack.packb({**hdr, **changes}, use_bin_type=True)

    cases = {
        "truncated header": ([good[0][: len(good[0]) // 2], good[1]], None),
        "garbage bytes": ([os.urandom(64)], None),
        "wrong dtype": ([variant(id="d", dtype="int64"), good[1]], "bad_dtype"),
        "shape/bytes mismatch": ([variant(id="s", shape=[5, 64], segments=[[fid, 5]]), good[1]], "size_mismatch"),
        "unknown function": ([variant(id="u", segments=[[f"{model}/0/99", 4]]), good[1]], "unknown_function"),
        "100 GB declared": ([variant(id="b", shape=[400_000_000, 64], segments=[[fid, 400_000_000]]), good[1]], "too_large"),
        "expired deadline": ([variant(id="e", deadline_ms=now_ms() - 1000), good[1]], "deadline_exceeded"),
    }
    ref = load_shard(tiny_checkpoint("mixtral"), [(0, 3)])
    for name, (frames, code) in cases.items():
        sock.send_multipart(frames)
        reply, _ = _recv_header(sock)
        assert reply["kind"] == "error", name
        if code is not None:
            assert reply["code"] == code, (name, reply)
        # a valid request right after still succeeds, with the right answer
        sock.send_multipart(_invoke(fid, x, f"ok-{name}"))
        reply, payload = _recv_header(sock)
        assert reply["kind"] == "reply" and reply["id"] == f"ok-{name}", (name, reply)
        y = torch.frombuffer(bytearray(payload[0]), dtype=torch.float32).view(4, 64)
        torch.testing.assert_close(y, ref.forward(x, [((0, 3), 4)]), rtol=0, atol=1e-6)
    assert proc.poll() is None
    sock.close()


def _shm_entries() -> set[str]:
    try:
        return {n for n in os.listdir("/dev/shm") if "eaas" in n}
    except FileNotFoundError:
        return set()


def test_sigterm_answers_everything_queued_then_exits_clean(registry, registered, eaas_env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = registered("mixtral")
    before = _shm_entries()
    proc = start_worker(eaas_env, model, "all", log_path=str(tmp_path / "w.log"))
    (w,) = wait_workers_ready(registry, model, 1)
    # a shm client too, so there is an arena to clean up
    from eaas.platform.client import ExpertClient

    client = ExpertClient(registry, model, transport="shm")
    client.forward(0, torch.randn(3, 64), torch.tensor([[0, 1]] * 3), torch.ones(3, 2))
    sock = _dealer(w.endpoint)
    n = 40
    for i in range(n):
        sock.send_multipart(_invoke(f"{model}/1/{i % 8}", torch.randn(64, 64), f"q{i}"))
    proc.send_signal(signal.SIGTERM)
    got = set()
    for _ in range(n):
        reply, _ = _recv_header(sock, 30_000)
        assert reply["kind"] == "reply", reply
        got.add(reply["id"])
    assert got == {f"q{i}" for i in range(n)}
    assert proc.wait(30) == 0
    assert w.id not in registry.worker_ids()
    client.close()
    # only this process's arenas (eaas-{pid}-...): other test sessions on the machine may hold their own
    mine = f"eaas-{os.getpid()}-"
    wait_for(lambda: {e for e in _shm_entries() if e.startswith(mine)} <= before, 10,
             what="shared-memory segments cleaned up")
    sock.close()


def test_kill_9_lease_expires_within_ttl(registry, registered, eaas_env) -> None:  # type: ignore[no-untyped-def]
    model = registered("mixtral")
    env = dict(eaas_env, EAAS_LEASE_TTL_S="1.5", EAAS_HEARTBEAT_INTERVAL_S="0.3")
    proc = start_worker(env, model, "*:0-3")
    (w,) = wait_workers_ready(registry, model, 1)
    proc.kill()
    proc.wait(10)
    t0 = time.monotonic()
    wait_for(lambda: w.id in registry.reap_expired() or w.id not in registry.worker_ids(), 1.5 + 1.0,
             what="lease expiry after kill -9")
    assert time.monotonic() - t0 <= 2.5
    assert registry.function(f"{model}/0/0")["replicas"] == []


def test_every_transport_gives_bit_identical_replies(one_worker, registry) -> None:  # type: ignore[no-untyped-def]
    """The same requests through inline (tcp), shm and nixl (when installed) to one real worker."""
    from eaas.platform.client import ExpertClient
    from eaas.platform.transport.nixl import nixl_available

    model, w, _ = one_worker
    transports = ["inline", "shm"] + (["nixl"] if nixl_available() and "nixl" in w.capabilities.get("transports", []) else [])
    g = torch.Generator().manual_seed(3)
    calls = []
    for i in range(12):
        t = 1 + 5 * i
        calls.append((i % 2, torch.randn(t, 64, generator=g), torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(t)]),
                      torch.rand(t, 2, generator=g)))
    results = {}
    for tr in transports:
        client = ExpertClient(registry, model, transport=tr)
        try:
            results[tr] = [client.forward(*c) for c in calls]
            assert set(client.transports().values()) == {tr}
        finally:
            client.close()
    for tr in transports[1:]:
        for a, b in zip(results["inline"], results[tr]):
            assert torch.equal(a, b), tr


def test_a_client_that_stops_reading_loses_no_reply_silently(one_worker, registry) -> None:  # type: ignore[no-untyped-def]
    """Issue 21: 10,000 pipelined invokes over a DEALER with queue limit 100 that reads nothing
    until every request is sent. Each request is answered or explicitly failed (``reply_dropped``),
    and the worker's drop counter equals the number of failed ones."""
    model, w, proc = one_worker
    fid = f"{model}/0/1"
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 100)
    sock.setsockopt(zmq.RCVHWM, 100)
    sock.setsockopt(zmq.RCVBUF, 64 << 10)  # a fixed kernel buffer: loopback autotuning could absorb ~30 MB
    sock.connect(w.endpoint)
    n = 10_000
    x = torch.randn(16, 64)
    payload = bytes(tensor_buffer(x))
    deadline = time.monotonic() + 120
    for i in range(n):  # bounded in count and time; blocks while the worker has not read
        assert sock.poll(max(1, int((deadline - time.monotonic()) * 1000)), zmq.POLLOUT), f"send {i} stalled"
        h = invoke_header(f"r{i}", [(fid, 16)], dtype=x.dtype, hidden=64, deadline_ms=now_ms() + 600_000,
                          transport="inline")
        sock.send_multipart([encode_header(h), payload])
    # Read nothing until the worker reports a drop: a fast worker may have queued every request
    # before computing, so "all sent" alone does not mean its replies have nowhere to go yet.
    wait_for(lambda: registry.worker(w.id).replies_dropped > 0, 90,
             what="the worker dropping replies to a client that reads nothing")
    answered, failed, other = set(), set(), []
    while len(answered) + len(failed) + len(other) < n:
        left_ms = int((deadline - time.monotonic()) * 1000)
        assert left_ms > 0 and sock.poll(left_ms), (
            f"replies stopped: {len(answered)} answered + {len(failed)} failed of {n}: some vanished")
        hdr = msgpack.unpackb(sock.recv_multipart()[0], raw=False)
        if hdr["kind"] == "reply":
            answered.add(hdr["id"])
        elif hdr.get("code") == "reply_dropped":
            failed.add(hdr["id"])
        else:
            other.append(hdr)
    assert not other, other[:3]
    assert answered | failed == {f"r{i}" for i in range(n)} and not answered & failed
    assert failed, "the client's queue never filled: the test did not exercise drops"

    def reported() -> bool:
        return registry.worker(w.id).replies_dropped == len(failed)

    wait_for(reported, 10, what=f"heartbeat replies_dropped == {len(failed)}")
    # The worker is healthy afterwards: a normal request is answered.
    sock.send_multipart(_invoke(fid, x, "after"))
    reply, _ = _recv_header(sock)
    assert reply["kind"] == "reply" and reply["id"] == "after"
    assert proc.poll() is None
    sock.close()


def test_a_worker_started_while_redis_is_down_registers_once_it_is_back(tiny_checkpoint, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Issue 21: Redis stopped; a worker launched in the gap waits (backoff, INFO lines) instead of
    exiting, and registers and serves once the same Redis (same port, same data) is back."""
    from eaas.functions import inspect_checkpoint
    from eaas.registry.server import RedisServer, free_port

    port = free_port()
    data = tmp_path / "redis-data"
    data.mkdir()
    server = RedisServer(port=port, persist_dir=data).start()
    reg = Registry.from_url(server.url, "outage")
    spec, fns = inspect_checkpoint(tiny_checkpoint("mixtral"))
    reg.register_model(spec.to_dict(), [f.to_dict() for f in fns])
    server.stop()  # redis-server saves its RDB on SIGTERM: the registry survives the restart
    env = dict(os.environ, EAAS_REDIS_URL=f"redis://127.0.0.1:{port}/0", EAAS_PREFIX="outage",
               EAAS_STARTUP_TIMEOUT_S="60", EAAS_LOG_LEVEL="INFO", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    log_path = tmp_path / "worker.log"
    proc = start_worker(env, spec.name, "all", log_path=str(log_path))
    server2 = None
    try:
        def retrying() -> bool:
            assert proc.poll() is None, log_path.read_text()[-2000:]
            return log_path.read_text().count("registry unreachable") >= 3

        wait_for(retrying, 30, what="the worker retrying the registry")
        server2 = RedisServer(port=port, persist_dir=data).start()
        (w,) = wait_workers_ready(reg, spec.name, 1)
        _assert_answers(w.endpoint, f"{spec.name}/1/2", "after-outage")
        text = log_path.read_text()
        assert "giving up in" in text and "registry reachable after" in text
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        reg.close()
        if server2 is not None:
            server2.stop()


def test_a_worker_gives_up_on_an_unreachable_registry_with_a_clear_error(tiny_checkpoint, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from eaas.registry.server import free_port

    env = dict(os.environ, EAAS_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", EAAS_STARTUP_TIMEOUT_S="1.5",
               COLUMNS="300")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "eaas.cli", "worker", "--model", "m"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "registry still unreachable after 1.5 s" in proc.stderr and "EAAS_STARTUP_TIMEOUT_S" in proc.stderr
    assert time.monotonic() - t0 < 30


def test_fuzzed_frames_never_kill_a_worker_nor_make_it_allocate(one_worker, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    """Issue 14: 12,000 random and mutated messages (valid headers with fields flipped, truncated,
    oversized, of the wrong type; random bytes; wrong frame counts) at a live worker. It never dies,
    its memory does not grow by what headers claim, and a valid request right after is answered
    exactly."""
    import random

    import psutil

    model, w, proc = one_worker
    fid = f"{model}/0/2"
    x = torch.randn(4, 64)
    good = _invoke(fid, x, "seed")
    base = msgpack.unpackb(good[0], raw=False)
    rng = random.Random(14)
    junk_values = [None, -1, 0, 2**63 - 1, 2**64, -(2**63), 1e308, float("nan"), "", "x" * 5000, b"\x00" * 64,
                   [], [1, 2, 3], [[fid, -5]], [[fid, 2**40]], {"a": 1}, True, [400_000_000, 64], [4, 64, 64],
                   "float64", "int8", "bfloat16", "shm", "nixl", {"arena": "eaas-1-0000000000000000", "offset": 0,
                                                                 "nbytes": 2**40}]
    rss0 = psutil.Process(proc.pid).memory_info().rss

    def mutated() -> list[bytes]:
        kind = rng.randrange(6)
        if kind == 0:  # random bytes, 1..3 frames
            return [rng.randbytes(rng.randrange(0, 300)) for _ in range(rng.randrange(1, 4))]
        h = dict(base)
        for _ in range(rng.randrange(1, 4)):
            key = rng.choice(list(h) + ["extra", "handle"])
            if rng.random() < 0.2:
                h.pop(key, None)
            else:
                h[key] = rng.choice(junk_values)
        try:
            head = msgpack.packb(h, use_bin_type=True)
        except (TypeError, ValueError, OverflowError):
            head = rng.randbytes(40)
        payload = good[1]
        if kind == 1:
            head = head[: rng.randrange(1, max(2, len(head)))]  # truncated header
        elif kind == 2:
            payload = bytes(payload)[: rng.randrange(0, len(payload))]  # truncated payload
        elif kind == 3:
            return [head]  # no payload frame
        elif kind == 4:
            return [head, payload, payload]  # one frame too many
        return [head, payload]

    sock = _dealer(w.endpoint)
    sent = 0
    for _ in range(120):  # 120 rounds x 100 messages, bounded
        for _ in range(100):
            sock.send_multipart(mutated())
            sent += 1
        while sock.poll(0):
            sock.recv_multipart()  # error replies: drained so the worker's queue to us never fills
        assert proc.poll() is None, f"the worker died after {sent} fuzzed messages"
    assert sent >= 10_000
    sock.send_multipart(_invoke(fid, x, "after-fuzz"))
    ref = load_shard(tiny_checkpoint("mixtral"), [(0, 2)]).forward(x, [((0, 2), 4)])
    deadline = time.monotonic() + 30
    while True:  # skip the error replies still in flight, bounded in time
        reply, payload = _recv_header(sock, max(1, int((deadline - time.monotonic()) * 1000)))
        if reply.get("id") == "after-fuzz":
            break
    assert reply["kind"] == "reply", reply
    torch.testing.assert_close(torch.frombuffer(bytearray(payload[0]), dtype=torch.float32).view(4, 64), ref,
                               rtol=0, atol=1e-6)
    growth = psutil.Process(proc.pid).memory_info().rss - rss0
    assert growth < 256 << 20, f"worker RSS grew by {growth >> 20} MiB under fuzzing"
    assert proc.poll() is None
    sock.close()


_DIES_BEFORE_ITS_REPLIES = r"""
import os, signal, sys, torch
from eaas.bench.echo import PairClient
from eaas.platform.protocol import now_ms, send_frames
endpoint, fid, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
c = PairClient(endpoint, "nixl", arena_bytes=n * (2048 * 64 * 4) + (1 << 20))
c.connect(timeout_s=30)
x = torch.randn(2048, 64)
for i in range(n):  # posted back to back and never read: the worker answers them after this process is gone
    slot = c.channel.alloc(2048, 64, x.dtype)
    slot.x.copy_(x)
    send_frames(c.sock, c.channel.invoke_frames(slot, f"r{i}", [(fid, 2048)], now_ms() + 60_000))
print("POSTED", flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # no bye: the worker's NIXL WRITEs of the replies meet a dead agent
"""


def test_a_nixl_client_killed_before_its_replies_does_not_kill_the_worker(one_worker, registry, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    """A NIXL client posts 24 invokes and is SIGKILLed before any reply. Writing those replies
    into its arena fails (NIXL raises ``NIXL_ERR_REMOTE_DISCONNECT``, or the transfer ends in
    ``ERR``): each is counted as a dropped reply, and the worker keeps serving — a new NIXL
    client gets exact answers. (Before, the first failed WRITE ended the worker's serving loop:
    a host cut off mid-stream in the multi-host tests killed the worker on the other side.)"""
    from eaas.bench.echo import PairClient
    from eaas.platform.transport.nixl import nixl_available

    model, w, proc = one_worker
    if not nixl_available() or "nixl" not in w.capabilities.get("transports", []):
        pytest.skip("NIXL is not installed here (pip install nixl-cu12)")
    fid = f"{model}/0/1"
    dying = subprocess.run([sys.executable, "-c", _DIES_BEFORE_ITS_REPLIES, w.endpoint, fid, "24"],
                           check=False, capture_output=True, text=True, timeout=120)
    assert "POSTED" in dying.stdout, dying.stderr[-2000:]
    wait_for(lambda: proc.poll() is not None or registry.worker(w.id).replies_dropped > 0, 60,
             what="the worker counting replies it could not write into the dead client's arena")
    assert proc.poll() is None, "the worker died"
    ref = load_shard(tiny_checkpoint("mixtral"), [(0, 1)])
    c = PairClient(w.endpoint, "nixl", arena_bytes=1 << 20)
    try:
        c.connect(timeout_s=30)
        x = torch.randn(3, 64)
        # close, not bit-equal: the worker runs 1 thread, this process more (a GEMM's bits may differ)
        torch.testing.assert_close(c.roundtrip(x, [(fid, 3)]), ref.forward(x, [((0, 1), 3)]), rtol=1e-5, atol=1e-6)
    finally:
        c.close()
    assert proc.poll() is None


def _keepers(pid: int) -> list[int]:
    """Live lease-keeper children of process ``pid`` (from /proc)."""
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except OSError:
            continue
        for k in kids:
            try:
                with open(f"/proc/{k}/cmdline", "rb") as f:
                    if b"eaas.platform.lease" in f.read():
                        out.append(k)
            except OSError:
                pass
    return out


def test_a_lease_keeper_killed_for_real_is_replaced_and_the_worker_registers_again(one_worker, registry) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL the worker's lease keeper: the worker starts one new keeper (not one per loop
    iteration), which registers it again as a new incarnation, and it keeps serving. Before, the
    new keeper could not open the board (its file was unlinked after the first keeper opened it)
    and died at once, again and again, while the worker's lease expired."""
    model, w, proc = one_worker
    (old,) = wait_for(lambda: _keepers(proc.pid), 10, what="the worker's lease keeper")
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: any(x.id == w.id and x.epoch > w.epoch for x in registry.workers()), 30, interval_s=0.1,
             what="the worker registered again by a new keeper")
    keepers = _keepers(proc.pid)
    assert len(keepers) == 1 and keepers[0] != old, keepers
    _assert_answers(w.endpoint, f"{model}/1/3", "after-keeper")
    assert proc.poll() is None


def _arenas_mapped_by(pid: int, client_pid: int) -> set[str]:
    """Names of ``client_pid``'s shm arenas that process ``pid`` still maps (from /proc)."""
    with open(f"/proc/{pid}/maps") as f:
        return {line.split("/dev/shm/", 1)[1].split()[0] for line in f
                if f"/dev/shm/eaas-{client_pid}-" in line}


def test_a_client_that_drops_a_connection_lets_the_worker_unmap_its_arena(one_worker, registry) -> None:  # type: ignore[no-untyped-def]
    """A client drops a connection it still could use (a timeout, a pair reset) and opens a new
    one: the worker must let go of the old pair's arena at once — the client says ``bye`` —
    and not keep mapping 64 MiB of shared memory per reconnect of a live client until it
    exits (its sweep only frees pairs of dead processes). Plain shm (no ring: a ring's
    doorbell closing already tells the worker)."""
    from eaas.platform.client import ExpertClient
    from eaas.settings import get_settings

    model, w, proc = one_worker
    client = ExpertClient(registry, model, get_settings(redis_url="unused", prefix=registry.prefix, shm_ring=False),
                          transport="shm")
    x, idx, wt = torch.randn(1, 64), torch.tensor([[1, 2]]), torch.tensor([[0.5, 0.5]])
    try:
        client.forward(0, x, idx, wt)
        first = _arenas_mapped_by(proc.pid, os.getpid())
        assert len(first) == 1, first
        for lane in list(client._lanes):  # what a timeout or a pair reset does to the connection
            lane.conns.drop(w.id)
        client.forward(0, x, idx, wt)  # a new connection, a new arena
        wait_for(lambda: len(_arenas_mapped_by(proc.pid, os.getpid())) == 1, 10,
                 what="the worker unmapping the dropped pair's arena")
        assert _arenas_mapped_by(proc.pid, os.getpid()) != first
    finally:
        client.close()
