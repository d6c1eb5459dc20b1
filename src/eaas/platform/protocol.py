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

Nothing is pickled. :func:`decode_header` validates every field — and the declared
payload size against a limit — before anything proportional to the payload is
allocated; each failure raises :class:`~eaas.errors.ProtocolError` whose ``code`` is
one of :data:`ERROR_CODES`. Unknown functions are the worker's check: pass
``known_functions`` to :func:`check_functions` (or to the transport endpoint).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Container, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple, Union

import msgpack
import torch
import zmq
from msgpack import packb as _packb
from msgpack import unpackb as _unpackb

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
})

Frame = Union[bytes, bytearray, memoryview, Any]  # Any: zmq.Frame (has .buffer)


_NO_HANDLE: Mapping[str, Any] = MappingProxyType({})


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
    return _packb(d, use_bin_type=True)


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
    return _packb(d, use_bin_type=True)


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
    return _packb(d, use_bin_type=True)


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


# --- decoding / validation --------------------------------------------------------


def _fail(msg: str, code: str) -> ProtocolError:
    return ProtocolError(msg, code)


def _int(d: Mapping[str, Any], key: str, *, lo: int = 0) -> int:
    val = d.get(key)
    if type(val) is not int or val < lo:
        raise _fail(f"field {key!r} must be an int >= {lo}, got {val!r:.80}", "bad_field")
    return val


def _str(d: Mapping[str, Any], key: str, max_len: int = 256) -> str:
    val = d.get(key)
    if not isinstance(val, str) or len(val) > max_len:
        raise _fail(f"field {key!r} must be a string of <= {max_len} chars, got {val!r:.80}", "bad_field")
    return val


def peek_request_id(raw: Frame) -> str | int | None:
    """Best-effort request id of a (possibly malformed) header, for error replies."""
    try:
        buf = frame_buffer(raw)
        if len(buf) > MAX_HEADER_BYTES:
            return None
        d = msgpack.unpackb(buf, raw=False, strict_map_key=True)
        rid = d.get("id") if isinstance(d, dict) else None
        if (type(rid) is int) or (isinstance(rid, str) and len(rid) <= MAX_ID_CHARS):
            return rid
    except Exception:  # noqa: BLE001 - anything malformed means "no id"
        pass
    return None


def _handle(d: Mapping[str, Any]) -> dict[str, Any]:
    h = d.get("handle", {})
    if not isinstance(h, dict) or len(h) > MAX_HANDLE_ITEMS:
        raise _fail("field 'handle' must be a map of <= 32 items", "bad_handle")
    for k, val in h.items():
        if not isinstance(k, str):
            raise _fail("handle keys must be strings", "bad_handle")
        if isinstance(val, bool) or not isinstance(val, (int, str, bytes)):
            if not (isinstance(val, list) and len(val) <= MAX_HANDLE_ITEMS
                    and all(isinstance(x, (int, bytes)) and not isinstance(x, bool) for x in val)):
                raise _fail(f"handle[{k!r}] has an unsupported type", "bad_handle")
        if isinstance(val, (str, bytes)) and len(val) > MAX_HANDLE_VALUE_BYTES:
            raise _fail(f"handle[{k!r}] is too long", "bad_handle")
    return h


