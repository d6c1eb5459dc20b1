"""A worker's side of every pair: what arrives, and which way each reply leaves.

Messages arrive two ways — on a same-host pair's shared-memory ring
(:mod:`eaas.platform.transport.ring`) or on the worker's ZeroMQ ROUTER socket — and
:class:`Mailroom` treats them alike: every message goes through
:meth:`~eaas.platform.transport.select.WorkerEndpoint.on_message` (decode, validate,
never raise); control messages and bad input are answered at once; a valid invoke is
handed to the worker (``on_invoke``). A reply leaves the way its request came: through
the ring when it fits, else over ZeroMQ through the
:class:`~eaas.platform.outbox.ReplyOutbox` (which drops, and says so, what a client does
not read).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import zmq

from eaas.errors import ProtocolError
from eaas.platform.outbox import ReplyOutbox
from eaas.platform.protocol import Header, has_input, recv_frames
from eaas.platform.transport.select import WorkerEndpoint
from eaas.platform.waiter import Waiter

log = logging.getLogger(__name__)

#: messages taken off the ZeroMQ socket in one pass at most
RECEIVE_BUDGET = 4096

#: ``on_invoke(peer, header, x[N, D], ring or None)``
InvokeHandler = Callable[[bytes, Header, torch.Tensor, Any], None]


class Mailroom:
    """Receive from rings and the socket; send replies back the way they came.

    Args:
        sock: the worker's bound ROUTER socket.
        endpoint_io: decodes and validates everything, keeps every pair's transport state.
        outbox: ZeroMQ reply delivery.
        waiter: the spin-then-sleep wait over rings and the socket.
        worker_id: for log lines.
        on_invoke: called for every valid invoke (a worker queues it for its next batch; the
            echo peer of the benchmarks answers it at once through :meth:`send`).
    """

    def __init__(self, sock: zmq.Socket, endpoint_io: WorkerEndpoint, outbox: ReplyOutbox, waiter: Waiter,
                 worker_id: str, on_invoke: InvokeHandler) -> None:
        self.sock, self.endpoint_io, self.outbox, self.waiter = sock, endpoint_io, outbox, waiter
        self.worker_id, self.on_invoke = worker_id, on_invoke

    def receive(self, timeout_ms: int) -> bool:
        """Take every waiting message off the rings and the socket (waiting up to ``timeout_ms``
        for the first; spinning on the rings first when there are fast-path peers). True if any came."""
        rings = self.endpoint_io.rings
        ring_ready = False
        if rings:
            if timeout_ms:
                res = self.waiter.wait(list(rings.values()), [self.sock], timeout_ms / 1000)
                for ring in res.closed:
                    self._drop_ring_peer(ring)
                ring_ready = res.ring_ready and not res.closed
        elif not self.sock.poll(timeout_ms):
            return False
        got = self._take_rings(rings) if rings else False
        if ring_ready or (rings and not has_input(self.sock)):
            # nothing on the socket, or an invoke came on a ring (the socket is looked at by the
            # next pass, whose wait checks it first): skip the recv and its zmq.Again (~10 µs)
            return got
        for _ in range(RECEIVE_BUDGET):
            try:
                # envelope and header as bytes, payload frames as zero-copy zmq.Frames
                frames = recv_frames(self.sock, zmq.NOBLOCK, 2)
            except zmq.Again:
                break
            got = True
            if len(frames) >= 2:
                self._accept(frames[0], frames[1:], None)
        return got

    def send(self, peer: bytes, frames: list, request_id: Any, ring: Any) -> None:
        """Send a reply: through the ring it came by when it fits, else over ZeroMQ.

        Raises:
            zmq.ZMQError: the socket refused the message (the outbox counts drops itself).
        """
        if ring is not None and len(frames) == 1 and not ring.closed and ring.post(frames[0]):
            ring.notify()
            return
        self.outbox.send(peer, frames, request_id)

    def _take_rings(self, rings: dict) -> bool:
        got = False
        for peer, ring in list(rings.items()):
            for _ in range(ring.slots):
                try:
                    data = ring.take()
                except ProtocolError as e:  # a corrupt ring: forget the pair, the client reconnects
                    log.warning("worker %s: dropping a peer's ring: %s", self.worker_id, e)
                    self.endpoint_io.drop_peer(peer)
                    break
                if data is None:
                    break
                got = True
                self._accept(peer, [data], ring)
        return got

    def _drop_ring_peer(self, ring: Any) -> None:
        for peer, r in list(self.endpoint_io.rings.items()):
            if r is ring:
                log.info("worker %s: a fast-path client closed its doorbell; dropping its state", self.worker_id)
                self.endpoint_io.drop_peer(peer)

    def _accept(self, peer: bytes, frames: list, ring: Any) -> None:
        inc = self.endpoint_io.on_message(peer, frames)
        if inc.reply is not None:
            self.send(peer, inc.reply, inc.header.id if inc.header is not None else None, ring)
        elif inc.x is not None and inc.header is not None:
            if ring is None and self.outbox.congested(peer):  # its reply could not be delivered: do not compute it
                self.outbox.drop(peer, inc.header.id)
                return
            self.on_invoke(peer, inc.header, inc.x, ring)
