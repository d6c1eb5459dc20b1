"""The one place that maps errors to HTTP statuses, in OpenAI's error shape.

Body: ``{"error": {"message": str, "type": str, "param": str | None, "code": str | None}}``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from eaas.errors import (
    CheckpointError,
    ConfigError,
    EaaSError,
    ExpertComputeError,
    ExpertTimeout,
    NonFiniteLogits,
    NoReplicaAvailable,
    NotFound,
    Overloaded,
    ProtocolError,
    RegistryUnavailable,
    RemoteError,
)

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1


class APIError(Exception):
    """An error the gateway answers with a given status (raised by route code).

    Attributes:
        status: HTTP status.
        type: OpenAI error type (``invalid_request_error``, ``not_found_error``, ...).
        param: the offending request field, if any.
        code: short machine-readable code.
    """

    def __init__(
        self, status: int, message: str, *, type: str = "invalid_request_error",
        param: str | None = None, code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """An HTTP 400 in OpenAI's error shape."""
    return APIError(400, message, param=param, code=code)


def model_not_found(name: str, served: Iterable[str]) -> APIError:
    """An HTTP 404 for a model not served here, as OpenAI answers one (``invalid_request_error``,
    code ``model_not_found``), on every endpoint that takes a model."""
    return APIError(404, f"The model '{name}' does not exist; served here: {sorted(served)}",
                    type="invalid_request_error", param="model", code="model_not_found")


# EaaSError subclass -> (status, type, code); the first matching class wins.
_EAAS_STATUS: list[tuple[type[EaaSError], int, str, str]] = [
    (NoReplicaAvailable, 503, "service_unavailable", "no_replica"),
    (ExpertTimeout, 503, "service_unavailable", "expert_timeout"),
    (RegistryUnavailable, 503, "service_unavailable", "registry_unavailable"),
    (NotFound, 404, "not_found_error", "not_found"),
    # Between the gateway and the workers: a malformed wire message, an error reply or a failed
    # computation is an upstream (server) fault, never the HTTP caller's. The caller's own bad
    # input is refused as APIError 400 where it is read (schemas, tensors, completions).
    (ProtocolError, 502, "upstream_error", "bad_upstream_message"),
    (RemoteError, 502, "upstream_error", "worker_error"),
    (ExpertComputeError, 502, "upstream_error", "expert_compute_failed"),
    (ConfigError, 400, "invalid_request_error", "bad_request"),
    (CheckpointError, 500, "server_error", "checkpoint_error"),
    (NonFiniteLogits, 500, "server_error", "non_finite_logits"),
    (Overloaded, 429, "rate_limit_error", "overloaded"),
]


def to_api_error(exc: BaseException) -> APIError:
    """Map any exception to the :class:`APIError` the client sees."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EaaSError):
        for cls, status, type_, code in _EAAS_STATUS:
            if isinstance(exc, cls):
                return APIError(status, str(exc), type=type_, code=code)
        return APIError(502, str(exc), type="upstream_error", code=type(exc).__name__)
    log.exception("gateway: unexpected error", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}", type="server_error", code="internal_error")


def error_body(err: APIError) -> dict:
    """OpenAI error envelope ``{"error": {message, type, param, code}}`` as a dict."""
    return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}


def error_response(exc: BaseException) -> JSONResponse:
    """The JSON response for ``exc`` (``Retry-After`` on 503)."""
    err = to_api_error(exc)
    headers = None
    if err.status in (429, 503):
        retry = getattr(exc, "retry_after_s", RETRY_AFTER_S) if isinstance(exc, EaaSError) else RETRY_AFTER_S
        headers = {"Retry-After": str(retry)}
    if err.status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(error_body(err), status_code=err.status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    if first.get("type") == "json_invalid":
        return f"malformed JSON body: {first.get('ctx', {}).get('error', msg)}", None
    if first.get("type") == "extra_forbidden":  # OpenAI's own wording for an unknown field
        return f"Unrecognized request argument supplied: {param}", param
    return f"{param or 'body'}: {msg} (got {first.get('input')!r:.200})", param


def install_handlers(app: FastAPI) -> None:
    """Register the exception handlers on ``app``."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(EaaSError)
    async def _eaas_error(request: Request, exc: EaaSError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(APIError(400, message, param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(APIError(exc.status_code, str(exc.detail), type=type_))

    @app.exception_handler(Exception)
    async def _other(request: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)
