"""An echo peer and a minimal synchronous pair client, for tests and benchmarks.

``python -m eaas.bench.echo --bind ipc:///tmp/x.sock`` serves a ROUTER
socket through :class:`WorkerEndpoint` and answers every invoke with ``y = x``
(written back through the transport, as a worker would); ``--raw`` echoes frames
untouched (the bare ZeroMQ baseline). It prints ``READY <endpoint>`` once bound and
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
from eaas.platform.protocol import Header, encode_header, now_ms, raise_if_error, recv_frames, send_frames
from eaas.platform.decode import decode_header
from eaas.platform.transport.base import ClientChannel
from eaas.platform.transport.select import WorkerEndpoint, make_client_channel


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
    ep = None if raw else WorkerEndpoint(max_message_bytes=max_message_bytes, offered=offered, device=device)
    print(f"READY {bound}", file=ready_out, flush=True)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    last_sweep = time.monotonic()
    while not stop:
        if not poller.poll(200):
            if ep is not None and time.monotonic() - last_sweep > 1.0:
                ep.sweep()
                last_sweep = time.monotonic()
            continue
        try:
            # envelope (and, with the protocol, header) as bytes; payloads as frames
            frames = recv_frames(sock, zmq.NOBLOCK, 1 if ep is None else 2)
        except zmq.Again:
            continue
        if ep is None:  # bare ZeroMQ baseline: the same I/O loop, no protocol
            send_frames(sock, frames)
            continue
        if len(frames) < 2:
            continue
        peer = frames[0]
        # What a worker does with the bytes: decode + validate the header, open x
        # (a view), compute y = f(x) (identity here) and hand y to reply_frames,
        # which writes it where the transport wants it (arena / frames / NIXL WRITE).
        inc = ep.on_message(peer, frames[1:])
        if inc.reply is not None:
            send_frames(sock, [peer, *inc.reply])
        elif inc.x is not None and inc.header is not None:
            try:
                out = ep.reply_frames(peer, inc.header, inc.x)  # y = x
            except Exception as e:  # noqa: BLE001
                out = ep.error_reply(inc.header.id, e)
            send_frames(sock, [peer, *out])
    sock.close(0)
    ctx.term()


class PairClient:
    """One DEALER connected to one worker, with one channel; one request at a time.

    Args:
        endpoint: the worker's ZeroMQ endpoint.
        transport: the pair's transport (see ``select_transport``).
        arena_bytes: arena size for shared transports.
        max_message_bytes: reply size limit.
    """

    def __init__(self, endpoint: str, transport: str, *, arena_bytes: int = 64 << 20,
                 max_message_bytes: int = 1 << 30, ctx: zmq.Context | None = None,
                 device: str = "cpu") -> None:
        self.ctx = ctx or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.max_message_bytes = max_message_bytes
        self.channel: ClientChannel = make_client_channel(transport, arena_bytes=arena_bytes, device=device)
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

    def roundtrip(self, x: torch.Tensor, segments: Sequence[tuple[str, int]] | None = None,
                  *, timeout_s: float = 30.0, out: torch.Tensor | None = None) -> torch.Tensor:
        """Send ``x[N, D]`` and return a copy of ``y`` (into ``out`` if given)."""
        ch = self.channel
        rows = x.shape[0]
        slot = ch.alloc(rows, x.shape[1], x.dtype)
        slot.x.copy_(x)  # the gather (copy 1)
        rid = next(self._ids)
        segs = segments if segments is not None else (("echo/0/0", rows),)
        send_frames(self.sock, ch.invoke_frames(slot, rid, segs, now_ms() + int(timeout_s * 1000)))
        try:
            frames = self._recv(timeout_s)
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
