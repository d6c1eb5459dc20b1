"""``shm`` transport: a shared-memory arena per client–worker pair (same host).

The client creates the arena (``/dev/shm/eaas-{pid}-{random}``, mode 0600) and
announces it in a ``hello``; the worker maps it and **unlinks it at once**, so from
then on the segment has no name and the kernel frees it when the last of the two
processes unmaps it or dies — nothing can leak in ``/dev/shm``. Before the worker
has mapped it, the client owns the name: it unlinks on ``hello_ack``, on
:meth:`ShmClientChannel.close`, at interpreter exit (atexit), and
:func:`sweep_stale_arenas` removes names whose creator pid is dead (a client
SIGKILLed before any worker mapped its arena).

A request's rows are written by the caller straight into an arena view
(``slot.x``); the header carries ``{"arena", "offset", "nbytes"}``; the worker views
the same bytes and writes ``y`` (same shape and dtype) back into the **same
region**; the client reads ``y`` as a view until it releases the slot. When the
arena is full (or a request is bigger than it) :meth:`ShmClientChannel.alloc`
falls back to an inline slot for that request.
"""

from __future__ import annotations

import atexit
import bisect
import logging
import mmap
import os
import re
import secrets
import threading
from collections.abc import Hashable, Sequence

import torch

from eaas.errors import ProtocolError, TransportError
from eaas.procs import pid_alive
from eaas.platform.protocol import Frame, Header, encode_reply
from eaas.platform.transport.arena import ArenaChannel, check_region
from eaas.platform.transport.base import Slot, write_reply
from eaas.platform.transport.inline import InlineClientChannel
from eaas.platform.transport.ring import (
    DEFAULT_SLOT_BYTES,
    DEFAULT_SLOTS,
    Ring,
    accept_bell,
    check_ring_geometry,
    connect_bell,
    listen_bell,
    ring_bytes,
    ring_supported,
)

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
ARENA_PREFIX = "eaas-"
ARENA_NAME_RE = re.compile(r"^eaas-(\d{1,10})-([0-9a-f]{16})$")
STALE_NAME_RE = re.compile(r"^eaas-(\d{1,10})-([0-9a-f]{16})(\.bell)?$")  # arenas and their doorbells
BELL_SUFFIX = ".bell"
ALIGN_BYTES = 64
MAX_CACHED_VIEWS = 1024

_owned_lock = threading.Lock()
_owned_names: set[str] = set()  # arenas this process created and has not unlinked yet
_atexit_registered = False


def _unlink(name: str) -> bool:
    try:
        os.unlink(os.path.join(SHM_DIR, name))
        return True
    except FileNotFoundError:
        return False
    finally:
        with _owned_lock:
            _owned_names.discard(name)


def _unlink_owned_at_exit() -> None:
    for name in list(_owned_names):
        _unlink(name)


def sweep_stale_arenas(shm_dir: str = SHM_DIR) -> list[str]:
    """Unlink ``eaas-{pid}-*`` segments (and doorbells) whose creator pid is dead; return their names."""
    removed = []
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return removed
    for name in names:
        m = STALE_NAME_RE.match(name)
        if m and not pid_alive(int(m.group(1))):
            try:
                os.unlink(os.path.join(shm_dir, name))
                removed.append(name)
                log.info("shm arena %s: creator pid %s is dead, unlinked", name, m.group(1))
            except OSError:
                pass
    return removed


