"""The EaaS wire protocol: ZeroMQ multipart messages with a msgpack header.

A message (after the ROUTER envelope, which the socket owner strips) is::

    frame 0      msgpack map: the header (see :class:`Header`)
    frame 1..n   raw tensor bytes (transport ``inline`` only; C-contiguous, native
                 little-endian, ``shape`` and ``dtype`` from the header)

Header fields (``v`` and ``kind`` always; the rest per kind):

====================  =====================================================
``v``                 protocol version, :data:`PROTOCOL_VERSION`
``kind``              one of :data:`KINDS`
``id``                request id, ``str`` (<= 128 chars) or ``int``
``deadline_ms``       absolute unix epoch milliseconds (``invoke``)
``segments``          ``[[function_id, rows], ...]`` (``invoke``); rows sum to ``shape[0]``
``dtype``             ``"float32" | "bfloat16" | "float16"`` (``invoke``, ``reply``)
``shape``             ``[rows, hidden]`` (``invoke``, ``reply``)
``transport``         ``"inline" | "shm" | "cuda_ipc" | "nixl"`` (``invoke``, ``reply``, ``hello``)
``handle``            transport-specific map (arena name, offset, ...); validated by the transport
``status``            ``"ok"`` (``reply``)
``error``, ``code``   human text and machine code (``error``)
====================  =====================================================

Nothing is pickled. :func:`eaas.platform.decode.decode_header` validates every field — and the declared
payload size against a limit — before anything proportional to the payload is
allocated; each failure raises :class:`~eaas.errors.ProtocolError` whose ``code`` is
one of :data:`ERROR_CODES`. Unknown functions are the worker's check: pass
``known_functions`` to :func:`eaas.platform.decode.check_functions` (or to the transport endpoint).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple, Union

import torch
import zmq
import msgspec

from eaas.errors import ProtocolError

PROTOCOL_VERSION = 1
KINDS = frozenset({"invoke", "reply", "error", "ping", "pong", "hello", "hello_ack", "bye"})
TRANSPORTS = ("inline", "shm", "cuda_ipc", "nixl")
DTYPES: Mapping[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_RCVMORE = int(zmq.RCVMORE)
_SNDMORE = int(zmq.SNDMORE)  # a plain int: ``int | zmq.Flag`` goes through enum machinery
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_ZmqFrame = zmq.Frame
_DTYPE_NAMES: Mapping[torch.dtype, str] = {dt: name for name, dt in DTYPES.items()}
_ITEMSIZE: Mapping[str, int] = {name: dt.itemsize for name, dt in DTYPES.items()}
MAX_HEADER_BYTES = 1 << 20  # segments of a few thousand experts fit easily
MAX_ID_CHARS = 128
MAX_SEGMENTS = 1 << 16
MAX_HANDLE_ITEMS = 32
MAX_HANDLE_VALUE_BYTES = 64 << 10  # NIXL agent metadata is a few KiB

#: Buffers below this many bytes are copied into the message by :func:`send_frames`;
#: larger ones are sent zero-copy. A zero-copy send of a Python buffer costs a
#: hand-off to pyzmq's garbage-collector thread (it must take the GIL to drop the
#: reference once libzmq is done with it); on a busy host that is slower than a
#: ``memcpy`` up to a few hundred KiB (measured with ``eaas bench transport``).
COPY_BELOW_BYTES = 256 << 10

#: Every ``ProtocolError.code`` this module (and the transports) raise.
ERROR_CODES = frozenset({
    "bad_header",          # frame 0 missing, not msgpack, not a map, too big
    "bad_version",
    "bad_kind",
    "bad_field",           # a field has the wrong type or range
    "bad_dtype",
    "bad_shape",
    "bad_segments",        # rows do not sum to shape[0], bad function id
    "size_mismatch",       # payload frame / handle extent != prod(shape) * itemsize
    "too_large",           # declared payload above the limit
    "deadline_exceeded",
    "unknown_function",
    "bad_transport",       # transport unknown or not offered
    "bad_handle",          # handle fields missing / outside the arena
    "unknown_arena",       # handle names an arena this peer never announced
    "internal",            # the worker failed computing (not the sender's fault)
    "reply_dropped",       # the reply could not be delivered (the client's queue was full); re-send
    "transfer_failed",     # the reply's data could not be written to the client's arena; hello again, re-send
})

#: Error codes after which the same rows may succeed on another replica (the client fails over).
RETRYABLE_CODES = frozenset({"internal", "unknown_function", "deadline_exceeded", "bad_transport", "unknown_arena",
                             "bad_handle", "reply_dropped", "transfer_failed"})

#: Error codes that mean the worker holds no transport state for this pair any more: the client
#: closes the connection (its next request there opens a new one, with a new hello).
PAIR_RESET_CODES = frozenset({"unknown_arena", "transfer_failed"})

Frame = Union[bytes, bytearray, memoryview, Any]  # Any: zmq.Frame (has .buffer)


_NO_HANDLE: Mapping[str, Any] = MappingProxyType({})
#: msgpack encoding of a header map (the same bytes as ``msgpack.packb(d, use_bin_type=True)``, ~3x faster)
_pack = msgspec.msgpack.Encoder().encode


class Header(NamedTuple):
    """A decoded (validated) or to-be-encoded message header (immutable).

    A ``NamedTuple`` rather than a frozen dataclass: one is built per message on
    the hot path, and a named tuple is built about 3x faster (~0.7 µs vs ~2.2 µs).

    Attributes:
        kind: one of :data:`KINDS`.
        id: request id (``str`` or ``int``); replies echo the invoke's id.
        deadline_ms: absolute unix epoch ms after which the request is worthless.
        segments: ``((function_id, rows), ...)``, rows summing to ``shape[0]``.
        dtype: dtype name from :data:`DTYPES`.
        shape: ``(rows, hidden)``.
        transport: data-plane transport name.
        handle: transport-specific map; keys ``str``, values ``int | str | bytes``
            (read-only when empty).
        status, error, code: reply status; error text and code.
        v: protocol version.
    """

    kind: str
    id: str | int = 0
    deadline_ms: int | None = None
    segments: tuple[tuple[str, int], ...] = ()
    dtype: str | None = None
    shape: tuple[int, int] | None = None
    transport: str | None = None
    handle: Mapping[str, Any] = _NO_HANDLE
    status: str | None = None
    error: str | None = None
    code: str | None = None
    v: int = PROTOCOL_VERSION

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype of the payload (``dtype`` must be set)."""
        return DTYPES[self.dtype]  # type: ignore[index]

    @property
    def nbytes(self) -> int:
        """Payload size in bytes: ``rows * hidden * itemsize`` (0 without a payload)."""
        if self.shape is None or self.dtype is None:
            return 0
        return self.shape[0] * self.shape[1] * DTYPES[self.dtype].itemsize


