"""Expert functions: what one routed expert computes, and loading it from checkpoints.

Public API (see DESIGN.md, "Functions"):

* :func:`inspect_checkpoint` — config + safetensors headers -> specs;
* :func:`load_shard` -> :class:`ExpertShard` — the hosted experts, callable;
* :func:`write_tiny_checkpoint` — small seeded real-format checkpoints;
* :mod:`eaas.functions.families` — per-family knowledge (:func:`get_family`,
  :data:`SUPPORTED_MODEL_TYPES`, :func:`experts_modules`);
* :mod:`eaas.functions.spec` — :class:`ModelSpec`, :class:`FunctionSpec`, ids.

Importing this package does not import transformers; the functions do, when called.
"""

from eaas.functions.checkpoint import write_tiny_checkpoint
from eaas.functions.families import SUPPORTED_MODEL_TYPES, experts_modules, get_family
from eaas.functions.loader import inspect_checkpoint, open_checkpoint
from eaas.functions.shard import ExpertShard, load_shard
from eaas.functions.spec import FunctionSpec, ModelSpec, function_id, parse_function_id

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "ExpertShard",
    "FunctionSpec",
    "ModelSpec",
    "experts_modules",
    "function_id",
    "get_family",
    "inspect_checkpoint",
    "load_shard",
    "open_checkpoint",
    "parse_function_id",
    "write_tiny_checkpoint",
]
