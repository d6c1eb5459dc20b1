"""The model runner: one thread owns the model and decodes many requests together.

Each step (after nano-vllm): the engine decides how many waiting prompts to admit, prefills
them, and runs *one* batched decode forward for every running sequence; then each sequence
takes its token (sampling, logprobs), releases text and maybe finishes. The forwards and the
KV cache belong to the engine (:mod:`eaas.gateway.engines`: ``slots``, batched prefill into
KV slots read in place; ``padded``, the previous one); the rest is here.

This is iteration-level (continuous) batching: a request joins or leaves the batch
between any two forward passes. It works for every causal LM transformers can
``generate`` with — including DeepSeek-V3, which transformers' paged continuous
batching cannot run — and for models loaded with ``experts_implementation="eaas"``,
whose expert calls then carry the tokens of the whole batch. Requests interact with the
runner only through thread-safe queues.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from typing import Any, Callable

import torch

from eaas.errors import EaaSError, NonFiniteLogits, Overloaded
from eaas.gateway.engines import Engine, PaddedEngine, SlotsEngine, StepHooks
from eaas.gateway.handles import FinishReason, GenerationEvent, GenerationHandle
from eaas.gateway.logprobs import TokenLogprob, token_bytes, token_logprob, token_name
from eaas.gateway.metrics import GatewayMetrics
from eaas.gateway.sampling import SamplingParams, TokenCounts, select_token
from eaas.gateway.sequence import SequenceState
from eaas.gateway.textstream import TextStream

log = logging.getLogger(__name__)

_ids = itertools.count()

IDLE_TICK_S = 1.0
"""An idle runner thread wakes this often (seconds), so its liveness stays visible."""


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
        microbatch_min_batch: ``slots`` engine: decode steps of at least this many sequences run
            as two concurrent micro-batches (0: never); see :class:`~eaas.gateway.engines.SlotsEngine`.
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
        microbatch_min_batch: int = 0,
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
        self.metrics: GatewayMetrics | None = None
        self._inbox: queue.Queue[Any] = queue.Queue()
        self._waiting: list[SequenceState] = []
        self._running: list[SequenceState] = []
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
        expanded_kv_heads_fix(model)  # both engines pass masks (the padded one too, in batched decodes)
        hooks = StepHooks(prefilled=self._start_group, decoded=self._take_token_or_fail, failed=self._fail)
        self._engine: Engine = (
            SlotsEngine(model, hooks, max_batch_size, self.max_model_len + 1, max_prefill_tokens,
                        microbatch_min_batch)
            if engine == "slots" else PaddedEngine(model, hooks, max_batch_size, max_prefills_per_step))

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
        detail = {"alive": alive, "stuck": stuck, "since_last_step_s": round(since_s, 3), "engine": self.engine,
                  "running": len(self._running), "waiting": len(self._waiting), "step_failures": self.step_failures,
                  # decode steps run as two overlapped micro-batches (EAAS_MICROBATCH_MIN_BATCH; slots engine)
                  "microbatch_steps": getattr(self._engine, "overlapped_steps", 0)}
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
                group.append(SequenceState(handle, params.for_choice(j), now, TextStream(self.tokenizer, params.stop)))
                handles.append(handle)
            group[0].backlog_tokens = len(prompt_ids)
            group[0].forks = group[1:]
            self._inbox.put(group[0])
        return handles

    def _leave_backlog(self, seq: SequenceState) -> None:
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
                    self._engine.reset()
        for seq in self._all_waiting() + self._running:
            self._finish(seq, FinishReason.ERROR, error=EaaSError("the model runner stopped"))
        self._waiting.clear()
        self._running.clear()
        self._engine.close()

    def _all_waiting(self) -> list[SequenceState]:
        return [s for parent in self._waiting for s in parent.group]

    def _step(self) -> bool:
        """One engine step: admit, prefill, one batched decode. False once stopping."""
        self._drain_inbox(block=not (self._running or self._waiting))
        if self._stopping:
            return False
        self._drop_cancelled()
        admit = self._engine.admit(self._waiting, len(self._running))
        admitted, self._waiting = self._waiting[:admit], self._waiting[admit:]
        if admitted:
            for parent in admitted:
                for member in parent.group:
                    self._leave_backlog(member)
            self._engine.prefill(admitted)
        if self._running:
            if self.metrics is not None:
                self.metrics.batch_size.labels(model=self.name).observe(len(self._running))
            self._engine.decode(self._running)
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
        elif isinstance(item, SequenceState):
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

    def _start_group(self, seq: SequenceState, last: torch.Tensor, plps: tuple[TokenLogprob | None, ...] | None) -> None:
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

    def _fail(self, seq: SequenceState, exc: BaseException) -> None:
        """End ``seq`` with ``exc`` (its forward failed): out of the batch, its KV freed."""
        if seq in self._running:
            self._running.remove(seq)
        self._finish(seq, FinishReason.ERROR, error=exc)

    def _release(self, seq: SequenceState) -> None:
        self._engine.release(seq)

    def _take_token_or_fail(self, seq: SequenceState, logits: torch.Tensor) -> None:
        """Take one token; any failure (non-finite logits, a sampling error) ends this sequence only."""
        try:
            self._take_token(seq, logits)
        except Exception as exc:  # noqa: BLE001
            log.warning("runner %s: sequence %s failed: %s", self.name, seq.handle.request_id, exc)
            if seq in self._running:
                self._running.remove(seq)
            self._finish(seq, FinishReason.ERROR, error=exc)

    def _take_token(self, seq: SequenceState, logits: torch.Tensor) -> None:
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

    def _finish(self, seq: SequenceState, reason: FinishReason, error: BaseException | None = None) -> None:
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
