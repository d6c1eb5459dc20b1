"""The model runner: one thread owns the model and decodes many requests together.

Each engine step is three parts (after nano-vllm): the scheduler decides how many
waiting sequences to admit (:func:`num_to_admit`, a pure function), the runner
prefills the admitted ones one by one (each into its own KV cache, so a lone
request computes exactly what ``model.generate`` computes) and then runs *one*
batched decode forward for every running sequence (:mod:`eaas.gateway.kvbatch`),
and finally each sequence takes its token, releases text and maybe finishes.

This is iteration-level (continuous) batching: a request joins or leaves the batch
between any two forward passes. It works for every causal LM transformers can
``generate`` with a ``DynamicCache`` — including DeepSeek-V3, which transformers'
paged continuous batching cannot run — and for models loaded with
``experts_implementation="eaas"``, whose expert calls then carry the tokens of the
whole batch. Requests interact with the runner only through thread-safe queues.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers import DynamicCache

from eaas.errors import EaaSError, NonFiniteLogits, Overloaded
from eaas.gateway.handles import FinishReason, GenerationEvent, GenerationHandle
from eaas.gateway.kvbatch import copy_cache, merge_caches, split_cache
from eaas.gateway.logprobs import TokenLogprob, prompt_logprobs, token_bytes, token_logprob, token_name
from eaas.gateway.metrics import GatewayMetrics
from eaas.gateway.sampling import SamplingParams, TokenCounts, select_token
from eaas.gateway.slotcache import SlotCache, attention_masks
from eaas.gateway.textstream import TextStream

log = logging.getLogger(__name__)

_ids = itertools.count()

IDLE_TICK_S = 1.0
"""An idle runner thread wakes this often (seconds), so its liveness stays visible."""


@dataclass(eq=False)
class _Sequence:
    """Runner-side state of one sequence (touched only by the runner thread)."""

    handle: GenerationHandle
    params: SamplingParams
    arrival_s: float
    text: TextStream
    queued: bool = True  # counted in the runner's admission backlog until its prefill starts or it ends
    backlog_tokens: int = 0  # prompt tokens it counts in the backlog (a fork: 0, its parent counts them)
    generator: torch.Generator | None = None
    counts: TokenCounts | None = None  # only when a penalty needs them
    cache: DynamicCache | None = None
    output_ids: list[int] = field(default_factory=list)
    forks: list[_Sequence] = field(default_factory=list)  # the other choices of an n > 1 request (share our prefill)
    row: int = -1  # slots engine: its row in the SlotCache (-1: none)
    kv_len: int = 0  # slots engine: positions written to its row
    pending_prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # sent with the first event

    @property
    def group(self) -> list[_Sequence]:
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


def expanded_kv_heads_fix(model: Any) -> int:
    """Make masked attention work for multi-head latent attention (DeepSeek-V3); returns modules fixed.

    An MLA module's ``expand_kv`` already returns keys and values with every query head, yet its
    ``num_key_value_groups`` is ``heads / kv_heads``: with an attention mask, transformers'
    SDPA path then ``repeat_kv``s the keys a second time and fails (``transformers`` 5.24,
    ``modeling_deepseek_v3.py``; without a mask it takes the GQA kernel, where 1 and the ratio
    compute the same). The groups of such a module are set to 1, the true ratio.
    """
    fixed = 0
    for module in model.modules():
        if hasattr(module, "expand_kv") and getattr(module, "num_key_value_groups", 1) > 1:
            module.num_key_value_groups = 1
            fixed += 1
    return fixed


class ModelRunner:
    """Owns a causal LM and its tokenizer in one thread; serves generation requests.

    Args:
        model: any transformers causal LM (monolithic, or an EaaS attention client).
        tokenizer: its tokenizer.
        name: the model id clients use (``"model"`` field, ``/v1/models``).
        max_batch_size: sequences decoded together at most.
        max_prefills_per_step: prompts prefilled between two decode steps at most.
        max_model_len: prompt + generated tokens at most; default: the config's
            ``max_position_embeddings``.
        max_waiting_requests: sequences submitted but not yet prefilled, at most;
            beyond it :meth:`submit_all` refuses with :class:`~eaas.errors.Overloaded`.
        max_waiting_tokens: prompt tokens of those sequences, at most.
        engine: ``"slots"``: waiting prompts are prefilled together (up to ``max_prefill_tokens``
            padded tokens per forward) into a :class:`~eaas.gateway.slotcache.SlotCache` that decode
            steps read and write in place. ``"padded"``: the previous engine, one prefill at a time
            into per-sequence caches merged and split every decode step (:mod:`eaas.gateway.kvbatch`).
        max_prefill_tokens: see ``engine``.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str,
        max_batch_size: int = 32,
        max_prefills_per_step: int = 4,
        max_model_len: int | None = None,
        max_waiting_requests: int = 256,
        max_waiting_tokens: int = 1 << 18,
        engine: str = "slots",
        max_prefill_tokens: int = 512,
    ) -> None:
        if engine not in ("slots", "padded"):
            raise ValueError(f"engine must be 'slots' or 'padded', got {engine!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_prefills_per_step = max_prefills_per_step
        config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
        self.config = config
        self.max_model_len = int(max_model_len or getattr(config, "max_position_embeddings", 2048))
        self.hidden_size = int(config.hidden_size)
        self.num_layers = int(config.num_hidden_layers)
        eos = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
        eos = eos if eos is not None else getattr(tokenizer, "eos_token_id", None)
        self.eos_token_ids: frozenset[int] = frozenset(
            [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        )
        self._logits_kw = (
            {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        )
        self.metrics: GatewayMetrics | None = None
        self._inbox: queue.Queue[Any] = queue.Queue()
        self._waiting: list[_Sequence] = []
        self._running: list[_Sequence] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.started = threading.Event()
        self.last_tick_s = time.monotonic()
        self.step_failures = 0
        self.max_waiting_requests = max_waiting_requests
        self.max_waiting_tokens = max_waiting_tokens
        self._backlog_lock = threading.Lock()
        self._backlog_requests = 0
        self._backlog_tokens = 0
        self._token_names: dict[int, str] = {}
        self._token_bytes: dict[int, bytes] = {}
        self.engine = engine
        self.max_prefill_tokens = max_prefill_tokens
        self._slots = SlotCache(max_batch_size, self.max_model_len + 1) if engine == "slots" else None
        self._rows: list[_Sequence] = []  # slots engine: the sequence in each row, rows 0..B-1
        self._pad_id = 0
        self._dtype = getattr(model, "dtype", None) or next(model.parameters()).dtype  # of the attention masks
        expanded_kv_heads_fix(model)  # both engines pass masks (the padded one too, in batched decodes)

    # --- lifecycle ---------------------------------------------------------------------

    def bind_metrics(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics

    def start(self) -> None:
        """Start the runner thread (idempotent)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name=f"eaas-runner-{self.name}", daemon=True)
        self._thread.start()
        self.started.wait(timeout=30)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the thread; unfinished sequences end with an error event."""
        if self._thread is None:
            return
        self._stopping = True
        self._inbox.put(None)
        self._thread.join(timeout=timeout_s)
        self._thread = None

    @property
    def alive(self) -> bool:
        """The runner thread is running and not stopping."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def health(self, stuck_after_s: float) -> tuple[bool, dict[str, Any]]:
        """(healthy, detail) for ``/healthz``: the thread is alive and its loop ticked recently.

        A step that takes longer than ``stuck_after_s`` seconds (a hung forward, an
        expert call that never returns) makes the runner unhealthy, so a supervisor
        restarts the gateway.
        """
        since_s = time.monotonic() - self.last_tick_s
        alive = self.alive
        stuck = alive and since_s > stuck_after_s
        detail = {"alive": alive, "stuck": stuck, "since_last_step_s": round(since_s, 3),
                  "running": len(self._running), "waiting": len(self._waiting), "step_failures": self.step_failures}
        return alive and not stuck, detail

    # --- API (any thread) -------------------------------------------------------------

    def token_name(self, token_id: int) -> str:
        """One token's name in logprobs: its text (special tokens kept), or ``bytes:\\xNN..`` when it
        is not whole UTF-8 (:func:`~eaas.gateway.logprobs.token_name`); cached per id."""
        name = self._token_names.get(token_id)
        if name is None:
            name = self._token_names[token_id] = token_name(self.tokenizer.decode([token_id]),
                                                            self.token_bytes(token_id))
        return name

    def token_bytes(self, token_id: int) -> bytes:
        """One token's raw bytes (:func:`~eaas.gateway.logprobs.token_bytes`); cached per id."""
        raw = self._token_bytes.get(token_id)
        if raw is None:
            raw = self._token_bytes[token_id] = token_bytes(self.tokenizer, token_id)
        return raw

    def submit(
        self, prompt_ids: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop | None = None
    ) -> GenerationHandle:
        """Queue one sequence; events arrive on the returned handle in ``loop``.

        Raises:
            Overloaded: the admission backlog is full (see :meth:`submit_all`).
        """
        return self.submit_all([prompt_ids], params, loop)[0]

    def submit_all(
        self, prompts: list[list[int]], params: SamplingParams, loop: asyncio.AbstractEventLoop | None = None,
        n: int = 1,
    ) -> list[GenerationHandle]:
        """Queue several sequences of one request, all or none.

        With ``n`` > 1 each prompt gets ``n`` sequences (choice ``j`` sampled with
        ``params.for_choice(j)``) that share one prefill: the prompt's KV cache is computed
        once and copied, and the handles come back prompt-major (``prompt * n + j``).

        Overload is refused, not queued forever: when the sequences submitted but
        not yet prefilled would exceed ``max_waiting_requests`` or their prompt tokens
        ``max_waiting_tokens``, nothing is queued (NVIDIA Dynamo and vLLM's router refuse
        the same way, 529/429, when their workers are saturated).

        Raises:
            Overloaded: the backlog is full; retry after ``retry_after_s``.
            ValueError: ``n`` is not in [1, max_batch_size] (its sequences could never decode together).
        """
        if not 1 <= n <= self.max_batch_size:
            raise ValueError(f"n={n} must be in [1, {self.max_batch_size}] (the runner's max batch size)")
        loop = loop or asyncio.get_running_loop()
        tokens = sum(len(p) for p in prompts)
        sequences = len(prompts) * n
        with self._backlog_lock:
            if (self._backlog_requests + sequences > self.max_waiting_requests
                    or self._backlog_tokens + tokens > self.max_waiting_tokens):
                if self.metrics is not None:
                    self.metrics.rejected.labels(model=self.name).inc()
                raise Overloaded(
                    f"model {self.name!r} is overloaded: {self._backlog_requests} requests"
                    f" ({self._backlog_tokens} prompt tokens) already wait for a batch slot"
                    f" (limits {self.max_waiting_requests} / {self.max_waiting_tokens}); retry later")
            self._backlog_requests += sequences
            self._backlog_tokens += tokens
        handles = []
        now = time.monotonic()
        for prompt_ids in prompts:
            group = []
            for j in range(n):
                handle = GenerationHandle(f"seq-{next(_ids)}", list(prompt_ids), loop)
                group.append(_Sequence(handle, params.for_choice(j), now, TextStream(self.tokenizer, params.stop)))
                handles.append(handle)
            group[0].backlog_tokens = len(prompt_ids)
            group[0].forks = group[1:]
            self._inbox.put(group[0])
        return handles

    def _leave_backlog(self, seq: _Sequence) -> None:
        if seq.queued:
            seq.queued = False
            with self._backlog_lock:
                self._backlog_requests -= 1
                self._backlog_tokens -= seq.backlog_tokens

    def call(self, fn: Callable[[Any], Any]) -> concurrent.futures.Future:
        """Run ``fn(model)`` in the runner thread between two steps."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put((fn, fut))
        return fut

    # --- the runner thread ----------------------------------------------------------------

    def _loop(self) -> None:
        self.started.set()
        with torch.inference_mode():
            while True:
                self.last_tick_s = time.monotonic()
                try:
                    if not self._step():
                        break
                except Exception as exc:  # noqa: BLE001 - one failed step never kills the runner
                    self.step_failures += 1
                    log.exception("runner %s: step failed; failing its %d sequences and going on", self.name,
                                  len(self._running) + len(self._waiting))
                    for seq in self._all_waiting() + self._running:
                        self._finish(seq, FinishReason.ERROR, error=exc)
                    self._waiting.clear()
                    self._running.clear()
                    self._rows.clear()
        for seq in self._all_waiting() + self._running:
            self._finish(seq, FinishReason.ERROR, error=EaaSError("the model runner stopped"))
        self._waiting.clear()
        self._running.clear()

    def _all_waiting(self) -> list[_Sequence]:
        return [s for parent in self._waiting for s in parent.group]

    def _step(self) -> bool:
        """One engine step: admit, prefill, one batched decode. False once stopping."""
        self._drain_inbox(block=not (self._running or self._waiting))
        if self._stopping:
            return False
        self._drop_cancelled()
        if self._slots is None:
            admit = groups_to_admit([len(s.forks) + 1 for s in self._waiting], len(self._running),
                                    self.max_batch_size, self.max_prefills_per_step)
            admitted, self._waiting = self._waiting[:admit], self._waiting[admit:]
            for seq in admitted:
                self._prefill(seq)
            if self._running:
                self._decode_step()
        else:
            admit = groups_to_admit([len(s.forks) + 1 for s in self._waiting], len(self._running),
                                    self.max_batch_size, self.max_batch_size)
            admit = min(admit, prefill_batch([len(s.prompt_ids) for s in self._waiting], self.max_prefill_tokens))
            admitted, self._waiting = self._waiting[:admit], self._waiting[admit:]
            if admitted:
                self._prefill_slots(admitted)
            if self._running:
                self._decode_slots()
        self._update_gauges()
        return True

    def _drain_inbox(self, block: bool) -> None:
        try:
            # Idle: wake at least every IDLE_TICK_S, so last_tick_s shows a live loop.
            item = self._inbox.get(block=block, timeout=IDLE_TICK_S if block else None)
            while True:
                self._accept(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            return

    def _accept(self, item: Any) -> None:
        if item is None:
            self._stopping = True
        elif isinstance(item, _Sequence):
            try:
                for seq in item.group:
                    seq.generator = seq.params.make_generator()
                    seq.counts = TokenCounts(seq.prompt_ids) if seq.params.penalized else None
            except Exception as exc:  # noqa: BLE001 - a bad request fails alone
                for seq in item.group:
                    self._finish(seq, FinishReason.ERROR, error=exc)
                return
            self._waiting.append(item)
        else:
            fn, fut = item
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(self.model))
                except BaseException as exc:  # delivered to the caller
                    fut.set_exception(exc)

    def _drop_cancelled(self) -> None:
        # a waiting prompt leaves once every choice it would start is cancelled; the prefill
        # ends the cancelled choices of a partly cancelled one
        for parent in [p for p in self._waiting if all(s.handle.cancelled for s in p.group)]:
            self._waiting.remove(parent)
            for seq in parent.group:
                self._finish(seq, FinishReason.CANCELLED)
        for seq in [s for s in self._running if s.handle.cancelled]:
            self._running.remove(seq)
            self._finish(seq, FinishReason.CANCELLED)

    def _prefill(self, seq: _Sequence) -> None:
        """One forward over ``seq``'s prompt; ``seq`` and its forks each take their first token."""
        group = seq.group
        for member in group:
            self._leave_backlog(member)
        device = self.model.device
        ids = torch.tensor([seq.prompt_ids], dtype=torch.long, device=device)  # [1, P]
        k_prompt = seq.params.prompt_logprobs
        # every position's logits only when the prompt's logprobs are asked for (logits_to_keep=0: all)
        logits_kw = {"logits_to_keep": 0} if (k_prompt is not None and self._logits_kw) else self._logits_kw
        cache = DynamicCache()
        try:
            out = self.model(input_ids=ids, cache=cache, use_cache=True, **logits_kw)
            plps = prompt_logprobs(out.logits[0], seq.prompt_ids, k_prompt) if k_prompt is not None else None
        except Exception as exc:
            log.warning("runner %s: prefill of %s failed: %s", self.name, seq.handle.request_id, exc)
            for member in group:
                self._finish(member, FinishReason.ERROR, error=exc)
            return
        for i, member in enumerate(group):
            member.cache = cache if i == 0 else copy_cache(cache)
        self._start_group(seq, out.logits[0, -1], plps)

    def _start_group(self, seq: _Sequence, last: torch.Tensor, plps: tuple[TokenLogprob | None, ...] | None) -> None:
        """After ``seq``'s prefill (its KV in place for it and its forks): each member takes its
        first token from ``last[V]``, or ends (cancelled; ``max_new_tokens=0``)."""
        if self.metrics is not None:
            self.metrics.prefills.labels(model=self.name).inc()
            self.metrics.ttft_s.labels(model=self.name).observe(time.monotonic() - seq.arrival_s)
        for member in seq.group:
            if member.handle.cancelled:
                self._finish(member, FinishReason.CANCELLED)
                continue
            if member.params.max_new_tokens == 0:  # echo only: the prompt's logprobs, no new token
                self._release(member)
                member.handle._deliver(GenerationEvent(finish_reason=FinishReason.LENGTH, prompt_logprobs=plps))
                self._count_finish(FinishReason.LENGTH)
                continue
            member.pending_prompt_logprobs = plps
            self._running.append(member)
            self._take_token_or_fail(member, last)

    # --- the slots engine ---------------------------------------------------------------

    def _forward_slots(self, ids: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor, row0: int,
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
        if isinstance(masks, dict):
            masks = {k: m.to(device) for k, m in masks.items()}
        else:
            masks = masks.to(device)
        self._slots.begin(row0, ids.shape[0], span, None if write is None else write.to(device))
        kw = {"logits_to_keep": logits_to_keep} if self._logits_kw else {}
        out = self.model(input_ids=ids.to(device), cache=self._slots, attention_mask=masks,
                         position_ids=positions.to(device), use_cache=True, **kw)
        return out.logits

    def _prefill_slots(self, parents: list[_Sequence]) -> None:
        """Prefill ``parents`` (their prompts right-padded into one forward; a request asking for its
        prompt's logprobs goes alone, with every position's logits) into fresh rows; forks copy
        their parent's row."""
        for parent in parents:
            for member in parent.group:
                self._leave_backlog(member)
        batched = [p for p in parents if p.params.prompt_logprobs is None]
        chunks = ([batched] if batched else []) + [[p] for p in parents if p.params.prompt_logprobs is not None]
        for chunk in chunks:
            self._prefill_chunk(chunk)

    def _prefill_chunk(self, chunk: list[_Sequence]) -> None:
        lengths = [len(s.prompt_ids) for s in chunk]
        longest = max(lengths)
        ids = torch.full((len(chunk), longest), self._pad_id, dtype=torch.long)  # [N, P] right-padded
        for i, s in enumerate(chunk):
            ids[i, : lengths[i]] = torch.tensor(s.prompt_ids, dtype=torch.long)
        positions = torch.arange(longest).expand(len(chunk), longest)
        k_prompt = chunk[0].params.prompt_logprobs if len(chunk) == 1 else None
        last_cols = sorted(set(n - 1 for n in lengths))
        keep: Any = 0 if (k_prompt is not None or not self._logits_kw) else torch.tensor(last_cols)
        row0 = len(self._rows)
        try:
            logits = self._forward_slots(ids, positions, torch.tensor(lengths), row0, None, keep)  # [N, q', V]
            plps = (prompt_logprobs(logits[0, : lengths[0]], chunk[0].prompt_ids, k_prompt)
                    if k_prompt is not None else None)
        except Exception as exc:
            log.warning("runner %s: prefill of %d prompts failed: %s", self.name, len(chunk), exc)
            for parent in chunk:
                for member in parent.group:
                    self._finish(member, FinishReason.ERROR, error=exc)
            return
        for parent, n in zip(chunk, lengths):
            self._claim_row(parent, n)
        for parent, n in zip(chunk, lengths):
            for fork in parent.forks:
                self._claim_row(fork, n)
                self._slots.move_row(parent.row, fork.row, n)
        for i, (parent, n) in enumerate(zip(chunk, lengths)):
            col = n - 1 if isinstance(keep, int) else last_cols.index(n - 1)
            self._start_group(parent, logits[i, col], plps)

    def _claim_row(self, seq: _Sequence, kv_len: int) -> None:
        seq.row = len(self._rows)
        seq.kv_len = kv_len
        self._rows.append(seq)

    def _decode_slots(self) -> None:
        """One decode forward over every row, reading and writing the slot cache in place."""
        batch = list(self._rows)
        written = torch.tensor([s.kv_len for s in batch], dtype=torch.long)  # [B] the column each row writes
        ids = torch.tensor([[s.output_ids[-1]] for s in batch], dtype=torch.long)  # [B, 1]
        try:
            logits = self._forward_slots(ids, written.unsqueeze(1), written + 1, 0, written, 1)
        except Exception as exc:
            log.warning("runner %s: decode step of %d sequences failed: %s", self.name, len(batch), exc)
            for seq in batch:
                self._running.remove(seq)
                self._finish(seq, FinishReason.ERROR, error=exc)
            return
        for seq in batch:
            seq.kv_len += 1
        if self.metrics is not None:
            self.metrics.batch_size.labels(model=self.name).observe(len(batch))
        for row, seq in enumerate(batch):
            self._take_token_or_fail(seq, logits[row, -1])

    def _release(self, seq: _Sequence) -> None:
        """Free ``seq``'s KV: its cache (padded engine) or its row, refilled by the last row (slots)."""
        seq.cache = None
        if seq.row < 0:
            return
        last = self._rows[-1]
        if last is not seq:
            self._slots.move_row(last.row, seq.row, last.kv_len)
            self._rows[seq.row] = last
            last.row = seq.row
        self._rows.pop()
        seq.row = -1

    def _decode_step(self) -> None:
        batch = list(self._running)
        device = self.model.device
        ids = torch.tensor([[s.output_ids[-1]] for s in batch], dtype=torch.long, device=device)  # [B, 1]
        try:
            if len(batch) == 1:
                out = self.model(input_ids=ids, cache=batch[0].cache, use_cache=True, **self._logits_kw)
            else:
                merged = merge_caches([s.cache for s in batch])
                out = self.model(
                    input_ids=ids,
                    cache=merged.cache,
                    attention_mask=merged.attention_mask.to(device),
                    position_ids=merged.position_ids.to(device),
                    use_cache=True,
                    **self._logits_kw,
                )
                for seq, cache in zip(batch, split_cache(merged, merged.cache)):
                    seq.cache = cache
        except Exception as exc:
            log.warning("runner %s: decode step of %d sequences failed: %s", self.name, len(batch), exc)
            for seq in batch:
                self._running.remove(seq)
                self._finish(seq, FinishReason.ERROR, error=exc)
            return
        if self.metrics is not None:
            self.metrics.batch_size.labels(model=self.name).observe(len(batch))
        logits = out.logits[:, -1]  # [B, V]
        for row, seq in enumerate(batch):
            self._take_token_or_fail(seq, logits[row])

    def _take_token_or_fail(self, seq: _Sequence, logits: torch.Tensor) -> None:
        """Take one token; any failure (non-finite logits, a sampling error) ends this sequence only."""
        try:
            self._take_token(seq, logits)
        except Exception as exc:  # noqa: BLE001
            log.warning("runner %s: sequence %s failed: %s", self.name, seq.handle.request_id, exc)
            if seq in self._running:
                self._running.remove(seq)
            self._finish(seq, FinishReason.ERROR, error=exc)

    def _take_token(self, seq: _Sequence, logits: torch.Tensor) -> None:
        """Select, append and deliver one token of ``seq`` from ``logits[V]`` (fp32/bf16).

        Raises:
            NonFiniteLogits: ``logits`` holds NaN or inf (sampling would be meaningless,
                and ``torch.multinomial`` raises a bare RuntimeError on it).
        """
        if not bool(torch.isfinite(logits).all()):
            raise NonFiniteLogits(
                f"the model produced non-finite logits (NaN/inf) for request {seq.handle.request_id} at"
                f" output position {len(seq.output_ids)}; the request was ended")
        token = select_token(logits, seq.params, seq.generator, seq.counts)
        entry = token_logprob(logits, token, seq.params.logprobs) if seq.params.logprobs is not None else None
        if seq.counts is not None:
            seq.counts.add(token)
        seq.output_ids.append(token)
        if self.metrics is not None:
            self.metrics.completion_tokens.labels(model=self.name).inc()
        is_eos = token in self.eos_token_ids and not seq.params.ignore_eos
        reason = None
        if is_eos:
            reason = FinishReason.STOP
        elif len(seq.output_ids) >= seq.params.max_new_tokens or seq.total_len >= self.max_model_len:
            reason = FinishReason.LENGTH
        text = seq.text.push(token, final=reason is not None) if not is_eos else seq.text.finish()
        if seq.text.stopped:
            reason = FinishReason.STOP
        event = GenerationEvent((token,), text, reason, logprobs=(entry,) if entry is not None else (),
                                prompt_logprobs=seq.pending_prompt_logprobs)
        seq.pending_prompt_logprobs = None
        if reason is not None:
            self._running.remove(seq)
            self._release(seq)
            self._count_finish(reason)
        seq.handle._deliver(event)

    def _finish(self, seq: _Sequence, reason: FinishReason, error: BaseException | None = None) -> None:
        self._leave_backlog(seq)
        self._release(seq)
        seq.handle._deliver(GenerationEvent(finish_reason=reason, error=error))
        self._count_finish(reason)

    def _count_finish(self, reason: FinishReason) -> None:
        if self.metrics is not None:
            self.metrics.sequences_finished.labels(model=self.name, reason=reason.value).inc()

    def _update_gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.running_sequences.labels(model=self.name).set(len(self._running))
            self.metrics.waiting_sequences.labels(model=self.name).set(len(self._waiting))
