"""Inspecting checkpoints: config + safetensors headers -> model and function specs.

Nothing here reads weights except to checksum them; :mod:`eaas.functions.shard`
loads them. Both layouts (see :mod:`eaas.functions.families`) are recognised.

Legend: ``E`` experts, ``D`` hidden, ``I`` expert intermediate size.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from eaas.errors import CheckpointError, UnsupportedArchitecture
from eaas.functions.families import FUSED, PER_EXPERT, Family, get_family
from eaas.functions.spec import FunctionSpec, ModelSpec, function_id
from eaas.functions.storage import CheckpointFiles, TensorInfo, dtype_name

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Part:
    """One piece of one expert parameter on disk.

    ``index`` is ``None`` for a per-expert tensor (read whole) and the expert's
    dim-0 index for a fused ``[E, ...]`` tensor.
    """

    info: TensorInfo
    index: int | None

    @property
    def byte_range(self) -> tuple[Path, int, int]:
        if self.index is None:
            return self.info.file, self.info.start, self.info.end
        return (self.info.file, *self.info.row_range(self.index))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape if self.index is None else self.info.shape[1:]


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """An opened checkpoint: config, family, files and layout.

    Attributes:
        path: checkpoint directory (absolute).
        config: the transformers config.
        family: the MoE family.
        files: tensors of the checkpoint.
        layout: ``"per_expert"`` or ``"fused"``.
        param_shapes: experts-module parameter -> shape of one expert's slice.
    """

    path: Path
    config: Any
    family: Family
    files: CheckpointFiles
    layout: str
    param_shapes: dict[str, tuple[int, ...]]

    @property
    def moe_layers(self) -> list[int]:
        return self.family.moe_layers(self.config)

    @property
    def num_experts(self) -> int:
        return self.family.num_experts(self.config)

    def expert_parts(self, layer: int, expert: int) -> dict[str, list[Part]]:
        """Parameter -> the parts on disk whose dim-0 concatenation is ``param[expert]``.

        Raises:
            CheckpointError: a tensor is missing, or its shape disagrees with the config.
        """
        if layer not in self.moe_layers or not 0 <= expert < self.num_experts:
            raise CheckpointError(
                f"{self.path}: no routed expert ({layer}, {expert}); MoE layers {self.moe_layers}, "
                f"{self.num_experts} experts"
            )
        out: dict[str, list[Part]] = {}
        for param, want in self.param_shapes.items():
            if self.layout == FUSED:
                info = self.files.get(self.family.fused_name(layer, param))
                expected: tuple[int, ...] = (self.num_experts, *want)
                if info.shape != expected:
                    raise _shape_error(self.path, info, expected)
                out[param] = [Part(info, expert)]
            else:
                names = self.family.per_expert_names(layer, expert, param)
                part_shape = (want[0] // len(names), *want[1:])
                parts = []
                for name in names:
                    info = self.files.get(name)
                    if info.shape != part_shape:
                        raise _shape_error(self.path, info, part_shape)
                    parts.append(Part(info, None))
                out[param] = parts
        return out


def _shape_error(path: Path, info: TensorInfo, expected: tuple[int, ...]) -> CheckpointError:
    return CheckpointError(
        f"{path}: tensor {info.name!r} has shape {list(info.shape)}, config implies {list(expected)}"
    )


def experts_config(family: Family, config: Any, num_experts: int) -> Any:
    """A copy of ``config`` for an experts module of ``num_experts`` experts, eager forward."""
    cfg = copy.deepcopy(config)
    setattr(cfg, family.count_attr, num_experts)
    cfg._experts_implementation = "eager"
    return cfg


def build_meta_experts(family: Family, config: Any, num_experts: int) -> torch.nn.Module:
    """Build the family's experts module on the meta device with ``num_experts`` experts.

    Raises:
        UnsupportedArchitecture: the built module does not have ``num_experts``
            experts on dim 0 (the count attribute is wrong for this transformers).
    """
    cls = family.load_experts_class()
    with torch.device("meta"):
        module = cls(experts_config(family, config, num_experts))
    for name, p in module.named_parameters(recurse=False):
        if p.shape[0] != num_experts:
            raise UnsupportedArchitecture(
                f"{family.model_type}: {cls.__name__}.{name} has {p.shape[0]} experts on dim 0 after "
                f"setting config.{family.count_attr}={num_experts}"
            )
    return module


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a checkpoint directory: config, family, safetensors headers, layout.

    Raises:
        CheckpointError: the directory, ``config.json`` or a safetensors file is
            missing or malformed, or no expert tensors are found.
        UnsupportedArchitecture: the config's ``model_type`` has no family.
    """
    directory = Path(path).expanduser().resolve()
    config_file = directory / "config.json"
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    try:
        raw = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: no config.json") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file}: invalid JSON ({e})") from None
    model_type = raw.get("model_type")
    if model_type is None:
        raise CheckpointError(f"{config_file}: no model_type")
    try:
        family = get_family(model_type)
    except UnsupportedArchitecture as e:
        archs = ", ".join(raw.get("architectures") or []) or "?"
        raise UnsupportedArchitecture(f"{e} (architectures: {archs})") from None

    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(directory)
    except (ValueError, OSError, TypeError) as e:
        raise CheckpointError(f"{config_file}: transformers cannot read it ({e})") from None
    files = CheckpointFiles(directory)
    meta = build_meta_experts(family, config, 1)
    param_shapes = {name: tuple(p.shape[1:]) for name, p in meta.named_parameters(recurse=False)}
    if set(param_shapes) != set(family.param_names):
        raise UnsupportedArchitecture(
            f"{family.model_type}: experts parameters {sorted(param_shapes)} differ from the known "
            f"{sorted(family.param_names)} (transformers version?)"
        )
    param_shapes = {p: param_shapes[p] for p in family.param_names}
    layers = family.moe_layers(config)
    if not layers:
        raise CheckpointError(f"{directory}: config has no MoE layers")
    layout = detect_layout(family, files, layers[0])
    return Checkpoint(directory, config, family, files, layout, param_shapes)