class Allocator:
    """First-fit allocator of ``ALIGN_BYTES``-aligned byte ranges in ``[0, size)``.

    Not thread-safe; callers hold a lock.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._free: list[tuple[int, int]] = [(0, size)] if size > 0 else []  # sorted (offset, length)
        self._used: dict[int, int] = {}

    @property
    def used_bytes(self) -> int:
        return sum(self._used.values())

    def alloc(self, nbytes: int) -> int | None:
        """Offset of a free range of at least ``nbytes`` (rounded up), or None."""
        need = max(ALIGN_BYTES, -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES)
        for i, (off, length) in enumerate(self._free):
            if length >= need:
                if length == need:
                    del self._free[i]
                else:
                    self._free[i] = (off + need, length - need)
                self._used[off] = need
                return off
        return None

    def free(self, offset: int) -> None:
        """Return a range from :meth:`alloc` (unknown offsets are ignored)."""
        length = self._used.pop(offset, None)
        if length is None:
            return
        i = bisect.bisect_left(self._free, (offset, 0))
        self._free.insert(i, (offset, length))
        if i + 1 < len(self._free) and offset + length == self._free[i + 1][0]:  # merge right
            self._free[i] = (offset, length + self._free[i + 1][1])
            del self._free[i + 1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:  # merge left
            self._free[i - 1] = (self._free[i - 1][0], self._free[i - 1][1] + self._free[i][1])
            del self._free[i]


class ShmArena:
    """A mapped shared-memory segment with a uint8 torch view over it."""

    def __init__(self, name: str, size: int, mm: mmap.mmap) -> None:
        self.name = name
        self.size = size
        self._mm: mmap.mmap | None = mm
        self.u8 = torch.frombuffer(mm, dtype=torch.uint8)  # [size] writable, no copy
        # (offset, nbytes, dtype, shape) -> view: the same slots recur request after
        # request, and building a view costs three tensor ops on the hot path.
        self._views: dict[tuple, torch.Tensor] = {}

    @classmethod
    def create(cls, size: int) -> ShmArena:
        """Create and map a new arena named ``eaas-{pid}-{random}`` (owned by us)."""
        global _atexit_registered
        name = f"{ARENA_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW, 0o600)
        with _owned_lock:
            _owned_names.add(name)
            if not _atexit_registered:
                atexit.register(_unlink_owned_at_exit)
                _atexit_registered = True
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
        except OSError as e:
            _unlink(name)
            raise TransportError(f"shm arena {name}: cannot create {size} bytes: {e}") from e
        finally:
            os.close(fd)
        return cls(name, size, mm)

    @classmethod
    def attach(cls, name: str, size: int) -> ShmArena:
        """Map an existing arena; the caller validated ``name`` and ``size``.

        Raises:
            ProtocolError: ``unknown_arena`` (no such segment), ``bad_handle`` (size differs).
        """
        try:
            fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_NOFOLLOW)
        except OSError as e:
            raise ProtocolError(f"shm arena {name}: cannot open: {e.strerror}", "unknown_arena") from None
        try:
            actual = os.fstat(fd).st_size
            if actual != size:
                raise ProtocolError(f"shm arena {name}: size {actual} != announced {size}", "bad_handle")
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return cls(name, size, mm)

    def view(self, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, int]) -> torch.Tensor:
        """``shape`` tensor of ``dtype`` over ``[offset, offset + nbytes)``, no copy.

        Views are cached per region (always built outside inference mode, so they
        can be written both inside and outside it); callers must not resize them.
        """
        key = (offset, nbytes, dtype, shape)
        v = self._views.get(key)
        if v is None:
            if len(self._views) >= MAX_CACHED_VIEWS:
                self._views.clear()
            with torch.inference_mode(False):
                v = self.u8[offset:offset + nbytes].view(dtype).view(shape)
            self._views[key] = v
        return v

    def buffer(self, nbytes: int) -> memoryview:
        """Writable ``memoryview`` of the arena's first ``nbytes`` (release it before :meth:`close`)."""
        assert self._mm is not None
        return memoryview(self._mm)[:nbytes]

    def unlink(self) -> bool:
        return _unlink(self.name)

    def close(self) -> None:
        """Unmap (when no tensor views remain; otherwise the GC unmaps later)."""
        self.u8 = torch.empty(0, dtype=torch.uint8)
        self._views = {}
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # views still alive somewhere; unmapped when they die
                pass


