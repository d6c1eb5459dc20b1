"""Capabilities, transport choice, channel factory and the worker's endpoint.

- :func:`local_capabilities` describes this process (advertised by workers in the
  registry, computed by clients);
- :func:`select_transport` is the pure choice for one client–worker pair;
- :func:`make_client_channel` builds the client side of the chosen transport;
- :class:`WorkerEndpoint` is the worker side of *all* transports: it decodes and
  validates every incoming message, never raises on bad input, and answers control
  messages (hello, ping) itself.
"""

from __future__ import annotations

import logging
import os
import socket
from collections import Counter
from collections.abc import Callable, Container, Hashable, Mapping, Sequence
from functools import lru_cache
from typing import Any, NamedTuple

import torch

from eaas.errors import ProtocolError, TransportError
from eaas.platform.protocol import TRANSPORTS, Frame, Header, encode_header, error_frames, now_ms
from eaas.platform.decode import check_functions, decode_header, peek_request_id
from eaas.platform.transport.base import ClientChannel, WorkerSide
from eaas.platform.transport.inline import InlineClientChannel, InlineWorkerSide
from eaas.platform.transport.shm import SHM_DIR, ShmClientChannel, ShmWorkerSide

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _host_ids() -> tuple[str, str | None]:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot_id = f.read().strip()
    except OSError:
        boot_id = "unknown-boot"
    host_id = f"{socket.gethostname()}/{boot_id}"
    try:  # another network namespace is another host to the network (containers, eaas.netns)
        host_id += f"/net:{os.stat('/proc/self/ns/net').st_ino}"
    except OSError:
        pass
    try:
        st = os.stat(SHM_DIR)
        shm_id = f"{host_id}/{st.st_dev}:{st.st_ino}" if os.access(SHM_DIR, os.W_OK) else None
    except OSError:
        shm_id = None
    return host_id, shm_id


def cuda_ipc_available() -> bool:
    """CUDA is usable and CuPy imports (checked lazily, never at import time)."""
    if not torch.cuda.is_available():
        return False
    try:
        import cupy  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means unavailable
        return False
    return True


def local_capabilities(device: str = "cpu", offered: Sequence[str] | None = None) -> dict[str, Any]:
    """What this process can do on the data plane (msgpack/JSON-serialisable).

    Args:
        device: the torch device this process's tensors live on (``"cpu"``, ``"cuda:0"``).
        offered: restrict the offered transports (``--transport``); default all available.

    Returns:
        ``{"host_id", "shm_id", "gpu_node_id", "pid", "device", "cuda", "nixl", "transports"}``.
    """
    from eaas.platform.transport.nixl import nixl_available

    host_id, shm_id = _host_ids()
    is_cuda = device.startswith("cuda") and cuda_ipc_available()
    has_nixl = nixl_available()
    available = ["inline"]
    if shm_id is not None:
        available.append("shm")
    if is_cuda:
        available.append("cuda_ipc")
    if has_nixl:
        available.append("nixl")
    if offered is not None:
        available = [t for t in available if t in offered or t == "inline"]
    return {
        "host_id": host_id, "shm_id": shm_id, "gpu_node_id": host_id if is_cuda else None,
        "pid": os.getpid(), "device": device, "cuda": is_cuda, "nixl": has_nixl,
        "transports": available,
    }


def select_transport(client_caps: Mapping[str, Any], worker_caps: Mapping[str, Any],
                     override: str | None = None) -> str:
    """Choose the transport of one client–worker pair (pure).

    Rules, in order: ``override`` (not ``"auto"``) if both ends offer it; both on
    CUDA on the same GPU node -> ``cuda_ipc``; same host (same ``/dev/shm``) ->
    ``shm``; both have NIXL -> ``nixl``; else ``inline``.

    Raises:
        TransportError: ``override`` is not offered by both ends.
    """
    both = set(client_caps.get("transports", ["inline"])) & set(worker_caps.get("transports", ["inline"]))
    both.add("inline")
    if override and override != "auto":
        if override not in TRANSPORTS or override not in both:
            raise TransportError(f"transport {override!r} is not offered by both ends (common: {sorted(both)})")
        return override
    if ("cuda_ipc" in both and client_caps.get("cuda") and worker_caps.get("cuda")
            and client_caps.get("gpu_node_id") is not None
            and client_caps.get("gpu_node_id") == worker_caps.get("gpu_node_id")):
        return "cuda_ipc"
    if "shm" in both and client_caps.get("shm_id") is not None and client_caps.get("shm_id") == worker_caps.get("shm_id"):
        return "shm"
    if "nixl" in both:
        return "nixl"
    return "inline"


