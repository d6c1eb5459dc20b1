"""The gateway's FastAPI app factory: state, middleware, error handlers and the routes.

The routes themselves are plain functions on one router (:mod:`eaas.gateway.routes`);
this module assembles an app around a :class:`~eaas.gateway.routes.GatewayState`.
Errors: :mod:`eaas.gateway.errors`.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI

from eaas.gateway.errors import install_handlers
from eaas.gateway.metrics import GatewayMetrics
from eaas.gateway.middleware import BodyLimitMiddleware, LatencyMiddleware
from eaas.gateway.routes import FunctionInvoker, GatewayState, Readiness, router
from eaas.gateway.runner import ModelRunner
from eaas.gateway.schemas import ErrorResponse
from eaas.settings import Settings

log = logging.getLogger(__name__)

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 500, 502, 503)}


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
        settings: gateway settings (``api_keys``, ``max_body_bytes``, ``max_batch_tokens``, ``runner_stuck_s``).
        runners: the model runners, by model id (a single runner is keyed by its name).
        readiness: ``() -> (ready, detail)`` added to ``/readyz`` (the expert client wires
            "every function has a ready replica" here); the runners' health always counts.
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
    state = GatewayState(settings, runners, metrics, readiness, function_invoker, int(time.time()))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if manage_runners:
            for r in runners.values():
                r.start()
        yield
        state.invoke_pool.shutdown(wait=False, cancel_futures=True)
        if manage_runners:
            for r in runners.values():
                r.stop()

    app = FastAPI(title="EaaS gateway", version="0.1.0", lifespan=lifespan, responses=_ERRORS)
    app.state.gateway = state
    app.state.settings = settings
    app.state.runners = runners
    app.state.metrics = metrics
    install_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(LatencyMiddleware, metrics=metrics)
    app.include_router(router)
    return app