def decode_header(
    raw: Frame,
    *,
    max_message_bytes: int,
    now_ms_: int | None = None,
    check_deadline: bool = True,
) -> Header:
    """Decode and validate frame 0. Allocates nothing proportional to the payload.

    Args:
        raw: frame 0 (bytes, memoryview or ``zmq.Frame``).
        max_message_bytes: largest payload (``rows * hidden * itemsize``) accepted.
        now_ms_: current epoch ms (injected for tests); default :func:`now_ms`.
        check_deadline: reject an ``invoke`` whose ``deadline_ms`` has passed.

    Raises:
        ProtocolError: with ``code`` from :data:`ERROR_CODES`.
    """
    if type(raw) is bytes:
        data: Any = raw
        n = len(raw)
    elif type(raw) is _ZmqFrame:  # received frame: its length is known, a small copy unpacks fastest
        n = len(raw)
        data = raw.bytes if 0 < n <= MAX_HEADER_BYTES else None
    else:
        try:
            data = frame_buffer(raw)
        except TypeError as e:
            raise _fail(f"header frame is not bytes: {e}", "bad_header") from None
        n = data.nbytes
        if 0 < n <= MAX_HEADER_BYTES and type(raw) is not memoryview:
            small = getattr(raw, "bytes", None)  # zmq.Frame: a small copy unpacks faster than a view
            if type(small) is bytes:
                data = small
    if n == 0 or n > MAX_HEADER_BYTES:
        raise _fail(f"header frame of {n} bytes (must be 1..{MAX_HEADER_BYTES})", "bad_header")
    try:
        # msgpack bounds every container by the input length, so this cannot blow up.
        d = _unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # noqa: BLE001 - msgpack raises a zoo of types
        raise _fail(f"header is not valid msgpack: {type(e).__name__}: {e}", "bad_header") from None
    if type(d) is not dict:
        raise _fail(f"header must be a map, got {type(d).__name__}", "bad_header")
    v = d.get("v")
    if type(v) is not int or v != PROTOCOL_VERSION:
        raise _fail(f"protocol version {v!r:.40} not supported (expected {PROTOCOL_VERSION})", "bad_version")
    kind = d.get("kind")
    if kind not in KINDS:
        raise _fail(f"unknown message kind {kind!r:.40}", "bad_kind")
    rid = d.get("id", 0)
    if not ((type(rid) is int) or (isinstance(rid, str) and len(rid) <= MAX_ID_CHARS)):
        raise _fail(f"field 'id' must be an int or a string of <= {MAX_ID_CHARS} chars", "bad_field")

    if kind == "invoke" or kind == "reply":
        pass
    elif kind in ("ping", "pong", "bye"):
        return Header(kind=kind, id=rid)
    elif kind == "error":
        code = d.get("code", "remote_error")
        return Header(kind=kind, id=rid, status="error", error=_str(d, "error", 4096),
                      code=code if isinstance(code, str) else "remote_error")
    transport = d.get("transport")
    if transport not in TRANSPORTS:
        raise _fail(f"unknown transport {transport!r:.40}", "bad_transport")
    handle = d.get("handle")
    handle = _NO_HANDLE if handle is None else _handle(d)
    if kind == "hello" or kind == "hello_ack":
        return Header(kind=kind, id=rid, transport=transport, handle=handle)

    # invoke / reply: a payload is declared.
    dtype = d.get("dtype")
    itemsize = _ITEMSIZE.get(dtype) if type(dtype) is str else None
    if itemsize is None:
        raise _fail(f"dtype {dtype!r:.40} not allowed (allowed: {sorted(DTYPES)})", "bad_dtype")
    shape = d.get("shape")
    if (type(shape) is not list or len(shape) != 2
            or type(shape[0]) is not int or type(shape[1]) is not int or shape[0] < 0 or shape[1] < 0):
        raise _fail(f"shape must be [rows, hidden] of ints >= 0, got {shape!r:.80}", "bad_shape")
    rows, hidden = shape
    nbytes = rows * hidden * itemsize  # python ints: no overflow
    if nbytes > max_message_bytes:
        raise _fail(f"declared payload of {nbytes} bytes exceeds the limit of {max_message_bytes}", "too_large")

    if kind == "reply":
        status = d.get("status", "ok")
        if status != "ok":
            raise _fail(f"reply status {status!r:.40} (expected 'ok')", "bad_field")
        return Header(kind=kind, id=rid, status="ok", dtype=dtype, shape=(rows, hidden),
                      transport=transport, handle=handle)

    deadline_ms = d.get("deadline_ms")
    if type(deadline_ms) is not int or deadline_ms < 0:
        deadline_ms = _int(d, "deadline_ms")  # raises bad_field with the message
    segs_raw = d.get("segments")
    if type(segs_raw) is not list or len(segs_raw) > MAX_SEGMENTS:
        raise _fail(f"field 'segments' must be a list of <= {MAX_SEGMENTS} [function_id, rows]", "bad_segments")
    segments: list[tuple[str, int]] = []
    total = 0
    for seg in segs_raw:
        if (type(seg) is not list or len(seg) != 2 or type(seg[0]) is not str
                or not seg[0] or len(seg[0]) > 256 or type(seg[1]) is not int or seg[1] < 0):
            raise _fail(f"bad segment {seg!r:.80} (expected [function_id, rows >= 0])", "bad_segments")
        segments.append((seg[0], seg[1]))
        total += seg[1]
    if total != rows:
        raise _fail(f"segment rows sum to {total} but shape[0] is {rows}", "bad_segments")
    if check_deadline:
        now = now_ms() if now_ms_ is None else now_ms_
        if deadline_ms <= now:
            raise _fail(f"deadline passed {now - deadline_ms} ms ago", "deadline_exceeded")
    return Header(kind=kind, id=rid, deadline_ms=deadline_ms, segments=tuple(segments),
                  dtype=dtype, shape=(rows, hidden), transport=transport, handle=handle)


def check_functions(h: Header, known_functions: Container[str]) -> None:
    """Reject an invoke naming a function this worker does not host.

    Raises:
        ProtocolError: ``unknown_function``.
    """
    for fid, _ in h.segments:
        if fid not in known_functions:
            raise _fail(f"function {fid!r} is not hosted here", "unknown_function")


def check_payload_frames(h: Header, frames: Sequence[Frame]) -> memoryview | None:
    """Check the payload frames of an inline message; return the payload buffer.

    Args:
        h: decoded header (``invoke`` or ``reply``).
        frames: the frames after frame 0.

    Raises:
        ProtocolError: ``size_mismatch`` when there is not exactly one frame of
            ``h.nbytes`` bytes (zero frames allowed for an empty payload).
    """
    if h.nbytes == 0 and not frames:
        return None
    if len(frames) != 1:
        raise _fail(f"expected 1 payload frame, got {len(frames)}", "size_mismatch")
    buf = frame_buffer(frames[0])
    if buf.nbytes != h.nbytes:
        raise _fail(f"payload frame has {buf.nbytes} bytes, shape {list(h.shape or ())} {h.dtype} "
                    f"needs {h.nbytes}", "size_mismatch")
    return buf


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
