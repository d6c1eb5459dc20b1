"""Property-based check of the gateway's OpenAPI schema with schemathesis: never a 5xx."""

from __future__ import annotations

import pytest
import torch

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

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


schema = schemathesis.pytest.from_fixture("gateway_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_server_errors(case):
    response = case.call()
    assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text[:300]}"
