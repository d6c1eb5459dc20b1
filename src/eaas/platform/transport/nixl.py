"""``nixl`` transport: one-sided NIXL WRITEs between registered arenas (UCX backend).

NVIDIA's NIXL (PyPI ``nixl-cu12``, import ``nixl_cu12``; older releases import as
``nixl._api``) moves bytes between *registered* memory of two agents: RDMA between
nodes (GPUDirect RDMA for GPU memory) in production, DRAM to DRAM over UCX's
tcp/shared-memory transports on a CPU machine.

Per client–worker pair:

- the client registers one DRAM arena (``arena_bytes``) once and sends
  ``hello{agent, meta, addr, size}`` (``meta`` = its NIXL agent metadata);
- the worker adds the client's agent, allocates and registers a *mirror* arena of
  the same size, and answers ``hello_ack{agent, meta, addr, size}``;
- invoke: the client fills ``slot.x`` (a view of its arena at ``offset``), WRITEs
  those bytes to the same offset of the worker's mirror with notification
  ``b"x:<id>"``, and once the WRITE is DONE sends the ZeroMQ header
  ``handle{agent, offset, nbytes}``;
- the worker checks the notification arrived (data landed), views the rows, puts
  ``y`` in the same region, WRITEs it back to the client's arena with ``b"y:<id>"``
  and then sends the ZeroMQ reply; the client checks the notification and returns
  a view of its own arena.

ZeroMQ carries every control message; NIXL carries only tensor bytes. One agent per
process (lazily created), shared by all channels. ``invoke_frames`` and
``reply_frames`` block until their WRITE completes (bounded by ``XFER_TIMEOUT_S``).
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Hashable, Sequence
from typing import Any

import torch

from eaas.errors import ProtocolError, TransportError
from eaas.platform.protocol import Frame, Header, encode_reply
from eaas.platform.transport.arena import ArenaChannel, check_region
from eaas.platform.transport.base import Slot, write_reply
from eaas.platform.transport.inline import InlineClientChannel
from eaas.platform.transport.shm import Allocator

log = logging.getLogger(__name__)

XFER_TIMEOUT_S = 10.0
NOTIF_TIMEOUT_S = 5.0
SPIN_POLLS = 20      # polls before yielding the CPU
YIELD_POLLS = 200    # sched_yield polls before napping
NAP_S = 20e-6

_import_lock = threading.Lock()
_nixl_mod: Any = None
_nixl_error: str | None = None


def _nixl() -> Any:
    """The NIXL python module (``nixl_cu12`` or ``nixl._api``), or raise TransportError."""
    global _nixl_mod, _nixl_error
    with _import_lock:
        if _nixl_mod is None and _nixl_error is None:
            os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")  # NIXL logs INFO to stdout otherwise
            errors = []
            for name in ("nixl_cu12", "nixl_cu13", "nixl._api"):
                try:
                    mod = __import__(name, fromlist=["nixl_agent"])
                    mod.nixl_agent, mod.nixl_agent_config  # noqa: B018 - probe the API
                    _nixl_mod = mod
                    logging.getLogger("nixl").setLevel(logging.WARNING)
                    break
                except Exception as e:  # noqa: BLE001 - missing wheel, missing libs, ...
                    errors.append(f"{name}: {type(e).__name__}: {e}")
            if _nixl_mod is None:
                _nixl_error = "; ".join(errors)
        if _nixl_mod is None:
            raise TransportError(f"NIXL is not available: {_nixl_error}")
        return _nixl_mod


def nixl_available() -> bool:
    """True when a NIXL wheel imports and its agent API is present."""
    try:
        _nixl()
    except TransportError:
        return False
    return True


def _backoff(spins: int) -> int:
    """One step of a polling loop: spin briefly, then yield the CPU, then nap.

    Busy-polling NIXL for completion starves the peer process (and UCX's progress
    thread) on a host with few cores; yielding lets them run. Returns ``spins + 1``.
    """
    if spins >= SPIN_POLLS:
        if spins < SPIN_POLLS + YIELD_POLLS:
            os.sched_yield()
        else:
            time.sleep(NAP_S)
    return spins + 1


class _Agent:
    """This process's NIXL agent (UCX backend) plus received notifications."""

    _instance: _Agent | None = None
    _instance_lock = threading.Lock()

    def __init__(self) -> None:
        mod = _nixl()
        self.name = f"eaas-{os.getpid()}-{secrets.token_hex(6)}"
        self.agent = mod.nixl_agent(self.name, mod.nixl_agent_config(backends=["UCX"]))
        self.lock = threading.RLock()
        self._notifs: dict[str, set[bytes]] = {}

    @classmethod
    def get(cls) -> _Agent:
        with cls._instance_lock:
            if cls._instance is None or cls._instance.pid != os.getpid():
                cls._instance = cls()
                cls._instance.pid = os.getpid()
            return cls._instance

    def register(self, t: torch.Tensor) -> Any:
        with self.lock:
            return self.agent.register_memory(
                self.agent.get_reg_descs([(t.data_ptr(), t.numel() * t.element_size(), 0, "")], "DRAM"))

    def deregister(self, reg: Any) -> None:
        with self.lock:
            self.agent.deregister_memory(reg)

    def metadata(self) -> bytes:
        with self.lock:
            return self.agent.get_agent_metadata()

    def add_remote(self, meta: bytes) -> str:
        with self.lock:
            name = self.agent.add_remote_agent(meta)
        return name.decode() if isinstance(name, bytes) else str(name)

    def remove_remote(self, name: str) -> None:
        with self.lock:
            try:
                self.agent.remove_remote_agent(name)
            except Exception:  # noqa: BLE001 - already gone
                pass

    def write(self, local_addr: int, remote: str, remote_addr: int, nbytes: int, notif: bytes,
              timeout_s: float = XFER_TIMEOUT_S) -> None:
        """One-sided WRITE of ``nbytes`` with notification; returns when DONE.

        Raises:
            TransportError: the transfer failed (NIXL reported ``ERR``, or raised: e.g.
                ``nixlRemoteDisconnectError`` when the remote agent's process died or its host
                was cut off) or did not finish in ``timeout_s``.
        """
        with self.lock:
            deadline = time.monotonic() + timeout_s
            spins, h = 0, None
            try:
                src = self.agent.get_xfer_descs([(local_addr, nbytes, 0)], "DRAM")
                dst = self.agent.get_xfer_descs([(remote_addr, nbytes, 0)], "DRAM")
                h = self.agent.initialize_xfer("WRITE", src, dst, remote, notif)
                state = self.agent.transfer(h)
                while state != "DONE":
                    if state == "ERR":
                        raise TransportError(f"nixl WRITE of {nbytes} bytes to {remote} failed")
                    if time.monotonic() > deadline:
                        raise TransportError(f"nixl WRITE of {nbytes} bytes to {remote} timed out")
                    spins = _backoff(spins)
                    state = self.agent.check_xfer_state(h)
            except TransportError:
                raise
            except Exception as e:  # noqa: BLE001 - NIXL raises its own exception types
                raise TransportError(f"nixl WRITE of {nbytes} bytes to {remote}: {type(e).__name__}: {e}") from e
            finally:
                if h is not None:
                    try:
                        self.agent.release_xfer_handle(h)
                    except Exception:  # noqa: BLE001 - a handle of a failed transfer may be gone already
                        pass

    def wait_notif(self, remote: str, tag: bytes, timeout_s: float = NOTIF_TIMEOUT_S) -> bool:
        """Consume notification ``tag`` from ``remote``, polling up to ``timeout_s``.

        Returns False when it did not come in time.

        Raises:
            TransportError: NIXL failed reading notifications.
        """
        deadline = time.monotonic() + timeout_s
        spins = 0
        while True:
            with self.lock:
                seen = self._notifs.get(remote)
                if seen is not None and tag in seen:  # already collected by an earlier poll
                    seen.discard(tag)
                    return True
                try:
                    notifs = self.agent.get_new_notifs()
                except Exception as e:  # noqa: BLE001 - NIXL raises its own exception types
                    raise TransportError(f"nixl: reading notifications failed: {type(e).__name__}: {e}") from e
                for agent, msgs in notifs.items():
                    key = agent.decode() if isinstance(agent, bytes) else str(agent)
                    self._notifs.setdefault(key, set()).update(msgs)
                seen = self._notifs.get(remote)
                if seen is not None and tag in seen:
                    seen.discard(tag)
                    return True
            if time.monotonic() > deadline:
                return False
            spins = _backoff(spins)

    def forget_notif(self, remote: str, tag: bytes) -> None:
        with self.lock:
            self._notifs.get(remote, set()).discard(tag)


