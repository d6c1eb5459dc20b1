"""Both checkpoint layouts and sharded indexes load to identical experts."""

from __future__ import annotations

import json

import pytest
import torch

from eaas.functions import inspect_checkpoint, load_shard, write_tiny_checkpoint
from eaas.functions.storage import INDEX_FILE

torch.set_num_threads(1)

# (family, the layout transformers does not write for it)
CASES = [("mixtral", "fused"), ("qwen3_moe", "fused"), ("gpt_oss", "per_expert")]


@pytest.mark.parametrize("arch,other", CASES)
def test_layouts_and_shards_agree(tmp_path, arch, other):
    kw = dict(hidden=32, experts=4, seed=3)
    native = write_tiny_checkpoint(arch, tmp_path / "native", **kw)
    converted = write_tiny_checkpoint(arch, tmp_path / "other", layout=other, **kw)
    sharded = write_tiny_checkpoint(arch, tmp_path / "sharded", layout=other, max_shard_size=20_000, **kw)
    index = json.loads((sharded / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 2

    specs = {p.name: inspect_checkpoint(p, name="m") for p in (native, converted, sharded)}
    assert specs["other"][0].layout == other and specs["sharded"][0].layout == other
    assert specs["native"][0].layout != other
    # same bytes per expert in every layout: the checksum is layout-independent
    sums = {k: [f.checksum for f in fns] for k, (_, fns) in specs.items()}
    assert sums["native"] == sums["other"] == sums["sharded"]
    assert [f.nbytes for f in specs["native"][1]] == [f.nbytes for f in specs["sharded"][1]]

    hosted = [(0, 3), (1, 0), (1, 2)]
    segments = [((1, 2), 4), ((0, 3), 3), ((1, 0), 5)]
    x = torch.randn(12, 32, generator=torch.Generator().manual_seed(0))
    outs = [load_shard(p, hosted).forward(x, segments) for p in (native, converted, sharded)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_cast_dtype_at_load(tmp_path):
    path = write_tiny_checkpoint("olmoe", tmp_path, hidden=32, experts=4)
    shard = load_shard(path, [(0, 1)], dtype="bfloat16")
    assert shard.dtype == torch.bfloat16
    assert shard.nbytes == 3 * 32 * 64 * 2
    y = shard.forward(torch.randn(3, 32, dtype=torch.bfloat16), [((0, 1), 3)])
    assert y.dtype == torch.bfloat16


def test_checksum_is_sha256_of_expert_bytes(tmp_path):
    import hashlib

    from safetensors import safe_open

    path = write_tiny_checkpoint("mixtral", tmp_path, hidden=32, experts=4)
    _, fns = inspect_checkpoint(path)
    f = next(fn for fn in fns if fn.layer == 1 and fn.expert == 2)
    digest = hashlib.sha256()
    with safe_open(str(path / "model.safetensors"), "pt") as st:
        for name in f.tensors:
            digest.update(st.get_tensor(name).numpy().tobytes())
    assert f.checksum == digest.hexdigest()
    assert f.tensors == [f"model.layers.1.block_sparse_moe.experts.2.{w}.weight" for w in ("w1", "w3", "w2")]
    assert len({fn.checksum for fn in fns}) == len(fns)
