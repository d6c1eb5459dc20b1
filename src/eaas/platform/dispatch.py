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

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


#: at most this many (token, slot) pairs are grouped in Python; beyond, with tensor ops
SMALL_PLAN_PAIRS = 256


@dataclass(frozen=True, slots=True)
class LayerPlan:
    """The rows each expert receives in a layer call, and how to combine their outputs.

    ``R`` is the number of valid ``(token, slot)`` pairs; the expert outputs ``y[R, D]``
    come in *plan order*: experts ascending, and each expert's rows in k-major order.

    Attributes:
        experts: expert ids hit, ascending.
        counts: rows per expert (same order).
        token_idx: ``[R]`` int64 token of each row, plan order (``token_idx[start:start+n]``
            is one expert's rows).
        weight_idx: ``[R]`` int64 index of each row's weight in ``top_k_weights.reshape(-1)``
            (``token * K + slot``).
        rounds: the accumulation rounds of :func:`combine`: round ``j`` adds, for every token,
            the output of its ``j``-th expert (ascending id); ``(rows of y [m], tokens [m])``
            as int64 tensors, or as two slices when the rows are consecutive and the tokens
            are ``0..m-1`` (every round of a lone token).
        by_expert: :meth:`expert_rows` built with the plan (cached tensors; decode-sized plans),
            or empty when it is sliced from ``token_idx`` on demand.
        weight_pos: ``weight_idx`` as Python ints (plans grouped in Python; empty otherwise).
    """

    experts: tuple[int, ...]
    counts: tuple[int, ...]
    token_idx: torch.Tensor
    weight_idx: torch.Tensor
    rounds: tuple[tuple[torch.Tensor, torch.Tensor] | tuple[slice, slice], ...]
    by_expert: tuple[tuple[int, torch.Tensor], ...] = ()
    weight_pos: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.experts)

    def expert_rows(self) -> Sequence[tuple[int, torch.Tensor]]:
        """``(expert, token indices [n])`` per expert, plan order (read-only; views of ``token_idx``
        or cached tensors of the same values)."""
        if self.by_expert:
            return self.by_expert
        out, start = [], 0
        for e, n in zip(self.experts, self.counts):
            out.append((e, self.token_idx[start : start + n]))
            start += n
        return out


#: plans of calls with at most this many (token, slot) pairs are kept, by their expert ids
_PLAN_CACHE_PAIRS = 16
_PLAN_CACHE: dict[tuple[int, ...], LayerPlan] = {}
_PLAN_CACHE_MAX = 4096

#: small index tensors recur call after call at decode ([0], [0, 1], ...): built once each
_INDEX_CACHE: dict[tuple[int, ...], torch.Tensor] = {}
_INDEX_CACHE_MAX = 4096
_INDEX_CACHE_LEN = 16  # lists longer than this are not cached


def _tensor(values: list[int]) -> torch.Tensor:
    """``values`` as an int64 tensor; short ones come from a cache (callers only read them)."""
    if len(values) > _INDEX_CACHE_LEN:
        return torch.tensor(values, dtype=torch.int64)
    key = tuple(values)
    t = _INDEX_CACHE.get(key)
    if t is None:
        if len(_INDEX_CACHE) >= _INDEX_CACHE_MAX:
            _INDEX_CACHE.clear()
        with torch.inference_mode(False):
            t = _INDEX_CACHE[key] = torch.tensor(values, dtype=torch.int64)
    return t


def plan_layer(top_k_index: torch.Tensor, num_experts: int) -> LayerPlan:
    """Group the ``(token, slot)`` pairs of a layer call by expert, in eager order.

    Args:
        top_k_index: ``[T, K]`` integer expert ids; ids outside ``[0, E)`` (the
            expert-parallel masking id ``E``, or -1) are skipped as transformers does.
        num_experts: ``E``.

    Returns:
        The :class:`LayerPlan` (read-only: plans of decode-sized calls, ``T*K <= 16``, are
        cached by their expert ids and shared). Small calls (``T*K <= SMALL_PLAN_PAIRS``) are
        grouped in Python: a handful of small tensors instead of a dozen tensor ops.
    """
    t, k = top_k_index.shape
    if t * k <= SMALL_PLAN_PAIRS:
        if t * k > _PLAN_CACHE_PAIRS:
            return _plan_small(top_k_index.tolist(), t, k, num_experts)
        key = (t, k, num_experts, *top_k_index.reshape(-1).tolist())  # decode: the same choices recur
        plan = _PLAN_CACHE.get(key)
        if plan is None:
            if len(_PLAN_CACHE) >= _PLAN_CACHE_MAX:
                _PLAN_CACHE.clear()
            plan = _PLAN_CACHE[key] = _plan_small(top_k_index.tolist(), t, k, num_experts)
        return plan
    flat = top_k_index.t().reshape(-1).to(torch.int64)  # [K*T], position p = slot*T + token
    order = torch.argsort(flat, stable=True)
    sorted_ids = flat[order]
    keep = (sorted_ids >= 0) & (sorted_ids < num_experts)
    order, sorted_ids = order[keep], sorted_ids[keep]
    experts, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    token_idx, slot = order % t, order // t
    return LayerPlan(tuple(experts.tolist()), tuple(counts.tolist()), token_idx, token_idx * k + slot,
                     _rounds_tensor(token_idx, k))


