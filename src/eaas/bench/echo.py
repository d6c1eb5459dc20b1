"""An echo peer and a minimal synchronous pair client, for tests and benchmarks.

``python -m eaas.bench.echo --bind ipc:///tmp/x.sock`` serves a ROUTER
socket through :class:`WorkerEndpoint` and answers every invoke with ``y = x``
(written back through the transport, as a worker would); ``--raw`` echoes frames
untouched (the bare ZeroMQ baseline). Same-host ``shm`` pairs use the message ring
(invokes and replies in the arena, :mod:`eaas.platform.transport.ring`), as a worker does. It prints ``READY <endpoint>`` once bound and
exits on SIGTERM/SIGINT. :class:`PairClient` is the smallest correct client of one
pair (one request in flight); the real client is ``eaas.platform.client``.
"""

from __future__ import annotations

import argparse
import itertools
import signal
import sys
import time
from collections.abc import Sequence

import torch
import zmq

from eaas.errors import ExpertTimeout, TransportError
from eaas.platform.mailroom import Mailroom
from eaas.platform.outbox import ReplyOutbox
from eaas.platform.protocol import (Header, encode_header, has_input, now_ms, raise_if_error, recv_frames,
                                    send_frames)
from eaas.platform.decode import decode_header
from eaas.platform.transport.base import ClientChannel
from eaas.platform.transport.select import WorkerEndpoint, make_client_channel
from eaas.platform.waiter import Waiter
from eaas.settings import get_settings


def _waiter() -> Waiter:
    """A waiter with the spin settings of the environment (``EAAS_SPIN_CAP_US``, ``EAAS_SPIN_FLOOR_US``)."""
    s = get_settings()
    return Waiter(s.spin_floor_us / 1e6, s.spin_cap_us / 1e6)


def serve(endpoint: str, *, max_message_bytes: int = 1 << 30, offered: Sequence[str] | None = None,
          raw: bool = False, device: str = "cpu", ready_out=sys.stdout) -> None:
    """Serve echoes on ``endpoint`` until SIGTERM/SIGINT (``tcp://127.0.0.1:0`` picks a port)."""
    torch.set_num_threads(1)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    print(f"READY {bound}", file=ready_out, flush=True)
    if raw:  # bare ZeroMQ baseline: the same I/O loop, no protocol
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        while not stop:
            if poller.poll(200):
                send_frames(sock, recv_frames(sock, 0, 1))
    else:
        ep = WorkerEndpoint(max_message_bytes=max_message_bytes, offered=offered, device=device)
        outbox = ReplyOutbox(sock, "echo")

        def echo(peer: bytes, header: Header, x: torch.Tensor, ring: object | None) -> None:
            # What a worker does with an opened invoke: compute y = f(x) (identity here) and
            # hand y to reply_frames, which writes it where the transport wants it (arena /
            # frames / NIXL WRITE); the reply leaves the way the request came.
            try:
                out = ep.reply_frames(peer, header, x)
            except Exception as e:  # noqa: BLE001
                out = ep.error_reply(header.id, e)
            mailroom.send(peer, out, header.id, ring)

        # the worker's own receive path: rings and socket, validation, control messages
        mailroom = Mailroom(sock, ep, outbox, _waiter(), "echo", echo)
        last_sweep = time.monotonic()
        while not stop:
            mailroom.receive(200)
            if outbox.owed:
                outbox.flush()
            if time.monotonic() - last_sweep > 1.0:
                ep.sweep()
                last_sweep = time.monotonic()
    sock.close(0)
    ctx.term()


