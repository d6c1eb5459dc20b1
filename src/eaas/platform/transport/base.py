"""The data-plane interface every transport implements.

One :class:`ClientChannel` per client–worker pair (client side); one
:class:`~eaas.platform.transport.select.WorkerEndpoint` per worker, which keeps the
per-peer state of every transport (worker side). Control messages (hello, invoke,
reply, error) always travel over the pair's ZeroMQ socket; only where the tensor
bytes live differs:

- ``inline``: in the ZeroMQ frames (zero-copy send and receive);
- ``shm``: in a shared-memory arena the client created, the header carries offsets;
- ``cuda_ipc``: in a CUDA device arena the client created, opened by IPC handle;
- ``nixl``: in registered arenas on both sides, moved by one-sided NIXL WRITEs.

Client-side life of a request (legend: ``N`` rows, ``D`` hidden)::

    slot = ch.alloc(N, D, dtype)          # slot.x: [N, D] view to fill (the gather target)
    torch.index_select(x, 0, idx, out=slot.x)
    send_frames(sock, ch.invoke_frames(slot, request_id, segments, deadline_ms))
    ... header = decode_header(frames[0]); raise_if_error(header) ...
    y = ch.decode_reply(slot, header, frames[1:])   # [N, D] view, valid until release
    ch.release(slot)                      # or ch.abandon(slot) if the request was given up

An abandoned slot stays reserved until a reply for it reaches
:meth:`ClientChannel.reply_dropped` or the channel closes, so a late reply can never
overwrite a slot that was handed out again.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from eaas.errors import ProtocolError
from eaas.platform.protocol import Frame, Header


@dataclass(slots=True, eq=False)
class Slot:
    """One request's place in a channel.

    Attributes:
        x: ``[N, D]`` tensor to fill with the request rows (arena view or fresh tensor).
        transport: the transport that carries this slot (``inline`` when a shared
            arena was full and the channel fell back).
        offset: byte offset in the channel's arena (-1 for inline).
        nbytes: payload size in bytes.
        request_id: set by ``invoke_frames``.
        buf: the payload as a byte ``memoryview`` of ``x`` (``inline``: made once per
            request tensor and reused with it).
        extra: transport-private state.
    """

    x: torch.Tensor
    transport: str
    offset: int = -1
    nbytes: int = 0
    request_id: str | int | None = None
    buf: memoryview | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class ClientChannel(Protocol):
    """Client side of one client–worker pair."""

    name: str

    def hello_header(self) -> Header | None:
        """The ``hello`` to send once before the first invoke (None: no handshake)."""

    def on_hello_ack(self, header: Header) -> None:
        """Consume the worker's ``hello_ack`` (raises TransportError if it refused)."""

    @property
    def ready(self) -> bool:
        """True once invokes may be sent (handshake done, or none needed)."""

    def alloc(self, rows: int, hidden: int, dtype: torch.dtype) -> Slot:
        """Reserve room for ``[rows, hidden]`` of ``dtype``; fill ``slot.x``."""

    def invoke_frames(self, slot: Slot, request_id: str | int,
                      segments: Sequence[tuple[str, int]], deadline_ms: int) -> list[Frame]:
        """Frames of the invoke carrying ``slot.x`` (send them with ``protocol.send_frames``)."""

    def decode_reply(self, slot: Slot, header: Header, frames: Sequence[Frame]) -> torch.Tensor:
        """``y[N, D]`` from a validated ``reply`` header; a view valid until release."""

    def release(self, slot: Slot) -> None:
        """Return the slot's room (after the reply was consumed or on an error reply)."""

    def abandon(self, slot: Slot) -> None:
        """Give up on the request: reserve the room until a late reply or close."""

    def reply_dropped(self, header: Header) -> None:
        """Report a reply/error for an abandoned or unknown request id (frees its room)."""

    def close(self) -> None:
        """Free everything; the worker learns through ``bye`` or by sweeping."""


@runtime_checkable
class WorkerSide(Protocol):
    """Worker side of one transport, for every peer of one ROUTER socket (``inline``,
    ``shm``, ``cuda_ipc``, ``nixl``). Every method raises
    :class:`~eaas.errors.ProtocolError` with a code on bad input and never anything else
    on purpose; :class:`~eaas.platform.transport.select.WorkerEndpoint` turns that into
    an error reply."""

    name: str

    def on_hello(self, peer: Hashable, header: Header) -> dict:
        """Set up the pair (map an arena, open handles); returns the ``hello_ack`` handle."""

    def open_request(self, peer: Hashable, header: Header, frames: Sequence[Frame]) -> torch.Tensor:
        """``x[N, D]`` of a validated invoke (a view; do not write into it)."""

    def reply_view(self, peer: Hashable, header: Header) -> torch.Tensor:
        """Where ``y[N, D]`` may be written directly (the request's region, or a fresh tensor)."""

    def reply_frames(self, peer: Hashable, header: Header, y: torch.Tensor) -> list[Frame]:
        """Frames answering ``header`` with ``y`` (written into the region when shared)."""

    def drop_peer(self, peer: Hashable) -> None:
        """Forget the pair's state."""

    def sweep(self) -> int:
        """Drop the state of peers whose process died; return how many."""


def write_reply(out: torch.Tensor, y: torch.Tensor) -> None:
    """Put the worker's output ``y[N, D]`` into the request's arena region ``out[N, D]``.

    No copy when ``y`` already is that region (a computation that wrote into
    ``reply_view``, or an echo); otherwise one ``copy_``.

    Raises:
        ProtocolError: ``internal`` when ``y``'s shape or dtype differ from the region's.
    """
    if y.shape != out.shape or y.dtype != out.dtype:
        raise ProtocolError(f"y is {list(y.shape)} {y.dtype}, request was {list(out.shape)} {out.dtype}",
                            "internal")
    if y.data_ptr() != out.data_ptr() or y.stride() != out.stride():
        out.copy_(y)


class ArenaSlots:
    """Slot bookkeeping shared by the arena transports (``shm``, ``cuda_ipc``, ``nixl``).

    A subclass sets ``name`` (its transport) and, in ``__init__``, ``_lock``
    (a lock), ``_alloc`` (an allocator with ``free(offset)``) and ``_abandoned``
    (request id -> Slot). Slots of another transport (an inline fallback when
    the arena was full) hold no arena room and are simply released.
    """

    name: str
    _lock: Any
    _alloc: Any
    _abandoned: dict[str | int, Slot]

    def release(self, slot: Slot) -> None:
        """Return the slot's arena room."""
        if slot.transport == self.name and slot.offset >= 0:
            with self._lock:
                self._alloc.free(slot.offset)
            slot.offset = -1

    def abandon(self, slot: Slot) -> None:
        """Keep the room reserved until the late reply shows up (:meth:`reply_dropped`) or close."""
        if slot.transport == self.name and slot.offset >= 0 and slot.request_id is not None:
            with self._lock:
                self._abandoned[slot.request_id] = slot
        else:
            self.release(slot)

    def reply_dropped(self, header: Header) -> None:
        """A reply for an abandoned (or unknown) request arrived: free its room now."""
        with self._lock:
            slot = self._abandoned.pop(header.id, None)
        if slot is not None:
            self.release(slot)
