"""Placement of extra replicas of hot experts (pure functions, no I/O): vLLM EPLB's goal, live.

Legend: a *placement* maps worker id -> the function ids (``{model}/{layer}/{expert}``)
it hosts; *rates* map function id -> tokens/s routed to it (summed over replicas).

* :func:`predicted_loads`: per layer, per worker, the tokens/s it would serve if each
  function's tokens spread evenly over its replicas (what the client's per-(worker,
  layer) replica choice approaches, :class:`eaas.platform.dispatch.RecentTokens`).
* :func:`layer_balancedness`: vLLM EPLB's balancedness over those loads.
* :func:`plan_extra_replicas`: greedy additions that raise it (the decision, its delays
  and hysteresis are in :mod:`eaas.platform.autoscale.policy`).
"""

from __future__ import annotations

from collections.abc import Mapping

from eaas.functions.spec import parse_function_id


def layer_of(fid: str, cache: dict[str, int] = {}) -> int:  # noqa: B006 - a deliberate memo
    """The layer of a function id ``{model}/{layer}/{expert}`` (memoised).

    Raises:
        InvalidFunctionId: not of that form.
    """
    layer = cache.get(fid)
    if layer is None:
        layer = cache[fid] = parse_function_id(fid)[1]
    return layer


def predicted_loads(rates: Mapping[str, float], hosts: Mapping[str, frozenset[str]]) -> dict[int, dict[str, float]]:
    """Per MoE layer, per worker hosting a function of it: tokens/s it would serve, each
    function's rate split evenly over the workers hosting it (functions no worker hosts drop out)."""
    by_fn: dict[str, list[str]] = {}
    out: dict[int, dict[str, float]] = {}
    for wid, fids in hosts.items():
        for fid in fids:
            by_fn.setdefault(fid, []).append(wid)
            out.setdefault(layer_of(fid), {}).setdefault(wid, 0.0)
    for fid, wids in by_fn.items():
        share = max(rates.get(fid, 0.0), 0.0) / len(wids)
        layer = out[layer_of(fid)]
        for wid in wids:
            layer[wid] += share
    return out


def layer_balancedness(loads: Mapping[int, Mapping[str, float]]) -> float:
    """vLLM EPLB's balancedness: ``sum over layers of mean(load) / sum over layers of max(load)``,
    over the workers taking part in each layer (``vllm/distributed/eplb/eplb_state.py``); 1.0 when idle."""
    mean = sum(sum(per.values()) / len(per) for per in loads.values() if per)
    top = sum(max(per.values()) for per in loads.values() if per)
    return mean / top if top > 0 else 1.0


def balancedness(loads: list[float]) -> float:
    """Mean / max of per-worker loads; 1.0 when all idle or none."""
    top = max(loads, default=0.0)
    return sum(loads) / len(loads) / top if top > 0 else 1.0


def plan_extra_replicas(rates: Mapping[str, float], base: Mapping[str, frozenset[str]], *, target: float,
                        min_gain: float, max_per_worker: int, max_per_function: int,
                        candidates: int = 2) -> dict[str, frozenset[str]]:
    """Extra replicas that lift the predicted :func:`layer_balancedness` (greedy, one at a time).

    Each round looks, in every layer, at the ``candidates`` hottest functions of that
    layer's most loaded worker and the ``candidates`` least loaded workers of the layer
    that do not host them yet, and keeps the single addition that raises the
    balancedness most (only the changed layer is rescored). It stops at ``target``, or when
    the best addition lifts its own layer's share of the sum by less than ``min_gain``
    (the total by less than ``min_gain / layers``).

    Args:
        rates: tokens/s per function id (summed over its replicas).
        base: function ids each ready worker hosts by its shard.
        target: balancedness at which planning stops (0-1].
        min_gain: least rise one more replica must bring to its layer.
        max_per_worker: most extra replicas one worker hosts.
        max_per_function: most extra replicas one function gets.
        candidates: functions and workers tried per layer and round.

    Returns:
        Worker id -> extra function ids (only workers with some).
    """
    extras: dict[str, set[str]] = {w: set() for w in base}
    per_fn: dict[str, int] = {}
    loads = predicted_loads(rates, base)  # kept current as replicas are added
    holders: dict[str, list[str]] = {}
    by_wl: dict[tuple[str, int], list[str]] = {}  # (worker, layer) -> functions it hosts there
    for w, fids in base.items():
        for f in fids:
            holders.setdefault(f, []).append(w)
            by_wl.setdefault((w, layer_of(f)), []).append(f)
    stats = {layer: (sum(per.values()) / len(per), max(per.values())) for layer, per in loads.items() if per}
    sum_mean, sum_max = sum(m for m, _ in stats.values()), sum(x for _, x in stats.values())
    current = sum_mean / sum_max if sum_max > 0 else 1.0

    def with_replica(per: dict[str, float], fid: str, wid: str) -> dict[str, float]:
        """``per`` (one layer's loads) after ``fid`` gets a replica on ``wid``."""
        n = len(holders[fid])
        old_share, new_share = rates[fid] / n, rates[fid] / (n + 1)
        trial = dict(per)
        for w in holders[fid]:
            trial[w] -= old_share - new_share
        trial[wid] += new_share
        return trial

    for _ in range(sum(len(f) for f in base.values()) + 1):
        if current >= target:
            break
        best: tuple[float, str, str, int] | None = None
        for layer, per in loads.items():
            hot = max(per, key=lambda w: (per[w], w))
            fns = sorted((f for f in by_wl.get((hot, layer), ()) if rates.get(f, 0.0) > 0
                          and per_fn.get(f, 0) < max_per_function), key=lambda f: (-rates[f], f))[:candidates]
            for fid in fns:
                cold = sorted((w for w in per if w not in holders[fid] and len(extras[w]) < max_per_worker),
                              key=lambda w: (per[w], w))[:candidates]
                for wid in cold:  # only this layer's loads change: rescore it alone
                    trial = with_replica(per, fid, wid)
                    mean, top = stats[layer]
                    new_max = sum_max - top + max(trial.values())
                    score = (sum_mean - mean + sum(trial.values()) / len(trial)) / new_max if new_max > 0 else 1.0
                    if best is None or (score, wid, fid) > best[:3]:
                        best = (score, wid, fid, layer)
        if best is None or best[0] < current + min_gain / max(1, len(stats)):  # min_gain within one layer
            break
        current, wid, fid, layer = best
        loads[layer] = with_replica(loads[layer], fid, wid)
        holders[fid].append(wid)
        by_wl.setdefault((wid, layer), []).append(fid)
        mean, top = stats[layer]
        stats[layer] = (sum(loads[layer].values()) / len(loads[layer]), max(loads[layer].values()))
        sum_mean += stats[layer][0] - mean
        sum_max += stats[layer][1] - top
        extras[wid].add(fid)
        per_fn[fid] = per_fn.get(fid, 0) + 1
    return {w: frozenset(f) for w, f in extras.items() if f}