class PairClient:
    """One DEALER connected to one worker, with one channel; one request at a time.

    Args:
        endpoint: the worker's ZeroMQ endpoint.
        transport: the pair's transport (see ``select_transport``).
        arena_bytes: arena size for shared transports.
        max_message_bytes: reply size limit.
        ring: offer the shm message ring (``transport="shm"`` only): invokes and replies then
            travel in the arena, not over ZeroMQ.
    """

    def __init__(self, endpoint: str, transport: str, *, arena_bytes: int = 64 << 20,
                 max_message_bytes: int = 1 << 30, ctx: zmq.Context | None = None,
                 device: str = "cpu", ring: bool = True) -> None:
        self.ctx = ctx or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.max_message_bytes = max_message_bytes
        self.channel: ClientChannel = make_client_channel(transport, arena_bytes=arena_bytes, device=device,
                                                          ring=ring)
        self.ring = None  # the shm message ring, once the worker accepted it
        self._waiter = _waiter()
        self._ids = itertools.count(1)
        self._rcvtimeo = -1

    def _recv(self, timeout_s: float) -> list[zmq.Frame]:
        # A blocking recv bounded by RCVTIMEO: one wait inside libzmq instead of a
        # zmq_poll followed by a non-blocking recv (set only when the timeout changes).
        ms = max(int(timeout_s * 1000), 1)
        if ms != self._rcvtimeo:
            self.sock.setsockopt(zmq.RCVTIMEO, ms)
            self._rcvtimeo = ms
        try:
            return recv_frames(self.sock, 0, 1)  # header as bytes, payload as frames
        except zmq.Again:
            raise ExpertTimeout(f"no answer within {timeout_s} s") from None

    def connect(self, timeout_s: float = 30.0) -> None:
        """Ping until the worker answers (it may still be starting), then hello."""
        deadline = time.monotonic() + timeout_s
        self.sock.send(encode_header(Header(kind="ping", id="ping")))
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ExpertTimeout(f"worker did not answer a ping within {timeout_s} s")
            frames = self._recv(left)
            if decode_header(frames[0], max_message_bytes=self.max_message_bytes).kind == "pong":
                break
        hello = self.channel.hello_header()
        if hello is not None:
            self.sock.send(encode_header(hello))
            h = decode_header(self._recv(max(deadline - time.monotonic(), 0.001))[0],
                              max_message_bytes=self.max_message_bytes)
            if h.kind == "error":
                raise TransportError(f"worker refused {self.channel.name} hello: {h.code}: {h.error}")
            self.channel.on_hello_ack(h)
            self.ring = getattr(self.channel, "ring", None)

    def _recv_ring(self, timeout_s: float) -> list:
        deadline = time.monotonic() + timeout_s
        while (data := self.ring.take()) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ExpertTimeout(f"no answer within {timeout_s} s")
            if self._waiter.wait([self.ring], [self.sock], left).closed:
                raise TransportError("the worker closed the pair's doorbell")
            if self.ring.ready():
                continue
            if has_input(self.sock):  # a reply that did not fit the ring
                return recv_frames(self.sock, 0, 1)
        return [data]

    def roundtrip(self, x: torch.Tensor, segments: Sequence[tuple[str, int]] | None = None,
                  *, timeout_s: float = 30.0, out: torch.Tensor | None = None) -> torch.Tensor:
        """Send ``x[N, D]`` and return a copy of ``y`` (into ``out`` if given)."""
        ch = self.channel
        rows = x.shape[0]
        slot = ch.alloc(rows, x.shape[1], x.dtype)
        slot.x.copy_(x)  # the gather (copy 1)
        rid = next(self._ids)
        segs = segments if segments is not None else (("echo/0/0", rows),)
        frames = ch.invoke_frames(slot, rid, segs, now_ms() + int(timeout_s * 1000))
        ring = self.ring
        if ring is not None and len(frames) == 1 and ring.post(frames[0]):
            ring.notify()
        else:
            send_frames(self.sock, frames)
        try:
            frames = self._recv_ring(timeout_s) if ring is not None else self._recv(timeout_s)
            h = decode_header(frames[0], max_message_bytes=self.max_message_bytes, check_deadline=False)
            raise_if_error(h)
            y = ch.decode_reply(slot, h, frames[1:])
            if out is None:
                out = y.clone()
            else:
                out.copy_(y)  # the combine's read (copy 2)
        except BaseException:
            ch.abandon(slot)
            raise
        ch.release(slot)
        return out

    def close(self) -> None:
        try:
            self.sock.send(encode_header(Header(kind="bye", id="bye")), flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        self.channel.close()
        self.sock.close(0)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bind", required=True)
    p.add_argument("--raw", action="store_true")
    p.add_argument("--max-message-bytes", type=int, default=1 << 30)
    p.add_argument("--transports", default=None, help="comma-separated offered transports")
    p.add_argument("--device", default="cpu", help="torch device of the worker side (cuda:N for cuda_ipc)")
    a = p.parse_args(argv)
    serve(a.bind, max_message_bytes=a.max_message_bytes, raw=a.raw,
          offered=a.transports.split(",") if a.transports else None, device=a.device)


if __name__ == "__main__":
    main()
