"""NIXL transport through a real echo worker process (skips only without the library)."""

from __future__ import annotations


import pytest
import torch

from eaas.platform.transport.nixl import nixl_available

pytestmark = pytest.mark.skipif(not nixl_available(), reason="NIXL (pip install nixl-cu12) is not installed")

from test_transport import _bits, _carry, echo_ipc_endpoint, start_echo, stop  # noqa: E402


@pytest.fixture(scope="module")
def echo_nixl():
    proc, ep = start_echo(echo_ipc_endpoint())
    yield ep
    stop(proc)


def test_nixl_bit_identical(echo_nixl):
    _carry(echo_nixl, "nixl")


def test_nixl_capability_advertised():
    from eaas.platform.transport import local_capabilities

    caps = local_capabilities()
    assert caps["nixl"] is True and "nixl" in caps["transports"]


def test_nixl_many_round_trips_reuse_slots(echo_nixl):
    from eaas.bench.echo import PairClient

    c = PairClient(echo_nixl, "nixl", arena_bytes=1 << 20)
    try:
        c.connect(timeout_s=30)
        for i in range(50):
            x = torch.full((64, 128), float(i), dtype=torch.bfloat16)
            assert torch.equal(_bits(c.roundtrip(x)), _bits(x))
        assert c.channel._alloc.used_bytes == 0
    finally:
        c.close()
