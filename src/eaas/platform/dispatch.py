"""Dispatch and combine policy (pure functions, no I/O).

Legend: ``T`` tokens, ``K`` top-k, ``D`` hidden, ``E`` routed experts per layer.

The grouping and the combine order mirror transformers' eager experts loop
(``MixtralExperts.forward`` and siblings in transformers 5): experts in
ascending id, and for each expert the rows of ``torch.where(expert_mask[e])``
— ``(top_k_pos, token_idx)`` in k-major order — then
``out.index_add_(0, token_idx, (y * w[token_idx, top_k_pos, None]).to(out.dtype))``.
Doing the same steps in the same order makes the EaaS result equal the
monolithic one whenever the workers return the same ``f_e(x)``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class ExpertRows:
    """The rows one expert receives in a layer call.

    Attributes:
        expert: expert id in ``[0, E)``.
        token_idx: ``[n]`` int64 token index of each row.
        top_k_pos: ``[n]`` int64 top-k slot of each row.
    """

    expert: int
    token_idx: torch.Tensor
    top_k_pos: torch.Tensor


def plan_layer(top_k_index: torch.Tensor, num_experts: int) -> list[ExpertRows]:
    """Group the ``(token, slot)`` pairs of a layer call by expert, in eager order.

    Args:
        top_k_index: ``[T, K]`` integer expert ids; ids outside ``[0, E)`` (the
            expert-parallel masking id ``E``, or -1) are skipped as transformers does.
        num_experts: ``E``.

    Returns:
        One entry per expert hit, ascending expert id; rows in k-major order.
    """
    t, k = top_k_index.shape
    flat = top_k_index.t().reshape(-1).to(torch.int64)  # [K*T], position p = slot*T + token
    order = torch.argsort(flat, stable=True)
    sorted_ids = flat[order]
    experts, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    out: list[ExpertRows] = []
    start = 0
    for e, c in zip(experts.tolist(), counts.tolist()):
        pos = order[start : start + c]
        start += c
        if e < 0 or e >= num_experts:
            continue
        out.append(ExpertRows(expert=int(e), token_idx=pos % t, top_k_pos=pos // t))
    return out


def combine(
    hidden_states: torch.Tensor,
    plan: Sequence[ExpertRows],
    y: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """``out[t] = sum_k w[t,k] * f_{e[t,k]}(x[t])`` in the eager loop's order and dtype.

    Args:
        hidden_states: ``[T, D]`` (gives the output's shape and dtype).
        plan: from :func:`plan_layer`.
        y: ``[sum(n), D]`` expert outputs, the plan's rows concatenated in plan order.
        top_k_weights: ``[T, K]`` routing weights.

    Returns:
        ``[T, D]`` in ``hidden_states.dtype``.
    """
    out = torch.zeros_like(hidden_states)
    row = 0
    for rows in plan:
        n = rows.token_idx.numel()
        cur = y[row : row + n] * top_k_weights[rows.token_idx, rows.top_k_pos, None]
        out.index_add_(0, rows.token_idx, cur.to(out.dtype))
        row += n
    return out


def choose_replica(
    candidates: Sequence[str],
    load: Mapping[str, int],
    rng: random.Random,
    exclude: frozenset[str] | set[str] = frozenset(),
) -> str | None:
    """Pick a replica: least outstanding tokens; power-of-two choices when more than two.

    Args:
        candidates: ids of ready replicas hosting the function.
        load: outstanding tokens per worker (this client's in-flight rows plus the
            queue depth the worker last reported).
        rng: random source (ties and the two samples).
        exclude: workers that already failed in this call.

    Returns:
        A worker id, or None when every candidate is excluded.
    """
    c = [w for w in candidates if w not in exclude]
    if not c:
        return None
    if len(c) > 2:
        c = rng.sample(c, 2)
    best = min(load.get(w, 0) for w in c)
    ties = [w for w in c if load.get(w, 0) == best]
    return ties[0] if len(ties) == 1 else rng.choice(ties)
