"""The caller's side of a generation: events per step, and a handle to await or cancel them.

The model runner thread produces :class:`GenerationEvent` objects; each request's coroutine
consumes them from its :class:`GenerationHandle` on its own event loop. The only
crossing between the two threads is ``loop.call_soon_threadsafe`` and a
``threading.Event`` for cancellation.
"""

from __future__ import annotations

import asyncio
import enum
import threading
from dataclasses import dataclass

from eaas.gateway.logprobs import TokenLogprob


class FinishReason(str, enum.Enum):
    """Why a sequence stopped (OpenAI ``finish_reason`` values, plus ``cancelled``)."""
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class GenerationEvent:
    """What one step produced for one sequence.

    Attributes:
        token_ids: tokens generated in this step (usually one).
        text: text released in this step (may be empty while held back).
        finish_reason: set on the sequence's last event.
        error: the exception that ended the sequence (``finish_reason == ERROR``).
        logprobs: one entry per token of ``token_ids`` when the request asked for logprobs.
        prompt_logprobs: on a sequence's first event only, when the request asked for the
            prompt's logprobs (``echo``): one entry per prompt token, the first None.
    """

    token_ids: tuple[int, ...] = ()
    text: str = ""
    finish_reason: FinishReason | None = None
    error: BaseException | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None


class GenerationHandle:
    """The caller's side of one sequence: an async iterator of events, and cancel()."""

    def __init__(self, request_id: str, prompt_ids: list[int], loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self._loop = loop
        self._queue: asyncio.Queue[GenerationEvent] = asyncio.Queue()
        self._cancelled = threading.Event()
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop generating this sequence at the next step (idempotent, thread-safe)."""
        self._cancelled.set()

    def _deliver(self, event: GenerationEvent) -> None:  # runner thread
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the caller's loop is closed: nobody listens any more
            self.cancel()

    async def next_event(self) -> GenerationEvent:
        event = await self._queue.get()
        self.token_ids.extend(event.token_ids)
        self.logprobs.extend(event.logprobs)
        if event.prompt_logprobs is not None:
            self.prompt_logprobs = event.prompt_logprobs
        return event

    async def __aiter__(self):
        while True:
            event = await self.next_event()
            yield event
            if event.finish_reason is not None:
                return