def _parse_peer_handle(hd: dict, max_bytes: int) -> tuple[str, bytes, int, int]:
    agent, meta, addr, size = hd.get("agent"), hd.get("meta"), hd.get("addr"), hd.get("size")
    if not isinstance(agent, str) or not isinstance(meta, bytes) or type(addr) is not int or addr <= 0:
        raise ProtocolError("nixl hello needs agent (str), meta (bytes), addr (int)", "bad_handle")
    if type(size) is not int or not 0 < size <= max_bytes:
        raise ProtocolError(f"nixl arena size {size!r:.40} not in 1..{max_bytes}", "too_large")
    return agent, meta, addr, size


class NixlClientChannel(ArenaChannel):
    """Client side of ``nixl``: a registered DRAM arena mirrored by the worker.

    Args:
        arena_bytes: arena size on each side.
        xfer_timeout_s: longest an invoke's WRITE may take (the client's per-attempt deadline:
            a WRITE to a host that was cut off must not hold the caller past the point where it
            would fail over anyway).
    """

    name = "nixl"

    def __init__(self, arena_bytes: int, xfer_timeout_s: float = XFER_TIMEOUT_S) -> None:
        self.xfer_timeout_s = xfer_timeout_s
        self._agent = _Agent.get()
        self.arena = torch.empty(arena_bytes, dtype=torch.uint8)  # [bytes]
        self._reg = self._agent.register(self.arena)
        self._alloc = Allocator(arena_bytes)
        self._lock = threading.Lock()
        self._abandoned: dict[str | int, Slot] = {}
        self._inline = InlineClientChannel()
        self._ident = {"agent": self._agent.name}
        self._remote: tuple[str, int] | None = None  # (worker agent, worker mirror addr)

    def hello_header(self) -> Header | None:
        return Header(kind="hello", id=self._agent.name, transport="nixl", handle={
            "agent": self._agent.name, "meta": self._agent.metadata(),
            "addr": self.arena.data_ptr(), "size": self.arena.numel()})

    def on_hello_ack(self, header: Header) -> None:
        if header.kind != "hello_ack":
            raise TransportError(f"nixl: worker refused the hello ({header.code}: {header.error})")
        agent, meta, addr, size = _parse_peer_handle(dict(header.handle), self.arena.numel())
        if size != self.arena.numel():
            raise TransportError(f"nixl: worker mirror is {size} bytes, ours {self.arena.numel()}")
        name = self._agent.add_remote(meta)
        if name != agent:
            raise TransportError(f"nixl: worker metadata names agent {name!r}, handle says {agent!r}")
        self._remote = (agent, addr)

    @property
    def ready(self) -> bool:
        return self._remote is not None

    def _view(self, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, int]) -> torch.Tensor:
        return self.arena[offset:offset + nbytes].view(dtype).view(shape)

    def _on_invoke(self, slot: Slot, request_id: str | int) -> None:
        if self._remote is None:
            raise TransportError("nixl: invoke before hello_ack")
        agent, raddr = self._remote
        self._agent.write(self.arena.data_ptr() + slot.offset, agent, raddr + slot.offset, slot.nbytes,
                          f"x:{request_id}".encode(), self.xfer_timeout_s)

    def _on_reply(self, slot: Slot, header: Header) -> None:
        if self._remote is None:
            raise ProtocolError(f"reply {header.id!r} does not match its nixl slot", "bad_handle")
        if not self._agent.wait_notif(self._remote[0], f"y:{header.id}".encode()):
            raise TransportError(f"nixl: reply {header.id!r} arrived but its data notification did not")

    def reply_dropped(self, header: Header) -> None:
        if self._remote is not None:
            self._agent.forget_notif(self._remote[0], f"y:{header.id}".encode())
        super().reply_dropped(header)

    def close(self) -> None:
        if self._remote is not None:
            self._agent.remove_remote(self._remote[0])
            self._remote = None
        if self._reg is not None:
            self._agent.deregister(self._reg)
            self._reg = None


