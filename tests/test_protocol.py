"""Wire protocol: round trips and every malformed input -> ProtocolError with its code."""

from __future__ import annotations

import tracemalloc

import msgpack
import pytest
import torch

from eaas.errors import ProtocolError, RemoteError
from eaas.platform.protocol import (
    ERROR_CODES,
    PROTOCOL_VERSION,
    Header,
    encode_header,
    error_frames,
    invoke_header,
    now_ms,
    raise_if_error,
    reply_header,
    tensor_buffer,
    tensor_from_buffer,
)
from eaas.platform.decode import check_functions, check_payload_frames, decode_header, peek_request_id
from eaas.platform.transport.select import WorkerEndpoint

LIMIT = 64 << 20
NOW = 1_700_000_000_000


def _invoke(**over):
    d = {"v": PROTOCOL_VERSION, "kind": "invoke", "id": "r1", "deadline_ms": NOW + 1000,
         "segments": [["m/0/1", 2], ["m/0/3", 1]], "dtype": "float32", "shape": [3, 4],
         "transport": "inline", "handle": {}}
    d.update(over)
    return {k: v for k, v in d.items() if v is not ...}


def _pack(d) -> bytes:
    return msgpack.packb(d, use_bin_type=True)


def test_invoke_round_trip_all_fields():
    h = invoke_header("req-7", [("m/0/1", 2), ("m/0/3", 1)], dtype=torch.bfloat16, hidden=4,
                      deadline_ms=NOW + 5, transport="shm", handle={"arena": "a", "offset": 64, "nbytes": 24})
    got = decode_header(encode_header(h), max_message_bytes=LIMIT, now_ms_=NOW)
    assert got == h
    assert got.shape == (3, 4) and got.nbytes == 24 and got.torch_dtype == torch.bfloat16


@pytest.mark.parametrize("h", [
    Header(kind="ping", id=3), Header(kind="pong", id="x"), Header(kind="bye", id=0),
    Header(kind="hello", id="h", transport="shm", handle={"arena": "eaas-1-00", "size": 10}),
    Header(kind="hello_ack", id="h", transport="nixl", handle={"meta": b"\x00\x01"}),
    Header(kind="error", id=9, status="error", error="boom", code="too_large"),
])
def test_control_round_trip(h):
    assert decode_header(encode_header(h), max_message_bytes=LIMIT) == h


def test_reply_and_error_helpers():
    req = invoke_header(5, [("f", 2)], dtype=torch.float16, hidden=3, deadline_ms=NOW + 9, transport="inline")
    y = torch.zeros(2, 3, dtype=torch.float16)
    rep = decode_header(encode_header(reply_header(req, y)), max_message_bytes=LIMIT)
    assert (rep.kind, rep.id, rep.shape, rep.dtype, rep.status) == ("reply", 5, (2, 3), "float16", "ok")
    err = decode_header(error_frames(ProtocolError("nope", "unknown_function"), 5)[0], max_message_bytes=LIMIT)
    assert (err.kind, err.id, err.code, err.error) == ("error", 5, "unknown_function", "nope")
    with pytest.raises(RemoteError) as ei:
        raise_if_error(err)
    assert ei.value.code == "unknown_function"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tensor_buffer_zero_copy_bit_identical(dtype):
    x = torch.randn(5, 7).to(dtype)
    buf = tensor_buffer(x)
    assert len(buf) == x.numel() * x.element_size()
    y = tensor_from_buffer(buf, dtype, (5, 7))
    assert y.data_ptr() == x.data_ptr()  # a view, not a copy
    assert torch.equal(x.view(torch.uint8), y.view(torch.uint8))


