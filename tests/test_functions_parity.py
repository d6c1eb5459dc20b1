"""Parity: a shard's f_e(x) equals the transformers experts module's own per-expert output."""

from __future__ import annotations

import pytest
import torch

from eaas.functions import SUPPORTED_MODEL_TYPES, experts_modules, inspect_checkpoint, load_shard, write_tiny_checkpoint

torch.set_num_threads(1)

TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}


@pytest.fixture(scope="module", params=[(a, d) for a in SUPPORTED_MODEL_TYPES for d in ("float32", "bfloat16")], ids=lambda p: f"{p[0]}-{p[1]}")
def case(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    arch, dtype = request.param
    path = write_tiny_checkpoint(arch, tmp_path_factory.mktemp(f"{arch}-{dtype}"), dtype=dtype, hidden=32, experts=8)
    spec, _ = inspect_checkpoint(path, checksums=False)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), experts_implementation="eager")
    return spec, experts_modules(model.eval()), dtype


def reference(module: torch.nn.Module, x: torch.Tensor, expert: int) -> torch.Tensor:
    """The transformers module's own computation of one expert, weight 1."""
    n = x.shape[0]
    with torch.no_grad():
        return module(x, torch.full((n, 1), expert, dtype=torch.long), torch.ones((n, 1), dtype=x.dtype))


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.float().abs().max().clamp_min(1e-30)
    return ((y.float() - ref.float()).abs().max() / scale).item()


@pytest.mark.parametrize("n", [1, 7, 64])
def test_every_expert_of_a_layer(case, n):
    spec, modules, dtype = case
    dt = getattr(torch, dtype)
    layer = spec.moe_layers[-1]
    shard = load_shard(spec.checkpoint, [(layer, e) for e in range(spec.num_experts)], model=spec.name)
    assert shard.dtype == dt and shard.functions == tuple((layer, e) for e in range(spec.num_experts))
    gen = torch.Generator().manual_seed(n)
    for e in range(spec.num_experts):
        x = torch.randn(n, spec.hidden_size, generator=gen).to(dt)
        y = shard.forward(x, [((layer, e), n)])
        assert y.dtype == dt and y.shape == x.shape
        assert rel_err(y, reference(modules[layer], x, e)) <= TOLERANCE[dtype], (e, n)


def test_mixed_segments_noncontiguous_shard(case):
    """Several layers, experts not contiguous, zero-row segments, an expert in two segments."""
    spec, modules, dtype = case
    dt = getattr(torch, dtype)
    first, last = spec.moe_layers[0], spec.moe_layers[-1]
    hosted = [(last, 1), (last, 4), (last, 6), (first, 3), (first, 7)]
    shard = load_shard(spec.checkpoint, hosted)
    segments = [((last, 6), 5), ((first, 3), 0), ((last, 1), 9), ((first, 7), 3), ((last, 6), 2), ((last, 4), 0), ((first, 3), 11)]
    n = sum(r for _, r in segments)
    x = torch.randn(n, spec.hidden_size, generator=torch.Generator().manual_seed(1)).to(dt)
    y = shard.forward(x, segments)
    start = 0
    for (layer, e), rows in segments:
        if rows:
            ref = reference(modules[layer], x[start : start + rows], e)
            assert rel_err(y[start : start + rows], ref) <= TOLERANCE[dtype], (layer, e)
        start += rows
    assert not shard.has(last, 0) and shard.has(first, 7)


def test_zero_rows(case):
    spec, _, dtype = case
    layer = spec.moe_layers[0]
    shard = load_shard(spec.checkpoint, [(layer, 2)])
    x = torch.empty(0, spec.hidden_size, dtype=getattr(torch, dtype))
    assert shard.forward(x, [((layer, 2), 0)]).shape == (0, spec.hidden_size)
    assert shard.forward(x, []).shape == (0, spec.hidden_size)


@pytest.mark.parametrize("n", [1, 7, 64])
def test_direct_body_is_bit_identical_to_the_eager_forward(case, n):
    """The worker's direct per-expert body (expert_math) gives the eager forward's bits,
    with an expert in several segments, zero-row segments and experts out of order."""
    from eaas.functions.expert_math import expert_body

    spec, _, dtype = case
    dt = getattr(torch, dtype)
    layer = spec.moe_layers[-1]
    shard = load_shard(spec.checkpoint, [(layer, e) for e in range(spec.num_experts)], model=spec.name)
    module = shard.module(layer)
    assert expert_body(module) is not None, type(module).__name__  # every supported family takes the fast path
    assert getattr(module.config, "_experts_implementation", None) in (None, "eager")
    gen = torch.Generator().manual_seed(100 + n)
    order = [5, 2, 5, 0, 7, 2]
    counts = [int(c) for c in torch.bincount(torch.randint(len(order), (n,), generator=gen), minlength=len(order))]
    assert sum(counts) == n
    segments = [((layer, e), c) for e, c in zip(order, counts)]
    x = torch.randn(n, spec.hidden_size, generator=gen).to(dt)
    y = shard.forward(x, segments)
    local = torch.repeat_interleave(torch.tensor(order), torch.tensor(counts))[:, None]
    with torch.no_grad():
        ref = module(x, local, torch.ones((n, 1), dtype=dt))
    assert torch.equal(y, ref), float((y.float() - ref.float()).abs().max())
