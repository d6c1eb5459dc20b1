"""Expert load statistics: how unevenly a router spreads tokens over experts.

Pure functions over per-expert token counts, plus :func:`measure_expert_load`,
which runs a transformers MoE on token windows and counts its routers' top-k
choices. Measured on held-out *text*: random token ids overstate skew.

* hottest fraction = (assignments to the busiest expert) / (all assignments);
  uniform routing over E experts gives 1/E.
* Gini coefficient of the per-expert counts (0 = uniform, (E-1)/E = one expert
  takes all), the sorted-values form
  ``G = 2 * sum_i i * x_(i) / (E * sum x) - (E + 1) / E`` with ``x_(1) <= ... <= x_(E)``
  (Damgaard & Weiner 2000, eq. 2), the statistic that MoE load studies report per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from eaas.errors import ConfigError


def gini(counts: Sequence[float]) -> float:
    """Gini coefficient of non-negative ``counts`` (0 when all equal or all zero).

    Raises:
        ConfigError: empty input or a negative count.
    """
    xs = sorted(float(c) for c in counts)
    if not xs:
        raise ConfigError("gini of no counts")
    if xs[0] < 0:
        raise ConfigError(f"gini needs non-negative counts, got {xs[0]}")
    total = sum(xs)
    n = len(xs)
    if total == 0:
        return 0.0
    return 2.0 * sum(i * x for i, x in enumerate(xs, start=1)) / (n * total) - (n + 1) / n


def hottest_fraction(counts: Sequence[float]) -> float:
    """Share of all assignments that went to the busiest expert (0 when nothing was routed)."""
    total = float(sum(counts))
    return max(counts) / total if total > 0 else 0.0


def layer_load(router_logits: torch.Tensor, top_k: int) -> list[int]:
    """Tokens each expert receives under top-k routing.

    Args:
        router_logits: ``[tokens, E]`` router scores of one layer (any float dtype);
            top-k of the logits equals top-k of their softmax.
        top_k: experts per token.

    Returns:
        ``E`` counts summing to ``tokens * top_k``.

    Raises:
        ConfigError: a tensor that is not 2-D, or ``top_k`` outside ``[1, E]``.
    """
    if router_logits.dim() != 2:
        raise ConfigError(f"router logits must be [tokens, experts], got shape {tuple(router_logits.shape)}")
    num_experts = router_logits.shape[1]
    if not 1 <= top_k <= num_experts:
        raise ConfigError(f"top_k {top_k} must be in [1, {num_experts}]")
    chosen = torch.topk(router_logits.float(), top_k, dim=-1).indices.reshape(-1)
    return torch.bincount(chosen, minlength=num_experts).tolist()


@dataclass(frozen=True, slots=True)
class ExpertLoad:
    """Expert load of one MoE layer on some text.

    Attributes:
        layer: decoder layer index.
        counts: tokens per expert (top-k assignments).
        hottest_fraction: see :func:`hottest_fraction`.
        gini: see :func:`gini`.
    """

    layer: int
    counts: tuple[int, ...]
    hottest_fraction: float
    gini: float

    @classmethod
    def of(cls, layer: int, counts: Sequence[int]) -> "ExpertLoad":
        """Statistics of one layer's counts."""
        return cls(layer, tuple(int(c) for c in counts), hottest_fraction(counts), gini(counts))

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"layer": self.layer, "counts": list(self.counts), "hottest_fraction": self.hottest_fraction,
                "gini": self.gini}


@torch.inference_mode()
def measure_expert_load(model: torch.nn.Module, windows: torch.Tensor, top_k: int, moe_layers: Sequence[int],
                        batch_size: int = 16) -> list[ExpertLoad]:
    """Count a model's routing on token windows.

    Args:
        model: a transformers MoE ``*ForCausalLM`` whose forward accepts
            ``output_router_logits`` (Mixtral, Qwen-MoE, OLMoE, ...).
        windows: ``[N, T]`` int64 token ids.
        top_k: experts per token.
        moe_layers: decoder layer index of each entry of ``router_logits``, in order.
        batch_size: windows per forward.

    Returns:
        One :class:`ExpertLoad` per MoE layer.
    """
    totals: list[torch.Tensor] | None = None
    for start in range(0, windows.shape[0], batch_size):
        out = model(input_ids=windows[start:start + batch_size], output_router_logits=True, use_cache=False)
        per_layer = [torch.tensor(layer_load(logits.reshape(-1, logits.shape[-1]), top_k)) for logits in out.router_logits]
        totals = per_layer if totals is None else [a + b for a, b in zip(totals, per_layer)]
    if totals is None:
        raise ConfigError("no windows to measure expert load on")
    return [ExpertLoad.of(layer, t.tolist()) for layer, t in zip(moe_layers, totals)]
