"""The gateway's HTTP routes: plain functions on one router, reading the app's :class:`GatewayState`.

``GET /healthz``, ``GET /readyz``, ``GET /metrics``, ``GET /v1/models``, ``GET /v1/models/{model}``,
``POST /v1/completions``, ``POST /v1/chat/completions``,
``POST /v1/layers/{model}/{layer}:forward`` and ``POST /v1/functions/{function_id}:invoke``
(safetensors bodies). Errors: :mod:`eaas.gateway.errors`.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hmac
import inspect
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from eaas.errors import Cancelled
from eaas.functions.families import moe_block
from eaas.gateway.cancel import await_or_cancel, new_request_id
from eaas.gateway.completions import handle_generation
from eaas.gateway.errors import APIError, model_not_found
from eaas.gateway.metrics import CONTENT_TYPE, GatewayMetrics
from eaas.gateway.runner import ModelRunner
from eaas.gateway.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from eaas.gateway.tensors import read_matrix, write_tensors
from eaas.settings import Settings

Readiness = Callable[[], "tuple[bool, dict]"]
FunctionInvoker = Callable[..., torch.Tensor]
"""``(function_id, x[N, D][, cancelled=threading.Event]) -> y[N, D]``; may raise ``NotFound`` (404)
or any ``EaaSError``. An invoker that takes ``cancelled`` should not start work once it is set."""

SAFETENSORS_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@dataclass
class GatewayState:
    """Everything the routes need, kept on ``app.state.gateway`` by :func:`eaas.gateway.app.create_app`."""

    settings: Settings
    runners: dict[str, ModelRunner]
    metrics: GatewayMetrics
    readiness: Readiness | None
    function_invoker: FunctionInvoker | None
    created: int
    # raw function invokes run here (cancellable while queued), not in Starlette's shared pool
    invoke_pool: concurrent.futures.ThreadPoolExecutor = field(default_factory=lambda: concurrent.futures.ThreadPoolExecutor(
        max_workers=8, thread_name_prefix="eaas-invoke"))

    @functools.cached_property
    def invoker_takes_cancelled(self) -> bool:
        """The function invoker accepts ``cancelled=`` (looked up once, not per request)."""
        fn = self.function_invoker
        return fn is not None and "cancelled" in inspect.signature(fn).parameters

    def runner(self, name: str) -> ModelRunner:
        """The runner serving model ``name``.

        Raises:
            APIError: 404 when no runner serves it.
        """
        runner = self.runners.get(name)
        if runner is None:
            raise model_not_found(name, self.runners)
        return runner

    def runner_health(self) -> tuple[bool, dict[str, Any]]:
        """(every runner healthy, per-runner detail); see :meth:`ModelRunner.health`."""
        checks = {name: r.health(self.settings.runner_stuck_s) for name, r in self.runners.items()}
        return all(ok for ok, _ in checks.values()), {name: d for name, (_, d) in checks.items()}


def gateway_state(request: Request) -> GatewayState:
    """The :class:`GatewayState` of the app serving ``request``."""
    return request.app.state.gateway


def check_api_key(request: Request) -> None:
    """Require ``Authorization: Bearer <key>`` when API keys are configured (constant-time compare).

    Raises:
        APIError: 401 with ``WWW-Authenticate: Bearer``.
    """
    keys = gateway_state(request).settings.api_keys
    if not keys:
        return
    auth = request.headers.get("authorization", "")
    token = auth[7:].strip().encode() if auth[:7].lower() == "bearer " else b""
    if not any(hmac.compare_digest(token, k.encode()) for k in keys):
        raise APIError(401, "missing or invalid API key (Authorization: Bearer <key>)",
                       type="authentication_error", code="invalid_api_key")


router = APIRouter()
_AUTH = [Depends(check_api_key)]


@router.get("/healthz", tags=["ops"], responses={503: {"model": dict}})
async def healthz(request: Request) -> JSONResponse:
    """200 while every model runner thread is alive and not stuck in one step; else 503."""
    healthy, detail = gateway_state(request).runner_health()
    return JSONResponse({"status": "ok" if healthy else "unhealthy", "runners": detail},
                        status_code=200 if healthy else 503)


@router.get("/readyz", tags=["ops"], responses={503: {"model": dict}})
async def readyz(request: Request) -> JSONResponse:
    """200 when the runners are healthy and (with an expert client) every function has a ready replica."""
    gw = gateway_state(request)
    healthy, runner_detail = gw.runner_health()
    detail: dict[str, Any] = {"runners": runner_detail}
    ready = healthy
    if gw.readiness is not None:
        replicas_ready, replica_detail = await run_in_threadpool(gw.readiness)
        ready = ready and replicas_ready
        detail.update(replica_detail)
    return JSONResponse({"ready": bool(ready), "detail": detail}, status_code=200 if ready else 503)


@router.get("/metrics", tags=["ops"], response_class=Response)
async def metrics_endpoint(request: Request) -> Response:
    """Prometheus text exposition of the gateway's metrics."""
    return Response(gateway_state(request).metrics.render(), media_type=CONTENT_TYPE)


