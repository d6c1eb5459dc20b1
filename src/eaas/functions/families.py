"""Per-family knowledge: where each MoE family keeps its routed experts.

One :class:`Family` per transformers ``model_type``. Everything the loader, the
checkpoint writer and the client integration need to know about a family lives
here and nowhere else:

* the family's own experts class (decorated with ``@use_experts_implementation``
  in transformers) and the config attribute that sets its expert count;
* where the experts module sits in a loaded model (``module_path``) and the router;
* the checkpoint tensor names in the two layouts found in the wild:
  ``per_expert`` (``{disk_prefix}.{expert}.w1.weight`` ...) and ``fused``
  (``{module_path}.gate_up_proj`` with experts on dim 0, as in memory);
* which decoder layers have routed experts.

Layouts were read from transformers 5.24 ``save_pretrained`` output (see
DESIGN.md, "Facts checked against transformers").

Legend: ``E`` experts, ``D`` hidden, ``I`` expert intermediate size.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from eaas.errors import NotFound, UnsupportedArchitecture

PER_EXPERT = "per_expert"
FUSED = "fused"
LAYOUTS = (PER_EXPERT, FUSED)


def _all_layers(config: Any) -> list[int]:
    return list(range(config.num_hidden_layers))


def _qwen_moe_layers(config: Any) -> list[int]:
    # Source: Qwen2MoeDecoderLayer / Qwen3MoeDecoderLayer.__init__.
    mlp_only = set(getattr(config, "mlp_only_layers", None) or [])
    step = getattr(config, "decoder_sparse_step", 1) or 1
    if config.num_experts <= 0:
        return []
    return [i for i in range(config.num_hidden_layers) if i not in mlp_only and (i + 1) % step == 0]


def _deepseek_moe_layers(config: Any) -> list[int]:
    # Source: DeepseekV3DecoderLayer.__init__ (layer_idx >= first_k_dense_replace).
    first = getattr(config, "first_k_dense_replace", 0) or 0
    return [i for i in range(config.num_hidden_layers) if i >= first]


@dataclass(frozen=True, slots=True)
class Family:
    """Where and how one MoE family stores and computes its routed experts.

    Attributes:
        model_type: transformers ``config.model_type``.
        experts_class: dotted path of the family's experts ``nn.Module``.
        count_attr: config attribute the experts class reads its expert count from.
            Setting an alias that the config does not map is silently ignored by
            transformers, so the loader checks the built module's shapes too.
        intermediate_attr: config attribute holding one expert's intermediate size.
        module_path: experts module inside a loaded ``*ForCausalLM``.
        router_path: router module inside a loaded ``*ForCausalLM``.
        disk_prefix: per-expert tensor prefix on disk (``{disk_prefix}.{expert}.``).
        per_expert: for each experts-module parameter, the per-expert tensor names
            (suffixes after ``{disk_prefix}.{expert}.``) concatenated on dim 0 to
            form that parameter's slice of one expert.
        native_layout: the layout ``save_pretrained`` writes.
        moe_layers: config -> decoder layers that have routed experts.
    """

    model_type: str
    experts_class: str
    count_attr: str
    intermediate_attr: str
    module_path: str
    router_path: str
    disk_prefix: str
    per_expert: tuple[tuple[str, tuple[str, ...]], ...]
    native_layout: str
    moe_layers: Callable[[Any], list[int]] = _all_layers

    @property
    def param_names(self) -> tuple[str, ...]:
        """Parameter names of the experts module, in checkpoint order."""
        return tuple(p for p, _ in self.per_expert)

    def load_experts_class(self) -> type[torch.nn.Module]:
        """Import and return the family's experts class."""
        module_name, _, cls_name = self.experts_class.rpartition(".")
        return getattr(importlib.import_module(module_name), cls_name)

    def fused_name(self, layer: int, param: str) -> str:
        """Checkpoint name of a fused 3-D parameter ``[E, ...]`` of ``layer``."""
        return f"{self.module_path.format(layer=layer)}.{param}"

    def per_expert_names(self, layer: int, expert: int, param: str) -> tuple[str, ...]:
        """Checkpoint names whose dim-0 concatenation is ``param[expert]``."""
        prefix = self.disk_prefix.format(layer=layer)
        for p, parts in self.per_expert:
            if p == param:
                return tuple(f"{prefix}.{expert}.{s}" for s in parts)
        raise KeyError(param)

    def intermediate_size(self, config: Any) -> int:
        return int(getattr(config, self.intermediate_attr))

    def num_experts(self, config: Any) -> int:
        return int(getattr(config, self.count_attr))


_GATED = (("gate_up_proj", ("gate_proj.weight", "up_proj.weight")), ("down_proj", ("down_proj.weight",)))

_FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family(
            model_type="mixtral",
            experts_class="transformers.models.mixtral.modeling_mixtral.MixtralExperts",
            count_attr="num_local_experts",
            intermediate_attr="intermediate_size",
            module_path="model.layers.{layer}.mlp.experts",
            router_path="model.layers.{layer}.mlp.gate",
            disk_prefix="model.layers.{layer}.block_sparse_moe.experts",
            # w1 = gate, w3 = up, w2 = down (MixtralBlockSparseTop2MLP in transformers 4.x).
            per_expert=(("gate_up_proj", ("w1.weight", "w3.weight")), ("down_proj", ("w2.weight",))),
            native_layout=PER_EXPERT,
        ),
        Family(
            model_type="qwen2_moe",
            experts_class="transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeExperts",
            count_attr="num_experts",
            intermediate_attr="moe_intermediate_size",
            module_path="model.layers.{layer}.mlp.experts",
            router_path="model.layers.{layer}.mlp.gate",
            disk_prefix="model.layers.{layer}.mlp.experts",
            per_expert=_GATED,
            native_layout=PER_EXPERT,
            moe_layers=_qwen_moe_layers,
        ),
        Family(
            model_type="qwen3_moe",
            experts_class="transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeExperts",
            count_attr="num_experts",
            intermediate_attr="moe_intermediate_size",
            module_path="model.layers.{layer}.mlp.experts",
            router_path="model.layers.{layer}.mlp.gate",
            disk_prefix="model.layers.{layer}.mlp.experts",
            per_expert=_GATED,
            native_layout=PER_EXPERT,
            moe_layers=_qwen_moe_layers,
        ),
        Family(
            model_type="olmoe",
            experts_class="transformers.models.olmoe.modeling_olmoe.OlmoeExperts",
            count_attr="num_experts",
            intermediate_attr="intermediate_size",
            module_path="model.layers.{layer}.mlp.experts",
            router_path="model.layers.{layer}.mlp.gate",
            disk_prefix="model.layers.{layer}.mlp.experts",
            per_expert=_GATED,
            native_layout=PER_EXPERT,
        ),
        Family(
            model_type="deepseek_v3",
            experts_class="transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3Experts",
            count_attr="n_routed_experts",
            intermediate_attr="moe_intermediate_size",
            module_path="model.layers.{layer}.mlp.experts",
            router_path="model.layers.{layer}.mlp.gate",
            disk_prefix="model.layers.{layer}.mlp.experts",
            per_expert=_GATED,
            native_layout=PER_EXPERT,
            moe_layers=_deepseek_moe_layers,
        ),
        Family(
            model_type="gpt_oss",
            experts_class="transformers.models.gpt_oss.modeling_gpt_oss.GptOssExperts",
            count_attr="num_local_experts",
            intermediate_attr="intermediate_size",
            module_path="model.layers.{layer}.mlp.experts",
            router_path="model.layers.{layer}.mlp.router",
            disk_prefix="model.layers.{layer}.mlp.experts",
            # No per-expert GPT-OSS checkpoints exist; this layout (one slice of each
            # fused tensor per expert: gate_up_proj [D, 2I] interleaved, biases) is ours.
            per_expert=(
                ("gate_up_proj", ("gate_up_proj",)),
                ("gate_up_proj_bias", ("gate_up_proj_bias",)),
                ("down_proj", ("down_proj",)),
                ("down_proj_bias", ("down_proj_bias",)),
            ),
            native_layout=FUSED,
        ),
    )
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_FAMILIES))


def get_family(model_type: str) -> Family:
    """Return the family of a transformers ``model_type``.

    Raises:
        UnsupportedArchitecture: no family is registered for ``model_type``.
    """
    try:
        return _FAMILIES[model_type]
    except KeyError:
        raise UnsupportedArchitecture(
            f"unsupported architecture {model_type!r}: EaaS serves the routed experts of "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        ) from None


def family_of_model(model: torch.nn.Module) -> Family:
    """Return the family of a loaded transformers model (by ``model.config.model_type``)."""
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedArchitecture(f"{type(model).__name__} has no transformers config")
    return get_family(config.model_type)


def experts_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Map decoder layer index -> routed-experts module of a loaded transformers model.

    Only layers listed by the family's ``moe_layers`` rule appear (dense layers of
    DeepSeek-V3 or Qwen-MoE ``mlp_only_layers`` are skipped).

    Raises:
        UnsupportedArchitecture: the model's family is unknown, or a layer that
            should hold experts does not (the model's structure differs from the
            family's known one).
    """
    family = family_of_model(model)
    out: dict[int, torch.nn.Module] = {}
    for layer in family.moe_layers(model.config):
        path = family.module_path.format(layer=layer)
        # A bare decoder (``MixtralModel``) lacks the ``model.`` prefix of ``*ForCausalLM``.
        candidates = (path, path.removeprefix("model."))
        for candidate in candidates:
            try:
                out[layer] = model.get_submodule(candidate)
                break
            except AttributeError:
                continue
        else:
            raise UnsupportedArchitecture(
                f"{family.model_type}: no experts module at {path!r} in {type(model).__name__}"
            )
    return out


def moe_block(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    """The sparse MoE block (router + experts) of decoder layer ``layer`` of a transformers
    ``*ForCausalLM`` (``model.model.layers[layer].block_sparse_moe`` for Mixtral, ``.mlp`` for
    the others, per the families above).

    Raises:
        NotFound: the layer does not exist, or it is a dense layer without an MoE block.
    """
    layers = model.model.layers  # type: ignore[union-attr]
    if not 0 <= layer < len(layers):
        raise NotFound(f"layer {layer} does not exist; the model has layers 0..{len(layers) - 1}")
    for attr in ("block_sparse_moe", "mlp"):
        block = getattr(layers[layer], attr, None)
        if block is not None and hasattr(block, "experts"):
            return block
    raise NotFound(f"layer {layer} has no MoE block (dense layer)")
