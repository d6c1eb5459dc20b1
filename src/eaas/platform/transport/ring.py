"""The same-host fast path: invokes and replies signalled in shared memory (issue 16).

ZeroMQ hands every message through its I/O threads: a round trip costs ~0.3-0.9 ms
on a small VM, more than one MoE layer's work at decode. On one host the ``shm``
pair already shares an arena for the tensor bytes; this module puts the *message*
there too, so the per-layer path needs no ZeroMQ and, while both sides are awake,
no system call at all.

**Layout.** The first :func:`ring_bytes` of the pair's arena (the allocator never
hands them out)::

    byte   0  req_posted     u64, written by the client: requests posted so far
    byte  64  req_taken      u64, written by the worker: requests taken so far
    byte 128  rep_posted     u64, written by the worker
    byte 192  rep_taken      u64, written by the client
    byte 256  worker_asleep  u64, 1 while the worker sleeps in the kernel
    byte 320  client_asleep  u64, 1 while the client sleeps in the kernel
    byte 1024 request slots  ``slots`` x ``slot_bytes``: [u32 length][msgpack header]
    then      reply slots    the same

Each direction is one producer and one consumer (a Lamport ring): the producer writes
a slot, then bumps its ``posted`` word; the consumer reads ``posted``, then the slot,
then bumps ``taken``. The message is the same msgpack header ZeroMQ would carry,
decoded and validated by the same code (:func:`~eaas.platform.decode.decode_header`);
the tensor rows stay where they are in the arena.

**Signalling.** A waiter spins on the ``posted`` word for a budget
(:mod:`eaas.platform.spin`), then sets its ``asleep`` word and sleeps in ``poll`` on
the pair's **doorbell**, a unix stream socket; a producer that sees the peer asleep
writes one byte to it. The doorbell also tells each side at once that the other
died (EOF). Store->load ordering between "bump posted" and "read asleep" needs a
full fence, which Python lacks; an uncontended ``threading.Lock`` acquire/release is
a locked read-modify-write on x86-64 (a full barrier there), so the fast path is
offered on x86-64 only (:func:`ring_supported`). Every sleep also has a timeout, so a
wake-up lost anyway costs one timeout, never a hang.

**Fallback.** A message that does not fit a slot, or finds the ring full, travels
over ZeroMQ as before; both sides accept replies from either path.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import struct
import threading

from eaas.errors import ProtocolError

log = logging.getLogger(__name__)

CONTROL_BYTES = 1024
DEFAULT_SLOTS = 8
DEFAULT_SLOT_BYTES = 4096
MAX_SLOTS = 1024
MAX_SLOT_BYTES = 1 << 20
_LEN = struct.Struct("<I")

# u64 word indices (64 bytes apart: one cache line each)
REQ_POSTED, REQ_TAKEN, REP_POSTED, REP_TAKEN, WORKER_ASLEEP, CLIENT_ASLEEP = 0, 8, 16, 24, 32, 40

_fence_lock = threading.Lock()


def fence() -> None:
    """A full memory barrier on x86-64: an uncontended lock's acquire and release are
    locked read-modify-writes (``lock cmpxchg`` / ``lock xadd``)."""
    _fence_lock.acquire()
    _fence_lock.release()


def ring_supported() -> bool:
    """Whether this machine may use the shared-memory fast path (x86-64 Linux)."""
    return platform.machine().lower() in ("x86_64", "amd64") and hasattr(socket, "AF_UNIX")


def ring_bytes(slots: int = DEFAULT_SLOTS, slot_bytes: int = DEFAULT_SLOT_BYTES) -> int:
    """Bytes the ring occupies at the start of the arena: control words + both slot areas."""
    return CONTROL_BYTES + 2 * slots * slot_bytes


def check_ring_geometry(slots: object, slot_bytes: object, arena_size: int) -> tuple[int, int]:
    """Validate a ring announced by a peer (before mapping anything over it).

    Raises:
        ProtocolError: ``bad_handle`` when a field is not an int in range, or the ring
            would not fit in the arena.
    """
    if type(slots) is not int or not 1 <= slots <= MAX_SLOTS:
        raise ProtocolError(f"ring slots {slots!r:.40} not in 1..{MAX_SLOTS}", "bad_handle")
    if type(slot_bytes) is not int or not 64 <= slot_bytes <= MAX_SLOT_BYTES or slot_bytes % 64:
        raise ProtocolError(f"ring slot_bytes {slot_bytes!r:.40} not a multiple of 64 in 64..{MAX_SLOT_BYTES}",
                            "bad_handle")
    if ring_bytes(slots, slot_bytes) > arena_size:
        raise ProtocolError(f"ring of {ring_bytes(slots, slot_bytes)} bytes does not fit the arena", "bad_handle")
    return slots, slot_bytes


class Ring:
    """One side of a pair's ring: posts in one direction, takes from the other.

    Args:
        buf: writable ``memoryview`` of the arena's first :func:`ring_bytes` bytes.
        slots, slot_bytes: the geometry (validated by :func:`check_ring_geometry`).
        role: ``"client"`` (posts requests, takes replies) or ``"worker"`` (the reverse).
        bell: the connected doorbell socket (made non-blocking here; the ring owns it).

    Single-threaded per side: one thread posts and takes (the client's calls are
    serialised; the worker has one loop).
    """

    def __init__(self, buf: memoryview, slots: int, slot_bytes: int, role: str, bell: socket.socket) -> None:
        self._buf = buf
        self._w = buf[:CONTROL_BYTES].cast("Q")
        self.slots, self.slot_bytes = slots, slot_bytes
        req_base, rep_base = CONTROL_BYTES, CONTROL_BYTES + slots * slot_bytes
        if role == "client":
            self._out_posted, self._out_taken, self._out_base = REQ_POSTED, REQ_TAKEN, req_base
            self._in_posted, self._in_taken, self._in_base = REP_POSTED, REP_TAKEN, rep_base
            self._me_asleep, self._peer_asleep = CLIENT_ASLEEP, WORKER_ASLEEP
        elif role == "worker":
            self._out_posted, self._out_taken, self._out_base = REP_POSTED, REP_TAKEN, rep_base
            self._in_posted, self._in_taken, self._in_base = REQ_POSTED, REQ_TAKEN, req_base
            self._me_asleep, self._peer_asleep = WORKER_ASLEEP, CLIENT_ASLEEP
        else:
            raise ValueError(f"role must be 'client' or 'worker', got {role!r}")
        # our own counters, kept locally: the peer's copy of them is never trusted
        self._posted = self._w[self._out_posted]
        self._taken = self._w[self._in_taken]
        bell.setblocking(False)
        self.bell = bell
        self.closed = False
        self.posted = self.taken = self.rings_sent = 0  # counters for tests and benchmarks

    def fileno(self) -> int:
        """The doorbell's file descriptor (readable: a ring, or EOF when the peer is gone)."""
        return self.bell.fileno()

    # --- producing -------------------------------------------------------------

    def post(self, data: bytes) -> bool:
        """Put one message in the next outgoing slot. False (nothing written) when it does
        not fit a slot or the peer has not taken the slot's previous message yet."""
        if self.closed:
            return False
        n = len(data)
        if n + 4 > self.slot_bytes:
            return False
        posted = self._posted
        if posted - self._w[self._out_taken] >= self.slots:
            return False
        off = self._out_base + (posted % self.slots) * self.slot_bytes
        _LEN.pack_into(self._buf, off, n)
        self._buf[off + 4 : off + 4 + n] = data
        self._posted = posted + 1
        self._w[self._out_posted] = posted + 1  # publish: the slot's bytes were stored before this
        self.posted += 1
        return True

    def notify(self) -> None:
        """Wake the peer if it sleeps (call after :meth:`post`)."""
        fence()  # our posted store must be visible before we read the peer's asleep word
        if not self.closed and self._w[self._peer_asleep]:
            try:
                self.bell.send(b"\x01")
                self.rings_sent += 1
            except (BlockingIOError, InterruptedError):
                pass  # the peer has unread rings: it will wake anyway
            except OSError:
                self.closed = True

    # --- consuming -------------------------------------------------------------

    def ready(self) -> bool:
        """True when an incoming message waits (one shared-memory read; False once closed)."""
        return not self.closed and self._w[self._in_posted] != self._taken

    def take(self) -> bytes | None:
        """The next incoming message (a copy of its bytes), or None.

        Raises:
            ProtocolError: ``bad_handle``: the peer's counter or a length is out of range
                (a corrupt or hostile ring; drop the pair).
        """
        if self.closed:
            return None
        posted = self._w[self._in_posted]
        taken = self._taken
        if posted == taken:
            return None
        if not 0 < posted - taken <= self.slots:
            raise ProtocolError(f"ring overrun: posted {posted}, taken {taken}, {self.slots} slots", "bad_handle")
        off = self._in_base + (taken % self.slots) * self.slot_bytes
        (n,) = _LEN.unpack_from(self._buf, off)
        if n + 4 > self.slot_bytes:
            raise ProtocolError(f"ring slot length {n} exceeds {self.slot_bytes - 4}", "bad_handle")
        data = bytes(self._buf[off + 4 : off + 4 + n])
        self._taken = taken + 1
        self._w[self._in_taken] = taken + 1  # the slot may be reused from now on
        self.taken += 1
        return data

    # --- sleeping --------------------------------------------------------------

    def sleep_begin(self) -> bool:
        """Announce a kernel wait. Returns True (and cancels it) when a message arrived meanwhile
        or the ring is closed (nothing to wait for)."""
        if self.closed:
            return True
        self._w[self._me_asleep] = 1
        fence()  # asleep must be visible before we look at posted once more
        if self.ready():
            self._w[self._me_asleep] = 0
            return True
        return False

    def sleep_end(self) -> bool:
        """End a kernel wait: clear the asleep word and drain the doorbell. False when the
        peer has closed its end (it exited or dropped the pair)."""
        if self.closed:
            return False
        self._w[self._me_asleep] = 0
        while True:
            try:
                data = self.bell.recv(4096)
            except (BlockingIOError, InterruptedError):
                return not self.closed
            except OSError:
                self.closed = True
                return False
            if not data:
                self.closed = True
                return False

    def close(self) -> None:
        """Close the doorbell (the peer sees EOF) and stop posting."""
        self.closed = True
        try:
            self.bell.close()
        except OSError:
            pass
        try:
            self._w.release()
        except (ValueError, BufferError):
            pass


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a unix socket (``SO_PEERCRED``)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def listen_bell(path: str) -> socket.socket:
    """A listening unix socket at ``path`` (mode 0600) for one worker's doorbell connection.

    Raises:
        OSError: the path cannot be bound.
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)
        try:
            s.bind(path)
        finally:
            os.umask(old)
        s.listen(1)
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


def accept_bell(listener: socket.socket) -> socket.socket | None:
    """The worker's doorbell connection, if it is waiting and comes from our own uid."""
    try:
        conn, _ = listener.accept()
    except (BlockingIOError, InterruptedError, OSError):
        return None
    if peer_uid(conn) != os.getuid():
        log.warning("doorbell: a process of another user connected; refused")
        conn.close()
        return None
    return conn


def connect_bell(path: str, timeout_s: float = 1.0) -> socket.socket:
    """Connect to a client's doorbell at ``path``.

    Raises:
        OSError: nothing listens there (or it is not ours).
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout_s)
    try:
        s.connect(path)
        if peer_uid(s) != os.getuid():
            raise PermissionError(f"doorbell {path} belongs to another user")
    except OSError:
        s.close()
        raise
    return s
