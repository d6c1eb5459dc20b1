"""OpenAI-compatible request and response bodies (pydantic, at the HTTP edge)."""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

from eaas.gateway.errors import bad_request

MAX_STOP_STRINGS = 4
MAX_N = 128
"""``n`` / ``best_of`` at most (the runner's batch size is the tighter limit, checked per model)."""
MAX_LOGPROBS = 20
"""``logprobs`` (completions) and ``top_logprobs`` (chat) at most, as vLLM's default ``max_logprobs``."""
I64_MIN, I64_MAX = -(2**63), 2**63 - 1
_TOKEN_ID = re.compile(r"0|[1-9][0-9]{0,9}", re.ASCII)

TokenIds = list[StrictInt]
Prompt = Union[StrictStr, list[StrictStr], TokenIds, list[TokenIds]]

# Documented OpenAI parameters this server does not implement: refused with a 400 that names them,
# unless the value sent is one that changes nothing (OpenAI's own default, or an empty list).
# Each maps to the values accepted as no-ops; None (JSON null) is always accepted.
UNSUPPORTED_COMPLETION: dict[str, tuple[Any, ...]] = {
    "suffix": ("",),
}
UNSUPPORTED_CHAT: dict[str, tuple[Any, ...]] = {
    "audio": (),
    "function_call": ("none",),
    "functions": ([],),
    "metadata": (),
    "modalities": (["text"],),
    "parallel_tool_calls": (True,),
    "prediction": (),
    "prompt_cache_key": (),
    "reasoning_effort": (),
    "response_format": ({"type": "text"},),
    "safety_identifier": (),
    "service_tier": ("auto", "default"),
    "store": (False,),
    "tool_choice": ("none",),
    "tools": ([],),
    "verbosity": (),
    "web_search_options": (),
}


class StreamOptions(BaseModel):
    """OpenAI ``stream_options`` (only with ``stream: true``)."""
    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool = False
    include_obfuscation: StrictBool | None = Field(
        None, description="accepted only as false/null: chunks carry no obfuscation padding")

    @field_validator("include_obfuscation")
    @classmethod
    def _no_obfuscation(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError("include_obfuscation=true is not supported (no obfuscation padding is sent)")
        return v


class _Sampling(BaseModel):
    """The parameters both generation endpoints share (OpenAI's, plus vLLM's ``top_k``, ``min_p``,
    ``repetition_penalty`` and ``ignore_eos``). Unknown fields are refused (400 naming the field)."""

    model_config = ConfigDict(extra="forbid")
    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {}
    """Documented parameters refused unless null or a no-op value (per endpoint)."""

    model: StrictStr
    max_tokens: StrictInt | None = Field(None, ge=0, description="tokens to generate at most")
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: StrictInt | None = Field(None, ge=I64_MIN, le=I64_MAX, description="any signed 64-bit integer")
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = Field(1, ge=1, le=MAX_N, description="choices per prompt (one prefill, n decodes)")
    logit_bias: dict[str, StrictFloat | StrictInt] | None = Field(
        None, description="token id (as a decimal string) -> bias in [-100, 100]")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    user: StrictStr | None = Field(None, max_length=256, description="end-user id: written to the request log")
    # vLLM's extra sampling parameters
    top_k: StrictInt = Field(0, ge=-1, description="keep the k most likely tokens; 0 or -1 = off (vLLM)")
    min_p: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False, description="vLLM's min-p; 0 = off")
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0, allow_inf_nan=False, description="vLLM's; 1 = off")
    ignore_eos: StrictBool = False

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        if any(len(s) == 0 or len(s) > 200 for s in stops):
            raise ValueError("stop strings must have 1 to 200 characters")
        for s in stops:  # a lone surrogate can never appear in decoded text: it would never stop anything
            try:
                s.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"stop strings must be valid Unicode text ({e.reason} at position {e.start})") from None
        return v

    @field_validator("logit_bias")
    @classmethod
    def _check_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not _TOKEN_ID.fullmatch(key):  # canonical ASCII only: "7", never " 7", "07" or another script's 7
                raise ValueError(f"keys must be token ids written as decimal integers, got {key[:20]!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"bias for token {key} must be in [-100, 100], got {bias}")
        return v

    def check(self) -> None:
        """The checks that span fields, and the refused parameters (after schema validation).

        Raises:
            APIError: 400 in OpenAI's error shape, ``param`` naming the offending field.
        """
        refused = self.refused_parameter()
        if refused is not None:
            raise bad_request(f"{refused!r} is not supported by this server", param=refused,
                              code="unsupported_parameter")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true", param="stream_options")

    @property
    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def bias_pairs(self) -> tuple[tuple[int, float], ...]:
        """``logit_bias`` as ``(token_id, bias)`` pairs (ids not yet checked against a vocabulary)."""
        return tuple((int(k), float(b)) for k, b in (self.logit_bias or {}).items())

    def refused_parameter(self) -> str | None:
        """The first unsupported OpenAI parameter this request sets to a value that would matter."""
        for name, harmless in self.UNSUPPORTED.items():
            value = getattr(self, name)
            if value is not None and not any(value == h for h in harmless):
                return name
        return None


class CompletionRequest(_Sampling):
    """``POST /v1/completions`` (OpenAI's legacy completions; every documented field is known)."""

    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = UNSUPPORTED_COMPLETION

    prompt: Prompt = Field(..., description="text, list of texts, token ids, or list of token-id lists")
    max_tokens: StrictInt | None = Field(16, ge=0, description="tokens to generate at most (0 only with echo)")
    best_of: StrictInt | None = Field(None, ge=1, le=MAX_N, description="candidates per prompt; the n best are returned")
    echo: StrictBool = False
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS, description="top alternatives per token")
    suffix: Any = Field(None, description="not supported (refused unless null or empty)")

    def check(self) -> None:
        super().check()
        if self.max_tokens == 0 and not self.echo:
            raise bad_request("max_tokens=0 is only allowed with echo=true (it scores the prompt)", param="max_tokens")
        if self.best_of is not None:
            if self.best_of < self.n:
                raise bad_request(f"best_of ({self.best_of}) must be at least n ({self.n})", param="best_of")
            if self.stream and self.best_of > self.n:
                raise bad_request("best_of > n cannot be streamed (the best choices are known only at the end)",
                                  param="best_of")

    @property
    def candidates(self) -> int:
        """Sequences generated per prompt: ``best_of`` when given, else ``n``."""
        return self.best_of if self.best_of is not None else self.n


