"""Memory: loading a quarter of one layer's experts reads only those experts."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from eaas.functions import write_tiny_checkpoint

# ~400 MB checkpoint: 2 layers x 8 experts x 3 x 1024 x 2048 fp32 (25 MB per expert)
BIG = dict(layers=2, hidden=1024, intermediate=2048, experts=8, top_k=2)

CHILD = textwrap.dedent(
    """
    import json, sys, gc
    import psutil, torch
    torch.set_num_threads(1)
    from eaas.functions import load_shard, open_checkpoint
    from eaas.functions.loader import build_meta_experts
    path = sys.argv[1]
    ckpt = open_checkpoint(path)                       # imports transformers + the experts class
    build_meta_experts(ckpt.family, ckpt.config, 2)
    gc.collect()
    proc = psutil.Process()
    before = proc.memory_info().rss
    shard = load_shard(ckpt, [(1, 2), (1, 5)])          # a quarter of layer 1, not contiguous
    gc.collect()
    after = proc.memory_info().rss
    y = shard.forward(torch.randn(4, 1024), [((1, 2), 2), ((1, 5), 2)])
    print(json.dumps({"before": before, "after": after, "nbytes": shard.nbytes, "finite": bool(torch.isfinite(y).all())}))
    """
)


@pytest.fixture(scope="session")
def big_checkpoint(tmp_path_factory):
    return write_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("big"), **BIG)


def test_rss_grows_by_hosted_bytes_only(big_checkpoint):
    size = (big_checkpoint / "model.safetensors").stat().st_size
    assert size >= 200 << 20
    r = subprocess.run([sys.executable, "-c", CHILD, str(big_checkpoint)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["nbytes"] == 2 * 3 * 1024 * 2048 * 4
    assert m["finite"]
    growth = m["after"] - m["before"]
    print(f"rss growth {growth / m['nbytes']:.3f}x hosted bytes")
    assert growth <= 1.25 * m["nbytes"], f"RSS grew {growth / 2**20:.1f} MiB for {m['nbytes'] / 2**20:.1f} MiB of experts"
