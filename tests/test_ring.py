"""The same-host fast path: the shm message ring, its doorbell, the spin policy and the waiter.

Unit tests run a client Ring and a worker Ring over one shared mapping in this process
(a socketpair for the doorbell); the rest go through a real echo process and real
expert workers, killed for real.
"""

from __future__ import annotations

import mmap
import signal
import socket
import threading
import time

import pytest
import torch

from eaas.errors import ProtocolError, TransportError
from eaas.platform.spin import EXPLORE_EVERY, SpinState, ewma, prefer_spinning, spin_budget_s, spin_this_wait
from eaas.platform.transport.ring import (
    REQ_POSTED,
    WORKER_ASLEEP,
    Ring,
    check_ring_geometry,
    ring_bytes,
    ring_supported,
)
from eaas.platform.waiter import Waiter
from eaas.testing import wait_for

pytestmark = pytest.mark.skipif(not ring_supported(), reason="the shm ring is offered on x86-64 Linux only")

SLOTS, SLOT_BYTES = 4, 256


@pytest.fixture
def pair():
    """(client Ring, worker Ring) over one mapping, doorbell = a socketpair."""
    mm = mmap.mmap(-1, ring_bytes(SLOTS, SLOT_BYTES))
    a, b = socket.socketpair()
    client = Ring(memoryview(mm), SLOTS, SLOT_BYTES, "client", a)
    worker = Ring(memoryview(mm), SLOTS, SLOT_BYTES, "worker", b)
    yield client, worker
    client.close()
    worker.close()


# --- the ring itself ---------------------------------------------------------------------


def test_messages_arrive_in_order_both_ways(pair) -> None:
    client, worker = pair
    for i in range(3 * SLOTS):  # wraps around the slots several times
        assert client.post(f"req {i}".encode())
        assert worker.ready()
        assert worker.take() == f"req {i}".encode()
        assert worker.take() is None and not worker.ready()
        assert worker.post(f"rep {i}".encode())
        assert client.take() == f"rep {i}".encode()
    assert client.posted == client.taken == worker.posted == worker.taken == 3 * SLOTS


def test_a_full_ring_or_an_oversized_message_is_refused_not_overwritten(pair) -> None:
    client, worker = pair
    for i in range(SLOTS):
        assert client.post(bytes([i]) * 10)
    assert not client.post(b"one too many")  # the worker has not taken the oldest yet
    assert not client.post(b"x" * SLOT_BYTES)  # does not fit a slot (4 bytes of length)
    assert worker.take() == bytes([0]) * 10  # the oldest survived
    assert client.post(b"now there is room")
    taken = [worker.take() for _ in range(SLOTS)]
    assert taken[-1] == b"now there is room" and worker.take() is None


def test_a_corrupt_counter_or_length_is_an_error_not_a_crash(pair) -> None:
    client, worker = pair
    w = memoryview(client._buf)[:1024].cast("Q")
    w[REQ_POSTED] = 10**12  # a hostile peer claims a trillion messages
    with pytest.raises(ProtocolError, match="overrun"):
        worker.take()
    w[REQ_POSTED] = 0
    assert client.post(b"ok")
    client._buf[1024:1028] = (SLOT_BYTES * 4).to_bytes(4, "little")  # the length word lies
    with pytest.raises(ProtocolError, match="exceeds"):
        worker.take()
    w.release()


def test_notify_rings_the_doorbell_only_when_the_peer_sleeps(pair) -> None:
    client, worker = pair
    client.post(b"a")
    client.notify()
    assert client.rings_sent == 0  # the worker was awake (spinning): no system call
    worker.take()
    assert worker.sleep_begin() is False  # nothing waiting: it may sleep
    client.post(b"b")
    client.notify()
    assert client.rings_sent == 1
    assert worker.sleep_end() is True  # doorbell drained, peer alive
    assert worker.take() == b"b"
    client.post(b"c")
    assert worker.sleep_begin() is True  # a message is already there: no sleep


def test_the_doorbell_reports_a_peer_that_closed(pair) -> None:
    client, worker = pair
    assert worker.sleep_begin() is False
    client.close()
    assert worker.sleep_end() is False and worker.closed
    assert not worker.ready() and worker.take() is None and not worker.post(b"x")


@pytest.mark.parametrize("slots,slot_bytes,size", [(0, 256, 1 << 20), (4, 100, 1 << 20), (4, 4096, 1000),
                                                   ("4", 256, 1 << 20), (10**6, 256, 1 << 40)])
def test_announced_ring_geometry_is_validated(slots, slot_bytes, size) -> None:
    with pytest.raises(ProtocolError) as e:
        check_ring_geometry(slots, slot_bytes, size)
    assert e.value.code == "bad_handle"


# --- the spin policy (pure) --------------------------------------------------------------


