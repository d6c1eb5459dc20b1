"""Reply delivery on a worker's ROUTER socket: never drop a reply without a trace.

A ZeroMQ ROUTER silently discards a message for a peer whose pipe is full unless
``ZMQ_ROUTER_MANDATORY`` is set (zmq_socket(3), "ZMQ_ROUTER": "messages ... are
dropped" when the HWM is reached; with ``ROUTER_MANDATORY`` the send fails with
``EAGAIN`` instead, or ``EHOSTUNREACH`` for a peer that is gone). A client that
pipelines faster than it reads would otherwise wait for replies that never come.

:class:`ReplyOutbox` sets ``ROUTER_MANDATORY`` and a bounded send wait
(``SNDTIMEO``). A reply that still cannot be handed to ZeroMQ is *dropped
explicitly*: counted (heartbeat ``replies_dropped``, ``eaas registry workers``),
logged once per congestion episode of a peer with the count, and remembered by
request id. While a peer is congested every further reply to it (and every new
request from it, which is then not computed) takes the same path at once, without
waiting again. :meth:`ReplyOutbox.flush`, called from the serving loop, answers
each remembered request with an error reply of code ``reply_dropped`` as soon as
the peer has room again, so the client learns which requests failed and may
re-send them.
"""

from __future__ import annotations

import errno
import logging
from collections import Counter, deque
from collections.abc import Hashable, Sequence
from typing import Any

import zmq

from eaas.errors import ProtocolError
from eaas.platform.protocol import error_frames, send_frames

log = logging.getLogger(__name__)

#: error code of the reply that stands in for one that could not be delivered
REPLY_DROPPED = "reply_dropped"


class ReplyOutbox:
    """Send replies to ROUTER peers; account for every one that cannot be delivered.

    Args:
        sock: the worker's ROUTER socket (its options are set here).
        worker_id: for log lines.
        send_timeout_ms: longest wait for room in a peer's pipe before a reply is
            dropped (``SNDTIMEO``); later replies to a congested peer do not wait.
        max_remembered: request ids kept per peer for ``reply_dropped`` notices;
            beyond it the oldest are forgotten (counted in :attr:`notices_lost`).

    Attributes:
        dropped: replies that could not be delivered (monotonic count).
        notices_sent: ``reply_dropped`` error replies delivered later.
        notices_lost: dropped replies whose peer never got a notice (the peer
            disconnected, or more than ``max_remembered`` were waiting).
    """

    def __init__(self, sock: zmq.Socket, worker_id: str, *, send_timeout_ms: int = 100,
                 max_remembered: int = 1_000_000) -> None:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.SNDTIMEO, int(send_timeout_ms))
        self._sock = sock
        self._worker_id = worker_id
        self._max = max_remembered
        self._congested: dict[Hashable, deque[str]] = {}
        self._episode: Counter[Hashable] = Counter()
        self.dropped = 0
        self.notices_sent = 0
        self.notices_lost = 0

    def congested(self, peer: Hashable) -> bool:
        """The peer's pipe was full at the last try and it has notices still owed."""
        return peer in self._congested

    @property
    def owed(self) -> int:
        """``reply_dropped`` notices not yet delivered, over every peer."""
        return sum(len(q) for q in self._congested.values())

    def send(self, peer: bytes, frames: Sequence[Any], request_id: Any) -> bool:
        """Send one reply (``frames`` without the envelope). True if ZeroMQ took it.

        Never raises for a slow or vanished peer: the reply is dropped and
        accounted for instead.
        """
        if peer in self._congested:
            self.drop(peer, request_id)
            return False
        try:
            send_frames(self._sock, [peer, *frames])
            return True
        except zmq.Again:
            self.drop(peer, request_id)
        except zmq.ZMQError as e:
            if e.errno != errno.EHOSTUNREACH:
                raise
            self.dropped += 1
            self.notices_lost += 1
            log.warning("worker %s: reply to request %r dropped: its client disconnected", self._worker_id, request_id)
        return False

    def count_lost(self) -> None:
        """Account for a reply whose data a transport could not deliver (the worker sends the
        error reply itself, so no ``reply_dropped`` notice is owed)."""
        self.dropped += 1

    def drop(self, peer: Hashable, request_id: Any) -> None:
        """Account for a reply that will not be sent; a ``reply_dropped`` notice is owed."""
        self.dropped += 1
        queue = self._congested.get(peer)
        if queue is None:
            queue = self._congested[peer] = deque()
            log.warning("worker %s: client %s is not reading its replies (its queue is full); dropping replies"
                        " to it and failing each with %r once it reads again", self._worker_id, _peer(peer),
                        REPLY_DROPPED)
        self._episode[peer] += 1
        if request_id is None:
            self.notices_lost += 1
            return
        if len(queue) >= self._max:
            queue.popleft()
            self.notices_lost += 1
        queue.append(str(request_id))

    def flush(self) -> int:
        """Deliver owed ``reply_dropped`` notices while peers have room (never waits).

        Returns the number of notices sent.
        """
        sent = 0
        for peer in list(self._congested):
            queue = self._congested[peer]
            while queue:
                rid = queue[0]
                err = ProtocolError(f"the reply to request {rid!r} was dropped: the client did not read"
                                    " its replies in time; re-send it", REPLY_DROPPED)
                try:
                    send_frames(self._sock, [peer, *error_frames(err, rid)], zmq.NOBLOCK)
                except zmq.Again:
                    break
                except zmq.ZMQError as e:
                    if e.errno != errno.EHOSTUNREACH:
                        raise
                    self.notices_lost += len(queue)
                    log.warning("worker %s: client %s disconnected before it read %d %r notices",
                                self._worker_id, _peer(peer), len(queue), REPLY_DROPPED)
                    queue.clear()
                    break
                queue.popleft()
                sent += 1
            if not queue:
                del self._congested[peer]
                log.warning("worker %s: client %s reads again: %d replies were dropped while it was not reading",
                            self._worker_id, _peer(peer), self._episode.pop(peer, 0))
        self.notices_sent += sent
        return sent


def _peer(peer: Hashable) -> str:
    return peer.hex() if isinstance(peer, bytes) else str(peer)