BAD = [
    ("truncated header", _pack(_invoke())[:-5], "bad_header"),
    ("garbage bytes", b"\xc1\xff\x00garbage", "bad_header"),
    ("empty frame", b"", "bad_header"),
    ("not a map", _pack([1, 2, 3]), "bad_header"),
    ("int keys", _pack({1: 2}), "bad_header"),
    ("no version", _pack(_invoke(v=...)), "bad_version"),
    ("future version", _pack(_invoke(v=99)), "bad_version"),
    ("bool version", _pack(_invoke(v=True)), "bad_version"),
    ("unknown kind", _pack(_invoke(kind="launch")), "bad_kind"),
    ("bad id type", _pack(_invoke(id=[1])), "bad_field"),
    ("long id", _pack(_invoke(id="x" * 500)), "bad_field"),
    ("wrong dtype", _pack(_invoke(dtype="float64")), "bad_dtype"),
    ("dtype not str", _pack(_invoke(dtype=7)), "bad_dtype"),
    ("shape 3-d", _pack(_invoke(shape=[3, 4, 1])), "bad_shape"),
    ("shape negative", _pack(_invoke(shape=[-3, 4])), "bad_shape"),
    ("shape float", _pack(_invoke(shape=[3.0, 4])), "bad_shape"),
    ("rows do not sum", _pack(_invoke(segments=[["m/0/1", 2]])), "bad_segments"),
    ("segment malformed", _pack(_invoke(segments=[["m/0/1", "2"], ["x", 1]])), "bad_segments"),
    ("segments not list", _pack(_invoke(segments="m")), "bad_segments"),
    ("100 GB declared", _pack(_invoke(shape=[25_000_000, 1024], segments=[["m/0/1", 25_000_000]])), "too_large"),
    ("expired deadline", _pack(_invoke(deadline_ms=NOW - 1)), "deadline_exceeded"),
    ("deadline missing", _pack(_invoke(deadline_ms=...)), "bad_field"),
    ("unknown transport", _pack(_invoke(transport="carrier-pigeon")), "bad_transport"),
    ("handle not a map", _pack(_invoke(handle=[1])), "bad_handle"),
    ("handle bad value", _pack(_invoke(handle={"a": {"b": 1}})), "bad_handle"),
    ("reply bad status", _pack({**_invoke(kind="reply"), "status": "meh"}), "bad_field"),
    ("kind unhashable", _pack(_invoke(kind=["invoke"])), "bad_kind"),
]


@pytest.mark.parametrize("name,raw,code", BAD, ids=[b[0] for b in BAD])
def test_malformed_header_codes(name, raw, code):
    assert code in ERROR_CODES
    with pytest.raises(ProtocolError) as ei:
        decode_header(raw, max_message_bytes=LIMIT, now_ms_=NOW)
    assert ei.value.code == code, str(ei.value)


def test_oversized_header_frame_rejected_before_parsing():
    with pytest.raises(ProtocolError) as ei:
        decode_header(b"\x80" * ((1 << 20) + 1), max_message_bytes=LIMIT)
    assert ei.value.code == "bad_header"


def test_payload_frame_checks():
    h = decode_header(_pack(_invoke()), max_message_bytes=LIMIT, now_ms_=NOW)
    assert len(check_payload_frames(h, [b"\x00" * 48])) == 48
    for frames in ([b"\x00" * 47], [], [b"\x00" * 48, b""], [b"\x00" * 4800]):
        with pytest.raises(ProtocolError) as ei:
            check_payload_frames(h, frames)
        assert ei.value.code == "size_mismatch"


def test_unknown_function():
    h = decode_header(_pack(_invoke()), max_message_bytes=LIMIT, now_ms_=NOW)
    check_functions(h, {"m/0/1", "m/0/3"})
    with pytest.raises(ProtocolError) as ei:
        check_functions(h, {"m/0/1"})
    assert ei.value.code == "unknown_function"


def test_peek_request_id():
    assert peek_request_id(_pack(_invoke(v=99, id="abc"))) == "abc"
    assert peek_request_id(b"garbage") is None
    assert peek_request_id(_pack({"id": {"x": 1}})) is None