@pytest.mark.parametrize("typical_us,may_spin,want_us", [
    (100, True, 400),      # short waits: spin SPIN_FACTOR (4) typical waits
    (10, True, 50),        # never below the floor
    (2000, True, 3000),    # capped
    (5000, True, 50),      # waits longer than the cap: sleep after the floor
    (100, False, 50),      # the sleeping arm: the floor only
])
def test_spin_budget(typical_us, may_spin, want_us) -> None:
    got = spin_budget_s(typical_us / 1e6, may_spin, floor_s=50e-6, cap_s=3000e-6)
    assert got == pytest.approx(want_us / 1e6)


@pytest.mark.parametrize("spin_us,sleep_us,want", [
    (None, None, True),    # nothing measured: spin
    (300, None, True),     # an arm not measured yet loses to one that was (exploration measures it)
    (None, 300, False),
    (200, 300, True),      # spinning waits were shorter: keep spinning
    (370, 300, True),      # longer, but within SPIN_MARGIN (25%) of the sleeping arm: noise, keep spinning
    (400, 300, False),     # spinning made the waits clearly longer (it stole the compute): sleep
])
def test_the_arm_whose_waits_were_shorter_is_preferred(spin_us, sleep_us, want) -> None:
    us = lambda v: None if v is None else v / 1e6  # noqa: E731
    assert prefer_spinning(us(spin_us), us(sleep_us)) is want
    arms = [spin_this_wait(i, us(spin_us), us(sleep_us)) for i in range(EXPLORE_EVERY * 2)]
    assert arms.count(not want) == 2 and arms[EXPLORE_EVERY - 1] is (not want)  # the other arm, explored


def test_a_waiter_that_spins_into_longer_waits_stops_spinning() -> None:
    """The mechanism feeds the policy: waits that spun and took longer turn spinning off."""
    s = SpinState()
    assert s.may_spin()
    for i in range(4 * EXPLORE_EVERY):
        arm = s.may_spin()
        s.observe(0.0009 if arm else 0.0003, slept=not arm, spun_arm=arm)  # spinning costs 0.6 ms here
    assert s.spin_wait_s == pytest.approx(0.0009) and s.sleep_wait_s == pytest.approx(0.0003)
    assert not prefer_spinning(s.spin_wait_s, s.sleep_wait_s)
    later = []
    for _ in range(2 * EXPLORE_EVERY):
        later.append(s.may_spin())
        s.observe(0.0009 if later[-1] else 0.0003, slept=not later[-1], spun_arm=later[-1])
    assert later.count(True) == 2  # from now on only the explorations spin


def test_a_rare_long_spinning_wait_does_not_turn_spinning_off() -> None:
    """The arms are compared by their medians: one wait in eight that spun but hit a 3 ms
    stall (the peer preempted) must not make a waiter whose spinning waits are typically
    55 µs prefer sleeping ones of 140 µs (an exponentially weighted mean did: 213 vs 150 µs)."""
    s = SpinState()
    spun_waits = 0
    for i in range(8 * EXPLORE_EVERY):
        arm = s.may_spin()
        if arm:
            spun_waits += 1
            wait = 0.003 if spun_waits % 8 == 0 else 55e-6
        else:
            wait = 140e-6
        s.observe(wait, slept=not arm, spun_arm=arm)
    assert s.spin_wait_s == pytest.approx(55e-6) and s.sleep_wait_s == pytest.approx(140e-6)
    assert prefer_spinning(s.spin_wait_s, s.sleep_wait_s)
    assert s.spun >= 7 * EXPLORE_EVERY  # only the explorations slept
    mean = None
    for w in s.spin_waits:
        mean = ewma(mean, w)
    assert mean > 1.25 * 140e-6  # the mean would have preferred sleeping: the window holds the stall


def test_spinning_can_be_switched_off_and_state_learns() -> None:
    assert spin_budget_s(1e-4, True, floor_s=50e-6, cap_s=0) == 0
    s = SpinState()
    for _ in range(50):
        s.observe(0.001, slept=True)
    assert s.typical_wait_s == pytest.approx(0.001, rel=1e-3) and s.slept == 50 and s.spun == 0


# --- the waiter ---------------------------------------------------------------------------


def test_waiter_sleeps_and_wakes_on_the_doorbell(pair) -> None:
    client, worker = pair
    waiter = Waiter(floor_s=0, cap_s=0)  # never spin: every wait goes to the kernel

    def later() -> None:  # post once the waiter sleeps in the kernel: only the doorbell can wake it
        wait_for(lambda: worker._w[WORKER_ASLEEP] == 1, 10, interval_s=0.001, what="the waiter asleep")
        client.post(b"hello")
        client.notify()

    t = threading.Thread(target=later)
    t.start()
    res = waiter.wait([worker], [], timeout_s=10)
    t.join()
    assert res.slept and res.ring_ready and not res.closed and res.waited_s < 5
    assert worker.take() == b"hello" and client.rings_sent == 1