class TextPart(BaseModel):
    """One ``{"type": "text", "text": ...}`` part of a chat message's content."""
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    """One chat message (OpenAI ``messages[i]``): role, content as a string or a list of text parts,
    and the optional ``name`` / ``tool_call_id`` the chat template receives."""
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: StrictStr | list[dict[str, Any]] | None = None
    name: StrictStr | None = None
    tool_call_id: StrictStr | None = None

    @field_validator("content")
    @classmethod
    def _check_parts(cls, v: str | list[dict[str, Any]] | None) -> str | list[dict[str, Any]] | None:
        if isinstance(v, list):
            for j, part in enumerate(v):
                kind = part.get("type")
                if kind != "text":
                    raise ValueError(f"content part {j} has type {kind!r}: only 'text' parts are supported"
                                     " (this model takes text only)")
                TextPart.model_validate(part)
        return v

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        return self

    @property
    def text(self) -> str:
        """The content as one string (text parts joined by newlines, as vLLM does)."""
        if isinstance(self.content, list):
            return "\n".join(p["text"] for p in self.content)
        return self.content or ""

    def template_dict(self) -> dict[str, str]:
        """What the chat template sees: role, content as text, and name / tool_call_id when given."""
        out = {"role": self.role, "content": self.text}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions`` (needs a tokenizer with a chat template; every documented
    field is known: implemented, or refused by :meth:`refused_parameter`)."""

    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = UNSUPPORTED_CHAT

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1, description="wins over max_tokens")
    max_tokens: StrictInt | None = Field(None, ge=1, description="deprecated by OpenAI for max_completion_tokens")
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    audio: Any = None
    function_call: Any = None
    functions: Any = None
    metadata: Any = None
    modalities: Any = None
    parallel_tool_calls: Any = None
    prediction: Any = None
    prompt_cache_key: Any = None
    reasoning_effort: Any = None
    response_format: Any = None
    safety_identifier: Any = None
    service_tier: Any = None
    store: Any = None
    tool_choice: Any = None
    tools: Any = None
    verbosity: Any = None
    web_search_options: Any = None

    def check(self) -> None:
        super().check()
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs requires logprobs=true", param="top_logprobs")

    @property
    def candidates(self) -> int:
        """Sequences generated per conversation (``n``)."""
        return self.n

    @property
    def output_limit(self) -> int | None:
        """``max_completion_tokens``, else ``max_tokens``, else None."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class PromptTokensDetails(BaseModel):
    """OpenAI ``usage.prompt_tokens_details``: prompt tokens served from a prefix cache (none here)."""
    cached_tokens: int = 0


class Usage(BaseModel):
    """Token counts of a response (OpenAI ``usage``; tokens). A prompt counts once however many
    choices it has; ``completion_tokens`` counts every generated token, ``best_of`` candidates included."""
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()


class CompletionChoice(BaseModel):
    """One choice of ``/v1/completions`` (text, token ids, finish reason)."""
    index: int
    text: str
    token_ids: list[int] | None = None
    logprobs: dict[str, Any] | None = Field(None, description="tokens, token_logprobs, top_logprobs, text_offset")
    finish_reason: str | None


class CompletionResponse(BaseModel):
    """The ``/v1/completions`` response body (OpenAI ``text_completion``)."""
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ChatChoiceMessage(BaseModel):
    """The assistant message of a chat choice."""
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    """One choice of ``/v1/chat/completions``."""
    index: int
    message: ChatChoiceMessage
    logprobs: dict[str, Any] | None = Field(None, description="content: [{token, logprob, bytes, top_logprobs}]")
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    """The ``/v1/chat/completions`` response body (OpenAI ``chat.completion``)."""
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    """One served model in ``/v1/models``."""
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "eaas"
    max_model_len: int


class ModelList(BaseModel):
    """The ``/v1/models`` response body."""
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    """OpenAI error object: message, type, param, code."""
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI error envelope ``{"error": {...}}``."""
    error: ErrorDetail