def now_ms() -> int:
    """Current unix epoch time in integer milliseconds."""
    return time.time_ns() // 1_000_000


# --- encoding -----------------------------------------------------------------


def encode_header(h: Header) -> bytes:
    """Pack a header into frame-0 bytes (only the fields that are set)."""
    d: dict[str, Any] = {"v": h.v, "kind": h.kind, "id": h.id}
    if h.deadline_ms is not None:
        d["deadline_ms"] = h.deadline_ms
    if h.segments:
        d["segments"] = [[f, r] for f, r in h.segments]
    if h.dtype is not None:
        d["dtype"] = h.dtype
    if h.transport is not None:
        d["transport"] = h.transport
    if h.status is not None:
        d["status"] = h.status
    if h.error is not None:
        d["error"] = h.error
    if h.code is not None:
        d["code"] = h.code
    if h.shape is not None:
        d["shape"] = list(h.shape)
    if h.handle:
        d["handle"] = dict(h.handle)
    return _pack(d)


def encode_invoke(
    request_id: str | int,
    segments: Sequence[tuple[str, int]],
    *,
    dtype: torch.dtype,
    hidden: int,
    deadline_ms: int,
    transport: str,
    handle: Mapping[str, Any] | None = None,
) -> bytes:
    """``encode_header(invoke_header(...))`` without building the :class:`Header` (hot path).

    Decodes to exactly the header :func:`invoke_header` builds from the same arguments.
    """
    segs = [[str(f), int(r)] for f, r in segments]
    rows = 0
    for seg in segs:
        rows += seg[1]
    d: dict[str, Any] = {"v": PROTOCOL_VERSION, "kind": "invoke", "id": request_id,
                         "deadline_ms": int(deadline_ms), "segments": segs, "dtype": dtype_name(dtype),
                         "transport": transport, "shape": [rows, int(hidden)]}
    if handle:
        d["handle"] = dict(handle)
    return _pack(d)


