"""The runner's two engines: how prefill and decode forwards run over the KV cache.

Both take the same calls from :class:`~eaas.gateway.runner.ModelRunner` (admit, prefill,
decode, release) and hand results back through :class:`StepHooks`; sampling, stop handling
and delivery stay in the runner. See ``docs/DESIGN.md`` ("The runner's engine").

- :class:`SlotsEngine`: batched prefill into a :class:`~eaas.gateway.slotcache.SlotCache`
  that decode steps read and write in place.
- :class:`PaddedEngine`: the previous engine, one prefill per prompt into its own
  ``DynamicCache``, caches merged and split every decode step (:mod:`eaas.gateway.kvbatch`).

Legend: ``B`` sequences in a forward, ``P`` prompt tokens, ``V`` vocabulary size.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import DynamicCache

from eaas.gateway.kvbatch import copy_cache, merge_caches, split_cache
from eaas.gateway.logprobs import TokenLogprob, prompt_logprobs
from eaas.gateway.sequence import SequenceState, groups_to_admit, microbatch_split, prefill_batch
from eaas.gateway.slotcache import SlotCache, attention_masks

log = logging.getLogger(__name__)

PromptLogprobs = tuple[TokenLogprob | None, ...] | None


@dataclass(frozen=True, slots=True)
class StepHooks:
    """What an engine hands back to the runner.

    Attributes:
        prefilled: ``(parent, last_logits[V], prompt_logprobs)`` once a group's KV is in place
            (for the parent and every fork): each member takes its first token.
        decoded: ``(seq, logits[V])`` after a decode forward, per sequence in batch order.
        failed: ``(seq, exc)``: the forward that carried ``seq`` failed; end it with an error.
    """

    prefilled: Callable[[SequenceState, torch.Tensor, PromptLogprobs], None]
    decoded: Callable[[SequenceState, torch.Tensor], None]
    failed: Callable[[SequenceState, BaseException], None]


class Engine(Protocol):
    """The calls the runner makes on an engine, once per step, in this order."""

    def admit(self, waiting: list[SequenceState], num_running: int) -> int:
        """How many waiting groups (from the front) to prefill in this step."""

    def prefill(self, parents: list[SequenceState]) -> None:
        """Prefill these groups; calls ``hooks.prefilled`` (or ``hooks.failed``) for each."""

    def decode(self, running: list[SequenceState]) -> None:
        """One decode forward over ``running``; calls ``hooks.decoded`` (or ``hooks.failed``) for each."""

    def release(self, seq: SequenceState) -> None:
        """Free ``seq``'s KV (it finished, failed or was cancelled); idempotent."""

    def close(self) -> None:
        """Stop any helper thread (the runner stopped)."""


