"""Per-request token selection: greedy, or temperature / top-p sampling with a seed.

Legend: ``V`` vocabulary size.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request picks its tokens.

    Attributes:
        max_new_tokens: tokens to generate at most (>= 1).
        temperature: 0 = greedy (exactly ``generate(do_sample=False)``); > 0 samples.
        top_p: nucleus mass kept, in (0, 1].
        seed: seeds the request's own ``torch.Generator``; None = random.
        stop: stop strings; the text ends before the first one found.
        ignore_eos: keep generating after the EOS token.
    """

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def make_generator(self) -> torch.Generator | None:
        """A CPU generator for this request (None when greedy)."""
        if self.greedy:
            return None
        g = torch.Generator(device="cpu")
        g.manual_seed(self.seed if self.seed is not None else random.getrandbits(63))
        return g


def select_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick the next token from one row of logits.

    Args:
        logits: ``[V]`` logits of the last position (any float dtype; computed in fp32).
        params: the request's sampling parameters.
        generator: the request's generator (None when greedy).

    Returns:
        The token id.
    """
    scores = logits.float()
    if params.greedy:
        return int(torch.argmax(scores))
    scores = scores / params.temperature
    probs = torch.softmax(scores, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        drop = cumulative - sorted_probs > params.top_p  # keep the smallest set with mass >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_probs.cpu(), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
