"""``inline`` transport: tensor bytes as zero-copy ZeroMQ frames.

Works anywhere ZeroMQ does (tcp across hosts, ipc locally). Sending hands ZeroMQ a
memoryview of the tensor (zero-copy above :data:`COPY_BELOW_BYTES`, below which
``send_frames`` copies it: a memcpy is cheaper there); receiving views the
``zmq.Frame`` buffer (``np.frombuffer`` + ``torch.from_numpy``, no copy). Received
views must not be written.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
import torch
import zmq

from eaas.errors import ProtocolError
from eaas.platform.protocol import (
    COPY_BELOW_BYTES,
    DTYPES as _DTYPES,
    Frame,
    Header,
    encode_invoke,
    encode_reply,
    tensor_buffer,
    tensor_from_buffer,
)
from eaas.platform.decode import check_payload_frames
from eaas.platform.transport.base import Slot


def payload_frames(t: torch.Tensor) -> list[Frame]:
    """The payload frames for a contiguous CPU tensor ``t`` (none for an empty one).

    The frame is a byte view of ``t`` (no copy here); :func:`send_frames` copies it
    into the message below :data:`COPY_BELOW_BYTES` (``t`` may be reused as soon as
    the send returns) and sends it zero-copy above (``t``'s storage stays alive, and
    must not be written, until ZeroMQ has sent it).

    Raises:
        ProtocolError: ``t`` is not contiguous or not on the CPU.
    """
    if not t.numel():
        return []
    return [tensor_buffer(t)]


def check_reply_matches(slot: Slot, header: Header) -> None:
    """Raise ``size_mismatch`` unless the reply's shape/dtype equal the request's.

    Raises:
        ProtocolError: ``size_mismatch``.
    """
    x = slot.x
    if header.shape != x.shape or _DTYPES.get(header.dtype) != x.dtype:  # type: ignore[arg-type]
        raise ProtocolError(
            f"reply {header.id!r} is {list(header.shape or ())} {header.dtype}, request was "
            f"{list(slot.x.shape)} {slot.x.dtype}", "size_mismatch")


#: numpy dtypes to view received frames with (bfloat16 as its 16-bit pattern).
_NP_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": np.dtype(np.uint16)}


def open_inline(header: Header, frames: Sequence[Frame]) -> torch.Tensor:
    """``[N, D]`` view of an inline payload (validated against the header; no copy).

    The view shares the received frame's memory; do not write into it.

    Raises:
        ProtocolError: ``size_mismatch``.
    """
    if len(frames) == 1:
        f = frames[0]
        if type(f) is zmq.Frame:  # the hot path: one received frame
            # numpy views the frame and torch.from_numpy wraps it: one light call each,
            # cheaper than torch.frombuffer(...).view(...) per message.
            dtype = header.dtype
            npdt = _NP_DTYPES[dtype]  # type: ignore[index]
            shape = header.shape
            n = len(f)
            if n and shape is not None and n == shape[0] * shape[1] * npdt.itemsize:
                t = torch.from_numpy(np.frombuffer(f, dtype=npdt).reshape(shape))
                return t.view(torch.bfloat16) if dtype == "bfloat16" else t
    buf = check_payload_frames(header, frames)
    if buf is None:
        return torch.empty(header.shape, dtype=header.torch_dtype)  # type: ignore[arg-type]
    return tensor_from_buffer(buf, header.torch_dtype, header.shape)  # type: ignore[arg-type]


class InlineClientChannel:
    """Client side of the ``inline`` transport (no handshake, no shared state)."""

    name = "inline"

    def __init__(self) -> None:
        # Released request tensors below COPY_BELOW_BYTES with their byte views, for
        # reuse: send_frames copied their bytes into the message, so nothing else
        # holds them.
        self._free: dict[tuple[int, int, torch.dtype], list[tuple[torch.Tensor, memoryview]]] = {}

    def hello_header(self) -> Header | None:
        return None

    def on_hello_ack(self, header: Header) -> None:  # pragma: no cover - no handshake
        return None

    @property
    def ready(self) -> bool:
        return True

    def alloc(self, rows: int, hidden: int, dtype: torch.dtype) -> Slot:
        free = self._free.get((rows, hidden, dtype))
        if free:
            x, buf = free.pop()
            return Slot(x=x, transport="inline", nbytes=len(buf), buf=buf)
        x = torch.empty((rows, hidden), dtype=dtype)
        return Slot(x=x, transport="inline", nbytes=rows * hidden * dtype.itemsize)

    def _recycle(self, slot: Slot) -> None:
        buf = slot.buf
        if buf is not None and slot.transport == "inline" and 0 < slot.nbytes < COPY_BELOW_BYTES:
            x = slot.x
            free = self._free.setdefault((x.shape[0], x.shape[1], x.dtype), [])
            if len(free) < 4 and len(self._free) <= 64:
                free.append((x, buf))

    def invoke_frames(self, slot: Slot, request_id: str | int,
                      segments: Sequence[tuple[str, int]], deadline_ms: int) -> list[Frame]:
        slot.request_id = request_id
        x = slot.x
        h = encode_invoke(request_id, segments, dtype=x.dtype, hidden=x.shape[1],
                          deadline_ms=deadline_ms, transport="inline")
        if not slot.nbytes:
            return [h]
        buf = slot.buf
        if buf is None:
            buf = slot.buf = tensor_buffer(x)  # raises unless contiguous and on the CPU
        return [h, buf]

    def decode_reply(self, slot: Slot, header: Header, frames: Sequence[Frame]) -> torch.Tensor:
        check_reply_matches(slot, header)
        return open_inline(header, frames)

    def release(self, slot: Slot) -> None:
        slot.extra.clear()
        self._recycle(slot)

    def abandon(self, slot: Slot) -> None:
        slot.extra.clear()

    def reply_dropped(self, header: Header) -> None:
        return None

    def close(self) -> None:
        self._free.clear()


class InlineWorkerSide:
    """Worker side of ``inline``: payloads in frames, replies in frames."""

    name = "inline"

    def on_hello(self, peer: Hashable, header: Header) -> dict:
        return {}

    def open_request(self, peer: Hashable, header: Header, frames: Sequence[Frame]) -> torch.Tensor:
        return open_inline(header, frames)

    def reply_view(self, peer: Hashable, header: Header) -> torch.Tensor:
        return torch.empty(header.shape, dtype=header.torch_dtype)  # type: ignore[arg-type]

    def reply_frames(self, peer: Hashable, header: Header, y: torch.Tensor) -> list[Frame]:
        if not y.is_contiguous():
            y = y.contiguous()
        return [encode_reply(header, y), *payload_frames(y)]

    def drop_peer(self, peer: Hashable) -> None:
        return None

    def sweep(self) -> int:
        return 0
