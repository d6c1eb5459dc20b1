"""Property-based check of the gateway's OpenAPI schema with schemathesis: never a 5xx.

Every operation of the schema gets its own hypothesis run of cases generated
from the schema and sent to the real ASGI app (a real model runner behind it).
The operations are driven from the schema object itself rather than through
schemathesis' pytest plugin: its lazy-fixture mode writes pytest's private
``Node._nodeid`` (gone in pytest 9.2), so the plugin path breaks whenever pytest
reshuffles its internals; ``get_all_operations`` / ``as_strategy`` are public API.
"""

from __future__ import annotations

import pytest
import torch

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402

from eaas.gateway.app import create_app  # noqa: E402
from eaas.gateway.runner import ModelRunner  # noqa: E402
from eaas.settings import Settings  # noqa: E402
from gateway_ckpt import write_gateway_checkpoint  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def gateway_schema(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = write_gateway_checkpoint(tmp_path_factory.mktemp("schema") / "tiny")
    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    runner = ModelRunner(model, tok, name="tiny", max_model_len=24)  # bounds every generation
    runner.start()
    app = create_app(Settings(max_body_bytes=256 * 1024), runner, manage_runners=False,
                     function_invoker=lambda fid, x: x)
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    runner.stop()


def _check_operation(operation, calls: dict[str, int]) -> None:
    """25 schema-generated cases against one operation: none may get a 5xx."""
    label = f"{operation.method.upper()} {operation.path}"

    @given(case=operation.as_strategy())
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def check(case):
        response = case.call()
        calls[label] = calls.get(label, 0) + 1
        assert response.status_code < 500, f"{label}: {response.status_code} {response.text[:300]}"

    check()


def test_no_server_errors(gateway_schema):
    operations = [result.ok() for result in gateway_schema.get_all_operations()]
    paths = {op.path for op in operations}
    assert {"/v1/completions", "/v1/models", "/healthz"} <= paths, paths  # the schema really lists the API
    calls: dict[str, int] = {}
    for operation in operations:
        _check_operation(operation, calls)
    assert set(calls) == {f"{op.method.upper()} {op.path}" for op in operations}