def _plan_small(ids: list[list[int]], t: int, k: int, num_experts: int) -> LayerPlan:
    buckets: dict[int, list[int]] = {}
    for slot in range(k):
        for tok in range(t):
            e = ids[tok][slot]
            if 0 <= e < num_experts:
                buckets.setdefault(e, []).append(tok * k + slot)
    experts = sorted(buckets)
    pairs = [p for e in experts for p in buckets[e]]  # token * K + slot, plan order
    seen: dict[int, int] = {}
    rounds: list[tuple[list[int], list[int]]] = []
    tokens = []
    for row, p in enumerate(pairs):
        tok = p // k
        tokens.append(tok)
        j = seen.get(tok, 0)
        seen[tok] = j + 1
        if j == len(rounds):
            rounds.append(([], []))
        rounds[j][0].append(row)
        rounds[j][1].append(tok)
    by_expert, start = [], 0
    for e in experts:
        n = len(buckets[e])
        by_expert.append((e, _tensor(tokens[start : start + n])))
        start += n
    return LayerPlan(tuple(experts), tuple(len(buckets[e]) for e in experts), _tensor(tokens), _tensor(pairs),
                     tuple(_round(r, tk) for r, tk in rounds), tuple(by_expert), tuple(pairs))


def _round(rows: list[int], tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor] | tuple[slice, slice]:
    """One combine round: slices when its rows are consecutive and its tokens are ``0..m-1``
    (a lone decode token's rounds: no index tensors, no gathers), else index tensors."""
    m = len(rows)
    if tokens == list(range(m)) and rows == list(range(rows[0], rows[0] + m)):
        return slice(rows[0], rows[0] + m), slice(0, m)
    return _tensor(rows), _tensor(tokens)