def test_waiter_says_whether_a_ring_or_only_a_socket_ended_the_wait(pair) -> None:
    """``ring_ready`` lets a caller take the rings and skip its sockets: it must be set only
    when a ring has input, and never when only a socket or the timeout ended the wait."""
    import zmq

    client, worker = pair
    ctx = zmq.Context.instance()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://waiter-ring-ready")
        b.connect("inproc://waiter-ring-ready")
        spinner = Waiter(floor_s=1e-3, cap_s=1e-3)
        res = spinner.wait([worker], [b], timeout_s=0.01)
        assert not res.ring_ready and not res.closed  # the timeout
        a.send(b"x")
        res = spinner.wait([worker], [b], timeout_s=10)
        assert not res.ring_ready and res.waited_s < 5  # the socket
        b.recv()
        client.post(b"hello")
        res = spinner.wait([worker], [b], timeout_s=10)
        assert res.ring_ready and not res.slept  # the ring, seen while spinning
        assert worker.take() == b"hello"
    finally:
        a.close(0)
        b.close(0)


def test_waiter_returns_at_once_when_a_peer_closes(pair) -> None:
    client, worker = pair
    def later() -> None:  # close once the waiter sleeps: only the doorbell's EOF can end the wait early
        wait_for(lambda: worker._w[WORKER_ASLEEP] == 1, 10, interval_s=0.001, what="the waiter asleep")
        client.close()

    t = threading.Thread(target=later)
    t.start()
    res = Waiter(floor_s=0, cap_s=0).wait([worker], [], timeout_s=10)
    t.join()
    assert res.closed == [worker] and res.waited_s < 5


# --- through real processes ----------------------------------------------------------------


@pytest.fixture
def echo():
    from tests.test_transport import echo_ipc_endpoint, start_echo, stop

    proc, ep = start_echo(echo_ipc_endpoint())
    yield proc, ep
    stop(proc)


def test_shm_pairs_carry_invokes_and_replies_in_the_ring(echo) -> None:
    from eaas.bench.echo import PairClient

    _, ep = echo
    with_ring, without = PairClient(ep, "shm", arena_bytes=1 << 20), PairClient(ep, "shm", arena_bytes=1 << 20, ring=False)
    try:
        with_ring.connect(timeout_s=30)
        without.connect(timeout_s=30)
        assert with_ring.ring is not None and without.ring is None
        g = torch.Generator().manual_seed(3)
        for i in range(50):
            x = torch.randn(1 + i, 64, generator=g)
            assert torch.equal(with_ring.roundtrip(x).view(torch.uint8), without.roundtrip(x).view(torch.uint8))
        assert with_ring.ring.posted == with_ring.ring.taken == 50  # every invoke and reply went through the ring
    finally:
        with_ring.close()
        without.close()


def test_garbage_or_a_corrupt_counter_in_the_ring_never_kills_the_worker(echo) -> None:
    from eaas.bench.echo import PairClient

    proc, ep = echo
    c = PairClient(ep, "shm", arena_bytes=1 << 20)
    try:
        c.connect(timeout_s=30)
        x = torch.randn(2, 8)
        assert c.ring.post(b"\xc1 not msgpack")
        c.ring.notify()
        reply = None
        deadline = time.monotonic() + 10
        while reply is None and time.monotonic() < deadline:
            c._waiter.wait([c.ring], [], 0.5)
            reply = c.ring.take()
        from eaas.platform.decode import decode_header

        h = decode_header(reply, max_message_bytes=1 << 20, check_deadline=False)
        assert h.kind == "error" and h.code == "bad_header"  # answered through the ring, with a code
        assert torch.equal(c.roundtrip(x), x)  # and the pair still works
        w = c.ring._w
        w[REQ_POSTED] = 10**12  # a corrupt counter: the worker drops this pair and closes its doorbell
        c.ring.notify()
        deadline = time.monotonic() + 20
        while not c._waiter.wait([c.ring], [], 0.5).closed:
            assert time.monotonic() < deadline, "the worker did not drop the corrupt pair"
        with pytest.raises(TransportError):
            c.roundtrip(x, timeout_s=20)
    finally:
        c.close()
    assert proc.poll() is None  # the worker lives, and serves a new pair
    c2 = PairClient(ep, "shm", arena_bytes=1 << 20)
    try:
        c2.connect(timeout_s=30)
        assert torch.equal(c2.roundtrip(x), x)
    finally:
        c2.close()