@router.get("/v1/models", dependencies=_AUTH, response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    """The served models (OpenAI ``GET /v1/models``)."""
    gw = gateway_state(request)
    return ModelList(data=[ModelCard(id=n, created=gw.created, max_model_len=r.max_model_len)
                           for n, r in gw.runners.items()])


@router.get("/v1/models/{model_id:path}", dependencies=_AUTH, response_model=ModelCard,
            responses={404: {"model": ErrorResponse}})
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    """One served model (OpenAI ``GET /v1/models/{model}``); 404 in OpenAI's error shape when unknown."""
    gw = gateway_state(request)
    runner = gw.runners.get(model_id)
    if runner is None:
        raise model_not_found(model_id, gw.runners)
    return ModelCard(id=model_id, created=gw.created, max_model_len=runner.max_model_len)


@router.post("/v1/completions", dependencies=_AUTH)
async def completions(req: CompletionRequest, request: Request) -> Response:
    """OpenAI completions (text, texts or token ids; ``stream`` via SSE)."""
    return await handle_generation(request, req, gateway_state(request).runner(req.model))


@router.post("/v1/chat/completions", dependencies=_AUTH)
async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
    """OpenAI chat completions (tokenizers with a chat template)."""
    return await handle_generation(request, req, gateway_state(request).runner(req.model))


def _layer_call(layer: int, x: torch.Tensor) -> Callable[[Any], dict[str, torch.Tensor]]:
    """What the runner thread runs for a layer forward: the MoE block on ``x[T, D]``."""

    def run(model: Any) -> dict[str, torch.Tensor]:
        block = moe_block(model, layer)
        param = next(block.parameters(), None)
        h = x.to(device=model.device, dtype=param.dtype if param is not None else x.dtype).unsqueeze(0)  # [1, T, D]
        out = block(h)
        result = {"hidden_states": (out[0] if isinstance(out, tuple) else out)[0].to(x.dtype)}  # [T, D]
        if isinstance(out, tuple) and len(out) > 1 and isinstance(out[1], torch.Tensor):
            result["router_logits"] = out[1].reshape(x.shape[0], -1).float()  # [T, E]
        return result

    return run


@router.post("/v1/layers/{model:path}/{layer}:forward", dependencies=_AUTH, response_class=Response,
             openapi_extra=SAFETENSORS_BODY)
async def layer_forward(model: str, layer: int, request: Request) -> Response:
    """Run layer ``layer``'s MoE block (router + experts) on ``hidden_states[T, D]`` (safetensors in and out)."""
    gw = gateway_state(request)
    runner = gw.runner(model)
    x = read_matrix(await request.body(), "hidden_states", runner.hidden_size, gw.settings.max_batch_tokens)
    result = await await_or_cancel(request, runner.call(_layer_call(layer, x)), metrics=gw.metrics,
                                   endpoint="layer_forward", request_id=new_request_id("layer"))
    if isinstance(result, Response):
        return result
    return Response(write_tensors(result), media_type="application/octet-stream")


def _invoke_unless_cancelled(gw: GatewayState, function_id: str, x: torch.Tensor, cancelled: threading.Event) -> Any:
    """Run the invoker unless the request was cancelled while queued; pass ``cancelled`` on when
    the invoker takes it (the expert client re-checks it once it holds its call lock)."""
    if cancelled.is_set():
        raise Cancelled("cancelled before it started")
    if gw.invoker_takes_cancelled:
        return gw.function_invoker(function_id, x, cancelled=cancelled)  # type: ignore[misc]
    return gw.function_invoker(function_id, x)  # type: ignore[misc]


@router.post("/v1/functions/{function_id:path}:invoke", dependencies=_AUTH, response_class=Response,
             openapi_extra=SAFETENSORS_BODY, responses={501: {"model": ErrorResponse}})
async def function_invoke(function_id: str, request: Request) -> Response:
    """Compute one expert function ``f(x)`` for ``x[N, D]``; returns ``y[N, D]`` (safetensors in and out)."""
    gw = gateway_state(request)
    if gw.function_invoker is None:
        raise APIError(501, "function invoke is not configured on this gateway (no expert client)",
                       type="not_implemented", code="not_configured")
    x = read_matrix(await request.body(), "x", None, gw.settings.max_batch_tokens)
    cancelled = threading.Event()
    fut = gw.invoke_pool.submit(_invoke_unless_cancelled, gw, function_id, x, cancelled)
    y = await await_or_cancel(request, fut, metrics=gw.metrics, endpoint="function_invoke",
                              request_id=new_request_id("invoke"), cancelled=cancelled)
    if isinstance(y, Response):
        return y
    if tuple(y.shape) != tuple(x.shape):
        raise APIError(500, f"function {function_id} returned shape {list(y.shape)}, expected {list(x.shape)}",
                       type="server_error")
    return Response(write_tensors({"y": y.to(x.dtype)}), media_type="application/octet-stream")