def detect_layout(family: Family, files: CheckpointFiles, layer: int) -> str:
    """Return ``"fused"`` or ``"per_expert"`` from which names the checkpoint has.

    Raises:
        CheckpointError: neither layout's first tensor of ``layer`` is present.
    """
    first = family.param_names[0]
    fused = family.fused_name(layer, first)
    if fused in files:
        return FUSED
    per_expert = family.per_expert_names(layer, 0, first)[0]
    if per_expert in files:
        return PER_EXPERT
    raise CheckpointError(
        f"{files.directory}: missing tensor for the experts of layer {layer}: "
        f"neither {fused!r} (fused) nor {per_expert!r} (per expert)"
    )


def inspect_checkpoint(
    path: str | Path, name: str | None = None, *, checksums: bool = True
) -> tuple[ModelSpec, list[FunctionSpec]]:
    """Read a checkpoint's config and safetensors headers into specs.

    Every routed expert of every MoE layer is checked: all its tensors present,
    shapes consistent with the config, one dtype. With ``checksums`` the expert's
    bytes are read and hashed (sha256; the whole expert part of the checkpoint is
    read once, sequentially); without, ``checksum`` is ``""``.

    Args:
        path: checkpoint directory (``config.json`` + ``model.safetensors`` or
            ``model.safetensors.index.json`` with shards).
        name: model name; defaults to the directory name.

    Raises:
        CheckpointError: missing or truncated file, missing tensor, shape mismatch.
        UnsupportedArchitecture: the architecture has no expert family (named in the message).
    """
    ckpt = open_checkpoint(path)
    config, family = ckpt.config, ckpt.family
    model_name = name or ckpt.path.name
    function_id(model_name, 0, 0)  # validates the name
    functions: list[FunctionSpec] = []
    dtypes: set[str] = set()
    intermediate = family.intermediate_size(config)
    for layer in ckpt.moe_layers:
        for expert in range(ckpt.num_experts):
            parts = [p for ps in ckpt.expert_parts(layer, expert).values() for p in ps]
            dtypes.update(dtype_name(p.info.dtype) for p in parts)
            ranges = [p.byte_range for p in parts]
            functions.append(
                FunctionSpec(
                    id=function_id(model_name, layer, expert),
                    model=model_name,
                    layer=layer,
                    expert=expert,
                    model_type=family.model_type,
                    hidden_size=int(config.hidden_size),
                    intermediate_size=intermediate,
                    dtype=dtype_name(parts[0].info.dtype),
                    checkpoint=str(ckpt.path),
                    tensors=[p.info.name for p in parts],
                    checksum=ckpt.files.sha256(ranges) if checksums else "",
                    nbytes=sum(end - start for _, start, end in ranges),
                )
            )
    if len(dtypes) != 1:
        raise CheckpointError(f"{ckpt.path}: expert tensors have mixed dtypes {sorted(dtypes)}")
    model = ModelSpec(
        name=model_name,
        model_type=family.model_type,
        architectures=list(getattr(config, "architectures", None) or []),
        checkpoint=str(ckpt.path),
        num_layers=int(config.num_hidden_layers),
        moe_layers=ckpt.moe_layers,
        num_experts=ckpt.num_experts,
        top_k=int(config.num_experts_per_tok),
        hidden_size=int(config.hidden_size),
        intermediate_size=intermediate,
        dtype=dtypes.pop(),
        vocab_size=int(config.vocab_size),
        layout=ckpt.layout,
    )
    logger.info("checkpoint %s: %s, %d functions, layout %s", ckpt.path, family.model_type, len(functions), ckpt.layout)
    return model, functions