def _rounds_tensor(token_idx: torch.Tensor, k: int) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """Rounds of :class:`LayerPlan` with tensor ops: the rank of each row among its token's rows."""
    r = token_idx.numel()
    if r == 0:
        return ()
    by_token = torch.argsort(token_idx, stable=True)  # rows grouped by token, plan order kept
    _, counts = torch.unique_consecutive(token_idx[by_token], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(r) - torch.repeat_interleave(starts, counts)
    rank = torch.empty_like(rank_sorted)
    rank[by_token] = rank_sorted
    rounds = []
    for j in range(int(counts.max())):
        rows = (rank == j).nonzero().squeeze(1)
        rounds.append((rows, token_idx[rows]))
    return tuple(rounds)


def combine(
    hidden_states: torch.Tensor,
    plan: LayerPlan,
    y: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """``out[t] = sum_k w[t,k] * f_{e[t,k]}(x[t])`` with the eager loop's arithmetic.

    The eager loop computes ``cur = y_e * w[token_idx, top_k_pos, None]`` per expert and
    ``out.index_add_(0, token_idx, cur.to(out.dtype))`` for experts in ascending id, from
    zeros. Here the products are one broadcast multiply over all rows (the same
    elementwise products), and the sums run in rounds: round ``j`` adds every token's
    ``j``-th expert — per token the same additions in the same order, so the result is
    bit-identical, in ``K`` ``index_add_`` calls instead of one per expert.

    Args:
        hidden_states: ``[T, D]`` (gives the output's shape and dtype).
        plan: from :func:`plan_layer`.
        y: ``[R, D]`` expert outputs in plan order (on ``hidden_states``' device).
        top_k_weights: ``[T, K]`` routing weights (same device; the plan's indices follow it).

    Returns:
        ``[T, D]`` in ``hidden_states.dtype``.
    """
    out = torch.zeros_like(hidden_states)
    dev = out.device
    widx = plan.weight_idx
    if widx.device != dev:
        widx = widx.to(dev)
    cur = y * top_k_weights.reshape(-1).index_select(0, widx).unsqueeze(1)
    if cur.dtype != out.dtype:
        cur = cur.to(out.dtype)
    t = out.shape[0]
    for rows, tokens in plan.rounds:
        if isinstance(rows, slice):  # the same additions, without index tensors
            (out if tokens.start == 0 and tokens.stop == t else out[tokens]).add_(cur[rows])
        else:
            out.index_add_(0, tokens.to(dev), cur.index_select(0, rows.to(dev)))
    return out


def combine_rows(
    hidden_states: torch.Tensor,
    plan: LayerPlan,
    rows: list[torch.Tensor],
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """:func:`combine` for one token whose ``R`` expert outputs come as ``R`` separate rows.

    A decode step's replies stay in their slots, one ``[1, D]`` row per expert; joining
    them (``torch.cat``) only to index them apart again cost about half of
    :func:`combine`'s time at D=256 (measured: 49 vs 27 µs per call). With one token every
    round of :func:`combine` adds one row, in plan order, so this adds
    ``rows[r] * w[weight_idx[r]]`` for ``r = 0..R-1`` to zeros: the same products and the
    same additions in the same order, hence the same bits.

    Args:
        hidden_states: ``[1, D]`` (gives the output's shape and dtype).
        plan: from :func:`plan_layer` for ``top_k_index[1, K]`` (``weight_pos`` is set).
        rows: ``R`` tensors ``[1, D]``, the expert outputs in plan order (on ``hidden_states``' device).
        top_k_weights: ``[1, K]`` routing weights.

    Returns:
        ``[1, D]`` in ``hidden_states.dtype``.

    Raises:
        ValueError: not one token, or ``rows`` does not match the plan.
    """
    if hidden_states.shape[0] != 1 or len(rows) != len(plan.weight_pos):
        raise ValueError(f"combine_rows needs one token and one row per planned pair; got T={hidden_states.shape[0]},"
                         f" {len(rows)} rows for {len(plan.weight_pos)} pairs")
    out = torch.zeros_like(hidden_states)
    w = top_k_weights.reshape(-1, 1)  # [K, 1]: w[s] is a [1] tensor, broadcast over the row
    for row, pos in zip(rows, plan.weight_pos):
        cur = row * w[pos]
        out.add_(cur if cur.dtype == out.dtype else cur.to(out.dtype))
    return out


class RecentTokens:
    """Rows sent lately per key (``(worker id, layer)``): a count that halves every ``half_life_s`` seconds.

    The replica choice adds it to the outstanding rows, so that with nothing in
    flight (light load, where outstanding counts are 0 and every choice a tie) the
    replica whose worker served the fewest rows *of that layer* lately gets the next
    ones. A hot expert's rows thus spread over its replicas by each replica's load in
    the layer, which is how an extra replica on a worker that is cold in that layer
    takes its share (the policy side is
    :func:`eaas.platform.autoscale.policy.plan_extra_replicas`). Time is passed in
    (monotonic seconds). Updates from several threads may lose an increment now
    and then; the count only steers a choice.
    """

    __slots__ = ("half_life_s", "_values")

    def __init__(self, half_life_s: float = 1.0) -> None:
        if half_life_s <= 0:
            raise ValueError(f"half_life_s must be > 0, got {half_life_s}")
        self.half_life_s = half_life_s
        self._values: dict[object, tuple[float, float]] = {}  # key -> (count, at)

    def get(self, key: object, now: float) -> float:
        """The decayed count of ``key`` at ``now`` (rows)."""
        v = self._values.get(key)
        if v is None:
            return 0.0
        return v[0] * math.exp2(-(now - v[1]) / self.half_life_s)

    def add(self, key: object, rows: int, now: float) -> None:
        """Count ``rows`` more sent for ``key`` at ``now``."""
        self._values[key] = (self.get(key, now) + rows, now)


_LAYERS: dict[str, str] = {}


def layer_key(fid: str) -> str:
    """The layer part of a function id ``{model}/{layer}/{expert}`` (memoised; for :class:`RecentTokens` keys)."""
    layer = _LAYERS.get(fid)
    if layer is None:
        if len(_LAYERS) > 65536:
            _LAYERS.clear()
        layer = _LAYERS[fid] = fid.rsplit("/", 2)[-2] if fid.count("/") >= 2 else ""
    return layer


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
