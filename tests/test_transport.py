"""Transports through a real echo worker process: bit-identical, robust, no leaks."""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from eaas.testing import wait_for
import torch

from eaas.errors import TransportError
from eaas.platform.protocol import Header, encode_header, invoke_header, now_ms
from eaas.platform.decode import decode_header
from eaas.platform.transport import WorkerEndpoint, local_capabilities, select_transport
from eaas.bench.echo import PairClient
from eaas.platform.transport.shm import STALE_NAME_RE, Allocator, ShmArena, ShmClientChannel, sweep_stale_arenas

LIMIT = 64 << 20


def _read_line(proc: subprocess.Popen, timeout_s: float) -> str:
    """One stdout line of ``proc``, waiting at most ``timeout_s``."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout_s):
        proc.kill()
        raise TimeoutError(f"process {proc.pid} printed nothing in {timeout_s} s")
    return proc.stdout.readline().strip()


def echo_ipc_endpoint() -> str:
    """A fresh ``ipc://`` endpoint under /tmp for an echo peer (:func:`stop` removes its file)."""
    return f"ipc:///tmp/eaas-test-{uuid.uuid4().hex[:8]}.sock"


def start_echo(bind: str, *extra: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "eaas.bench.echo", "--bind", bind, *extra],
                            stdout=subprocess.PIPE, text=True)
    proc.ipc_path = bind[len("ipc://"):] if bind.startswith("ipc://") else None  # type: ignore[attr-defined]
    deadline = time.monotonic() + 60
    line = _read_line(proc, 60)
    while not line.startswith("READY ") and time.monotonic() < deadline:  # skip library chatter
        line = _read_line(proc, max(deadline - time.monotonic(), 0.1))
    assert line.startswith("READY "), line
    return proc, line.split()[1]


