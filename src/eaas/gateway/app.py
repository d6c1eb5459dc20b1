"""The gateway's FastAPI app factory.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``,
``POST /v1/layers/{model}/{layer}:forward``, ``POST /v1/functions/{function_id}:invoke``,
``GET /healthz``, ``GET /readyz``, ``GET /metrics``. Errors: :mod:`eaas.gateway.errors`.
"""

from __future__ import annotations

import concurrent.futures
import hmac
import inspect
import logging
import threading
import time
from contextlib import asynccontextmanager
from typing import Any, Callable

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from eaas.errors import Cancelled
from eaas.functions.families import moe_block
from eaas.gateway.cancel import await_or_cancel, new_request_id
from eaas.gateway.completions import handle_generation
from eaas.gateway.errors import APIError, install_handlers, not_found
from eaas.gateway.metrics import CONTENT_TYPE, GatewayMetrics
from eaas.gateway.middleware import BodyLimitMiddleware, LatencyMiddleware
from eaas.gateway.runner import ModelRunner
from eaas.gateway.schemas import ChatCompletionRequest, CompletionRequest, ErrorResponse, ModelCard, ModelList
from eaas.gateway.tensors import read_matrix, write_tensors
from eaas.settings import Settings

log = logging.getLogger(__name__)

Readiness = Callable[[], "tuple[bool, dict]"]
FunctionInvoker = Callable[..., torch.Tensor]
"""``(function_id, x[N, D][, cancelled=threading.Event]) -> y[N, D]``; may raise ``NotFound`` (404)
or any ``EaaSError``. An invoker that takes ``cancelled`` should not start work once it is set."""

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 503)}
_SAFETENSORS_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


def _invoke_unless_cancelled(invoker: Any, function_id: str, x: torch.Tensor, cancelled: threading.Event) -> Any:
    """Run ``invoker`` unless the request was cancelled while queued; pass ``cancelled`` on when
    the invoker takes it (the expert client re-checks it once it holds its call lock)."""
    if cancelled.is_set():
        raise Cancelled("cancelled before it started")
    if "cancelled" in inspect.signature(invoker).parameters:
        return invoker(function_id, x, cancelled=cancelled)
    return invoker(function_id, x)


