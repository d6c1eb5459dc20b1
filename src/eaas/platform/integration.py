"""transformers integration: ``experts_implementation="eaas"``.

transformers dispatches the forward of every experts module decorated with
``@use_experts_implementation`` through ``ALL_EXPERTS_FUNCTIONS``
(``transformers.integrations.moe``) by name, with flattened tokens::

    fn(experts_module, hidden_states[T, D], top_k_index[T, K], top_k_weights[T, K]) -> out[T, D]

:func:`register_experts_implementation` registers :func:`eaas_experts_forward`
under the name ``"eaas"``; :func:`load_model` loads a checkpoint with that
implementation, *without materialising routed-expert weights* (the experts
class is built on the meta device and its parameters removed, so the tensors
are never read and an eager fallback could not silently use garbage), and binds
each experts module to an :class:`~eaas.platform.client.ExpertClient` with its
layer index. The result is an ordinary ``PreTrainedModel`` (``generate``,
continuous batching, ...) whose routed experts run on EaaS workers.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from eaas.errors import CheckpointError, EaaSError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from eaas.platform.client import ExpertClient
    from eaas.registry.store import Registry
    from eaas.settings import Settings

log = logging.getLogger(__name__)

IMPLEMENTATION_NAME = "eaas"
_patch_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class ExpertsBinding:
    """What an experts module needs to run remotely: the client, model name and layer."""

    client: "ExpertClient"
    model: str
    layer: int


def eaas_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """Experts forward that dispatches to EaaS workers.

    Args:
        self: a family's experts module bound by :func:`bind_experts`.
        hidden_states: ``[T, D]`` flattened tokens.
        top_k_index: ``[T, K]`` int64 expert ids from the model's own router.
        top_k_weights: ``[T, K]`` routing weights (fp32 for bf16 Mixtral/DeepSeek-V3).

    Returns:
        ``[T, D]`` in ``hidden_states.dtype``: ``sum_k w[t,k] * f_{e[t,k]}(x[t])``,
        combined in the order of transformers' eager experts loop.

    Raises:
        EaaSError: the module is not bound; NoReplicaAvailable / ExpertTimeout from the client.
    """
    binding: ExpertsBinding | None = getattr(self, "_eaas_binding", None)
    if binding is None:
        raise EaaSError(
            f"{type(self).__name__} has experts_implementation='eaas' but is not bound to an ExpertClient;"
            " load the model with eaas.load_model()"
        )
    return binding.client.forward(binding.layer, hidden_states, top_k_index, top_k_weights)


def register_experts_implementation() -> None:
    """Register ``"eaas"`` in transformers' ``ExpertsInterface`` (idempotent; must precede loading)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION_NAME, eaas_experts_forward)


@contextlib.contextmanager
def experts_without_weights(model_type: str) -> Iterator[None]:
    """While active, the family's experts class is built with no parameters at all.

    Its ``__init__`` runs on the meta device, then every parameter it created is
    removed and the module is marked initialised, so ``from_pretrained`` neither
    allocates nor reads routed-expert weights. Any eager use then raises
    ``AttributeError`` instead of computing with uninitialised memory.
    """
    from eaas.functions.families import get_family

    cls = get_family(model_type).load_experts_class()
    with _patch_lock:
        original = cls.__init__

        def __init__(self: torch.nn.Module, config: Any, *args: Any, **kwargs: Any) -> None:
            with torch.device("meta"):
                original(self, config, *args, **kwargs)
            for name in list(self._parameters):
                del self._parameters[name]
            self._is_hf_initialized = True

        cls.__init__ = __init__  # type: ignore[method-assign]
        try:
            yield
        finally:
            cls.__init__ = original  # type: ignore[method-assign]


def bind_experts(model: "PreTrainedModel", client: "ExpertClient", model_name: str) -> dict[int, torch.nn.Module]:
    """Tag every experts module of ``model`` with its layer and ``client``.

    Returns:
        decoder layer index -> experts module.
    """
    from eaas.functions.families import experts_modules

    modules = experts_modules(model)
    for layer, module in modules.items():
        module._eaas_binding = ExpertsBinding(client, model_name, layer)  # type: ignore[assignment]
    return modules


def load_client_model(checkpoint: str | Path, dtype: torch.dtype | str | None = None) -> "PreTrainedModel":
    """Load a checkpoint as an attention client: every part but the routed experts.

    Args:
        checkpoint: directory with ``config.json`` and safetensors.
        dtype: torch dtype (default: the checkpoint's).

    Raises:
        CheckpointError: no such directory / config.
        UnsupportedArchitecture: the family has no EaaS experts support.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(checkpoint)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json (not a checkpoint directory)")
    register_experts_implementation()
    config = AutoConfig.from_pretrained(path)
    kwargs: dict[str, Any] = {"experts_implementation": IMPLEMENTATION_NAME}
    kwargs["dtype"] = dtype if dtype is not None else "auto"
    with experts_without_weights(config.model_type), quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.eval()
    return model


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers while loading: the expert tensors on disk are 'unexpected' by design for
    an attention client, and its tensor-parallel notes and progress bars are noise (benchmarks keep
    stdout JSON). Restores the verbosity and progress bars afterwards."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_model(
    model: str | Path,
    *,
    settings: "Settings | None" = None,
    registry: "Registry | None" = None,
    dtype: torch.dtype | str | None = None,
) -> tuple["PreTrainedModel", "ExpertClient"]:
    """Load a registered model as an attention client whose routed experts run on EaaS.

    Args:
        model: a registered model name, or a checkpoint directory that is
            registered (by its directory name) — its spec's checkpoint is used.
        settings: the settings object (default: from the environment).
        registry: registry to use (default: the deployment's, see ``eaas.registry.deployment``).
        dtype: compute dtype of the client (default: the checkpoint's).

    Returns:
        (model, client): ``model`` is a transformers ``*ForCausalLM``; close the client when done.

    Raises:
        NotFound: the model is not registered.
        DeploymentNotFound / RegistryUnavailable: no registry reachable.
    """
    from eaas.platform.client import ExpertClient
    from eaas.registry.deployment import connect_registry
    from eaas.settings import get_settings

    settings = settings or get_settings()
    name = Path(model).name if Path(model).is_dir() else str(model)
    if registry is None:
        registry = connect_registry(settings, f"attention client {name}")
    spec = registry.model(name)
    hf_model = load_client_model(spec["checkpoint"], dtype=dtype)
    client = ExpertClient(registry, name, settings=settings)
    bind_experts(hf_model, client, name)
    log.info("model %s: attention client loaded (%d MoE layers on EaaS)", name, len(spec.get("moe_layers", [])))
    return hf_model, client
