"""``/v1/completions`` and ``/v1/chat/completions``: prompts in, runner events out.

A client that disconnects stops its sequences: non-streaming requests watch the
ASGI channel for ``http.disconnect``; streaming responses cancel in ``finally``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from eaas.gateway.cancel import CLIENT_CLOSED, note_cancelled, wait_disconnect
from eaas.gateway.errors import bad_request, error_body, error_response, to_api_error
from eaas.gateway.handles import FinishReason, GenerationEvent, GenerationHandle
from eaas.gateway.runner import ModelRunner
from eaas.gateway.sampling import SamplingParams
from eaas.gateway.schemas import ChatCompletionRequest, CompletionRequest, _Sampling

MAX_PROMPTS = 64


class CancellingStreamingResponse(StreamingResponse):
    """A streaming response that runs ``on_close`` however the stream ends."""

    def __init__(self, content: Any, on_close: Any, **kw: Any) -> None:
        super().__init__(content, **kw)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def max_prompt_chars(runner: ModelRunner) -> int:
    """Characters a text prompt may have before tokenizing it is pointless (cached per runner).

    No token covers more characters than the longest vocabulary entry, so a text
    longer than ``max_model_len * longest_token * 2`` (2: normalizer slack) cannot
    fit: it is refused before the tokenizer spends seconds and gigabytes on it.
    """
    cached = getattr(runner, "_eaas_max_prompt_chars", None)
    if cached is None:
        try:
            longest = max((len(t) for t in runner.tokenizer.get_vocab()), default=16)
        except (AttributeError, TypeError):
            longest = 64
        cached = runner.max_model_len * max(1, longest) * 2 + 64
        runner._eaas_max_prompt_chars = cached  # type: ignore[attr-defined]
    return int(cached)


def check_text(text: str, max_chars: int, runner: ModelRunner, param: str = "prompt") -> None:
    """Refuse text the tokenizer cannot take (lone surrogates) or that cannot fit the context.

    Raises:
        HTTPException: 400 with OpenAI's error shape.
    """
    if len(text) > max_chars:
        raise bad_request(f"{param} has {len(text)} characters: it cannot fit the model's limit of "
                          f"{runner.max_model_len} tokens", param=param, code="context_length_exceeded")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad_request(f"{param} is not valid Unicode text ({e.reason} at position {e.start})", param=param) from None


def normalize_prompt(prompt: Any, runner: ModelRunner) -> list[list[int]]:
    """Text, texts, token ids or lists of token ids -> one token-id list per prompt."""
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts or len(prompts) > MAX_PROMPTS:
        raise bad_request(f"prompt must hold 1 to {MAX_PROMPTS} prompts, got {len(prompts)}", param="prompt")
    vocab = int(getattr(runner.config, "vocab_size", 0) or len(runner.tokenizer))
    max_chars = max_prompt_chars(runner)
    out = []
    for p in prompts:
        if isinstance(p, str):
            check_text(p, max_chars, runner)
        elif len(p) > runner.max_model_len:
            raise bad_request(f"prompt's {len(p)} tokens exceed the model's limit of {runner.max_model_len}",
                              param="prompt", code="context_length_exceeded")
        ids = runner.tokenizer(p, add_special_tokens=True)["input_ids"] if isinstance(p, str) else list(p)
        if not ids:
            raise bad_request("prompt is empty (no tokens)", param="prompt")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"token ids must be in [0, {vocab}); got {bad[:5]}", param="prompt")
        out.append(ids)
    return out


def sampling_params(req: _Sampling, prompts: list[list[int]], runner: ModelRunner, default_max: int) -> SamplingParams:
    """Build and check the request's sampling parameters against the model's limit."""
    longest = max(len(p) for p in prompts)
    room = runner.max_model_len - longest
    max_tokens = req.max_tokens if req.max_tokens is not None else min(default_max, room)
    if room < 1 or max_tokens > room:
        raise bad_request(
            f"max_tokens={max_tokens} plus the prompt's {longest} tokens exceeds the model's "
            f"limit of {runner.max_model_len} tokens",
            param="max_tokens", code="context_length_exceeded",
        )
    return SamplingParams(
        max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
        seed=req.seed, stop=req.stop_list, ignore_eos=req.ignore_eos,
    )


async def _merge(handles: list[GenerationHandle]) -> AsyncIterator[tuple[int, GenerationEvent]]:
    """Events of several sequences as they come, tagged by index."""
    if len(handles) == 1:
        async for event in handles[0]:
            yield 0, event
        return
    out: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, h: GenerationHandle) -> None:
        async for event in h:
            await out.put((i, event))

    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    try:
        left = len(handles)
        while left:
            i, event = await out.get()
            left -= event.finish_reason is not None
            yield i, event
    finally:
        for t in tasks:
            t.cancel()


def _finish_str(reason: FinishReason | None) -> str | None:
    return None if reason is None else reason.value


class Generation:
    """One HTTP generation request: its handles and its response in either mode."""

    def __init__(self, runner: ModelRunner, prompts: list[list[int]], params: SamplingParams, chat: bool) -> None:
        self.runner = runner
        self.prompts = prompts
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        loop = asyncio.get_running_loop()
        self.handles = runner.submit_all(prompts, params, loop)
        self.endpoint = "chat_completions" if chat else "completions"
        self.finished = False
        self._noted = False
        if runner.metrics is not None:
            runner.metrics.prompt_tokens.labels(model=runner.name).inc(sum(len(p) for p in prompts))

    def cancel(self) -> None:
        for h in self.handles:
            h.cancel()

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(len(h.token_ids) for h in self.handles)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _choice(self, i: int, text: str, reason: str | None, token_ids: list[int] | None, delta: bool,
                role: bool = True) -> dict:
        if self.chat:
            if not delta:
                return {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
            # OpenAI streams the role in a choice's first delta only
            body = {"role": "assistant", "content": text} if role else {"content": text}
            return {"index": i, "delta": body, "finish_reason": reason}
        return {"index": i, "text": text, "token_ids": token_ids, "logprobs": None, "finish_reason": reason}

    def _envelope(self, choices: list[dict], stream: bool) -> dict:
        obj = ("chat.completion.chunk" if stream else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.runner.name, "choices": choices}

    async def respond(self, request: Request) -> Response:
        """Wait for every sequence (cancelling them if the client leaves)."""
        texts = [[] for _ in self.handles]
        reasons: list[str | None] = [None] * len(self.handles)

        async def collect() -> None:
            async for i, event in _merge(self.handles):
                if event.error is not None:
                    raise event.error
                texts[i].append(event.text)
                if event.finish_reason is not None:
                    reasons[i] = _finish_str(event.finish_reason)

        work = asyncio.ensure_future(collect())
        watch = asyncio.ensure_future(wait_disconnect(request))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():  # the client went away
                self.cancel()
                work.cancel()
                note_cancelled(self.runner.metrics, self.endpoint, self.id, "its sequences were stopped")
                return Response(status_code=CLIENT_CLOSED)
            if work.exception() is not None:
                return error_response(work.exception())
        finally:
            watch.cancel()
            self.cancel()
        choices = [
            self._choice(i, "".join(texts[i]), reasons[i], list(h.token_ids), delta=False)
            for i, h in enumerate(self.handles)
        ]
        return JSONResponse({**self._envelope(choices, stream=False), "usage": self.usage()})

    async def stream(self, include_usage: bool) -> Response:
        """SSE: one chunk per step and sequence, ``data: [DONE]`` last."""
        events = _merge(self.handles)
        try:
            first = await events.__anext__()
        except BaseException:
            self.cancel()
            raise
        if first[1].error is not None:
            self.cancel()
            return error_response(first[1].error)

        async def body() -> AsyncIterator[str]:
            pending: tuple[int, GenerationEvent] | None = first
            role_sent: set[int] = set()
            try:
                while pending is not None:
                    i, event = pending
                    if event.error is not None:
                        yield f"data: {json.dumps(error_body(to_api_error(event.error)))}\n\n"
                        break
                    if event.token_ids or event.finish_reason is not None:
                        choice = self._choice(i, event.text, _finish_str(event.finish_reason),
                                              list(event.token_ids), delta=True, role=i not in role_sent)
                        role_sent.add(i)
                        yield f"data: {json.dumps(self._envelope([choice], stream=True))}\n\n"
                    pending = await anext(events, None)
                if include_usage:
                    yield f"data: {json.dumps({**self._envelope([], stream=True), 'usage': self.usage()})}\n\n"
                yield "data: [DONE]\n\n"
                self.finished = True
            finally:
                self.cancel()

        def on_close() -> None:
            self.cancel()
            if not self.finished and not self._noted:
                self._noted = True
                note_cancelled(self.runner.metrics, self.endpoint, self.id, "its stream was stopped")

        return CancellingStreamingResponse(body(), on_close=on_close, media_type="text/event-stream",
                                           headers={"Cache-Control": "no-cache"})


def chat_prompt(req: ChatCompletionRequest, runner: ModelRunner) -> list[list[int]]:
    """Render the messages with the tokenizer's chat template."""
    tok = runner.tokenizer
    if not getattr(tok, "chat_template", None):
        raise bad_request(f"model {runner.name!r} has no chat template; use /v1/completions", param="model")
    messages = [m.model_dump() for m in req.messages]
    max_chars = max_prompt_chars(runner)
    total = 0
    for m in messages:
        content = m.get("content") or ""
        if isinstance(content, str):
            check_text(content, max_chars, runner, param="messages")
            total += len(content)
    if total > max_chars:
        raise bad_request(f"messages have {total} characters: they cannot fit the model's limit of "
                          f"{runner.max_model_len} tokens", param="messages", code="context_length_exceeded")
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return normalize_prompt([list(ids)], runner)


async def handle_generation(
    request: Request, req: CompletionRequest | ChatCompletionRequest, runner: ModelRunner
) -> Response:
    """Shared body of both generation endpoints."""
    chat = isinstance(req, ChatCompletionRequest)
    # tokenizing is CPU work: keep it off the event loop so /healthz and streams stay responsive
    if chat:
        prompts = await run_in_threadpool(chat_prompt, req, runner)
    else:
        prompts = await run_in_threadpool(normalize_prompt, req.prompt, runner)
    params = sampling_params(req, prompts, runner, default_max=16 if not chat else runner.max_model_len)
    gen = Generation(runner, prompts, params, chat)
    if req.stream:
        return await gen.stream(bool((req.stream_options or {}).get("include_usage")))
    return await gen.respond(request)
