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
from eaas.gateway.kvbatch import merge_caches, split_cache
from eaas.gateway.handles import FinishReason, GenerationEvent, GenerationHandle
from eaas.gateway.metrics import GatewayMetrics
from eaas.gateway.sampling import SamplingParams, select_token
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
    generator: torch.Generator | None = None
    cache: DynamicCache | None = None
    output_ids: list[int] = field(default_factory=list)

    @property
    def prompt_ids(self) -> list[int]:
        return self.handle.prompt_ids

    @property
    def total_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


def num_to_admit(num_waiting: int, num_running: int, max_batch_size: int, max_prefills_per_step: int) -> int:
    """Scheduler decision: how many waiting sequences to prefill in this step."""
    return max(0, min(num_waiting, max_batch_size - num_running, max_prefills_per_step))


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
    ) -> None:
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

    def submit(
        self, prompt_ids: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop | None = None
    ) -> GenerationHandle:
        """Queue one sequence; events arrive on the returned handle in ``loop``.

        Raises:
            Overloaded: the admission backlog is full (see :meth:`submit_all`).
        """
        return self.submit_all([prompt_ids], params, loop)[0]

    def submit_all(
        self, prompts: list[list[int]], params: SamplingParams, loop: asyncio.AbstractEventLoop | None = None
    ) -> list[GenerationHandle]:
        """Queue several sequences of one request, all or none.

        Overload is refused, not queued forever: when the sequences submitted but
        not yet prefilled would exceed ``max_waiting_requests`` or their prompt tokens
        ``max_waiting_tokens``, nothing is queued (NVIDIA Dynamo and vLLM's router refuse
        the same way, 529/429, when their workers are saturated).

        Raises:
            Overloaded: the backlog is full; retry after ``retry_after_s``.
        """
        loop = loop or asyncio.get_running_loop()
        tokens = sum(len(p) for p in prompts)
        with self._backlog_lock:
            if (self._backlog_requests + len(prompts) > self.max_waiting_requests
                    or self._backlog_tokens + tokens > self.max_waiting_tokens):
                if self.metrics is not None:
                    self.metrics.rejected.labels(model=self.name).inc()
                raise Overloaded(
                    f"model {self.name!r} is overloaded: {self._backlog_requests} requests"
                    f" ({self._backlog_tokens} prompt tokens) already wait for a batch slot"
                    f" (limits {self.max_waiting_requests} / {self.max_waiting_tokens}); retry later")
            self._backlog_requests += len(prompts)
            self._backlog_tokens += tokens
        handles = []
        for prompt_ids in prompts:
            handle = GenerationHandle(f"seq-{next(_ids)}", list(prompt_ids), loop)
            self._inbox.put(_Sequence(handle, params, time.monotonic(), TextStream(self.tokenizer, params.stop)))
            handles.append(handle)
        return handles

    def _leave_backlog(self, seq: _Sequence) -> None:
        if seq.queued:
            seq.queued = False
            with self._backlog_lock:
                self._backlog_requests -= 1
                self._backlog_tokens -= len(seq.prompt_ids)

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
                    for seq in self._waiting + self._running:
                        self._finish(seq, FinishReason.ERROR, error=exc)
                    self._waiting.clear()
                    self._running.clear()
        for seq in self._waiting + self._running:
            self._finish(seq, FinishReason.ERROR, error=EaaSError("the model runner stopped"))
        self._waiting.clear()
        self._running.clear()

    def _step(self) -> bool:
        """One engine step: admit, prefill, one batched decode. False once stopping."""
        self._drain_inbox(block=not (self._running or self._waiting))
        if self._stopping:
            return False
        self._drop_cancelled()
        admit = num_to_admit(len(self._waiting), len(self._running), self.max_batch_size, self.max_prefills_per_step)
        admitted, self._waiting = self._waiting[:admit], self._waiting[admit:]
        for seq in admitted:
            self._prefill(seq)
        if self._running:
            self._decode_step()
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
                item.generator = item.params.make_generator()
            except Exception as exc:  # noqa: BLE001 - a bad request fails alone
                self._finish(item, FinishReason.ERROR, error=exc)
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
        for group in (self._waiting, self._running):
            for seq in [s for s in group if s.handle.cancelled]:
                group.remove(seq)
                self._finish(seq, FinishReason.CANCELLED)

    def _prefill(self, seq: _Sequence) -> None:
        self._leave_backlog(seq)
        device = self.model.device
        ids = torch.tensor([seq.prompt_ids], dtype=torch.long, device=device)  # [1, P]
        cache = DynamicCache()
        try:
            out = self.model(input_ids=ids, cache=cache, use_cache=True, **self._logits_kw)
        except Exception as exc:
            log.warning("runner %s: prefill of %s failed: %s", self.name, seq.handle.request_id, exc)
            self._finish(seq, FinishReason.ERROR, error=exc)
            return
        seq.cache = cache
        if self.metrics is not None:
            self.metrics.ttft_s.labels(model=self.name).observe(time.monotonic() - seq.arrival_s)
        self._running.append(seq)
        self._take_token_or_fail(seq, out.logits[0, -1])

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
        token = select_token(logits, seq.params, seq.generator)
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
        if reason is None:
            seq.handle._deliver(GenerationEvent((token,), text))
        else:
            self._running.remove(seq)
            seq.cache = None
            seq.handle._deliver(GenerationEvent((token,), text, reason))
            self._count_finish(reason)

    def _finish(self, seq: _Sequence, reason: FinishReason, error: BaseException | None = None) -> None:
        self._leave_backlog(seq)
        seq.cache = None
        seq.handle._deliver(GenerationEvent(finish_reason=reason, error=error))
        self._count_finish(reason)

    def _count_finish(self, reason: FinishReason) -> None:
        if self.metrics is not None:
            self.metrics.sequences_finished.labels(model=self.name, reason=reason.value).inc()

    def _update_gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.running_sequences.labels(model=self.name).set(len(self._running))
            self.metrics.waiting_sequences.labels(model=self.name).set(len(self._waiting))