class ShmClientChannel(ArenaChannel):
    """Client side of ``shm``: owns the pair's arena and allocates slots in it.

    Args:
        arena_bytes: arena size (``Settings.shm_arena_bytes``).
        ring: offer the message ring (the fast path) when this machine supports it.

    Invokes may be sent right after the ``hello`` (ZeroMQ keeps order on one
    connection); ``ready`` turns true on ``hello_ack``. ``ring`` is the pair's
    :class:`~eaas.platform.transport.ring.Ring` once the worker accepted it (else None).
    """

    name = "shm"

    def __init__(self, arena_bytes: int, *, ring: bool = True) -> None:
        sweep_stale_arenas()
        reserve = ring_bytes() if ring and ring_supported() and arena_bytes > 2 * ring_bytes() else 0
        self.arena = ShmArena.create(arena_bytes)
        self._alloc = Allocator(arena_bytes)
        if reserve:
            self._alloc.alloc(reserve)  # offset 0: the ring's bytes are never handed out
        self._lock = threading.Lock()
        self._abandoned: dict[str | int, Slot] = {}
        self._inline = InlineClientChannel()
        self._ident = {"arena": self.arena.name}
        self._acked = False
        self.ring: Ring | None = None
        self._bell_path: str | None = None
        self._listener = None
        if reserve:
            path = os.path.join(SHM_DIR, self.arena.name + BELL_SUFFIX)
            try:
                with _owned_lock:
                    _owned_names.add(self.arena.name + BELL_SUFFIX)
                self._listener = listen_bell(path)
                self._bell_path = path
            except OSError as e:
                _unlink(self.arena.name + BELL_SUFFIX)
                log.info("shm arena %s: no doorbell (%s); invokes go over ZeroMQ", self.arena.name, e)

    def hello_header(self) -> Header | None:
        handle = {"arena": self.arena.name, "size": self.arena.size, "pid": os.getpid()}
        if self._bell_path is not None:
            handle["ring_slots"], handle["ring_slot_bytes"] = DEFAULT_SLOTS, DEFAULT_SLOT_BYTES
        return Header(kind="hello", id=self.arena.name, transport="shm", handle=handle)

    def on_hello_ack(self, header: Header) -> None:
        if header.kind != "hello_ack" or header.handle.get("arena") != self.arena.name:
            self._close_listener()
            raise TransportError(f"shm arena {self.arena.name}: worker did not map it ({header.error or header})")
        self.arena.unlink()  # the worker unlinked it already; this is belt and braces
        if self._listener is not None and header.handle.get("ring") == 1:
            conn = accept_bell(self._listener)
            if conn is not None:
                self.ring = Ring(self.arena.buffer(ring_bytes()), DEFAULT_SLOTS, DEFAULT_SLOT_BYTES, "client", conn)
        self._close_listener()
        self._acked = True

    def _close_listener(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._bell_path is not None:
            _unlink(self.arena.name + BELL_SUFFIX)

    @property
    def ready(self) -> bool:
        return self._acked

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._alloc.used_bytes

    def _view(self, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, int]) -> torch.Tensor:
        return self.arena.view(offset, nbytes, dtype, shape)

    def close(self) -> None:
        self._close_listener()
        if self.ring is not None:
            self.ring.close()
        self.arena.unlink()
        self.arena.close()


