"""Taking a call's replies: from the pairs' shared-memory rings first, then the ZeroMQ
sockets and their connection monitors.

:class:`ReplyIntake` is the waiting half of :class:`~eaas.platform.inflight.LayerCall`
(which inherits it): it waits on every pair with a request in flight — spinning on the
rings, then sleeping in one ``poll`` (:class:`~eaas.platform.waiter.Waiter`) — and hands
each reply to ``_on_reply`` and each lost connection to ``_disconnected``; what a reply
means (match, error codes, rows, failover) is the call's business.
"""

from __future__ import annotations

import time
from typing import Any

import zmq

from eaas.errors import ProtocolError
from eaas.platform.callstate import CallEnv, InFlight
from eaas.platform.connections import Conn
from eaas.platform.protocol import has_input, recv_frames


class ReplyIntake:
    """Mixin: the reply-taking loop of a call (see the module docstring).

    The class using it provides ``c`` (its lane), ``inflight`` (request id ->
    :class:`~eaas.platform.callstate.InFlight`), ``_on_reply(wid, conn, frames)`` and
    ``_disconnected(wid, reason)``.
    """

    c: CallEnv
    inflight: dict[str, InFlight]

    def _on_reply(self, wid: str, cn: Conn, frames: list[Any]) -> None:  # pragma: no cover - provided by the call
        raise NotImplementedError

    def _disconnected(self, wid: str, reason: str) -> None:  # pragma: no cover - provided by the call
        raise NotImplementedError

    def _collect(self) -> None:
        """Wait (until the earliest attempt deadline, at most 50 ms) for replies and disconnects."""
        c = self.c
        conns = {fl.wid: c.conns[fl.wid] for fl in self.inflight.values() if fl.wid in c.conns}
        if self._take_rings(conns):
            return
        earliest = min(fl.deadline_s for fl in self.inflight.values())
        timeout_s = max(0.0, min(0.05, earliest - time.monotonic()))
        rings = [cn.ring for cn in conns.values() if cn.ring is not None]
        socks = [s for cn in conns.values() for s in (cn.sock, cn.monitor)]
        res = c.waiter.wait(rings, socks, timeout_s)
        if res.ring_ready and not res.closed:
            # A reply came on a ring: take it now. The sockets and monitors (a ZeroMQ reply, a
            # disconnect) are looked at by the next wait, if anything is still in flight: checking
            # them here costs a getsockopt per socket and a failed recv per pair on every reply.
            self._take_rings(conns)
            return
        for wid, cn in conns.items():
            if cn.ring is not None and cn.ring in res.closed:
                self._disconnected(wid, "the worker closed its doorbell")
                continue
            if has_input(cn.monitor):
                self._on_monitor(wid, cn)
            if wid in c.conns:
                self._take_socket(wid, cn)
        self._take_rings(conns)

    def _take_rings(self, conns: dict[str, Conn]) -> bool:
        """Handle every reply waiting on the pairs' rings. True if any was handled."""
        got = False
        for wid, cn in conns.items():
            ring = cn.ring
            while ring is not None and ring.ready() and wid in self.c.conns:
                try:
                    data = ring.take()
                except ProtocolError as e:
                    self._disconnected(wid, f"corrupt ring: {e}")
                    break
                if data is None:
                    break
                got = True
                self._on_reply(wid, cn, [data])
        return got

    def _take_socket(self, wid: str, cn: Conn) -> None:
        while wid in self.c.conns and has_input(cn.sock):  # no recv, and no zmq.Again, when nothing came
            try:
                frames = recv_frames(cn.sock, zmq.NOBLOCK, 1)  # header as bytes, payload as frames
            except zmq.ZMQError:  # Again included
                return
            self._on_reply(wid, cn, frames)

    def _on_monitor(self, wid: str, cn: Conn) -> None:
        disconnected = False
        while True:
            try:
                msg = cn.monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            event = int.from_bytes(msg[0][:2], "little")
            if event & (zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED):
                disconnected = True
        if disconnected:
            self._disconnected(wid, "connection dropped")
