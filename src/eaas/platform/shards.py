"""Shards: which functions a worker hosts (pure functions, no I/O).

A shard SPEC names ``(layer, expert)`` pairs of one model as items
``LAYERS:EXPERTS`` separated by ``;`` (or spaces), each side a comma list of
numbers and ranges ``a-b`` (inclusive) or ``*`` (all). Examples::

    all            every expert of every MoE layer
    *:0-3          experts 0..3 of every MoE layer
    0:1,5;2-3:*    experts 1 and 5 of layer 0, all experts of layers 2 and 3

:func:`plan_pool` splits a model into shard groups so that every expert has at
least ``replicas`` replicas on ``workers`` workers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from eaas.errors import ConfigError

_ITEM = re.compile(r"^\s*([*\d,\- ]+)\s*:\s*([*\d,\- ]+)\s*$")


def _parse_side(text: str, universe: Sequence[int], what: str, spec: str) -> list[int]:
    text = text.strip()
    if text == "*":
        return list(universe)
    out: list[int] = []
    allowed = set(universe)
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ConfigError(f"shard spec {spec!r}: bad {what} {part!r} (use N, A-B or *)")
        a, b = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
        if b < a:
            raise ConfigError(f"shard spec {spec!r}: empty range {part!r}")
        for v in range(a, b + 1):
            if v not in allowed:
                raise ConfigError(f"shard spec {spec!r}: {what} {v} does not exist (valid: {_ranges(universe)})")
            out.append(v)
    return out


def _ranges(values: Sequence[int]) -> str:
    vals = sorted(values)
    if not vals:
        return "none"
    return f"{vals[0]}-{vals[-1]}" if vals == list(range(vals[0], vals[-1] + 1)) else ",".join(map(str, vals))


def parse_shard_spec(spec: str, moe_layers: Sequence[int], num_experts: int) -> list[tuple[int, int]]:
    """Expand a shard SPEC into sorted, unique ``(layer, expert)`` pairs.

    Args:
        spec: the SPEC (see module docstring).
        moe_layers: decoder layers that have routed experts.
        num_experts: routed experts per MoE layer.

    Raises:
        ConfigError: malformed spec, a layer without experts, an expert out of range, or an empty shard.
    """
    experts = list(range(num_experts))
    if spec.strip().lower() in ("all", "*"):
        pairs = {(l, e) for l in moe_layers for e in experts}
    else:
        pairs = set()
        for item in re.split(r"[;\s]+(?=[*\d][*\d,\-]*\s*:)", spec.strip()):
            if not item.strip():
                continue
            m = _ITEM.match(item)
            if not m:
                raise ConfigError(f"shard spec {spec!r}: bad item {item!r} (use LAYERS:EXPERTS, e.g. '*:0-3')")
            layers = _parse_side(m.group(1), moe_layers, "layer", spec)
            exps = _parse_side(m.group(2), experts, "expert", spec)
            pairs.update((l, e) for l in layers for e in exps)
    if not pairs:
        raise ConfigError(f"shard spec {spec!r} selects no expert")
    return sorted(pairs)


@dataclass(frozen=True, slots=True)
class ShardPlan:
    """One worker slot of a pool plan: its shard group name and spec."""

    shard_name: str
    spec: str


def plan_pool(num_experts: int, workers: int, replicas: int = 2) -> list[ShardPlan]:
    """Split experts into shard groups so each expert has >= ``replicas`` replicas.

    ``G = max(1, workers // replicas)`` groups, each hosting a contiguous range of
    expert indices in every MoE layer; workers are dealt to groups round-robin, so
    every group gets ``>= replicas`` workers.

    Raises:
        ConfigError: ``workers < replicas`` (the replica count cannot be met) or bad sizes.
    """
    if num_experts < 1 or replicas < 1:
        raise ConfigError(f"plan_pool: num_experts={num_experts} and replicas={replicas} must be >= 1")
    if workers < replicas:
        raise ConfigError(f"{workers} worker(s) cannot give every expert {replicas} replicas")
    groups = max(1, min(workers // replicas, num_experts))
    bounds = [round(i * num_experts / groups) for i in range(groups + 1)]
    specs = [f"*:{bounds[g]}-{bounds[g + 1] - 1}" for g in range(groups)]
    return [ShardPlan(f"shard-{w % groups}", specs[w % groups]) for w in range(workers)]