def test_a_killed_worker_is_noticed_through_the_doorbell_not_a_timeout(echo) -> None:
    from eaas.bench.echo import PairClient

    proc, ep = echo
    c = PairClient(ep, "shm", arena_bytes=1 << 20)
    try:
        c.connect(timeout_s=30)
        x = torch.randn(4, 4)
        assert torch.equal(c.roundtrip(x), x)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        t0 = time.monotonic()
        with pytest.raises(TransportError, match="doorbell"):
            c.roundtrip(x, timeout_s=60)
        assert time.monotonic() - t0 < 30  # EOF on the doorbell, far sooner than the 60 s timeout
    finally:
        c.close()


def test_expert_client_over_the_ring_equals_the_zeromq_path(registry, registered, workers, monkeypatch) -> None:
    from eaas.platform import client as client_mod
    from eaas.platform.client import ExpertClient
    from eaas.settings import get_settings
    from eaas.testing import wait_workers_ready

    unjoined = []  # one-token calls combine their replies' rows unjoined (a spy that calls through)
    real = client_mod.combine_rows
    monkeypatch.setattr(client_mod, "combine_rows", lambda *a: unjoined.append(len(a[2])) or real(*a))

    model = registered("mixtral")
    workers(model, ["*:0-3", "*:4-7"])
    wait_workers_ready(registry, model, 2)
    fast = ExpertClient(registry, model, get_settings(redis_url="unused", prefix=registry.prefix))
    slow = ExpertClient(registry, model, get_settings(redis_url="unused", prefix=registry.prefix, shm_ring=False))
    try:
        g = torch.Generator().manual_seed(11)
        for t in (1, 1, 3, 40):
            x = torch.randn(t, 64, generator=g)
            idx = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(t)])
            w = torch.rand(t, 2, generator=g)
            assert torch.equal(fast.forward(1, x, idx, w), slow.forward(1, x, idx, w))
        assert unjoined == [2, 2, 2, 2]  # the two T=1 calls of each client, two rows each; T=3, 40 join
        rings = [c.ring for c in fast._conns._conns.values()]
        assert len(rings) == 2 and all(r is not None for r in rings)
        assert sum(r.posted for r in rings) == fast.stats.requests  # no invoke went over ZeroMQ
        assert all(c.ring is None for c in slow._conns._conns.values())
        # Replies are read where they landed and the slots are given back when the call ends:
        # nothing is held in any arena between calls but the ring's own bytes (offset 0).
        assert all(set(c.channel._alloc._used) == {0} for c in fast._conns._conns.values())
        assert all(not c.channel._alloc._used for c in slow._conns._conns.values())
    finally:
        fast.close()
        slow.close()


def test_invoke_returns_a_tensor_that_outlives_the_call(registry, registered, workers) -> None:
    """A one-row call reads its reply in the slot; what invoke() returns must be the caller's own
    copy, not a view of a slot the next call's reply overwrites."""
    from eaas.platform.client import ExpertClient
    from eaas.settings import get_settings
    from eaas.testing import wait_workers_ready

    model = registered("mixtral")
    workers(model, ["*:0-7"])
    wait_workers_ready(registry, model, 1)
    client = ExpertClient(registry, model, get_settings(redis_url="unused", prefix=registry.prefix))
    try:
        g = torch.Generator().manual_seed(5)
        x1, x2 = torch.randn(1, 64, generator=g), torch.randn(1, 64, generator=g)
        y1 = client.invoke(f"{model}/0/3", x1)
        kept = y1.clone()
        y2 = client.invoke(f"{model}/0/3", x2)  # same shape: same slot in the arena
        assert not torch.equal(y1, y2)
        assert torch.equal(y1, kept)
        assert client.transports() and set(client.transports().values()) == {"shm"}
    finally:
        client.close()


def test_connecting_to_an_unreachable_worker_leaves_no_arena_or_doorbell() -> None:
    """A new-user run found this: every retry to a SIGKILLed worker left a 64 MiB arena and its
    doorbell in /dev/shm until the client exited."""
    import os

    from eaas.platform.connections import Connections
    from eaas.platform.transport.select import local_capabilities
    from eaas.platform.transport.shm import STALE_NAME_RE
    from eaas.registry.records import WorkerRecord
    from eaas.registry.server import free_port
    from eaas.settings import get_settings

    def mine() -> set[str]:
        return {n for n in os.listdir("/dev/shm") if STALE_NAME_RE.match(n) and n.startswith(f"eaas-{os.getpid()}-")}

    before = mine()
    conns = Connections("m", get_settings(redis_url="unused", shm_arena_bytes=1 << 20), "auto")
    dead = WorkerRecord(id="w-dead", model="m", endpoint=f"tcp://127.0.0.1:{free_port()}",
                        capabilities=local_capabilities("cpu"))
    try:
        for _ in range(3):
            with pytest.raises(TransportError, match="not reachable"):
                conns.connect(dead)
            assert mine() == before
    finally:
        conns.close()
