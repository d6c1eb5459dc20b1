"""cuda_ipc transport through a real echo worker process (skips without CUDA + CuPy).

Run on a GPU machine with ``scripts/gpu_check.sh``.
"""

from __future__ import annotations


import pytest
import torch

from eaas.platform.transport.select import cuda_ipc_available

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not cuda_ipc_available(), reason="needs CUDA and CuPy (cupy-cuda12x)")]

from test_transport import _bits, echo_ipc_endpoint, start_echo, stop  # noqa: E402


@pytest.fixture(scope="module")
def echo_cuda():
    proc, ep = start_echo(echo_ipc_endpoint(), "--device", "cuda:0")
    yield ep
    stop(proc)


def _client(ep, arena_bytes=8 << 20):
    from eaas.bench.echo import PairClient

    c = PairClient(ep, "cuda_ipc", arena_bytes=arena_bytes, device="cuda:0")
    c.connect(timeout_s=60)
    return c


def test_cuda_ipc_selected_between_gpu_processes():
    from eaas.platform.transport import local_capabilities, select_transport

    caps = local_capabilities("cuda:0")
    assert "cuda_ipc" in caps["transports"]
    assert select_transport(caps, local_capabilities("cuda:0")) == "cuda_ipc"


def test_cuda_ipc_bit_identical(echo_cuda):
    c = _client(echo_cuda)
    try:
        g = torch.Generator(device="cuda").manual_seed(0)
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            for rows, hidden in ((1, 8), (37, 64), (513, 1024), (0, 16)):
                x = torch.randn(rows, hidden, device="cuda", generator=g).to(dt)
                y = c.roundtrip(x)
                assert y.dtype == dt and y.shape == x.shape
                assert y.device.type == "cuda" or rows == 0  # empty requests travel inline
                assert torch.equal(_bits(y.cpu()), _bits(x.cpu())), (dt, rows, hidden)
        assert c.channel._alloc.used_bytes == 0
    finally:
        c.close()


def test_cuda_ipc_event_ordering_under_async_writes(echo_cuda):
    """x written by a long async kernel right before the send must be seen complete."""
    c = _client(echo_cuda, arena_bytes=64 << 20)
    try:
        big = torch.randn(4096, 1024, device="cuda")
        for i in range(20):
            x = big * float(i) + 1.0  # queued work; no host sync before the send
            y = c.roundtrip(x)
            assert torch.equal(y, x), i
    finally:
        c.close()


def test_cuda_ipc_bad_offset_is_refused(echo_cuda):
    from eaas.platform.protocol import encode_header, invoke_header, now_ms
    from eaas.platform.decode import decode_header

    c = _client(echo_cuda, arena_bytes=1 << 20)
    try:
        ch = c.channel
        h = invoke_header("bad", [("f", 4)], dtype=torch.float32, hidden=8, deadline_ms=now_ms() + 10_000,
                          transport="cuda_ipc", handle={"arena": ch.arena_id, "offset": (1 << 20) - 64, "nbytes": 128})
        c.sock.send(encode_header(h))
        assert decode_header(c._recv(10)[0], max_message_bytes=1 << 30).code == "bad_handle"
        x = torch.ones(4, 8, device="cuda")
        assert torch.equal(c.roundtrip(x), x)  # still serving
    finally:
        c.close()