def make_client_channel(transport: str, *, arena_bytes: int = 64 << 20, device: str = "cpu",
                        ring: bool = True, xfer_timeout_s: float | None = None) -> ClientChannel:
    """Client side of one pair for ``transport`` (a name from :func:`select_transport`).

    ``ring``: offer the shm message ring (the same-host fast path). ``xfer_timeout_s``: the
    longest a ``nixl`` invoke's WRITE may block (default: the transport's own bound).

    Raises:
        TransportError: the transport cannot be set up here.
    """
    if transport == "inline":
        return InlineClientChannel()
    if transport == "shm":
        return ShmClientChannel(arena_bytes, ring=ring)
    if transport == "cuda_ipc":
        from eaas.platform.transport.cuda_ipc import CudaIpcClientChannel

        return CudaIpcClientChannel(arena_bytes, device=device)
    if transport == "nixl":
        from eaas.platform.transport.nixl import NixlClientChannel

        return NixlClientChannel(arena_bytes) if xfer_timeout_s is None else NixlClientChannel(arena_bytes,
                                                                                                 xfer_timeout_s)
    raise TransportError(f"unknown transport {transport!r} (known: {', '.join(TRANSPORTS)})")


class Incoming(NamedTuple):
    """What :meth:`WorkerEndpoint.on_message` made of one message (one per message:
    a named tuple, the cheapest immutable record to build).

    Attributes:
        header: the validated header (None when it could not be decoded).
        x: for a valid ``invoke``: the ``[N, D]`` rows (a view; do not write into it).
        reply: frames to send back to the peer now (``hello_ack``, ``pong``, ``error``).
        bye: the peer said goodbye (its per-pair state was dropped).
    """

    header: Header | None = None
    x: torch.Tensor | None = None
    reply: list[Frame] | None = None
    bye: bool = False