def test_100gb_declared_allocates_nothing_through_the_endpoint():
    """The worker's endpoint answers too_large without allocating the payload."""
    ep = WorkerEndpoint(max_message_bytes=LIMIT, offered=["inline"])
    raw = _pack(_invoke(shape=[25_000_000, 1024], segments=[["m/0/1", 25_000_000]], deadline_ms=now_ms() + 60_000))
    tracemalloc.start()
    try:
        inc = ep.on_message(b"peer", [raw, b"\x00" * 16])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < (1 << 20)
    assert inc.x is None
    err = decode_header(inc.reply[0], max_message_bytes=LIMIT)
    assert (err.kind, err.code, err.id) == ("error", "too_large", "r1")
    assert ep.rejected["too_large"] == 1


def test_endpoint_answers_every_malformed_message_and_keeps_serving():
    ep = WorkerEndpoint(max_message_bytes=LIMIT, known_functions={"m/0/1", "m/0/3"}, offered=["inline"])
    live = now_ms() + 60_000
    cases = [
        ([b"\xc1garbage"], "bad_header"),
        ([_pack(_invoke(deadline_ms=live))[:-3]], "bad_header"),
        ([_pack(_invoke(deadline_ms=live, dtype="int8")), b"\x00" * 12], "bad_dtype"),
        ([_pack(_invoke(deadline_ms=live)), b"\x00" * 47], "size_mismatch"),
        ([_pack(_invoke(deadline_ms=live, segments=[["m/0/9", 3]]))], "unknown_function"),
        ([_pack(_invoke(deadline_ms=1))], "deadline_exceeded"),
        ([_pack(_invoke(deadline_ms=live, transport="shm", handle={"arena": "eaas-1-0000000000000000",
                                                                   "offset": 0, "nbytes": 48}))],
         "bad_transport"),
        ([_pack({**_invoke(kind="reply"), "status": "ok"})], "bad_kind"),
        ([], "bad_header"),
    ]
    for frames, code in cases:
        inc = ep.on_message(b"p", frames)
        assert inc.x is None and inc.reply is not None
        assert decode_header(inc.reply[0], max_message_bytes=LIMIT).code == code
    x = torch.arange(12, dtype=torch.float32).view(3, 4)
    inc = ep.on_message(b"p", [_pack(_invoke(deadline_ms=live)), tensor_buffer(x)])
    assert inc.reply is None and torch.equal(inc.x, x)
    assert sum(ep.rejected.values()) == len(cases)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fast_encoders_match_header_path(dtype):
    from eaas.platform.protocol import encode_invoke, encode_reply

    args = ("r-9", [("m/0/1", 2), ("m/0/3", 1)])
    kw = dict(dtype=dtype, hidden=4, deadline_ms=NOW + 5, transport="shm",
              handle={"arena": "a", "offset": 64, "nbytes": 24})
    slow = decode_header(encode_header(invoke_header(*args, **kw)), max_message_bytes=LIMIT, now_ms_=NOW)
    fast = decode_header(encode_invoke(*args, **kw), max_message_bytes=LIMIT, now_ms_=NOW)
    assert fast == slow
    y = torch.zeros(3, 4, dtype=dtype)
    assert (decode_header(encode_reply(slow, y, handle=slow.handle), max_message_bytes=LIMIT)
            == decode_header(encode_header(reply_header(slow, y, handle=slow.handle)), max_message_bytes=LIMIT))


def test_send_recv_frames_round_trip():
    import zmq

    from eaas.platform.protocol import recv_frames, send_frames

    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://frames")
        b.connect("inproc://frames")
        x = torch.arange(12, dtype=torch.float32).view(3, 4)
        send_frames(a, [b"hdr", tensor_buffer(x)])
        got = recv_frames(b)
        assert [len(f) for f in got] == [3, 48]
        assert torch.equal(tensor_from_buffer(got[1].buffer, torch.float32, (3, 4)), x)
    finally:
        a.close(0)
        b.close(0)
        ctx.term()


