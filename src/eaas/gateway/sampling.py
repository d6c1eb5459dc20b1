"""Per-request token selection: logit processing, then greedy or seeded sampling.

The order follows vLLM's v1 sampler (``vllm/v1/sample/sampler.py``): logit bias, then the
penalties, then greedy argmax, or temperature -> min-p -> top-k -> top-p -> multinomial.
Logprobs reported to clients are taken from the *raw* logits (vLLM's default
``logprobs_mode="raw_logprobs"``), see :mod:`eaas.gateway.logprobs`.

Legend: ``V`` vocabulary size (the model's logits width).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import torch

_U64 = 1 << 64
GREEDY_BELOW = 1e-5
"""Temperatures below this are greedy, as vLLM's ``_SAMPLING_EPS`` (``vllm/sampling_params.py``)."""


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one sequence picks its tokens.

    Attributes:
        max_new_tokens: tokens to generate at most (>= 0; 0 only scores the prompt, ``echo``).
        temperature: below 1e-5 = greedy (exactly ``generate(do_sample=False)``); above, samples.
        top_p: nucleus mass kept, in (0, 1].
        top_k: keep the k most likely tokens; 0 = off (vLLM's ``top_k``; -1 is mapped to 0).
        min_p: drop tokens whose probability is below ``min_p`` x the top probability; 0 = off.
        seed: seeds the sequence's own ``torch.Generator`` (any signed or unsigned 64-bit
            integer); None = random.
        stop: stop strings; the text ends before the first one found.
        ignore_eos: keep generating after the EOS token.
        logit_bias: ``(token_id, bias)`` pairs added to the logits before selection
            (OpenAI ``logit_bias``; bias in [-100, 100]).
        presence_penalty: subtracted once from the logit of every token already generated
            (OpenAI's definition, output tokens only), in [-2, 2].
        frequency_penalty: subtracted per occurrence of a token already generated, in [-2, 2].
        repetition_penalty: CTRL / HF / vLLM penalty over prompt and output tokens: a positive
            logit is divided by it, a negative one multiplied; 1 = off.
        logprobs: report each sampled token's logprob and this many top alternatives
            (0..20); None = no logprobs.
        prompt_logprobs: report the prompt's logprobs with this many alternatives (``echo``);
            None = no.
    """

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logit_bias: tuple[tuple[int, float], ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        """Temperature below ``GREEDY_BELOW`` picks the argmax (dividing by it would overflow)."""
        return self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        """Any penalty needs the sequence's token counts."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    def make_generator(self) -> torch.Generator | None:
        """A CPU generator for this sequence (None when greedy)."""
        if self.greedy:
            return None
        g = torch.Generator(device="cpu")
        g.manual_seed(self.seed % _U64 if self.seed is not None else random.getrandbits(63))
        return g

    def for_choice(self, index: int) -> SamplingParams:
        """The parameters of choice ``index`` of an ``n`` > 1 request.

        Choice ``i`` is seeded with ``seed + i`` (mod 2^64), as vLLM's parallel sampling does
        (``vllm/v1/engine/parallel_sampling.py``): reproducible, choice 0 equals ``n=1``, and the
        choices of one seeded request are not copies of each other.
        """
        if index == 0 or self.seed is None:
            return self
        return replace(self, seed=(self.seed + index) % _U64)


class TokenCounts:
    """The tokens one sequence has seen, for the penalties (``[V]`` tensors, built on first use).

    Args:
        prompt_ids: the sequence's prompt (the repetition penalty covers it).
    """

    def __init__(self, prompt_ids: list[int]) -> None:
        self._prompt_ids = prompt_ids
        self._output: list[int] = []
        self.counts: torch.Tensor | None = None  # [V] float32, output occurrences
        self.seen: torch.Tensor | None = None  # [V] bool, prompt or output

    def _build(self, vocab: int) -> None:
        self.counts = torch.zeros(vocab, dtype=torch.float32)
        self.seen = torch.zeros(vocab, dtype=torch.bool)
        if self._prompt_ids:
            self.seen[torch.tensor(self._prompt_ids, dtype=torch.long)] = True
        for t in self._output:
            self.counts[t] += 1.0
            self.seen[t] = True

    def add(self, token: int) -> None:
        """Count one generated token."""
        if self.counts is None:
            self._output.append(token)
        else:
            self.counts[token] += 1.0
            self.seen[token] = True

    def copy(self) -> TokenCounts:
        """An independent copy (a fork of ``n`` > 1 starts from its parent's counts)."""
        out = TokenCounts(self._prompt_ids)
        out._output = list(self._output)
        if self.counts is not None:
            out.counts, out.seen = self.counts.clone(), self.seen.clone()
        return out

    def apply(self, scores: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        """Apply the penalties to ``scores[V]`` (fp32, in place) and return it.

        Formulas: OpenAI's ``mu[j] - c[j] * frequency_penalty - (c[j] > 0) * presence_penalty``
        (https://platform.openai.com/docs/advanced-usage, parameter details), and the
        repetition penalty of Keskar et al. 2019 as in vLLM's ``apply_penalties``.
        """
        if self.counts is None:
            self._build(scores.shape[-1])
        if params.repetition_penalty != 1.0:
            p = params.repetition_penalty
            penalized = torch.where(scores > 0, scores / p, scores * p)
            scores = torch.where(self.seen, penalized, scores)
        if params.frequency_penalty != 0.0:
            scores -= self.counts * params.frequency_penalty
        if params.presence_penalty != 0.0:
            scores -= (self.counts > 0).float() * params.presence_penalty
        return scores


def process_logits(logits: torch.Tensor, params: SamplingParams, counts: TokenCounts | None) -> torch.Tensor:
    """Logit bias and penalties on one row of logits (before temperature).

    Args:
        logits: ``[V]`` raw logits (any float dtype).
        params: the sequence's parameters.
        counts: the sequence's token counts (required when ``params.penalized``).

    Returns:
        ``[V]`` float32 scores (a new tensor; ``logits`` is untouched).
    """
    scores = logits.float().clone()
    if params.logit_bias:
        ids = torch.tensor([t for t, _ in params.logit_bias], dtype=torch.long, device=scores.device)
        bias = torch.tensor([b for _, b in params.logit_bias], dtype=torch.float32, device=scores.device)
        scores.index_add_(0, ids, bias)
    if params.penalized:
        if counts is None:
            raise ValueError("penalties need the sequence's TokenCounts")
        scores = counts.apply(scores, params)
    return scores


def select_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
                 counts: TokenCounts | None = None) -> int:
    """Pick the next token from one row of logits.

    Args:
        logits: ``[V]`` logits of the last position (any float dtype; computed in fp32).
        params: the sequence's sampling parameters.
        generator: the sequence's generator (None when greedy).
        counts: the sequence's token counts (needed for penalties).

    Returns:
        The token id.
    """
    scores = process_logits(logits, params, counts) if (params.logit_bias or params.penalized) else logits.float()
    if params.greedy:
        return int(torch.argmax(scores))
    probs = torch.softmax(scores / params.temperature, dim=-1)
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    if params.top_k > 0 and params.top_k < probs.shape[-1]:
        kth = torch.topk(probs, params.top_k).values[-1]
        probs = probs.masked_fill(probs < kth, 0.0)
    if params.min_p > 0.0 or params.top_k > 0:
        probs = probs / probs.sum()
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        drop = cumulative - sorted_probs > params.top_p  # keep the smallest set with mass >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_probs.cpu(), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
