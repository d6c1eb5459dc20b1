"""Publish-only mode: serve the autoscaler's desired replicas over HTTP.

For an external actuator (KEDA's ``metrics-api`` trigger on Kubernetes, one
worker Deployment per shard). The autoscaler runs with ``pool=None``: it reads
the registry and decides, never acts. Endpoints (loopback unless told otherwise):

- ``GET /desired`` -> ``{"shard-0": 2, ...}``
- ``GET /desired/{shard}`` -> ``{"shard": "shard-0", "replicas": 2}`` (404 for an unknown shard);
  KEDA: ``valueLocation: replicas``, ``targetValue: 1``, ``metricType: Value``.
- ``GET /metrics`` -> Prometheus text, ``eaas_desired_replicas{shard="..."}`` and the
  autoscaler's other metrics.
- ``GET /healthz`` -> ``{"ok": true}``
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from eaas.platform.autoscale.mechanism import Autoscaler

log = logging.getLogger(__name__)


def _handler(autoscaler: Autoscaler) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj: object) -> None:
            self._send(status, json.dumps(obj, sort_keys=True).encode())

        def do_GET(self) -> None:  # noqa: N802 - http.server API
            path = self.path.split("?", 1)[0].rstrip("/")
            if path == "/desired":
                self._json(200, autoscaler.desired_replicas())
            elif path.startswith("/desired/"):
                shard = unquote(path[len("/desired/") :])
                desired = autoscaler.desired_replicas()
                if shard in desired:
                    self._json(200, {"shard": shard, "replicas": desired[shard]})
                else:
                    self._json(404, {"error": f"unknown shard {shard!r}; known: {sorted(desired)}"})
            elif path == "/metrics":
                self._send(200, generate_latest(autoscaler.metrics), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._json(200, {"ok": True})
            else:
                self._json(404, {"error": f"no route {path!r}; try /desired, /desired/{{shard}}, /metrics"})

        def log_message(self, fmt: str, *args: object) -> None:
            log.debug("publish: " + fmt, *args)

    return Handler


class DesiredReplicasServer:
    """A small threaded HTTP server over an :class:`Autoscaler`'s decisions.

    Args:
        autoscaler: the (publish-only) autoscaler whose ``desired`` is served.
        host: bind address (loopback by default).
        port: TCP port (0 = a free one; see :attr:`port`).
    """

    def __init__(self, autoscaler: Autoscaler, host: str = "127.0.0.1", port: int = 0) -> None:
        self._httpd = ThreadingHTTPServer((host, port), _handler(autoscaler))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self._httpd.server_address[0]}:{self.port}"

    def start(self) -> "DesiredReplicasServer":
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="eaas-publish", daemon=True)
        self._thread.start()
        log.info("publish: serving desired replicas at %s", self.url)
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "DesiredReplicasServer":
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