class ShmWorkerSide:  # implements base.WorkerSide
    """Worker side of ``shm``: maps (then unlinks) each peer's arena and views slots.

    Args:
        max_arena_bytes: largest arena a peer may announce.
        ring: accept the message rings peers offer (the fast path).

    ``rings`` maps each peer whose ring was accepted to its worker-side
    :class:`~eaas.platform.transport.ring.Ring` (the worker's loop polls them).
    """

    name = "shm"

    def __init__(self, max_arena_bytes: int, *, ring: bool = True) -> None:
        self.max_arena_bytes = max_arena_bytes
        self.accept_rings = ring and ring_supported()
        self.rings: dict[Hashable, Ring] = {}
        self._peers: dict[Hashable, dict[str, tuple[ShmArena, int]]] = {}  # peer -> name -> (arena, pid)
        # peer -> (arena, offset, nbytes, dtype, shape) -> view, for handles that passed
        # _region's checks once: a client reuses the same few slots request after
        # request, and the reply looks its request's region up again.
        self._regions: dict[Hashable, dict[tuple, torch.Tensor]] = {}

    @property
    def num_arenas(self) -> int:
        return sum(len(a) for a in self._peers.values())

    def on_hello(self, peer: Hashable, header: Header) -> dict:
        hd = header.handle
        name, size, pid = hd.get("arena"), hd.get("size"), hd.get("pid")
        if not isinstance(name, str) or not ARENA_NAME_RE.match(name):
            raise ProtocolError(f"shm hello: bad arena name {name!r:.80}", "bad_handle")
        if type(size) is not int or not 0 < size <= self.max_arena_bytes:
            raise ProtocolError(f"shm hello: arena size {size!r:.40} not in 1..{self.max_arena_bytes}", "too_large")
        if type(pid) is not int or pid <= 0:
            raise ProtocolError("shm hello: bad pid", "bad_handle")
        ring = "ring_slots" in hd
        if ring:
            slots, slot_bytes = check_ring_geometry(hd.get("ring_slots"), hd.get("ring_slot_bytes"), size)
        arenas = self._peers.setdefault(peer, {})
        if name not in arenas:
            arena = ShmArena.attach(name, size)
            arena.unlink()  # both sides mapped it (the client before sending hello)
            arenas[name] = (arena, pid)
            log.debug("shm arena %s: mapped %d bytes for peer pid %d", name, size, pid)
        ack: dict = {"arena": name}
        if ring and self.accept_rings:
            ack["ring"] = int(self._open_ring(peer, arenas[name][0], slots, slot_bytes))
        return ack

    def _open_ring(self, peer: Hashable, arena: ShmArena, slots: int, slot_bytes: int) -> bool:
        """Connect to the client's doorbell (its path derives from the arena name: a peer
        cannot point us elsewhere) and map the ring. False: the pair stays on ZeroMQ."""
        old = self.rings.pop(peer, None)
        if old is not None:
            old.close()
        try:
            bell = connect_bell(os.path.join(SHM_DIR, arena.name + BELL_SUFFIX))
        except OSError as e:
            log.info("shm arena %s: doorbell not reachable (%s); this pair stays on ZeroMQ", arena.name, e)
            return False
        self.rings[peer] = Ring(arena.buffer(ring_bytes(slots, slot_bytes)), slots, slot_bytes, "worker", bell)
        return True

    def _region(self, peer: Hashable, header: Header) -> torch.Tensor:
        hd = header.handle
        name = hd.get("arena")
        off, nbytes = hd.get("offset"), hd.get("nbytes")
        regions = self._regions.get(peer)
        key = None
        if type(off) is int and type(nbytes) is int and type(name) is str:
            key = (name, off, nbytes, header.dtype, header.shape)
            if regions is not None:
                v = regions.get(key)
                if v is not None:
                    return v
        entry = self._peers.get(peer, {}).get(name) if isinstance(name, str) else None
        if entry is None:
            raise ProtocolError(f"shm arena {name!r:.80} was not announced by this peer", "unknown_arena")
        arena = entry[0]
        check_region("shm", header, off, nbytes, arena.size)
        v = arena.view(off, nbytes, header.torch_dtype, header.shape)  # type: ignore[arg-type]
        if key is not None:
            if regions is None:
                regions = self._regions[peer] = {}
            elif len(regions) >= MAX_CACHED_VIEWS:
                regions.clear()
            regions[key] = v
        return v

    def open_request(self, peer: Hashable, header: Header, frames: Sequence[Frame]) -> torch.Tensor:
        if frames:
            raise ProtocolError("shm invoke must not carry payload frames", "size_mismatch")
        return self._region(peer, header)

    def reply_view(self, peer: Hashable, header: Header) -> torch.Tensor:
        return self._region(peer, header)

    def reply_frames(self, peer: Hashable, header: Header, y: torch.Tensor) -> list[Frame]:
        out = self._region(peer, header)
        write_reply(out, y)
        return [encode_reply(header, y, handle=header.handle)]

    def drop_peer(self, peer: Hashable) -> None:
        ring = self.rings.pop(peer, None)
        if ring is not None:
            ring.close()
        self._regions.pop(peer, None)
        for arena, _ in self._peers.pop(peer, {}).values():
            arena.close()

    def sweep(self) -> int:
        """Unmap arenas whose client pid is dead; return how many."""
        dropped = 0
        for peer, arenas in list(self._peers.items()):
            for name, (arena, pid) in list(arenas.items()):
                if not pid_alive(pid):
                    ring = self.rings.pop(peer, None)
                    if ring is not None:
                        ring.close()
                    regions = self._regions.get(peer)
                    if regions:
                        for key in [k for k in regions if k[0] == name]:
                            del regions[key]
                    arena.close()
                    del arenas[name]
                    dropped += 1
            if not arenas:
                del self._peers[peer]
                self._regions.pop(peer, None)
        return dropped