def test_send_frames_copies_small_buffers_and_shares_large_ones():
    """The copy rule the inline transport relies on: a buffer under COPY_BELOW_BYTES is
    copied at send (the client recycles such request tensors at once); a larger one is
    sent zero-copy (over inproc the receiver sees the sender's very memory)."""
    import zmq

    from eaas.platform.protocol import COPY_BELOW_BYTES, recv_frames, send_frames

    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://copy-rule")
        b.connect("inproc://copy-rule")
        small = torch.zeros(COPY_BELOW_BYTES // 4 - 1, dtype=torch.float32)
        large = torch.zeros(COPY_BELOW_BYTES // 4, dtype=torch.float32)
        send_frames(a, [b"h", tensor_buffer(small)])
        send_frames(a, [b"h", tensor_buffer(large)])
        small.fill_(7.0)  # written after the send returned, before the receiver reads
        large.fill_(7.0)
        got_small, got_large = recv_frames(b, 0, 1), recv_frames(b, 0, 1)
        as_f32 = lambda f: torch.frombuffer(f.buffer, dtype=torch.float32)  # noqa: E731
        assert torch.count_nonzero(as_f32(got_small[1])) == 0  # copied: the old bytes
        assert bool((as_f32(got_large[1]) == 7.0).all())  # shared: the new bytes
    finally:
        a.close(0)
        b.close(0)
        ctx.term()


# --- the fast (msgspec) decoder gives the validator's answer --------------------------------

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from eaas.platform.decode import _decode_checked, _decode_fast  # noqa: E402

_any_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats(allow_nan=False)
    | st.text(max_size=300) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
_FIELDS = ("v", "kind", "id", "deadline_ms", "segments", "dtype", "shape", "transport", "handle", "status")


@st.composite
def _headers(draw):
    """A well-formed invoke or reply map, then up to three of its fields replaced or removed."""
    rows = draw(st.integers(0, 40))
    split = draw(st.integers(0, rows))
    d = _invoke(id=draw(st.integers(-5, 1 << 40) | st.text(max_size=130)), shape=[rows, draw(st.integers(0, 4096))],
                segments=[["m/0/1", split], ["m/0/3", max(0, rows - split + draw(st.sampled_from([0, 0, 0, 1, -1])))]], deadline_ms=NOW + draw(st.integers(-5, 5)),
                dtype=draw(st.sampled_from(["float32", "bfloat16", "float16"])),
                transport=draw(st.sampled_from(["inline", "shm", "cuda_ipc", "nixl"])),
                handle=draw(st.none() | st.just({"arena": "eaas-1-ab", "offset": 64, "nbytes": 12})
                            | st.dictionaries(st.text(max_size=4), _any_value, max_size=3)))
    if draw(st.booleans()):
        d["kind"] = "reply"
        if draw(st.booleans()):
            d["status"] = "ok"
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(_FIELDS))
        if draw(st.booleans()):
            d.pop(key, None)
        else:
            d[key] = draw(_any_value)
    return d


def _answer(fn):
    try:
        return fn()
    except ProtocolError as e:
        return ("error", e.code)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_headers(), st.sampled_from([LIMIT, 100]), st.booleans())
def test_fast_decoder_agrees_with_the_validator(d, limit, check_deadline):
    """Whenever the msgspec path accepts a header, the Python validator accepts it too and
    builds the same Header (so the fast path never lets through what the validator refuses)."""
    raw = _pack(d)
    checked = _answer(lambda: _decode_checked(raw, limit, NOW, check_deadline))
    fast = _decode_fast(raw, limit, NOW, check_deadline)
    if fast is not None:
        assert fast == checked and type(fast.segments) is tuple
    assert _answer(lambda: decode_header(raw, max_message_bytes=limit, now_ms_=NOW,
                                         check_deadline=check_deadline)) == checked


def test_fast_decoder_takes_the_hot_kinds():
    """The well-formed invoke and reply go through msgspec (the path exists and is used)."""
    inv = _pack(_invoke(transport="shm", handle={"arena": "eaas-1-ab", "offset": 64, "nbytes": 48}))
    rep = _pack({**_invoke(kind="reply"), "status": "ok"})
    for raw in (inv, rep):
        assert _decode_fast(raw, LIMIT, NOW, True) == _decode_checked(raw, LIMIT, NOW, True)
    assert _decode_fast(_pack({"v": 1, "kind": "ping", "id": 1}), LIMIT, NOW, True) is None