def stop(proc: subprocess.Popen) -> None:
    """Stop an echo peer and remove its ipc socket file (a killed peer leaves it behind)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    path = getattr(proc, "ipc_path", None)
    if path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def our_arenas(pid: int | None = None) -> set[str]:
    """Arenas and their doorbells created by ``pid`` (default: this test process; names are
    ``eaas-{pid}-...``). Other processes on the machine (another test session, a deployment)
    may hold their own."""
    mine = f"eaas-{os.getpid() if pid is None else pid}-"
    return {n for n in os.listdir("/dev/shm") if STALE_NAME_RE.match(n) and n.startswith(mine)}


def wait_until(cond, timeout_s: float, what: str) -> None:
    wait_for(cond, timeout_s, interval_s=0.01, what=what)


@pytest.fixture(scope="module")
def echo_ipc():
    proc, ep = start_echo(echo_ipc_endpoint())
    yield ep
    stop(proc)


@pytest.fixture(scope="module")
def echo_tcp():
    proc, ep = start_echo("tcp://127.0.0.1:0")
    yield ep
    stop(proc)


def _payloads():
    g = torch.Generator().manual_seed(0)
    out = []
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for rows, hidden in ((1, 8), (37, 64), (513, 96), (0, 16)):
            out.append(torch.randn(rows, hidden, generator=g).to(dt))
    special = torch.tensor([[float("nan"), float("inf"), -0.0, 1e-45]], dtype=torch.float32)
    out.append(special)
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _carry(endpoint: str, transport: str) -> None:
    c = PairClient(endpoint, transport, arena_bytes=4 << 20)
    try:
        c.connect(timeout_s=30)
        for x in _payloads():
            y = c.roundtrip(x, [("m/0/0", x.shape[0] // 2), ("m/0/1", x.shape[0] - x.shape[0] // 2)])
            assert y.dtype == x.dtype and y.shape == x.shape
            assert torch.equal(_bits(y), _bits(x)), (transport, x.dtype, tuple(x.shape))
        # The same shape again and again: inline reuses its released request tensors
        # (and their byte views), so each reply must carry this request's bytes.
        for rows in (37, 128):  # 9 KiB and 128 KiB (both under the copy threshold)
            for i in range(4):
                x = torch.full((rows, 256), float(i)) + torch.arange(256)
                assert torch.equal(_bits(c.roundtrip(x)), _bits(x)), (transport, rows, i)
        big = torch.randn(2048, 1024)  # 8 MiB > 4 MiB arena: shm falls back to inline
        assert torch.equal(_bits(c.roundtrip(big)), _bits(big))
    finally:
        c.close()


@pytest.mark.parametrize("transport", ["inline", "shm"])
def test_bit_identical_over_ipc(echo_ipc, transport):
    _carry(echo_ipc, transport)


def test_bit_identical_inline_over_tcp(echo_tcp):
    _carry(echo_tcp, "inline")


def test_worker_refuses_a_transport_it_does_not_offer():
    ep = WorkerEndpoint(max_message_bytes=LIMIT, offered=["inline"])
    ch = ShmClientChannel(1 << 20)
    try:
        r = ep.on_message(b"p", [encode_header(ch.hello_header())])
        assert decode_header(r.reply[0], max_message_bytes=LIMIT).code == "bad_transport"
    finally:
        ch.close()


# --- shm validation on the worker side (in-process endpoint, real arena) ----------------


def test_shm_bad_handles_get_codes_and_never_crash():
    ch = ShmClientChannel(1 << 20)
    ep = WorkerEndpoint(max_message_bytes=LIMIT, max_arena_bytes=2 << 20, offered=["shm"])
    try:
        ack = ep.on_message(b"p", [encode_header(ch.hello_header())])
        ch.on_hello_ack(decode_header(ack.reply[0], max_message_bytes=LIMIT))
        assert ch.arena.name not in os.listdir("/dev/shm")  # unlinked once both mapped it

        def inv(handle, shape=(4, 8), extra=()):
            h = invoke_header("r", [("f", shape[0])], dtype=torch.float32, hidden=shape[1],
                              deadline_ms=now_ms() + 60_000, transport="shm", handle=handle)
            inc = ep.on_message(b"p", [encode_header(h), *extra])
            return inc, (decode_header(inc.reply[0], max_message_bytes=LIMIT).code if inc.reply else None)

        name = ch.arena.name
        good = {"arena": name, "offset": 128, "nbytes": 128}
        inc, code = inv(good)
        assert code is None and inc.x.shape == (4, 8)
        cases = [
            ({**good, "offset": (1 << 20) - 64}, "bad_handle"),      # runs past the end
            ({**good, "offset": -64}, "bad_handle"),
            ({**good, "offset": 1 << 40}, "bad_handle"),
            ({**good, "offset": 130}, "bad_handle"),                 # misaligned for float32
            ({**good, "nbytes": 64}, "size_mismatch"),
            ({**good, "offset": "0"}, "bad_handle"),
            ({"offset": 0, "nbytes": 128}, "unknown_arena"),
            ({**good, "arena": "eaas-1-0123456789abcdef"}, "unknown_arena"),
        ]
        for handle, want in cases:
            assert inv(handle)[1] == want, handle
        assert inv(good, extra=[b"\x00" * 128])[1] == "size_mismatch"
        # the arena belongs to peer b"p": another peer cannot use it
        h = invoke_header("r", [("f", 4)], dtype=torch.float32, hidden=8, deadline_ms=now_ms() + 60_000,
                          transport="shm", handle=good)
        assert decode_header(ep.on_message(b"q", [encode_header(h)]).reply[0],
                             max_message_bytes=LIMIT).code == "unknown_arena"
        for handle, want in [
            ({"arena": "../../etc/passwd", "size": 4096, "pid": 1}, "bad_handle"),
            ({"arena": "eaas-1-0123456789abcdef", "size": 4096, "pid": 1}, "unknown_arena"),
            ({"arena": name, "size": 1 << 40, "pid": 1}, "too_large"),
            ({"arena": name, "size": "big", "pid": 1}, "too_large"),
        ]:
            r = ep.on_message(b"z", [encode_header(Header(kind="hello", id=1, transport="shm", handle=handle))])
            assert decode_header(r.reply[0], max_message_bytes=LIMIT).code == want, handle
    finally:
        ep.drop_peer(b"p")
        ch.close()


def test_abandoned_slot_is_not_reused_until_the_late_reply():
    ch = ShmClientChannel(4096)
    try:
        s1 = ch.alloc(8, 8, torch.float32)
        ch.invoke_frames(s1, "late", [("f", 8)], now_ms() + 1000)
        ch.abandon(s1)
        s2 = ch.alloc(8, 8, torch.float32)
        assert s2.offset != s1.offset
        ch.reply_dropped(Header(kind="reply", id="late"))
        ch.release(s2)
        assert ch.used_bytes == 0
    finally:
        ch.close()


def test_allocator_first_fit_and_merge():
    a = Allocator(1024)
    offs = [a.alloc(200) for _ in range(4)]
    assert offs == [0, 256, 512, 768] and a.alloc(1) is None
    a.free(256)
    a.free(512)
    assert a.alloc(500) == 256  # merged neighbours
    a.free(0)
    a.free(256)
    a.free(768)
    assert a.used_bytes == 0 and a.alloc(1024) == 0


# --- shm cleanup: real processes, exit and SIGKILL --------------------------------


CLIENT = textwrap.dedent("""
    import sys, torch
    from eaas.bench.echo import PairClient
    c = PairClient(sys.argv[1], "shm", arena_bytes=1 << 20)
    c.connect(timeout_s=30)
    x = torch.randn(16, 16)
    assert torch.equal(c.roundtrip(x), x)
    print("DONE", c.channel.arena.name, flush=True)
    if sys.argv[2] == "exit":
        c.close()
    else:
        sys.stdin.readline()  # wait to be killed
