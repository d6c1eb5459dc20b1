"""Cancelling work whose HTTP client went away, and saying so once.

Every cancellation — a completion, a stream, a raw layer forward or function
invoke — is logged once at INFO with the request id and counted in
``eaas_gateway_cancellations{endpoint}``. Raw calls are queued work (the model
runner's inbox, the expert client's call lock): :func:`await_or_cancel` races
their future against the client's disconnect and cancels work that has not
started, so a disconnected raw call never reaches a worker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

log = logging.getLogger(__name__)

#: nginx's "client closed request": the status logged for work cancelled by a disconnect
CLIENT_CLOSED = 499


def new_request_id(prefix: str) -> str:
    """A request id for logs and responses (``{prefix}-{24 hex}``)."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def note_cancelled(metrics: Any, endpoint: str, request_id: str, what: str) -> None:
    """Log one cancellation at INFO and count it (``metrics`` may be None)."""
    log.info("gateway: request %s (%s) cancelled: the client disconnected; %s", request_id, endpoint, what)
    if metrics is not None:
        metrics.record_cancellation(endpoint)


async def wait_disconnect(request: Request) -> None:
    """Return when the HTTP client disconnects (reads the ASGI receive channel)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def await_or_cancel(
    request: Request,
    fut: concurrent.futures.Future,
    *,
    metrics: Any,
    endpoint: str,
    request_id: str,
    cancelled: threading.Event | None = None,
) -> Any:
    """Await ``fut``; if the client disconnects first, cancel it and return a 499 response.

    ``fut.cancel()`` stops work that has not started (a queued runner call); ``cancelled``
    (if given) is set too, for work that checks it when it gets its turn (the expert
    client checks it after taking its call lock).

    Returns:
        The future's result, or a :class:`Response` with status 499.
    """
    work = asyncio.wrap_future(fut)
    watch = asyncio.ensure_future(wait_disconnect(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not watch.done():
            watch.cancel()
    if work.done():
        return work.result()
    if cancelled is not None:
        cancelled.set()
    stopped = fut.cancel()
    work.cancel()
    note_cancelled(metrics, endpoint, request_id, "queued work dropped" if stopped else "it was already running")
    return Response(status_code=CLIENT_CLOSED)