def logits_kwargs(model: Any) -> dict[str, int]:
    """``{"logits_to_keep": 1}`` when the model's forward takes it (only the last position's logits)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


class PaddedEngine:
    """One prefill per prompt into its own ``DynamicCache`` (exactly what ``generate`` computes);
    a decode step left-pads and stacks every cache into a batch cache, then slices it back.

    Args:
        model: the causal LM.
        hooks: the runner's callbacks.
        max_batch_size: sequences decoded together at most.
        max_prefills_per_step: prompts prefilled between two decode steps at most.
    """

    def __init__(self, model: Any, hooks: StepHooks, max_batch_size: int, max_prefills_per_step: int) -> None:
        self.model = model
        self.hooks = hooks
        self.max_batch_size = max_batch_size
        self.max_prefills_per_step = max_prefills_per_step
        self._logits_kw = logits_kwargs(model)

    def admit(self, waiting: list[SequenceState], num_running: int) -> int:
        return groups_to_admit([len(s.forks) + 1 for s in waiting], num_running, self.max_batch_size,
                               self.max_prefills_per_step)

    def prefill(self, parents: list[SequenceState]) -> None:
        for parent in parents:
            self._prefill_one(parent)

    def _prefill_one(self, seq: SequenceState) -> None:
        ids = torch.tensor([seq.prompt_ids], dtype=torch.long, device=self.model.device)  # [1, P]
        k_prompt = seq.params.prompt_logprobs
        # every position's logits only when the prompt's logprobs are asked for (logits_to_keep=0: all)
        logits_kw = {"logits_to_keep": 0} if (k_prompt is not None and self._logits_kw) else self._logits_kw
        cache = DynamicCache()
        try:
            out = self.model(input_ids=ids, cache=cache, use_cache=True, **logits_kw)
            plps = prompt_logprobs(out.logits[0], seq.prompt_ids, k_prompt) if k_prompt is not None else None
        except Exception as exc:  # noqa: BLE001 - this group fails alone
            log.warning("prefill of %s failed: %s", seq.handle.request_id, exc)
            for member in seq.group:
                self.hooks.failed(member, exc)
            return
        for i, member in enumerate(seq.group):
            member.cache = cache if i == 0 else copy_cache(cache)
        self.hooks.prefilled(seq, out.logits[0, -1], plps)

    def decode(self, running: list[SequenceState]) -> None:
        batch = list(running)
        device = self.model.device
        ids = torch.tensor([[s.output_ids[-1]] for s in batch], dtype=torch.long, device=device)  # [B, 1]
        try:
            if len(batch) == 1:
                out = self.model(input_ids=ids, cache=batch[0].cache, use_cache=True, **self._logits_kw)
            else:
                merged = merge_caches([s.cache for s in batch])
                out = self.model(input_ids=ids, cache=merged.cache, attention_mask=merged.attention_mask.to(device),
                                 position_ids=merged.position_ids.to(device), use_cache=True, **self._logits_kw)
                for seq, cache in zip(batch, split_cache(merged, merged.cache)):
                    seq.cache = cache
        except Exception as exc:  # noqa: BLE001 - the step's sequences fail, the runner goes on
            log.warning("decode step of %d sequences failed: %s", len(batch), exc)
            for seq in batch:
                self.hooks.failed(seq, exc)
            return
        logits = out.logits[:, -1]  # [B, V]
        for row, seq in enumerate(batch):
            self.hooks.decoded(seq, logits[row])

    def release(self, seq: SequenceState) -> None:
        seq.cache = None

    def close(self) -> None:
        pass


class SlotsEngine:
    """Batched prefill into a :class:`SlotCache`; decode steps read and write it in place.

    Waiting prompts that fit the batch are prefilled together, right-padded, at most
    ``max_prefill_tokens`` padded tokens per forward (a longer prompt goes alone; a request
    asking for its prompt's logprobs goes alone, with every position's logits). Forks copy
    their parent's row. A released row is refilled by the last one (rows stay ``0 .. B-1``).

    Args:
        model: the causal LM (its ``config``: sliding windows and layer types for the masks).
        hooks: the runner's callbacks.
        max_batch_size: rows of the cache.
        max_columns: positions per row at most (the model's context length).
        max_prefill_tokens: padded prompt tokens per prefill forward.
        microbatch_min_batch: a decode step of at least this many rows (and at least 2) runs as
            two micro-batches of rows ``[0, B/2)`` and ``[B/2, B)``, one on a helper thread, so
            that one's attention (torch ops release the GIL) runs while the other's expert call
            waits on the workers (MegaScale-Infer's ping-pong, SGLang's two-batch overlap);
            0: never. Each row computes what it computes in the one-forward step, over its own
            KV row; only the GEMMs' row counts differ.
    """

    def __init__(self, model: Any, hooks: StepHooks, max_batch_size: int, max_columns: int,
                 max_prefill_tokens: int, microbatch_min_batch: int = 0) -> None:
        self.model = model
        self.hooks = hooks
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        config = model.config
        self.config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        self.cache = SlotCache(max_batch_size, max_columns)
        self.rows: list[SequenceState] = []  # the sequence in each row, rows 0..B-1
        self._logits_kw = logits_kwargs(model)
        self._dtype = getattr(model, "dtype", None) or next(model.parameters()).dtype  # of the attention masks
        self._pad_id = 0
        self.microbatch_min_batch = microbatch_min_batch
        self._helper: ThreadPoolExecutor | None = None  # runs the first micro-batch of an overlapped step
        self.overlapped_steps = 0

    def admit(self, waiting: list[SequenceState], num_running: int) -> int:
        admit = groups_to_admit([len(s.forks) + 1 for s in waiting], num_running, self.max_batch_size,
                                self.max_batch_size)
        return min(admit, prefill_batch([len(s.prompt_ids) for s in waiting], self.max_prefill_tokens))

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor, row0: int,
                 write: torch.Tensor | None, logits_to_keep: Any) -> torch.Tensor:
        """One forward over rows ``row0 ..`` of the slot cache.

        Args:
            ids: ``[B, q]`` input token ids.
            positions: ``[B, q]`` their positions (= cache columns).
            lengths: ``[B]`` valid columns per row once this forward has written.
            row0: first row.
            write: ``[B]`` the column each row writes (decode), or None (prefill from column 0).
            logits_to_keep: transformers' ``logits_to_keep`` (int, or a 1D index tensor).

        Returns:
            The logits ``[B, q', V]``.
        """
        device = self.model.device
        span = int(lengths.max())
        masks = attention_masks(self.config, positions, lengths, span, self._dtype)
        masks = {k: m.to(device) for k, m in masks.items()} if isinstance(masks, dict) else masks.to(device)
        self.cache.begin(row0, ids.shape[0], span, None if write is None else write.to(device))
        kw = {"logits_to_keep": logits_to_keep} if self._logits_kw else {}
        out = self.model(input_ids=ids.to(device), cache=self.cache, attention_mask=masks,
                         position_ids=positions.to(device), use_cache=True, **kw)
        return out.logits

    def prefill(self, parents: list[SequenceState]) -> None:
        batched = [p for p in parents if p.params.prompt_logprobs is None]
        chunks = ([batched] if batched else []) + [[p] for p in parents if p.params.prompt_logprobs is not None]
        for chunk in chunks:
            self._prefill_chunk(chunk)

    def _prefill_chunk(self, chunk: list[SequenceState]) -> None:
        lengths = [len(s.prompt_ids) for s in chunk]
        longest = max(lengths)
        ids = torch.full((len(chunk), longest), self._pad_id, dtype=torch.long)  # [N, P] right-padded
        for i, s in enumerate(chunk):
            ids[i, : lengths[i]] = torch.tensor(s.prompt_ids, dtype=torch.long)
        positions = torch.arange(longest).expand(len(chunk), longest)
        k_prompt = chunk[0].params.prompt_logprobs if len(chunk) == 1 else None
        last_cols = sorted({n - 1 for n in lengths})
        keep: Any = 0 if (k_prompt is not None or not self._logits_kw) else torch.tensor(last_cols)
        row0 = len(self.rows)
        try:
            logits = self._forward(ids, positions, torch.tensor(lengths), row0, None, keep)  # [N, q', V]
            plps = (prompt_logprobs(logits[0, : lengths[0]], chunk[0].prompt_ids, k_prompt)
                    if k_prompt is not None else None)
        except Exception as exc:  # noqa: BLE001 - these groups fail alone
            log.warning("prefill of %d prompts failed: %s", len(chunk), exc)
            for parent in chunk:
                for member in parent.group:
                    self.hooks.failed(member, exc)
            return
        for parent, n in zip(chunk, lengths):
            self._claim_row(parent, n)
        for parent, n in zip(chunk, lengths):
            for fork in parent.forks:
                self._claim_row(fork, n)
                self.cache.move_row(parent.row, fork.row, n)
        for i, (parent, n) in enumerate(zip(chunk, lengths)):
            col = n - 1 if isinstance(keep, int) else last_cols.index(n - 1)
            self.hooks.prefilled(parent, logits[i, col], plps)

    def _claim_row(self, seq: SequenceState, kv_len: int) -> None:
        seq.row = len(self.rows)
        seq.kv_len = kv_len
        self.rows.append(seq)

    def decode(self, running: list[SequenceState]) -> None:
        batch = list(self.rows)  # every running sequence has a row; row order is the batch order
        written = torch.tensor([s.kv_len for s in batch], dtype=torch.long)  # [B] the column each row writes
        ids = torch.tensor([[s.output_ids[-1]] for s in batch], dtype=torch.long)  # [B, 1]
        try:
            split = microbatch_split(len(batch), self.microbatch_min_batch)
            if split:
                logits = self._overlapped(ids, written, split)
            else:
                logits = self._forward(ids, written.unsqueeze(1), written + 1, 0, written, 1)
        except Exception as exc:  # noqa: BLE001 - the step's sequences fail, the runner goes on
            log.warning("decode step of %d sequences failed: %s", len(batch), exc)
            for seq in batch:
                self.hooks.failed(seq, exc)
            return
        for seq in batch:
            seq.kv_len += 1
        for row, seq in enumerate(batch):
            self.hooks.decoded(seq, logits[row, -1])

    def _overlapped(self, ids: torch.Tensor, written: torch.Tensor, split: int) -> torch.Tensor:
        """One decode step as two concurrent forwards over rows ``[0, split)`` (on the helper
        thread) and ``[split, B)`` (here); returns their logits ``[B, 1, V]`` in row order.

        Raises:
            Exception: whatever either forward raised (after both ended).
        """
        self.cache.reserve(int(written.max()) + 1)  # grow once, before the two forwards share the buffers
        if self._helper is None:
            self._helper = ThreadPoolExecutor(1, thread_name_prefix="eaas-microbatch")
        inference = torch.is_inference_mode_enabled()  # grad mode is per thread: the helper takes ours

        def first() -> torch.Tensor:
            with torch.inference_mode(inference):
                return self._forward(ids[:split], written[:split, None], written[:split] + 1, 0, written[:split], 1)

        fut = self._helper.submit(first)
        try:
            second = self._forward(ids[split:], written[split:, None], written[split:] + 1, split, written[split:], 1)
        finally:
            head = fut.result()  # always wait: its forward writes the shared buffers
        self.overlapped_steps += 1
        return torch.cat([head, second])

    def close(self) -> None:
        """Stop the micro-batch helper thread, if any."""
        if self._helper is not None:
            self._helper.shutdown(wait=True)
            self._helper = None

    def release(self, seq: SequenceState) -> None:
        seq.cache = None
        if seq.row < 0:
            return
        last = self.rows[-1]
        if last is not seq:
            self.cache.move_row(last.row, seq.row, last.kv_len)
            self.rows[seq.row] = last
            last.row = seq.row
        self.rows.pop()
        seq.row = -1

    def reset(self) -> None:
        """Forget every row (after a failed step ended all sequences)."""
        for seq in self.rows:
            seq.row = -1
        self.rows.clear()
