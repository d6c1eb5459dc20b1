"""OpenAI-compatible request and response bodies (pydantic, at the HTTP edge)."""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

MAX_STOP_STRINGS = 4

TokenIds = list[StrictInt]
Prompt = Union[StrictStr, list[StrictStr], TokenIds, list[TokenIds]]


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    max_tokens: StrictInt | None = Field(None, ge=1, description="tokens to generate at most")
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: StrictInt | None = Field(None, ge=0, le=2**63 - 1)
    stop: StrictStr | list[StrictStr] | None = None
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    n: StrictInt = Field(1, ge=1, le=1, description="only n=1 is supported")
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        if any(len(s) == 0 or len(s) > 200 for s in stops):
            raise ValueError("stop strings must have 1 to 200 characters")
        return v

    @property
    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: Prompt = Field(..., description="text, list of texts, token ids, or list of token-id lists")
    max_tokens: StrictInt | None = Field(16, ge=1, description="tokens to generate at most")


class ChatMessage(BaseModel):
    """One chat message (OpenAI ``messages[i]``: role and content)."""
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: StrictStr


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions`` (needs a tokenizer with a chat template)."""

    messages: list[ChatMessage] = Field(..., min_length=1)


class Usage(BaseModel):
    """Token counts of a response (OpenAI ``usage``; tokens)."""
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    """One choice of ``/v1/completions`` (text, token ids, finish reason)."""
    index: int
    text: str
    token_ids: list[int] | None = None
    logprobs: None = None
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
