"""Broken checkpoints and bad shard inputs fail with clear EaaS errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from eaas.errors import CheckpointError, ShardInputError, UnknownFunction, UnsupportedArchitecture
from eaas.functions import inspect_checkpoint, load_shard, write_tiny_checkpoint

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("mixtral"), hidden=32, experts=4)


@pytest.fixture
def copy(tiny, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny, dst)
    return dst


def test_truncated_file(copy):
    f = copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        inspect_checkpoint(copy)
    with pytest.raises(CheckpointError, match="truncated"):
        load_shard(copy, [(0, 0)])
    f.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="truncated"):
        inspect_checkpoint(copy)


def test_missing_tensor(copy):
    f = copy / "model.safetensors"
    tensors = load_file(str(f))
    gone = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    del tensors[gone]
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing tensor.*experts.3.w2"):
        inspect_checkpoint(copy)
    with pytest.raises(CheckpointError, match="missing tensor.*experts.3.w2"):
        load_shard(copy, [(1, 3)])
    load_shard(copy, [(1, 2)])  # the other experts still load


def test_no_expert_tensors_at_all(copy):
    f = copy / "model.safetensors"
    tensors = {k: v for k, v in load_file(str(f)).items() if "experts" not in k}
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="neither.*fused.*per expert"):
        inspect_checkpoint(copy)


def test_shape_mismatch_with_config(copy):
    cfg = json.loads((copy / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"shape \[64, 32\], config implies \[48, 32\]"):
        inspect_checkpoint(copy)
    with pytest.raises(CheckpointError, match="config implies"):
        load_shard(copy, [(0, 0)])


def test_missing_files(copy, tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        inspect_checkpoint(tmp_path / "nope")
    (copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        inspect_checkpoint(copy)
    (copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        inspect_checkpoint(copy)


def test_missing_shard_file(tmp_path):
    path = write_tiny_checkpoint("olmoe", tmp_path, hidden=32, experts=4, max_shard_size=30_000)
    sorted(path.glob("model-*.safetensors"))[-1].unlink()
    with pytest.raises(CheckpointError, match="file not found"):
        inspect_checkpoint(path)


def test_unsupported_architecture(copy):
    cfg = json.loads((copy / "config.json").read_text())
    cfg["model_type"] = "llama"
    cfg["architectures"] = ["LlamaForCausalLM"]
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitecture, match="'llama'.*LlamaForCausalLM"):
        inspect_checkpoint(copy)
    with pytest.raises(UnsupportedArchitecture, match="llama"):
        write_tiny_checkpoint("llama", copy / "x")


def test_expert_not_in_checkpoint(tiny):
    with pytest.raises(CheckpointError, match=r"no routed expert \(1, 4\)"):
        load_shard(tiny, [(1, 4)])
    with pytest.raises(CheckpointError, match=r"no routed expert \(2, 0\)"):
        load_shard(tiny, [(2, 0)])
    with pytest.raises(ShardInputError):
        load_shard(tiny, [])


def test_bad_shard_inputs(tiny):
    shard = load_shard(tiny, [(0, 1), (1, 2)], model="tiny")
    x = torch.randn(4, 32)
    with pytest.raises(UnknownFunction, match=r"\(0, 2\).*'tiny'"):
        shard.forward(x, [((0, 2), 4)])
    with pytest.raises(ShardInputError, match="cover 3 rows, x has 4"):
        shard.forward(x, [((0, 1), 3)])
    with pytest.raises(ShardInputError, match=r"shape \[4, 16\], expected \[N, 32\]"):
        shard.forward(torch.randn(4, 16), [((0, 1), 4)])
    with pytest.raises(ShardInputError, match="dtype bfloat16, expected float32"):
        shard.forward(x.bfloat16(), [((0, 1), 4)])
    with pytest.raises(ShardInputError, match="malformed segment"):
        shard.forward(x, [(0, 1, 4)])
    with pytest.raises(ShardInputError, match="negative"):
        shard.forward(x, [((0, 1), -1), ((1, 2), 5)])
    with pytest.raises(ShardInputError, match="torch.Tensor"):
        shard.forward(x.numpy(), [((0, 1), 4)])


def test_no_meta_weights_left(tiny):
    shard = load_shard(tiny, [(0, 0), (0, 3)])
    for layer in (0,):
        for name, p in shard.module(layer).named_parameters():
            assert not p.is_meta and p.device.type == "cpu", name
            assert p.shape[0] == 2
