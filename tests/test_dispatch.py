"""Dispatch/combine policy: the plan groups rows as transformers' eager experts loop does and
combine's arithmetic is bit-identical to it (pure functions, no processes)."""

from __future__ import annotations

import pytest
import torch

from eaas.platform import dispatch
from eaas.platform.dispatch import combine, plan_layer


def eager_reference(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                    f, num_experts: int) -> torch.Tensor:
    """transformers' eager loop (MixtralExperts.forward, transformers 5), with f(e, rows) the expert."""
    final = torch.zeros_like(x)
    mask = torch.nn.functional.one_hot(top_k_index, num_classes=num_experts + 1).permute(2, 1, 0)
    hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in hit:
        e = int(e[0])
        if e == num_experts:
            continue
        top_k_pos, token_idx = torch.where(mask[e])
        cur = f(e, x[token_idx]) * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, cur.to(final.dtype))
    return final


def experts_fn(num_experts: int, d: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(num_experts, d, d, generator=g).to(dtype)
    return lambda e, rows: torch.tanh(rows @ w[e])


@pytest.mark.parametrize("t", [1, 3, 17, 200])  # 200 * 4 > SMALL_PLAN_PAIRS: the tensor path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plan_and_combine_equal_the_eager_loop_bit_for_bit(t: int, dtype: torch.dtype) -> None:
    e, k, d = 8, 4, 32
    g = torch.Generator().manual_seed(t)
    x = torch.randn(t, d, generator=g).to(dtype)
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    idx[0, 1] = e  # the expert-parallel masking id is skipped
    w = torch.softmax(torch.randn(t, k, generator=g), -1).to(dtype)
    f = experts_fn(e, d, dtype)
    plan = plan_layer(idx, e)
    # y in plan order, as the workers return it
    y = torch.cat([f(ex, x[rows]) for ex, rows in plan.expert_rows()])
    got = combine(x, plan, y, w)
    ref = eager_reference(x, idx, w, f, e)
    assert got.dtype == ref.dtype
    assert torch.equal(got, ref)


def test_small_and_tensor_plans_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(1)
    idx = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(40)])
    small = plan_layer(idx, 6)
    monkeypatch.setattr(dispatch, "SMALL_PLAN_PAIRS", 0)
    big = plan_layer(idx, 6)
    assert small.experts == big.experts and small.counts == big.counts
    assert torch.equal(small.token_idx, big.token_idx) and torch.equal(small.weight_idx, big.weight_idx)
    assert len(small.rounds) == len(big.rounds) == 2
    for (r1, t1), (r2, t2) in zip(small.rounds, big.rounds):
        assert torch.equal(r1, r2) and torch.equal(t1, t2)


def test_decode_plans_are_cached_by_expert_ids() -> None:
    """Decode-sized plans are shared between calls with the same expert ids (and only those)."""
    a, b = plan_layer(torch.tensor([[3, 1]]), 8), plan_layer(torch.tensor([[3, 1]]), 8)
    c = plan_layer(torch.tensor([[1, 3]]), 8)
    assert a is b and c is not a
    assert a.weight_idx.tolist() == [1, 0] and c.weight_idx.tolist() == [0, 1]
    assert [(e, r.tolist()) for e, r in a.expert_rows()] == [(1, [0]), (3, [0])]
    assert plan_layer(torch.tensor([[3, 1]]), 9) is not a  # another expert count: another plan
    idx = torch.tensor([[2, 0], [0, 5], [2, 5]])
    sliced = dispatch.LayerPlan(*[getattr(plan_layer(idx, 6), f) for f in ("experts", "counts", "token_idx",
                                                                          "weight_idx", "rounds")])
    assert [(e, r.tolist()) for e, r in plan_layer(idx, 6).expert_rows()] == \
        [(e, r.tolist()) for e, r in sliced.expert_rows()] == [(0, [1, 0]), (2, [0, 2]), (5, [1, 2])]  # k-major


def test_a_call_with_only_masked_experts_plans_nothing() -> None:
    plan = plan_layer(torch.full((3, 2), 8), 8)
    assert not plan and plan.expert_rows() == []


def test_a_lone_tokens_rounds_are_slices() -> None:
    """Decode of one stream: combine adds slices, no index tensors (bit-identity: the test above, t=1)."""
    plan = plan_layer(torch.tensor([[3, 1]]), 8)
    assert plan.experts == (1, 3)
    assert plan.rounds == ((slice(0, 1), slice(0, 1)), (slice(1, 2), slice(0, 1)))


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_rows_equals_the_eager_loop_bit_for_bit(k: int, dtype: torch.dtype) -> None:
    """A decode step's replies, one [1, D] row per expert and never joined, combine to the eager loop's bits."""
    e, d = 8, 64
    g = torch.Generator().manual_seed(k)
    x = torch.randn(1, d, generator=g).to(dtype)
    idx = torch.randperm(e, generator=g)[:k].unsqueeze(0)
    w = torch.softmax(torch.randn(1, k, generator=g), -1)  # float32 weights with bf16 rows: promoted, then cast
    f = experts_fn(e, d, dtype)
    plan = plan_layer(idx, e)
    rows = [f(ex, x[r]) for ex, r in plan.expert_rows()]
    got = dispatch.combine_rows(x, plan, rows, w)
    ref = eager_reference(x, idx, w, f, e)
    assert got.dtype == ref.dtype and torch.equal(got, ref)
    assert torch.equal(got, combine(x, plan, torch.cat(rows), w))
    if k > 1:  # a missing row is refused, not combined into a wrong sum
        with pytest.raises(ValueError):
            dispatch.combine_rows(x, plan, rows[:-1], w)


def test_combine_rows_skips_a_masked_expert_and_refuses_several_tokens() -> None:
    e, d = 8, 16
    f = experts_fn(e, d, torch.float32)
    x = torch.randn(1, d)
    idx = torch.tensor([[5, e]])  # the expert-parallel masking id: one pair only
    w = torch.tensor([[0.7, 0.3]])
    plan = plan_layer(idx, e)
    assert plan.weight_pos == (0,)
    rows = [f(ex, x[r]) for ex, r in plan.expert_rows()]
    assert torch.equal(dispatch.combine_rows(x, plan, rows, w), eager_reference(x, idx, w, f, e))
    two = plan_layer(torch.tensor([[1, 2], [2, 3]]), e)
    with pytest.raises(ValueError):
        dispatch.combine_rows(torch.randn(2, d), two, [torch.randn(1, d)] * 4, torch.ones(2, 2))