class WorkerEndpoint:
    """Worker side of every transport, for all peers of one ROUTER socket.

    Args:
        max_message_bytes: largest payload accepted (``Settings.max_message_bytes``).
        max_arena_bytes: largest shared arena a peer may announce.
        known_functions: if given, invokes naming other functions are refused
            (``unknown_function``); may be a live set the worker updates.
        offered: transports offered (default: every one available here).
        device: torch device of the worker's tensors.
        ring: accept the shm message rings clients offer (the same-host fast path).
        clock_ms: current epoch ms (injected in tests).
        xfer_timeout_s: longest a reply's NIXL WRITE may hold the worker (s); a reply later
            than the client's per-attempt timeout is of no use to it (it failed over). Default:
            ``nixl.XFER_TIMEOUT_S``.

    Peers are opaque hashables, normally the ROUTER identity frame.
    ``rejected`` counts refused messages by error code.
    """

    def __init__(self, *, max_message_bytes: int, max_arena_bytes: int | None = None,
                 known_functions: Container[str] | None = None, offered: Sequence[str] | None = None,
                 device: str = "cpu", ring: bool = True, clock_ms: Callable[[], int] = now_ms,
                 xfer_timeout_s: float = 10.0) -> None:
        self.max_message_bytes = max_message_bytes
        self.known_functions = known_functions
        self.clock_ms = clock_ms
        self.capabilities = local_capabilities(device, offered)
        arena_cap = max_arena_bytes or max(max_message_bytes, 64 << 20)
        self._sides: dict[str, WorkerSide] = {"inline": InlineWorkerSide()}
        if "shm" in self.capabilities["transports"]:
            self._sides["shm"] = ShmWorkerSide(arena_cap, ring=ring)
        if "cuda_ipc" in self.capabilities["transports"]:
            from eaas.platform.transport.cuda_ipc import CudaIpcWorkerSide

            self._sides["cuda_ipc"] = CudaIpcWorkerSide(arena_cap, device=device)
        if "nixl" in self.capabilities["transports"]:
            from eaas.platform.transport.nixl import NixlWorkerSide

            self._sides["nixl"] = NixlWorkerSide(arena_cap, xfer_timeout_s=xfer_timeout_s)
        self.rejected: Counter[str] = Counter()

    @property
    def transports(self) -> list[str]:
        return list(self._sides)

    @property
    def rings(self) -> dict[Hashable, Any]:
        """Peer -> its shm message :class:`~eaas.platform.transport.ring.Ring` (the fast path's peers)."""
        shm = self._sides.get("shm")
        return shm.rings if shm is not None else {}

    def _side(self, header: Header) -> Any:
        side = self._sides.get(header.transport or "")
        if side is None:
            raise ProtocolError(f"transport {header.transport!r} is not offered by this worker "
                                f"(offered: {', '.join(self._sides)})", "bad_transport")
        return side

    def on_message(self, peer: Hashable, frames: Sequence[Frame]) -> Incoming:
        """Decode one message (ROUTER envelope already stripped). Never raises on bad input."""
        header: Header | None = None
        try:
            if not frames:
                raise ProtocolError("empty message", "bad_header")
            header = decode_header(frames[0], max_message_bytes=self.max_message_bytes,
                                   now_ms_=self.clock_ms())
            if header.kind == "invoke":
                if self.known_functions is not None:
                    check_functions(header, self.known_functions)
                x = self._side(header).open_request(peer, header, frames[1:])
                return Incoming(header=header, x=x)
            if header.kind == "hello":
                ack = self._side(header).on_hello(peer, header)
                return Incoming(header=header, reply=[encode_header(Header(
                    kind="hello_ack", id=header.id, transport=header.transport, handle=ack))])
            if header.kind == "ping":
                return Incoming(header=header, reply=[encode_header(Header(kind="pong", id=header.id))])
            if header.kind == "bye":
                self.drop_peer(peer)
                return Incoming(header=header, bye=True)
            raise ProtocolError(f"a worker does not accept {header.kind!r} messages", "bad_kind")
        except ProtocolError as e:
            self.rejected[e.code] += 1
            rid = header.id if header is not None else (peek_request_id(frames[0]) if frames else None)
            log.info("peer %r: rejected message %r: %s (%s)", peer, rid, e, e.code)
            return Incoming(header=header, reply=error_frames(e, rid))
        except Exception as e:  # noqa: BLE001 - a bad message must never kill the worker
            self.rejected["internal"] += 1
            log.exception("peer %r: failed to open a message", peer)
            return Incoming(header=header, reply=error_frames(ProtocolError(str(e), "internal"),
                                                              peek_request_id(frames[0]) if frames else None))

    def reply_view(self, peer: Hashable, header: Header) -> torch.Tensor:
        """Where ``y`` for ``header`` may be written directly (``[N, D]``, request dtype)."""
        return self._side(header).reply_view(peer, header)

    def reply_frames(self, peer: Hashable, header: Header, y: torch.Tensor) -> list[Frame]:
        """Frames answering ``header`` with ``y[N, D]`` (written into the arena if shared).

        Raises:
            ProtocolError: the peer's arena vanished or y has the wrong shape; answer
                with :meth:`error_reply` instead.
            TransportError: the bytes could not be moved to the peer (a NIXL WRITE to a
                client that died or was cut off); the pair's state is then best dropped.
        """
        return self._side(header).reply_frames(peer, header, y)

    @staticmethod
    def error_reply(request_id: str | int | None, err: Exception) -> list[Frame]:
        """Frames of an error reply (``err.code`` or ``"internal"``)."""
        return error_frames(err, request_id)

    def drop_peer(self, peer: Hashable) -> None:
        """Forget a peer's per-pair state (arenas, agents)."""
        for side in self._sides.values():
            side.drop_peer(peer)

    def sweep(self) -> int:
        """Drop per-pair state of peers whose process died (same host); call periodically."""
        return sum(side.sweep() for side in self._sides.values())
