"""Load a model for the gateway and build its app (used by ``eaas gateway``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from eaas.errors import CheckpointError, ConfigError
from eaas.settings import Settings

log = logging.getLogger(__name__)


def load_monolithic(model_dir: Path, experts_implementation: str | None = None) -> Any:
    """The plain transformers model (every expert in this process): the baseline.

    Args:
        model_dir: checkpoint directory.
        experts_implementation: transformers' ``experts_implementation`` (``eager``, ``grouped_mm``,
            ``batched_mm``, ...); None: transformers' default.

    Raises:
        CheckpointError: the checkpoint cannot be loaded, or the experts implementation is unknown
            or unavailable here.
    """
    from transformers import AutoModelForCausalLM

    kw = {"experts_implementation": experts_implementation} if experts_implementation else {}
    try:
        return AutoModelForCausalLM.from_pretrained(model_dir, **kw).eval()
    except (OSError, ValueError, ImportError) as exc:
        raise CheckpointError(f"cannot load a causal LM from {model_dir}: {exc}") from exc


def load_attention_client(model_dir: Path, settings: Settings) -> tuple[Any, Any]:
    """The EaaS attention client: ``eaas.platform.integration.load_model``."""
    try:
        from eaas.platform.integration import load_model
    except ImportError as exc:
        raise ConfigError(
            f"the EaaS attention client is not available ({exc}); run with --monolithic to serve the plain model"
        ) from exc
    return load_model(model_dir, settings=settings)


def eaas_hooks(client: Any) -> dict[str, Any]:
    """``create_app`` hooks wired to an :class:`~eaas.platform.client.ExpertClient`.

    Readiness = every function of the model has a ready replica; the function
    invoke endpoint calls the client; expert calls and failovers feed the metrics.
    """
    from eaas.gateway.metrics import GatewayMetrics

    metrics = GatewayMetrics()
    client.metrics = metrics
    metrics.bind_pool(client.pool_summary)

    def readiness() -> tuple[bool, dict[str, Any]]:
        missing = client.missing_functions()
        return (not missing, {"model": client.model, "functions_without_replica": len(missing), "examples": missing[:5],
                              "transports": client.transports(),  # worker id -> its pair's data plane
                              # unreachable: serving goes on with the routing table last read
                              "registry": client.routing.registry_status()})

    def invoke(function_id: str, x: Any, cancelled: Any = None) -> Any:
        if not function_id.startswith(client.model + "/"):
            from eaas.errors import NotFound

            raise NotFound(f"unknown function {function_id!r}")
        return client.invoke(function_id, x, cancelled=cancelled)

    return {"readiness": readiness, "function_invoker": invoke, "metrics": metrics}


def build_gateway(
    model_dir: Path, settings: Settings, *, monolithic: bool, name: str | None = None, **app_kw: Any
) -> FastAPI:
    """Load the model and tokenizer, wrap them in a runner, and build the app.

    Args:
        model_dir: checkpoint directory (config.json, safetensors, tokenizer).
        settings: gateway settings (``torch_threads``, ``max_batch_size``, ...).
        monolithic: load the plain transformers model instead of the attention client (with
            ``settings.experts_implementation`` when set).
        name: model id for clients (default: the directory's name).
        **app_kw: passed to :func:`eaas.gateway.app.create_app` (readiness, function_invoker, metrics).
    """
    import torch
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"{model_dir} has no config.json: not a checkpoint directory")
    torch.set_num_threads(settings.torch_threads)
    client = None
    if monolithic:
        model = load_monolithic(model_dir, settings.experts_implementation)
    else:
        model, client = load_attention_client(model_dir, settings)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    log.info("gateway: model %s loaded (%s)", name or model_dir.name, "monolithic" if monolithic else "attention client")
    return assemble_gateway(model, tokenizer, name or model_dir.name, settings, client=client, **app_kw)


def assemble_gateway(model: Any, tokenizer: Any, name: str, settings: Settings, *, client: Any = None,
                     **app_kw: Any) -> FastAPI:
    """The one place a gateway app is put together: a runner for ``model`` with the settings'
    batch and queue bounds, the expert client's hooks when there is one, and the app.

    Args:
        model: a transformers causal LM (monolithic or an attention client).
        tokenizer: its tokenizer.
        name: the model id clients use.
        settings: ``max_batch_size``, ``engine``, ``max_prefill_tokens``, ``microbatch_min_batch``,
            ``max_waiting_*`` and the app's.
        client: the :class:`~eaas.platform.client.ExpertClient` behind ``model``, if any.
        **app_kw: override :func:`eaas.gateway.app.create_app` hooks.
    """
    from eaas.gateway.app import create_app
    from eaas.gateway.runner import ModelRunner

    runner = ModelRunner(model, tokenizer, name=name, max_batch_size=settings.max_batch_size,
                         engine=settings.engine, max_prefill_tokens=settings.max_prefill_tokens,
                         microbatch_min_batch=settings.microbatch_min_batch,
                         max_waiting_requests=settings.max_waiting_requests,
                         max_waiting_tokens=settings.max_waiting_tokens)
    hooks = eaas_hooks(client) if client is not None else {}
    return create_app(settings, runner, **{**hooks, **app_kw})
