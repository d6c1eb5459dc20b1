"""The attention client's connections to expert workers: one per worker incarnation.

Each is a ZeroMQ DEALER socket (``IMMEDIATE``: nothing is queued for a peer that is
not connected), a monitor socket that reports disconnects, and the data-plane channel
chosen for the pair (:func:`~eaas.platform.transport.select.select_transport`). A
channel that needs a handshake (``shm``, ``cuda_ipc``, ``nixl``) sends ``hello`` and
waits up to 2 s for ``hello_ack``; a refusal or silence falls back to ``inline``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import zmq

from eaas.errors import EaaSError, ProtocolError, TransportError
from eaas.platform.curve import connect_curve, load_keys
from eaas.platform.protocol import Header, encode_header
from eaas.platform.decode import decode_header
from eaas.platform.transport.select import local_capabilities, make_client_channel, select_transport
from eaas.registry.records import WorkerRecord
from eaas.settings import Settings

log = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 2.0
CONNECT_TIMEOUT_MS = 250
BYE_LINGER_MS = 200  # how long libzmq keeps trying to deliver a dropped connection's ``bye`` (ms)


@dataclass(slots=True)
class Conn:
    """One client–worker pair: a DEALER socket, its monitor and the transport channel."""

    worker: WorkerRecord
    sock: zmq.Socket
    monitor: zmq.Socket
    channel: Any
    transport: str
    ring: Any = None  # the shm fast path's Ring, when the pair has one


class Connections:
    """Open connections by worker id; reconnects when a worker's endpoint or epoch changes.

    Args:
        model: for log lines.
        settings: ``max_message_bytes``, ``shm_arena_bytes``.
        transport: ``auto`` (per pair) or a forced transport name.
    """

    def __init__(self, model: str, settings: Settings, transport: str) -> None:
        self.model, self.settings, self.transport = model, settings, transport
        self._caps: dict[str, dict] = {}  # device -> local_capabilities(device)
        self._ctx = zmq.Context.instance()
        self._conns: dict[str, Conn] = {}
        # CURVE: pin the workers' public key and present ours (eaas.platform.curve)
        self._curve = load_keys(settings.curve_keys_dir) if settings.curve_keys_dir else None

    def __contains__(self, wid: str) -> bool:
        return wid in self._conns

    def __getitem__(self, wid: str) -> Conn:
        return self._conns[wid]

    def get(self, wid: str) -> Conn | None:
        """The open connection to ``wid``, or None."""
        return self._conns.get(wid)

    def caps(self, device: str) -> dict:
        """This process's capabilities for tensors on ``device`` (``cuda:N`` offers ``cuda_ipc``)."""
        c = self._caps.get(device)
        if c is None:
            c = self._caps[device] = local_capabilities(device)
        return c

    def connect(self, worker: WorkerRecord, device: str = "cpu") -> Conn:
        """The connection to this incarnation of ``worker`` (opened, with its handshake, if needed).

        ``device``: where the caller's hidden states live; a new pair's transport follows it
        (both ends on CUDA on one GPU node: ``cuda_ipc``; one host: ``shm``).

        Raises:
            TransportError: a handshake was needed and the worker is not reachable.
        """
        c = self._conns.get(worker.id)
        if c is not None and c.worker.endpoint == worker.endpoint and c.worker.epoch == worker.epoch:
            return c
        if c is not None:
            self.drop(worker.id)
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        if self._curve is not None:
            connect_curve(sock, self._curve)
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED)
        sock.connect(worker.endpoint)
        name = "inline"
        try:
            name = select_transport(self.caps(device), worker.capabilities, self.transport)
        except TransportError as e:
            log.warning("client %s: %s; using inline with worker %s", self.model, e, worker.id)
        channel = make_client_channel(name, arena_bytes=self.settings.shm_arena_bytes, ring=self.settings.shm_ring,
                                      device=device if name == "cuda_ipc" else "cpu",
                                      xfer_timeout_s=self.settings.request_timeout_ms / 1000)
        c = Conn(worker, sock, monitor, channel, name)
        hello = channel.hello_header()
        try:
            if hello is not None and not self._handshake(c, hello):
                channel.close()
                c.channel, c.transport = make_client_channel("inline"), "inline"
        except BaseException:  # unreachable worker: free the arena, its doorbell and the sockets now
            self._close(c)
            raise
        c.ring = getattr(c.channel, "ring", None)
        self._conns[worker.id] = c
        log.info("client %s: connected to worker %s at %s via %s%s", self.model, worker.id, worker.endpoint,
                 c.transport, " (shared-memory ring)" if c.ring is not None else "")
        return c

    def _handshake(self, c: Conn, hello: Any) -> bool:
        if not c.sock.poll(CONNECT_TIMEOUT_MS, zmq.POLLOUT):
            raise TransportError(f"worker {c.worker.id} at {c.worker.endpoint} is not reachable")
        c.sock.send(encode_header(hello), zmq.NOBLOCK)
        deadline = time.monotonic() + HELLO_TIMEOUT_S
        while time.monotonic() < deadline:
            if not c.sock.poll(50):
                continue
            frames = c.sock.recv_multipart(copy=False)
            try:
                h = decode_header(frames[0], max_message_bytes=self.settings.max_message_bytes, check_deadline=False)
            except ProtocolError:
                continue
            if h.kind == "hello_ack" and h.id == hello.id:
                try:
                    c.channel.on_hello_ack(h)
                    return True
                except EaaSError as e:
                    log.warning("client %s: worker %s refused %s: %s", self.model, c.worker.id, c.transport, e)
                    return False
            if h.kind == "error" and h.id == hello.id:
                log.warning("client %s: worker %s refused %s: %s", self.model, c.worker.id, c.transport, h.error)
                return False
        log.warning("client %s: no hello_ack from %s within %.1fs", self.model, c.worker.id, HELLO_TIMEOUT_S)
        return False

    def drop(self, wid: str) -> None:
        """Close the connection to ``wid`` (its channel, monitor and socket), if any.

        The worker is told ``bye`` (if it can still be reached), so it frees the pair's state
        at once — a shared arena it maps, an opened IPC handle — rather than keeping it for as
        long as this process lives (its sweep frees only pairs of dead processes).
        """
        c = self._conns.pop(wid, None)
        if c is not None:
            self._close(c, bye=True)

    @staticmethod
    def _close(c: Conn, bye: bool = False) -> None:
        linger_ms = 0
        if bye:
            try:
                c.sock.send(encode_header(Header(kind="bye", id="bye")), zmq.NOBLOCK)
                linger_ms = BYE_LINGER_MS  # libzmq delivers it after close, in its I/O thread
            except zmq.ZMQError:  # no connection to the worker: nothing to tell
                pass
        try:
            c.channel.close()
        except Exception:  # noqa: BLE001 - closing a broken channel
            pass
        c.sock.disable_monitor()
        c.monitor.close(linger=0)
        c.sock.close(linger=linger_ms)

    def transports(self) -> dict[str, str]:
        """Worker id -> the transport its open connection uses."""
        return {wid: c.transport for wid, c in self._conns.items()}

    def close(self) -> None:
        """Say ``bye`` to every worker (it frees the pair's state at once) and close everything."""
        for wid in list(self._conns):
            self.drop(wid)