def create_app(
    settings: Settings,
    runners: dict[str, ModelRunner] | ModelRunner,
    *,
    readiness: Readiness | None = None,
    function_invoker: FunctionInvoker | None = None,
    metrics: GatewayMetrics | None = None,
    manage_runners: bool = True,
) -> FastAPI:
    """Build the gateway app.

    Args:
        settings: gateway settings (``api_keys``, ``max_body_bytes``, ``max_batch_tokens``).
        runners: the model runners, by model id (a single runner is keyed by its name).
        readiness: ``() -> (ready, detail)`` for ``/readyz``; default: every runner alive.
            The lead wires "every function has a ready replica" here.
        function_invoker: computes ``POST /v1/functions/{id}:invoke``; None -> 501.
        metrics: the metrics to export (create it first to hand its hooks
            ``record_expert_call`` / ``record_failover`` to the expert client).
        manage_runners: start the runners on app startup and stop them on shutdown.
    """
    if isinstance(runners, ModelRunner):
        runners = {runners.name: runners}
    metrics = metrics or GatewayMetrics()
    for runner in runners.values():
        runner.bind_metrics(metrics)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if manage_runners:
            for r in runners.values():
                r.start()
        yield
        invoke_pool.shutdown(wait=False, cancel_futures=True)
        if manage_runners:
            for r in runners.values():
                r.stop()

    app = FastAPI(title="EaaS gateway", version="0.1.0", lifespan=lifespan, responses=_ERRORS)
    app.state.settings = settings
    app.state.runners = runners
    app.state.metrics = metrics
    install_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(LatencyMiddleware, metrics=metrics)

    keys = [k.encode() for k in settings.api_keys]
    # raw function invokes run here (cancellable while queued), not in Starlette's shared pool
    invoke_pool = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="eaas-invoke")

    def check_api_key(request: Request) -> None:
        if not keys:
            return
        auth = request.headers.get("authorization", "")
        token = auth[7:].strip().encode() if auth[:7].lower() == "bearer " else b""
        if not any(hmac.compare_digest(token, k) for k in keys):
            raise APIError(401, "missing or invalid API key (Authorization: Bearer <key>)",
                           type="authentication_error", code="invalid_api_key")

    def get_runner(name: str) -> ModelRunner:
        runner = runners.get(name)
        if runner is None:
            raise not_found(f"model {name!r} is not served here; models: {sorted(runners)}", param="model")
        return runner

    auth = [Depends(check_api_key)]

    def runner_health() -> tuple[bool, dict[str, Any]]:
        checks = {name: r.health(settings.runner_stuck_s) for name, r in runners.items()}
        return all(ok for ok, _ in checks.values()), {name: d for name, (_, d) in checks.items()}

    @app.get("/healthz", tags=["ops"], responses={503: {"model": dict}})
    async def healthz() -> JSONResponse:
        """200 while every model runner thread is alive and not stuck in one step; else 503."""
        healthy, detail = runner_health()
        return JSONResponse({"status": "ok" if healthy else "unhealthy", "runners": detail},
                            status_code=200 if healthy else 503)

    @app.get("/readyz", tags=["ops"], responses={503: {"model": dict}})
    async def readyz() -> JSONResponse:
        """200 when the runners are healthy and (with an expert client) every function has a ready replica."""
        healthy, runner_detail = runner_health()
        detail: dict[str, Any] = {"runners": runner_detail}
        ready = healthy
        if readiness is not None:
            replicas_ready, replica_detail = await run_in_threadpool(readiness)
            ready = ready and replicas_ready
            detail.update(replica_detail)
        return JSONResponse({"ready": bool(ready), "detail": detail}, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["ops"], response_class=Response)
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=auth, response_model=ModelList)
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=n, created=created, max_model_len=r.max_model_len)
                               for n, r in runners.items()])

    @app.post("/v1/completions", dependencies=auth)
    async def completions(req: CompletionRequest, request: Request) -> Response:
        return await handle_generation(request, req, get_runner(req.model))

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        return await handle_generation(request, req, get_runner(req.model))

    @app.post("/v1/layers/{model:path}/{layer}:forward", dependencies=auth, response_class=Response,
              openapi_extra=_SAFETENSORS_BODY)
    async def layer_forward(model: str, layer: int, request: Request) -> Response:
        """Run layer ``layer``'s MoE block (router + experts) on ``hidden_states[T, D]``."""
        runner = get_runner(model)
        x = read_matrix(await request.body(), "hidden_states", runner.hidden_size, settings.max_batch_tokens)

        def run(m: Any) -> dict[str, torch.Tensor]:
            block = moe_block(m, layer)
            param = next(block.parameters(), None)
            h = x.to(device=m.device, dtype=param.dtype if param is not None else x.dtype).unsqueeze(0)  # [1, T, D]
            out = block(h)
            result = {"hidden_states": (out[0] if isinstance(out, tuple) else out)[0].to(x.dtype)}  # [T, D]
            if isinstance(out, tuple) and len(out) > 1 and isinstance(out[1], torch.Tensor):
                result["router_logits"] = out[1].reshape(x.shape[0], -1).float()  # [T, E]
            return result

        result = await await_or_cancel(request, runner.call(run), metrics=metrics, endpoint="layer_forward",
                                       request_id=new_request_id("layer"))
        if isinstance(result, Response):
            return result
        return Response(write_tensors(result), media_type="application/octet-stream")

    @app.post("/v1/functions/{function_id:path}:invoke", dependencies=auth, response_class=Response,
              openapi_extra=_SAFETENSORS_BODY, responses={501: {"model": ErrorResponse}})
    async def function_invoke(function_id: str, request: Request) -> Response:
        """Compute one expert function ``f(x)`` for ``x[N, D]``; returns ``y[N, D]``."""
        if function_invoker is None:
            raise APIError(501, "function invoke is not configured on this gateway (no expert client)",
                           type="not_implemented", code="not_configured")
        x = read_matrix(await request.body(), "x", None, settings.max_batch_tokens)
        cancelled = threading.Event()
        fut = invoke_pool.submit(_invoke_unless_cancelled, function_invoker, function_id, x, cancelled)
        y = await await_or_cancel(request, fut, metrics=metrics, endpoint="function_invoke",
                                  request_id=new_request_id("invoke"), cancelled=cancelled)
        if isinstance(y, Response):
            return y
        if tuple(y.shape) != tuple(x.shape):
            raise APIError(500, f"function {function_id} returned shape {list(y.shape)}, expected {list(x.shape)}",
                           type="server_error")
        return Response(write_tensors({"y": y.to(x.dtype)}), media_type="application/octet-stream")

    return app
