"""One sequence's state inside the runner, and the scheduler's decisions (pure functions).

A request's prompt is one *group*: the parent sequence and, with ``n`` > 1, its forks,
which share the parent's prefill.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from eaas.gateway.handles import GenerationHandle
from eaas.gateway.logprobs import TokenLogprob
from eaas.gateway.sampling import SamplingParams, TokenCounts
from eaas.gateway.textstream import TextStream


@dataclass(eq=False)
class SequenceState:
    """Runner-side state of one sequence (touched only by the runner thread)."""

    handle: GenerationHandle
    params: SamplingParams
    arrival_s: float
    text: TextStream
    queued: bool = True  # counted in the runner's admission backlog until its prefill starts or it ends
    backlog_tokens: int = 0  # prompt tokens it counts in the backlog (a fork: 0, its parent counts them)
    generator: torch.Generator | None = None
    counts: TokenCounts | None = None  # only when a penalty needs them
    cache: Any = None  # padded engine: its own transformers DynamicCache
    output_ids: list[int] = field(default_factory=list)
    forks: list[SequenceState] = field(default_factory=list)  # the other choices of an n > 1 request (share our prefill)
    row: int = -1  # slots engine: its row in the SlotCache (-1: none)
    kv_len: int = 0  # slots engine: positions written to its row
    pending_prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # sent with the first event

    @property
    def group(self) -> list[SequenceState]:
        """This sequence and its forks: the sequences one prefill serves."""
        return [self, *self.forks]

    @property
    def prompt_ids(self) -> list[int]:
        return self.handle.prompt_ids

    @property
    def total_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


def groups_to_admit(group_sizes: list[int], num_running: int, max_batch_size: int, max_prefills_per_step: int) -> int:
    """Scheduler decision: how many waiting prompts (from the front, in arrival order) to prefill now.

    Args:
        group_sizes: per waiting prompt, the sequences its prefill starts (``n`` of its request).
        num_running: sequences decoding now.
        max_batch_size: sequences decoded together at most.
        max_prefills_per_step: prefills between two decode steps at most.

    Returns:
        The count ``k``: the first ``k`` groups fit the batch together; first come, first served
        (a large group at the front waits for room rather than be overtaken).
    """
    free = max_batch_size - num_running
    admitted = 0
    for size in group_sizes[:max_prefills_per_step]:
        if size > free:
            break
        free -= size
        admitted += 1
    return admitted


def prefill_batch(prompt_lengths: list[int], max_tokens: int) -> int:
    """How many prompts (from the front) one batched prefill forward takes: the most ``k`` whose
    padded size ``k * max(lengths[:k])`` fits ``max_tokens``; at least 1 (a long prompt goes alone)."""
    k, longest = 0, 0
    for n in prompt_lengths:
        longest = max(longest, n)
        if k and (k + 1) * longest > max_tokens:
            break
        k += 1
    return k


def microbatch_split(batch: int, min_batch: int) -> int:
    """Rows of the first micro-batch of a decode step of ``batch`` rows, or 0 (one forward).

    Two micro-batches only pay when each still has rows to overlap: the step is split in
    halves (the first takes ``batch // 2``) when ``min_batch`` > 0 and ``batch >= max(2, min_batch)``.
    """
    if min_batch <= 0 or batch < max(2, min_batch):
        return 0
    return batch // 2

