"""What the arena transports (``shm``, ``cuda_ipc``, ``nixl``) share, client and worker side.

Client side, :class:`ArenaChannel`: slots are ranges of the pair's arena, handed out by a
first-fit :class:`~eaas.platform.transport.shm.Allocator`; a request that does not fit
goes inline (a fresh tensor in ZeroMQ frames) instead; the invoke's header names the
arena and the range; a reply must name the same range back. A subclass supplies where a
range lives (:meth:`ArenaChannel._view`), what identifies its arena (``_ident``), and
what moves or orders the bytes around the header (:meth:`ArenaChannel._on_invoke`,
:meth:`ArenaChannel._on_reply`: a CUDA event, a NIXL WRITE; nothing for ``shm``).

Worker side, :func:`check_region`: the one validation of an announced range, before any
view is made of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from eaas.errors import ProtocolError
from eaas.platform.protocol import Frame, Header, encode_invoke
from eaas.platform.transport.base import ArenaSlots, Slot
from eaas.platform.transport.inline import InlineClientChannel, check_reply_matches


def check_region(transport: str, header: Header, off: Any, nbytes: Any, arena_size: int) -> tuple[int, int]:
    """Validate a request's range ``[off, off + nbytes)`` of a peer's arena.

    Raises:
        ProtocolError: ``bad_handle`` (not ints, outside the arena, misaligned for the
            dtype) or ``size_mismatch`` (``nbytes`` is not the header's shape × dtype).
    """
    if type(off) is not int or type(nbytes) is not int:
        raise ProtocolError(f"{transport} handle needs int 'offset' and 'nbytes'", "bad_handle")
    if nbytes != header.nbytes:
        raise ProtocolError(f"{transport} handle nbytes {nbytes} != shape {list(header.shape or ())} "
                            f"{header.dtype} = {header.nbytes}", "size_mismatch")
    if off < 0 or off + nbytes > arena_size or off % header.torch_dtype.itemsize:
        raise ProtocolError(f"{transport} range [{off}, {off + nbytes}) is outside the {arena_size}-byte arena "
                            "(or misaligned)", "bad_handle")
    return off, nbytes


class ArenaChannel(ArenaSlots):
    """Client side of an arena transport: allocation with inline fallback, invoke and reply.

    A subclass sets, in ``__init__``: ``_alloc``, ``_lock``, ``_abandoned`` (see
    :class:`~eaas.platform.transport.base.ArenaSlots`), ``_inline`` (an
    :class:`~eaas.platform.transport.inline.InlineClientChannel`) and ``_ident`` (the
    handle entries naming its arena, e.g. ``{"arena": name}``), and implements :meth:`_view`.
    """

    _inline: InlineClientChannel
    _ident: dict[str, Any]

    def _view(self, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, int]) -> torch.Tensor:
        """``shape`` tensor of ``dtype`` over the arena's ``[offset, offset + nbytes)``."""
        raise NotImplementedError

    def _on_invoke(self, slot: Slot, request_id: str | int) -> None:
        """Called once ``slot.x`` is filled, before its header is sent (move or order the bytes)."""

    def _on_reply(self, slot: Slot, header: Header) -> None:
        """Called on a matching reply, before ``slot.x`` is read as ``y``."""

    def alloc(self, rows: int, hidden: int, dtype: torch.dtype) -> Slot:
        nbytes = rows * hidden * dtype.itemsize
        off = None
        if nbytes:
            with self._lock:
                off = self._alloc.alloc(nbytes)
        if off is None:  # arena full (or an empty request): this one goes inline
            return self._inline.alloc(rows, hidden, dtype)
        return Slot(x=self._view(off, nbytes, dtype, (rows, hidden)), transport=self.name, offset=off, nbytes=nbytes)

    def invoke_frames(self, slot: Slot, request_id: str | int,
                      segments: Sequence[tuple[str, int]], deadline_ms: int) -> list[Frame]:
        if slot.transport != self.name:
            return self._inline.invoke_frames(slot, request_id, segments, deadline_ms)
        slot.request_id = request_id
        self._on_invoke(slot, request_id)
        return [encode_invoke(request_id, segments, dtype=slot.x.dtype, hidden=slot.x.shape[1],
                              deadline_ms=deadline_ms, transport=self.name,
                              handle={**self._ident, "offset": slot.offset, "nbytes": slot.nbytes})]

    def decode_reply(self, slot: Slot, header: Header, frames: Sequence[Frame]) -> torch.Tensor:
        if slot.transport != self.name:
            return self._inline.decode_reply(slot, header, frames)
        check_reply_matches(slot, header)
        hd = header.handle
        same = (header.transport == self.name and not frames and hd.get("offset") == slot.offset
                and hd.get("nbytes") == slot.nbytes)
        if same:
            for k, v in self._ident.items():
                if hd.get(k) != v:
                    same = False
                    break
        if not same:
            raise ProtocolError(f"reply {header.id!r} does not match its {self.name} slot", "bad_handle")
        self._on_reply(slot, header)
        return slot.x