def encode_reply(request: Header, y: torch.Tensor, *, handle: Mapping[str, Any] | None = None) -> bytes:
    """``encode_header(reply_header(request, y, handle=handle))`` without the :class:`Header`."""
    shape = y.shape
    d: dict[str, Any] = {"v": PROTOCOL_VERSION, "kind": "reply", "id": request.id, "status": "ok",
                         "dtype": dtype_name(y.dtype), "transport": request.transport,
                         "shape": [int(shape[0]), int(shape[1])]}
    if request.transport is None:
        del d["transport"]
    if handle:
        d["handle"] = dict(handle)
    return _pack(d)


def invoke_header(
    request_id: str | int,
    segments: Sequence[tuple[str, int]],
    *,
    dtype: torch.dtype,
    hidden: int,
    deadline_ms: int,
    transport: str,
    handle: Mapping[str, Any] | None = None,
) -> Header:
    """Build an ``invoke`` header for ``sum(rows)`` rows of ``hidden`` columns."""
    segs = tuple((str(f), int(r)) for f, r in segments)
    return Header(
        kind="invoke", id=request_id, deadline_ms=int(deadline_ms), segments=segs,
        dtype=dtype_name(dtype), shape=(sum(r for _, r in segs), int(hidden)),
        transport=transport, handle=dict(handle or {}),
    )


def reply_header(request: Header, y: torch.Tensor, *, handle: Mapping[str, Any] | None = None) -> Header:
    """Build the ``reply`` header answering ``request`` with ``y[rows, hidden]``."""
    return Header(
        kind="reply", id=request.id, status="ok", dtype=dtype_name(y.dtype),
        shape=(int(y.shape[0]), int(y.shape[1])), transport=request.transport,
        handle=dict(handle or {}),
    )


def error_header(request_id: str | int | None, message: str, code: str) -> Header:
    """Build an ``error`` header (``request_id`` None when it could not be read)."""
    return Header(kind="error", id=request_id if request_id is not None else "", status="error",
                  error=str(message)[:1000], code=code)


def error_frames(err: ProtocolError | Exception, request_id: str | int | None = None) -> list[bytes]:
    """The one-frame error reply for ``err`` (its ``code``, or ``"internal"``)."""
    code = getattr(err, "code", "internal")
    return [encode_header(error_header(request_id, str(err), code))]


def dtype_name(dtype: torch.dtype) -> str:
    """Wire name of a torch dtype.

    Raises:
        ProtocolError: ``bad_dtype`` when the dtype is not in :data:`DTYPES`.
    """
    name = _DTYPE_NAMES.get(dtype)  # type: ignore[call-overload]
    if name is not None:
        return name
    raise ProtocolError(f"dtype {dtype} not allowed (allowed: {sorted(DTYPES)})", "bad_dtype")


# --- tensors <-> buffers ----------------------------------------------------------