""")


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_no_shm_left_after_client_exits_or_dies(echo_ipc, how):
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, echo_ipc, how], stdout=subprocess.PIPE,
                            stdin=subprocess.PIPE, text=True)
    line = _read_line(proc, 60)
    assert line.startswith("DONE"), line
    assert line.split()[1].startswith(f"eaas-{proc.pid}-")  # the client's arena, named after its pid
    if how == "sigkill":
        proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) in (0, -signal.SIGKILL)
    assert our_arenas(proc.pid) == set()


def test_no_shm_left_after_worker_sigkilled():
    before = our_arenas()
    proc, ep = start_echo(echo_ipc_endpoint())
    c = PairClient(ep, "shm", arena_bytes=1 << 20)
    try:
        c.connect(timeout_s=30)
        x = torch.randn(4, 4)
        assert torch.equal(c.roundtrip(x), x)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        with pytest.raises(Exception):
            c.roundtrip(x, timeout_s=0.3)
    finally:
        c.close()
        stop(proc)
    assert our_arenas() - before == set()


def test_sweeper_removes_arena_of_a_dead_creator():
    # a torch-free child (fast to start) creating an arena named the way ShmArena.create does
    code = ("import os, secrets; n = f'eaas-{os.getpid()}-{secrets.token_hex(8)}'; "
            "os.close(os.open('/dev/shm/' + n, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)); "
            "print(n, flush=True); input()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)
    name = _read_line(proc, 60)
    assert name in os.listdir("/dev/shm")
    assert name not in sweep_stale_arenas()  # creator alive: kept
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert name in sweep_stale_arenas()
    assert name not in os.listdir("/dev/shm")


def test_arena_names_are_unique_and_carry_pid():
    a, b = ShmArena.create(4096), ShmArena.create(4096)
    try:
        assert a.name != b.name and a.name.startswith(f"eaas-{os.getpid()}-")
    finally:
        for x in (a, b):
            x.unlink()
            x.close()


# --- transport choice (pure) ----------------------------------------------------------


def _caps(host="h1", shm="h1/shm", gpu=None, cuda=False, nixl=False, transports=None):
    t = transports or (["inline", "shm"] + (["cuda_ipc"] if cuda else []) + (["nixl"] if nixl else []))
    return {"host_id": host, "shm_id": shm, "gpu_node_id": gpu, "cuda": cuda, "nixl": nixl, "transports": t}


SELECT_TABLE = [
    ("same host cpu", _caps(), _caps(), None, "shm"),
    ("same host, nixl both", _caps(nixl=True), _caps(nixl=True), None, "shm"),
    ("same gpu node, cuda", _caps(gpu="n1", cuda=True), _caps(gpu="n1", cuda=True), None, "cuda_ipc"),
    ("same host, worker cpu", _caps(gpu="n1", cuda=True), _caps(), None, "shm"),
    ("other gpu node", _caps(gpu="n1", cuda=True, nixl=True), _caps("h2", "h2/shm", gpu="n2", cuda=True, nixl=True),
     None, "nixl"),
    ("other host, nixl both", _caps(nixl=True), _caps("h2", "h2/shm", nixl=True), None, "nixl"),
    ("other host, nixl one side", _caps(nixl=True), _caps("h2", "h2/shm"), None, "inline"),
    ("other host", _caps(), _caps("h2", "h2/shm"), None, "inline"),
    ("same host, different /dev/shm", _caps(shm="a"), _caps(shm="b"), None, "inline"),
    ("no shm", _caps(shm=None), _caps(shm=None), None, "inline"),
    ("override inline", _caps(), _caps(), "inline", "inline"),
    ("override auto", _caps(), _caps(), "auto", "shm"),
    ("worker offers inline only", _caps(), _caps(transports=["inline"]), None, "inline"),
]


@pytest.mark.parametrize("name,client,worker,override,want", SELECT_TABLE, ids=[r[0] for r in SELECT_TABLE])
def test_select_transport_table(name, client, worker, override, want):
    assert select_transport(client, worker, override) == want


def test_select_override_not_offered_raises():
    with pytest.raises(TransportError):
        select_transport(_caps(), _caps(transports=["inline"]), "shm")
    with pytest.raises(TransportError):
        select_transport(_caps(), _caps(), "pigeon")


def test_local_capabilities_here():
    caps = local_capabilities()
    assert {"inline", "shm"} <= set(caps["transports"]) and caps["cuda"] is False
    assert select_transport(caps, local_capabilities()) == "shm"
    assert local_capabilities(offered=["inline"])["transports"] == ["inline"]


def test_every_side_implements_the_declared_protocols():
    from eaas.platform.transport.base import ClientChannel, WorkerSide

    ep = WorkerEndpoint(max_message_bytes=LIMIT)
    assert ep._sides and all(isinstance(side, WorkerSide) for side in ep._sides.values())
    ch = ShmClientChannel(1 << 20)
    try:
        assert isinstance(ch, ClientChannel)
    finally:
        ch.close()
