"""Specs, ids and per-family knowledge."""

from __future__ import annotations

import json

import pytest
import torch

from eaas.errors import InvalidFunctionId, InvalidSpec, UnsupportedArchitecture
from eaas.functions import SUPPORTED_MODEL_TYPES, FunctionSpec, ModelSpec, experts_modules, function_id, get_family, inspect_checkpoint, parse_function_id, write_tiny_checkpoint
from eaas.functions.checkpoint import tiny_config

torch.set_num_threads(1)


def test_function_ids_round_trip():
    assert function_id("mix", 3, 7) == "mix/3/7"
    assert parse_function_id("mix/3/7") == ("mix", 3, 7)


@pytest.mark.parametrize("bad", ["mix/3", "mix/a/1", "/1/2", "mix/1/2/3", "mix/-1/2", "", None])
def test_bad_function_ids(bad):
    with pytest.raises(InvalidFunctionId, match="expected 'model/layer/expert'"):
        parse_function_id(bad)


@pytest.mark.parametrize("args", [("a/b", 0, 0), ("", 0, 0), ("m", -1, 0), ("m", 0, True)])
def test_bad_function_id_parts(args):
    with pytest.raises(InvalidFunctionId):
        function_id(*args)


def test_specs_json_round_trip(tmp_path):
    path = write_tiny_checkpoint("deepseek_v3", tmp_path / "ds", hidden=32, experts=4)
    model, fns = inspect_checkpoint(path, name="ds")
    assert ModelSpec.from_dict(json.loads(json.dumps(model.to_dict()))) == model
    assert FunctionSpec.from_dict(json.loads(json.dumps(fns[0].to_dict()))) == fns[0]
    assert model.function_ids() == [f.id for f in fns]
    assert model.num_functions == len(fns) == 2 * 4
    with pytest.raises(InvalidSpec, match="missing fields"):
        ModelSpec.from_dict({"name": "x"})
    with pytest.raises(AttributeError):
        model.name = "y"  # frozen


def test_unsupported_family():
    with pytest.raises(UnsupportedArchitecture, match="'llama'"):
        get_family("llama")
    assert set(SUPPORTED_MODEL_TYPES) >= {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"}


def _meta_model(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("arch", SUPPORTED_MODEL_TYPES)
def test_family_knowledge_matches_transformers(arch):
    """moe_layers, module path, expert class and count attribute agree with a built model."""
    family = get_family(arch)
    config = tiny_config(arch, layers=3, hidden=32, intermediate=48, experts=6, top_k=2, vocab_size=300, eos_token_id=0, pad_token_id=1)
    if arch in ("qwen2_moe", "qwen3_moe"):
        config.mlp_only_layers = [1]
    model = _meta_model(config)
    mods = experts_modules(model)
    assert sorted(mods) == family.moe_layers(config)
    expected = {"deepseek_v3": [1, 2, 3], "qwen2_moe": [0, 2], "qwen3_moe": [0, 2]}.get(arch, [0, 1, 2])
    assert sorted(mods) == expected
    for layer, m in mods.items():
        assert type(m) is family.load_experts_class()
        assert m.num_experts == family.num_experts(config) == 6
        assert model.get_submodule(family.router_path.format(layer=layer)) is not None
    assert experts_modules(model.model).keys() == mods.keys()  # bare decoder too