class NixlWorkerSide:  # implements base.WorkerSide
    """Worker side of ``nixl``: a registered mirror arena per peer.

    Args:
        max_arena_bytes: largest arena a peer may announce (the worker allocates as much).
        xfer_timeout_s: longest a reply's WRITE may take (s): the worker serves nobody else
            meanwhile, so a WRITE to a host that was cut off must give up once the client
            has failed over anyway (the worker passes the per-attempt timeout).
    """

    name = "nixl"

    def __init__(self, max_arena_bytes: int, xfer_timeout_s: float = XFER_TIMEOUT_S) -> None:
        self.max_arena_bytes = max_arena_bytes
        self.xfer_timeout_s = xfer_timeout_s
        self._peers: dict[Hashable, dict[str, Any]] = {}

    def on_hello(self, peer: Hashable, header: Header) -> dict:
        agent_name, meta, addr, size = _parse_peer_handle(dict(header.handle), self.max_arena_bytes)
        agent = _Agent.get()
        self.drop_peer(peer)
        for other in [q for q, st in self._peers.items() if st["agent"] == agent_name]:
            self.drop_peer(other)  # the same client process on a new connection: its agent is loaded once
        try:
            remote = agent.add_remote(meta)
        except Exception as e:  # noqa: BLE001 - NIXL raises its own types on bad metadata
            raise ProtocolError(f"nixl hello: bad agent metadata: {e}", "bad_handle") from None
        if remote != agent_name:
            agent.remove_remote(remote)
            raise ProtocolError(f"nixl hello: metadata names {remote!r}, handle says {agent_name!r}", "bad_handle")
        mirror = torch.empty(size, dtype=torch.uint8)
        reg = agent.register(mirror)
        self._peers[peer] = {"agent": remote, "addr": addr, "size": size, "mirror": mirror, "reg": reg}
        return {"agent": agent.name, "meta": agent.metadata(), "addr": mirror.data_ptr(), "size": size}

    def _region(self, peer: Hashable, header: Header) -> tuple[dict, torch.Tensor]:
        st = self._peers.get(peer)
        hd = header.handle
        if st is None or hd.get("agent") != st["agent"]:
            raise ProtocolError("nixl: this peer has no registered arena (hello first)", "unknown_arena")
        off, nbytes = check_region("nixl", header, hd.get("offset"), hd.get("nbytes"), st["size"])
        view = st["mirror"][off:off + nbytes].view(header.torch_dtype).view(header.shape)
        return st, view

    def open_request(self, peer: Hashable, header: Header, frames: Sequence[Frame]) -> torch.Tensor:
        if frames:
            raise ProtocolError("nixl invoke must not carry payload frames", "size_mismatch")
        st, view = self._region(peer, header)
        if header.nbytes and not _Agent.get().wait_notif(st["agent"], f"x:{header.id}".encode()):
            raise ProtocolError(f"nixl: no data notification for request {header.id!r}", "bad_handle")
        return view

    def reply_view(self, peer: Hashable, header: Header) -> torch.Tensor:
        return self._region(peer, header)[1]

    def reply_frames(self, peer: Hashable, header: Header, y: torch.Tensor) -> list[Frame]:
        st, out = self._region(peer, header)
        write_reply(out, y)
        off = header.handle["offset"]
        if header.nbytes:
            _Agent.get().write(out.data_ptr(), st["agent"], st["addr"] + off, header.nbytes,
                               f"y:{header.id}".encode(), self.xfer_timeout_s)
        return [encode_reply(header, y, handle=header.handle)]

    def drop_peer(self, peer: Hashable) -> None:
        st = self._peers.pop(peer, None)
        if st is not None:
            agent = _Agent.get()
            agent.deregister(st["reg"])
            agent.remove_remote(st["agent"])

    def sweep(self) -> int:
        return 0
