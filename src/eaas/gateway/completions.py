"""``/v1/completions`` and ``/v1/chat/completions``: prompts in, runner events out.

A client that disconnects stops its sequences: non-streaming requests watch the
ASGI channel for ``http.disconnect``; streaming responses cancel in ``finally``.
"""

from __future__ import annotations

import asyncio
import json
import logging
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
from eaas.gateway.logprobs import TokenLogprob, chat_logprobs, completion_logprobs
from eaas.gateway.runner import ModelRunner
from eaas.gateway.sampling import SamplingParams
from eaas.gateway.schemas import ChatCompletionRequest, CompletionRequest

log = logging.getLogger(__name__)

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
    vocab = vocab_size(runner)
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


def vocab_size(runner: ModelRunner) -> int:
    """Token ids the model scores (its logits width, the config's ``vocab_size``)."""
    return int(getattr(runner.config, "vocab_size", 0) or len(runner.tokenizer))


def sampling_params(req: CompletionRequest | ChatCompletionRequest, prompts: list[list[int]], runner: ModelRunner,
                    default_max: int) -> SamplingParams:
    """Build and check the request's sampling parameters against the model (context, vocabulary, batch).

    Raises:
        APIError: 400 naming the parameter: a prompt that fills the context (``prompt`` /
            ``messages``), output past the context limit, ``logit_bias`` ids
            outside the vocabulary, more choices than the runner can decode together.
    """
    chat = isinstance(req, ChatCompletionRequest)
    limit_param = "max_completion_tokens" if chat and req.max_completion_tokens is not None else "max_tokens"
    limit = req.output_limit if chat else req.max_tokens
    longest = max(len(p) for p in prompts)
    room = runner.max_model_len - longest
    if room < 1:  # the prompt alone fills the context: its fault, not the output limit's (as OpenAI reports it)
        raise bad_request(
            f"the prompt's {longest} tokens leave no room for output within the model's limit of "
            f"{runner.max_model_len} tokens",
            param="messages" if chat else "prompt", code="context_length_exceeded",
        )
    max_tokens = limit if limit is not None else min(default_max, room)
    if max_tokens > room:
        raise bad_request(
            f"{limit_param}={max_tokens} plus the prompt's {longest} tokens exceeds the model's "
            f"limit of {runner.max_model_len} tokens",
            param=limit_param, code="context_length_exceeded",
        )
    vocab = vocab_size(runner)
    bias = req.bias_pairs
    outside = [t for t, _ in bias if not 0 <= t < vocab]
    if outside:
        raise bad_request(f"logit_bias token ids must be in [0, {vocab}); got {outside[:5]}", param="logit_bias")
    count_param = "best_of" if not chat and req.best_of is not None else "n"
    if req.candidates > runner.max_batch_size:
        raise bad_request(f"{count_param}={req.candidates} exceeds this model's batch size of {runner.max_batch_size}"
                          " (the choices of a prompt decode together)", param=count_param)
    sequences = len(prompts) * req.candidates
    if sequences > runner.max_waiting_requests:
        raise bad_request(f"{len(prompts)} prompts x {count_param}={req.candidates} make {sequences} sequences, more than"
                          f" this model ever queues ({runner.max_waiting_requests})", param=count_param)
    if chat:
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        prompt_logprobs = None
    else:
        # best_of ranks its candidates by their logprobs, so it needs them even when not returned
        logprobs = req.logprobs if req.logprobs is not None else (0 if req.candidates > req.n else None)
        prompt_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
    return SamplingParams(
        max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=max(0, req.top_k),
        min_p=req.min_p, seed=req.seed, stop=req.stop_list, ignore_eos=req.ignore_eos, logit_bias=bias,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
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


def _mean_logprob(handle: GenerationHandle) -> float:
    """OpenAI's ``best_of`` ranking: log probability per generated token (higher is better)."""
    return sum(e.logprob for e in handle.logprobs) / max(1, len(handle.logprobs))


class Generation:
    """One HTTP generation request: its handles and its response in either mode.

    Args:
        runner: the model's runner.
        prompts: token ids per prompt.
        params: the sampling parameters (choice ``j`` of a prompt uses ``params.for_choice(j)``).
        req: the validated request (``n``, ``best_of``, ``echo``, ``logprobs``).
        prompt_texts: per prompt, the text ``echo`` returns.
    """

    def __init__(self, runner: ModelRunner, prompts: list[list[int]], params: SamplingParams,
                 req: CompletionRequest | ChatCompletionRequest, prompt_texts: list[str] | None = None) -> None:
        self.runner = runner
        self.prompts = prompts
        self.chat = isinstance(req, ChatCompletionRequest)
        self.n = req.n
        self.candidates = req.candidates
        self.echo = bool(getattr(req, "echo", False))
        self.want_logprobs = req.logprobs if self.chat else req.logprobs is not None
        self.prompt_texts = prompt_texts or [""] * len(prompts)
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        loop = asyncio.get_running_loop()
        self.handles = runner.submit_all(prompts, params, loop, n=self.candidates)
        self.endpoint = "chat_completions" if self.chat else "completions"
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
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": 0}}

    def _offsets(self, ids: list[int], positions: range) -> list[int]:
        """``text_offset`` of tokens ``positions`` of ``ids``: where each starts in the decoded text.

        Token ``i`` starts after the text of ``ids[:i]``, less a trailing U+FFFD that is only half
        a character (one the text of all of ``ids`` does not keep there).
        """
        decode = self.runner.tokenizer.decode
        full = decode(ids, skip_special_tokens=True)
        out = []
        for i in positions:
            before = decode(ids[:i], skip_special_tokens=True)
            n = len(before)
            while n and before[n - 1] == "\ufffd" and (n > len(full) or full[n - 1] != "\ufffd"):
                n -= 1
            out.append(n)
        return out

    def _logprobs(self, i: int, first_generated: int, token_ids: list[int], entries: list[TokenLogprob],
                  first: bool) -> dict | None:
        """The logprobs object for handle ``i``'s generated positions ``first_generated ..`` (with the
        prompt's before them on its first chunk when ``echo`` asked for them)."""
        if not self.want_logprobs:
            return None
        if self.chat:
            return chat_logprobs(entries, self.runner.token_name, self.runner.token_bytes)
        h = self.handles[i]
        generated = list(h.token_ids)
        base = len(self.prompt_texts[i // self.candidates]) if self.echo else 0
        span = range(first_generated, first_generated + len(token_ids))
        offsets = [base + o for o in self._offsets(generated[: span.stop], span)]
        if first and self.echo and h.prompt_logprobs is not None:
            prompt = list(h.prompt_ids)
            offsets = self._offsets(prompt, range(len(prompt))) + offsets
            token_ids = prompt + token_ids
            entries = list(h.prompt_logprobs) + entries
        return completion_logprobs(entries, token_ids, self.runner.token_name, offsets)

    def _choice(self, index: int, text: str, reason: str | None, token_ids: list[int] | None, delta: bool,
                role: bool = True, logprobs: dict | None = None) -> dict:
        if self.chat:
            if not delta:
                return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                        "finish_reason": reason}
            # OpenAI streams the role in a choice's first delta only
            body = {"role": "assistant", "content": text} if role else {"content": text}
            return {"index": index, "delta": body, "logprobs": logprobs, "finish_reason": reason}
        return {"index": index, "text": text, "token_ids": token_ids, "logprobs": logprobs, "finish_reason": reason}

    def _envelope(self, choices: list[dict], stream: bool) -> dict:
        obj = ("chat.completion.chunk" if stream else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.runner.name, "choices": choices}

    def _chosen(self) -> list[int]:
        """Handle positions returned, in choice order: per prompt the ``n`` best of its candidates."""
        out = []
        for p in range(len(self.prompts)):
            group = list(range(p * self.candidates, (p + 1) * self.candidates))
            if self.candidates > self.n:
                group = sorted(group, key=lambda i: -_mean_logprob(self.handles[i]))[: self.n]
            out.extend(group)
        return out

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
        choices = []
        for index, i in enumerate(self._chosen()):
            h = self.handles[i]
            prefix = self.prompt_texts[i // self.candidates] if self.echo else ""
            logprobs = self._logprobs(i, 0, list(h.token_ids), list(h.logprobs), first=True)
            choices.append(self._choice(index, prefix + "".join(texts[i]), reasons[i], list(h.token_ids),
                                        delta=False, logprobs=logprobs))
        return JSONResponse({**self._envelope(choices, stream=False), "usage": self.usage()})

    async def stream(self, include_usage: bool) -> Response:
        """SSE: one chunk per step and sequence, ``data: [DONE]`` last (``best_of`` == ``n`` here,
        so handle ``i`` is choice ``i``)."""
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
            started: set[int] = set()
            emitted = [0] * len(self.handles)  # generated tokens already sent, per choice
            try:
                while pending is not None:
                    i, event = pending
                    if event.error is not None:
                        yield f"data: {json.dumps(error_body(to_api_error(event.error)))}\n\n"
                        break
                    if event.token_ids or event.finish_reason is not None:
                        is_first = i not in started
                        started.add(i)
                        text = event.text
                        if is_first and self.echo:
                            text = self.prompt_texts[i // self.candidates] + text
                        logprobs = self._logprobs(i, emitted[i], list(event.token_ids), list(event.logprobs),
                                                  first=is_first)
                        emitted[i] += len(event.token_ids)
                        choice = self._choice(i, text, _finish_str(event.finish_reason), list(event.token_ids),
                                              delta=True, role=is_first, logprobs=logprobs)
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
    """Render the messages with the tokenizer's chat template (text parts joined by newlines)."""
    tok = runner.tokenizer
    if not getattr(tok, "chat_template", None):
        raise bad_request(f"model {runner.name!r} has no chat template; use /v1/completions", param="model")
    messages = [m.template_dict() for m in req.messages]
    max_chars = max_prompt_chars(runner)
    total = 0
    for m in messages:
        check_text(m["content"], max_chars, runner, param="messages")
        total += len(m["content"])
    if total > max_chars:
        raise bad_request(f"messages have {total} characters: they cannot fit the model's limit of "
                          f"{runner.max_model_len} tokens", param="messages", code="context_length_exceeded")
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return normalize_prompt([list(ids)], runner)


def echo_texts(prompt: Any, prompts: list[list[int]], runner: ModelRunner) -> list[str]:
    """What ``echo`` returns per prompt: the text as sent, or token ids decoded."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    return [runner.tokenizer.decode(ids, skip_special_tokens=True) for ids in prompts]


async def handle_generation(
    request: Request, req: CompletionRequest | ChatCompletionRequest, runner: ModelRunner
) -> Response:
    """Shared body of both generation endpoints.

    Raises:
        APIError: 400 for a refused parameter or a bad combination (see ``req.check``).
    """
    req.check()
    chat = isinstance(req, ChatCompletionRequest)
    # tokenizing is CPU work: keep it off the event loop so /healthz and streams stay responsive
    if chat:
        prompts = await run_in_threadpool(chat_prompt, req, runner)
    else:
        prompts = await run_in_threadpool(normalize_prompt, req.prompt, runner)
    params = sampling_params(req, prompts, runner, default_max=16 if not chat else runner.max_model_len)
    texts = await run_in_threadpool(echo_texts, req.prompt, prompts, runner) if not chat and req.echo else None
    gen = Generation(runner, prompts, params, req, texts)
    if req.user is not None:  # OpenAI's end-user id: kept with the request id for abuse tracing
        log.info("request %s: model %s, user %r, %d sequences", gen.id, runner.name, req.user, len(gen.handles))
    if req.stream:
        return await gen.stream(bool(req.stream_options and req.stream_options.include_usage))
    return await gen.respond(request)
