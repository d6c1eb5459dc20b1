"""``cuda_ipc`` transport: a CUDA device arena shared by IPC handle (same GPU node).

The client ``cudaMalloc``s one arena per pair (``cupy.cuda.Memory``: a direct
allocation, never a memory-pool sub-allocation, whose IPC handle would point at the
pool chunk's base) and an interprocess event, and sends
``hello{ipc, size, device, event}``. The worker opens both
(``cudaIpcOpenMemHandle`` with lazy peer access, ``cudaIpcOpenEventHandle``) and
answers ``hello_ack{event}`` with its own interprocess event.

Ordering without host synchronisation: after the caller filled ``slot.x`` on the
current torch stream, ``invoke_frames`` records the client event on that stream;
the worker makes its current stream wait on that event before touching ``x``;
after writing ``y`` (same region) the worker records its event and the client's
``decode_reply`` makes the client's current stream wait on it. One event per
direction suffices: a wait always binds to the *latest* record, which is never
earlier than the one the message needs (at worst it over-waits).

CuPy is imported lazily (``pip install cupy-cuda12x``). Untested on CPU machines:
``scripts/gpu_check.sh`` runs ``tests/test_transport_cuda_ipc.py`` on a GPU host.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
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


def _cupy() -> Any:
    try:
        import cupy
    except Exception as e:  # noqa: BLE001
        raise TransportError(f"cuda_ipc needs CuPy (pip install cupy-cuda12x): {e}") from None
    return cupy


def _device_index(device: str | torch.device) -> int:
    d = torch.device(device)
    if d.type != "cuda":
        raise TransportError(f"cuda_ipc needs a CUDA device, got {device}")
    return d.index if d.index is not None else torch.cuda.current_device()


def _stream_ptr(idx: int) -> int:
    return torch.cuda.current_stream(idx).cuda_stream


def _as_u8_tensor(cp: Any, mem: Any, size: int, idx: int) -> torch.Tensor:
    """``[size]`` uint8 torch view of device memory ``mem`` (no copy)."""
    with cp.cuda.Device(idx):
        arr = cp.ndarray((size,), dtype=cp.uint8, memptr=cp.cuda.MemoryPointer(mem, 0))
        return torch.as_tensor(arr, device=f"cuda:{idx}")


class CudaIpcClientChannel(ArenaChannel):
    """Client side of ``cuda_ipc``: owns the device arena and slots in it.

    Args:
        arena_bytes: arena size in bytes.
        device: the CUDA device of the client's tensors (``"cuda:N"``).
    """

    name = "cuda_ipc"

    def __init__(self, arena_bytes: int, device: str = "cuda") -> None:
        cp = _cupy()
        self._cp = cp
        self._idx = _device_index(device)
        with cp.cuda.Device(self._idx):
            self._mem = cp.cuda.Memory(arena_bytes)  # cudaMalloc: its own IPC-able allocation
            self._event = cp.cuda.Event(block=False, disable_timing=True, interprocess=True)
            self._ipc = bytes(cp.cuda.runtime.ipcGetMemHandle(self._mem.ptr))
            self._ev_handle = bytes(cp.cuda.runtime.ipcGetEventHandle(self._event.ptr))
        self.u8 = _as_u8_tensor(cp, self._mem, arena_bytes, self._idx)
        self.size = arena_bytes
        self.arena_id = f"cuda-{os.getpid()}-{secrets.token_hex(8)}"
        self._alloc = Allocator(arena_bytes)
        self._lock = threading.Lock()
        self._abandoned: dict[str | int, Slot] = {}
        self._inline = InlineClientChannel()
        self._ident = {"arena": self.arena_id}
        self._worker_event: int | None = None

    def hello_header(self) -> Header | None:
        return Header(kind="hello", id=self.arena_id, transport="cuda_ipc", handle={
            "arena": self.arena_id, "ipc": self._ipc, "size": self.size, "device": self._idx,
            "event": self._ev_handle, "pid": os.getpid()})

    def on_hello_ack(self, header: Header) -> None:
        ev = header.handle.get("event")
        if header.kind != "hello_ack" or not isinstance(ev, bytes):
            raise TransportError(f"cuda_ipc: worker refused the hello ({header.code}: {header.error})")
        with self._cp.cuda.Device(self._idx):
            self._worker_event = self._cp.cuda.runtime.ipcOpenEventHandle(ev)

    @property
    def ready(self) -> bool:
        return self._worker_event is not None

    def _view(self, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, int]) -> torch.Tensor:
        return self.u8[offset:offset + nbytes].view(dtype).view(shape)

    def _on_invoke(self, slot: Slot, request_id: str | int) -> None:
        # x was written on the current stream: the worker waits on this record.
        self._cp.cuda.runtime.eventRecord(self._event.ptr, _stream_ptr(self._idx))

    def _on_reply(self, slot: Slot, header: Header) -> None:
        if self._worker_event is None:
            raise TransportError("cuda_ipc: reply before hello_ack")
        self._cp.cuda.runtime.streamWaitEvent(_stream_ptr(self._idx), self._worker_event, 0)

    def close(self) -> None:
        if self._worker_event is not None:
            try:
                self._cp.cuda.runtime.eventDestroy(self._worker_event)
            except Exception:  # noqa: BLE001
                pass
            self._worker_event = None
        torch.cuda.synchronize(self._idx)
        self.u8 = torch.empty(0, dtype=torch.uint8)
        self._mem = None  # cudaFree when the last view is gone


class CudaIpcWorkerSide:  # implements base.WorkerSide
    """Worker side of ``cuda_ipc``: opens each peer's arena and event by IPC handle.

    Args:
        max_arena_bytes: largest arena a peer may announce.
        device: the worker's CUDA device.
    """

    name = "cuda_ipc"

    def __init__(self, max_arena_bytes: int, device: str = "cuda") -> None:
        self._cp = _cupy()
        self._idx = _device_index(device)
        self.max_arena_bytes = max_arena_bytes
        with self._cp.cuda.Device(self._idx):
            self._event = self._cp.cuda.Event(block=False, disable_timing=True, interprocess=True)
            self._ev_handle = bytes(self._cp.cuda.runtime.ipcGetEventHandle(self._event.ptr))
        self._peers: dict[Hashable, dict[str, Any]] = {}

    def on_hello(self, peer: Hashable, header: Header) -> dict:
        cp, hd = self._cp, header.handle
        arena, ipc, size, ev, pid = (hd.get(k) for k in ("arena", "ipc", "size", "event", "pid"))
        if not isinstance(arena, str) or not isinstance(ipc, bytes) or not isinstance(ev, bytes):
            raise ProtocolError("cuda_ipc hello needs arena (str), ipc and event (bytes)", "bad_handle")
        if type(size) is not int or not 0 < size <= self.max_arena_bytes:
            raise ProtocolError(f"cuda_ipc arena size {size!r:.40} not in 1..{self.max_arena_bytes}", "too_large")
        self.drop_peer(peer)
        try:
            with cp.cuda.Device(self._idx):
                ptr = cp.cuda.runtime.ipcOpenMemHandle(ipc, cp.cuda.runtime.cudaIpcMemLazyEnablePeerAccess)
                ev_ptr = cp.cuda.runtime.ipcOpenEventHandle(ev)
        except Exception as e:  # noqa: BLE001 - CUDARuntimeError on a bad/foreign handle
            raise ProtocolError(f"cuda_ipc hello: cannot open handles: {e}", "unknown_arena") from None
        mem = cp.cuda.UnownedMemory(ptr, size, owner=None, device_id=self._idx)
        self._peers[peer] = {"arena": arena, "ptr": ptr, "event": ev_ptr, "size": size,
                             "u8": _as_u8_tensor(cp, mem, size, self._idx), "pid": pid}
        return {"arena": arena, "event": self._ev_handle}

    def _region(self, peer: Hashable, header: Header) -> tuple[dict, torch.Tensor]:
        st, hd = self._peers.get(peer), header.handle
        if st is None or hd.get("arena") != st["arena"]:
            raise ProtocolError(f"cuda_ipc arena {hd.get('arena')!r:.80} was not announced by this peer",
                                "unknown_arena")
        off, nbytes = check_region("cuda_ipc", header, hd.get("offset"), hd.get("nbytes"), st["size"])
        return st, st["u8"][off:off + nbytes].view(header.torch_dtype).view(header.shape)

    def open_request(self, peer: Hashable, header: Header, frames: Sequence[Frame]) -> torch.Tensor:
        if frames:
            raise ProtocolError("cuda_ipc invoke must not carry payload frames", "size_mismatch")
        st, view = self._region(peer, header)
        self._cp.cuda.runtime.streamWaitEvent(_stream_ptr(self._idx), st["event"], 0)  # x is written
        return view

    def reply_view(self, peer: Hashable, header: Header) -> torch.Tensor:
        return self._region(peer, header)[1]

    def reply_frames(self, peer: Hashable, header: Header, y: torch.Tensor) -> list[Frame]:
        _, out = self._region(peer, header)
        write_reply(out, y)
        self._cp.cuda.runtime.eventRecord(self._event.ptr, _stream_ptr(self._idx))  # y is written
        return [encode_reply(header, y, handle=header.handle)]

    def drop_peer(self, peer: Hashable) -> None:
        st = self._peers.pop(peer, None)
        if st is None:
            return
        torch.cuda.synchronize(self._idx)
        st["u8"] = None
        for fn, arg in ((self._cp.cuda.runtime.ipcCloseMemHandle, st["ptr"]),
                        (self._cp.cuda.runtime.eventDestroy, st["event"])):
            try:
                fn(arg)
            except Exception:  # noqa: BLE001 - peer already gone
                pass

    def sweep(self) -> int:
        from eaas.procs import pid_alive

        dead = [p for p, st in self._peers.items() if type(st["pid"]) is int and not pid_alive(st["pid"])]
        for p in dead:
            self.drop_peer(p)
        return len(dead)
