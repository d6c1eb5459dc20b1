"""Specs of models and expert functions: what the registry stores.

A *function* is one routed expert of one layer of one model, named
``{model}/{layer}/{expert}``. Specs are frozen slotted dataclasses that round-trip
through JSON (``to_dict`` / ``from_dict``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from dataclasses import MISSING

from eaas.errors import InvalidFunctionId, InvalidSpec


def function_id(model: str, layer: int, expert: int) -> str:
    """Return the id ``"{model}/{layer}/{expert}"`` of one expert function.

    Raises:
        InvalidFunctionId: ``model`` is empty or contains ``/``, or an index is negative.
    """
    if not isinstance(model, str) or not model or "/" in model:
        raise InvalidFunctionId(f"invalid model name {model!r}: must be non-empty and contain no '/'")
    for what, v in (("layer", layer), ("expert", expert)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise InvalidFunctionId(f"invalid {what} {v!r} for model {model!r}: must be an int >= 0")
    return f"{model}/{layer}/{expert}"


def parse_function_id(fid: str) -> tuple[str, int, int]:
    """Split ``"{model}/{layer}/{expert}"`` into ``(model, layer, expert)``.

    Raises:
        InvalidFunctionId: ``fid`` does not have that form.
    """
    if not isinstance(fid, str):
        raise InvalidFunctionId(f"invalid function id {fid!r}: expected 'model/layer/expert'")
    parts = fid.split("/")
    if len(parts) != 3 or not parts[0] or not parts[1].isdigit() or not parts[2].isdigit():
        raise InvalidFunctionId(f"invalid function id {fid!r}: expected 'model/layer/expert'")
    return parts[0], int(parts[1]), int(parts[2])


class _Dict:
    """``to_dict`` / ``from_dict`` for the dataclasses below (lists, not tuples, in JSON)."""

    __slots__ = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):  # noqa: ANN206 - returns cls
        if not isinstance(data, dict):
            raise InvalidSpec(f"{cls.__name__}: expected a dict, got {type(data).__name__}")
        all_fields = fields(cls)  # type: ignore[arg-type]
        names = {f.name for f in all_fields}
        required = {f.name for f in all_fields if f.default is MISSING and f.default_factory is MISSING}
        missing = required - data.keys()
        if missing:
            raise InvalidSpec(f"{cls.__name__}: missing fields {sorted(missing)} in {sorted(data)}")
        return cls(**{k: data[k] for k in names if k in data})


@dataclass(frozen=True, slots=True)
class ModelSpec(_Dict):
    """One MoE model as the registry knows it.

    Attributes:
        name: model name (the first part of every function id).
        model_type: transformers ``model_type`` (``"mixtral"``, ...).
        architectures: ``config.architectures``.
        checkpoint: absolute path of the checkpoint directory.
        num_layers: decoder layers.
        moe_layers: decoder layers that have routed experts.
        num_experts: routed experts per MoE layer.
        top_k: experts per token.
        hidden_size: ``D``.
        intermediate_size: one expert's intermediate size ``I``.
        dtype: torch dtype name of the expert tensors on disk (``"float32"``, ``"bfloat16"``).
        vocab_size: ``config.vocab_size``.
        layout: ``"per_expert"`` or ``"fused"`` (how the checkpoint stores experts).
    """

    name: str
    model_type: str
    architectures: list[str]
    checkpoint: str
    num_layers: int
    moe_layers: list[int]
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    dtype: str
    vocab_size: int
    layout: str = "per_expert"

    @property
    def num_functions(self) -> int:
        return len(self.moe_layers) * self.num_experts

    def function_ids(self) -> list[str]:
        """Ids of every expert function of the model, layer-major."""
        return [function_id(self.name, layer, e) for layer in self.moe_layers for e in range(self.num_experts)]


@dataclass(frozen=True, slots=True)
class FunctionSpec(_Dict):
    """One expert function: one routed expert of one layer.

    Attributes:
        id: ``"{model}/{layer}/{expert}"``.
        model, layer, expert: the parts of ``id``.
        model_type, hidden_size, intermediate_size, dtype, checkpoint: as in :class:`ModelSpec`.
        tensors: checkpoint tensor names read for this expert (a fused tensor is
            listed by name; the expert reads its dim-0 slice).
        checksum: sha256 hex of the expert's tensor bytes, in ``tensors`` order.
        nbytes: bytes of the expert's weights on disk.
    """

    id: str
    model: str
    layer: int
    expert: int
    model_type: str
    hidden_size: int
    intermediate_size: int
    dtype: str
    checkpoint: str
    tensors: list[str]
    checksum: str
    nbytes: int