def tensor_buffer(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (bf16 via a uint8 view).

    The memoryview keeps ``t``'s storage alive; send it with ``copy=False``.
    """
    if not t.is_contiguous() or not t.is_cpu:
        raise ProtocolError("tensor payloads must be contiguous CPU tensors", "bad_field")
    if t.dtype is torch.bfloat16:  # numpy has no bfloat16
        t = t.view(torch.uint8)
    return memoryview(t.numpy()).cast("B")


def frame_buffer(frame: Frame) -> memoryview:
    """The bytes of a frame: ``zmq.Frame.buffer`` (no copy) or ``memoryview(frame)``."""
    buf = getattr(frame, "buffer", None)
    return buf if buf is not None else memoryview(frame)


def tensor_from_buffer(buf: memoryview, dtype: torch.dtype, shape: tuple[int, int]) -> torch.Tensor:
    """A ``[rows, hidden]`` tensor viewing ``buf`` without copying.

    ``len(buf)`` must already equal ``prod(shape) * itemsize`` (checked by callers).
    Read-only buffers give a tensor that must not be written.
    """
    if shape[0] * shape[1] == 0:
        return torch.empty(shape, dtype=dtype)
    if getattr(buf, "readonly", False):
        with warnings.catch_warnings():  # read-only buffers: we never write into them
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(buf, dtype=dtype).view(shape)
    return torch.frombuffer(buf, dtype=dtype).view(shape)


# --- socket helpers (hot path) -------------------------------------------------------


def send_frames(sock: Any, frames: Sequence[Frame], flags: int = 0) -> None:
    """Send ``frames`` as one multipart message (every EaaS socket sends through here).

    The copy rule, per frame:

    - a ``zmq.Frame`` is sent by reference;
    - any other buffer (``bytes``, a byte ``memoryview`` from ``tensor_buffer``) is
      copied into the message when it is under :data:`COPY_BELOW_BYTES` (one
      ``memcpy`` in pyzmq, no ``zmq.Frame`` object; the caller may reuse the buffer
      as soon as this returns) and sent zero-copy above (ZeroMQ keeps a reference
      until the bytes are on the wire; the caller must not write the buffer again).

    Raises:
        zmq.ZMQError: as ``socket.send`` (``zmq.Again`` with ``NOBLOCK``).
    """
    flags = int(flags)
    more = flags | _SNDMORE
    send = sock.send
    last = len(frames) - 1
    for i, f in enumerate(frames):
        send(f, more if i < last else flags,
             copy=type(f) is not _ZmqFrame and len(f) < COPY_BELOW_BYTES)


def has_input(sock: Any) -> bool:
    """Whether a ZeroMQ socket has a message to read now (``ZMQ_EVENTS`` & ``POLLIN``, no recv).

    Plain ints instead of pyzmq's ``zmq.EVENTS``/``zmq.POLLIN`` enums: ``int & Flag`` builds an
    enum member per call (~1 µs of the ~3-4 µs a check costs), and the waiters check often.
    """
    return bool(sock.getsockopt(_EVENTS) & _POLLIN)


def recv_frames(sock: Any, flags: int = 0, head: int = 0) -> list[Any]:
    """``sock.recv_multipart(flags, copy=False)``, reading ``Frame.more`` instead of
    asking the socket for ``RCVMORE`` after every part (a syscall-free loop).

    The first ``head`` frames (small ones: a ROUTER envelope, the header) come back
    as ``bytes`` (``copy=True``: no ``zmq.Frame`` object and no second copy through
    ``Frame.bytes``); the rest, payloads, as zero-copy ``zmq.Frame``s.
    """
    out: list[Any] = []
    if head:
        getmore = sock.get
        while True:
            b = sock.recv(flags)
            out.append(b)
            if not getmore(_RCVMORE):
                return out
            flags = 0
            if len(out) >= head:
                break
    f = sock.recv(flags, copy=False)
    out.append(f)
    while f.more:
        f = sock.recv(0, copy=False)
        out.append(f)
    return out


def raise_if_error(h: Header) -> None:
    """Turn a decoded ``error`` reply into :class:`~eaas.errors.RemoteError`."""
    if h.kind == "error":
        from eaas.errors import RemoteError

        raise RemoteError(f"worker error ({h.code}): {h.error}", h.code or "remote_error")
