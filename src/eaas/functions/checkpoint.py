"""Tiny, seeded, real-format MoE checkpoints for tests and demos.

``write_tiny_checkpoint("mixtral", out)`` builds the family's config and model
with transformers, initialises it under a seed, and writes it with
``save_pretrained`` (config.json, generation_config.json, safetensors) plus a
byte-level BPE tokenizer (``tokenizer.json`` + ``tokenizer_config.json``) trained
with the ``tokenizers`` library on ``eaas/data/tokenizer_corpus.txt``. The same
arguments give the same bytes.

Real weights cannot be downloaded in our CI, so these checkpoints stand in for
real ones: the loader reads them with exactly the code it uses for real ones.
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import torch

from eaas.errors import CheckpointError, ConfigError
from eaas.functions.families import FUSED, LAYOUTS, PER_EXPERT, Family, get_family
from eaas.functions.storage import INDEX_FILE, SINGLE_FILE, parse_dtype

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
#: Jinja chat template of the tiny tokenizers (plain-text role markers; the tiny
#: vocabulary has no special role tokens), so ``/v1/chat/completions`` works on them.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
DEFAULT_VOCAB_SIZE = 512
NUM_HEADS = 4
NUM_KV_HEADS = 2


def corpus_text() -> str:
    """The tokenizer training text shipped with the package (original, public domain)."""
    return resources.files("eaas.data").joinpath("tokenizer_corpus.txt").read_text(encoding="utf-8")


def train_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE, lines: Iterable[str] | None = None):  # -> tokenizers.Tokenizer
    """Train a byte-level BPE (deterministic), with ``<|endoftext|>`` and ``<|pad|>`` as special tokens.

    Args:
        vocab_size: target size; it may come out smaller when the text has fewer
            merges, so callers size the model from ``get_vocab_size()``.
        lines: training text (default: the non-blank lines of the shipped corpus).

    Raises:
        ConfigError: ``vocab_size`` below the 256 bytes plus the 2 special tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 258:
        raise ConfigError(f"vocab_size {vocab_size} is too small: a byte-level BPE needs at least 258")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    if lines is None:
        lines = [line for line in corpus_text().splitlines() if line.strip()]
    tok.train_from_iterator(lines, trainer)
    return tok


def tiny_config(
    arch: str,
    *,
    layers: int,
    hidden: int,
    intermediate: int,
    experts: int,
    top_k: int,
    vocab_size: int,
    eos_token_id: int,
    pad_token_id: int,
) -> Any:
    """Return a small transformers config of family ``arch``.

    ``layers`` counts MoE layers: DeepSeek-V3 gets one extra dense first layer
    (``first_k_dense_replace=1``) so that its real structure is kept.

    Raises:
        UnsupportedArchitecture: ``arch`` is not a supported family.
        ConfigError: a size is invalid.
    """
    from transformers import CONFIG_MAPPING

    family = get_family(arch)
    if hidden % NUM_HEADS or hidden < 2 * NUM_HEADS:
        raise ConfigError(f"hidden {hidden} must be a multiple of {NUM_HEADS} and >= {2 * NUM_HEADS}")
    if layers < 1 or experts < 1 or not 1 <= top_k <= experts or intermediate < 1:
        raise ConfigError(
            f"invalid sizes: layers={layers}, experts={experts}, top_k={top_k}, intermediate={intermediate}"
        )
    head_dim = hidden // NUM_HEADS
    common: dict[str, Any] = dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        num_experts_per_tok=top_k,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        tie_word_embeddings=False,
    )
    extra: dict[str, Any]
    if arch == "mixtral":
        extra = dict(intermediate_size=intermediate, num_local_experts=experts, head_dim=head_dim)
    elif arch == "qwen2_moe":
        extra = dict(
            intermediate_size=2 * hidden,
            moe_intermediate_size=intermediate,
            shared_expert_intermediate_size=intermediate,
            num_experts=experts,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    elif arch == "qwen3_moe":
        extra = dict(
            intermediate_size=2 * hidden,
            moe_intermediate_size=intermediate,
            num_experts=experts,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            head_dim=head_dim,
        )
    elif arch == "olmoe":
        extra = dict(intermediate_size=intermediate, num_experts=experts)
    elif arch == "deepseek_v3":
        n_group = 2 if experts % 2 == 0 and experts // 2 >= top_k else 1
        extra = dict(
            num_hidden_layers=layers + 1,
            first_k_dense_replace=1,
            intermediate_size=2 * hidden,
            moe_intermediate_size=intermediate,
            n_routed_experts=experts,
            n_shared_experts=1,
            n_group=n_group,
            topk_group=1,
            kv_lora_rank=16,
            q_lora_rank=32,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=head_dim,
            head_dim=8,
        )
    elif arch == "gpt_oss":
        # Real GPT-OSS: YaRN factor 32 over 4096 original positions = 131072.
        extra = dict(
            intermediate_size=intermediate,
            num_local_experts=experts,
            head_dim=head_dim,
            sliding_window=16,
            max_position_embeddings=131072,
        )
    else:  # pragma: no cover - a family without a tiny recipe
        raise ConfigError(f"no tiny-checkpoint recipe for {family.model_type!r}")
    return CONFIG_MAPPING[arch](**{**common, **extra})


def write_tiny_checkpoint(
    arch: str,
    out: str | Path,
    *,
    layers: int = 2,
    hidden: int = 64,
    intermediate: int | None = None,
    experts: int = 8,
    top_k: int = 2,
    vocab_size: int | None = None,
    dtype: str = "float32",
    seed: int = 0,
    layout: str | None = None,
    max_shard_size: int | None = None,
) -> Path:
    """Write a small seeded MoE checkpoint of family ``arch`` to ``out``.

    Args:
        arch: transformers ``model_type`` (``"mixtral"``, ``"gpt_oss"``, ...).
        out: directory to create (may exist; files are overwritten).
        layers: MoE decoder layers (DeepSeek-V3 adds one dense first layer).
        hidden: ``D``.
        intermediate: one expert's ``I`` (default ``2 * hidden``).
        experts: routed experts per layer.
        top_k: experts per token.
        vocab_size: tokenizer target size (default 512); the model uses the
            tokenizer's actual size.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        seed: torch seed for the weights.
        layout: ``"per_expert"`` or ``"fused"``; default is what transformers writes.
        max_shard_size: bytes per safetensors file; when set, the checkpoint is
            sharded with a ``model.safetensors.index.json``.

    Returns:
        The checkpoint directory.

    Raises:
        UnsupportedArchitecture: ``arch`` is not supported.
        ConfigError: an argument is invalid.
    """
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    family = get_family(arch)
    torch_dtype = parse_dtype(dtype)
    if layout is not None and layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    if max_shard_size is not None and max_shard_size <= 0:
        raise ConfigError(f"max_shard_size must be > 0 bytes, got {max_shard_size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    tok = train_tokenizer(vocab_size or DEFAULT_VOCAB_SIZE)
    config = tiny_config(
        arch,
        layers=layers,
        hidden=hidden,
        intermediate=intermediate or 2 * hidden,
        experts=experts,
        top_k=top_k,
        vocab_size=tok.get_vocab_size(),
        eos_token_id=tok.token_to_id(EOS_TOKEN),
        pad_token_id=tok.token_to_id(PAD_TOKEN),
    )
    verbosity = hf_logging.get_verbosity()
    progress = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # tiny configs trip harmless size warnings
    hf_logging.disable_progress_bar()
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        model = model.to(torch_dtype)
        model.config.dtype = torch_dtype
        model.generation_config.do_sample = False
        for stale in (SINGLE_FILE, INDEX_FILE, *(p.name for p in out.glob("model-*.safetensors"))):
            (out / stale).unlink(missing_ok=True)
        model.save_pretrained(out, safe_serialization=True, max_shard_size="100GB")
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN
        )
        fast.chat_template = CHAT_TEMPLATE
        fast.save_pretrained(out)
    finally:
        hf_logging.set_verbosity(verbosity)
        if progress:
            hf_logging.enable_progress_bar()
    target = layout or family.native_layout
    if target != family.native_layout or max_shard_size is not None:
        _rewrite(out, family, config, target, max_shard_size)
    logger.info("checkpoint %s: wrote tiny %s (%s layout)", out, arch, target)
    return out


def _rewrite(out: Path, family: Family, config: Any, layout: str, max_shard_size: int | None) -> None:
    """Re-save ``out/model.safetensors`` in ``layout``, optionally sharded."""
    from safetensors.torch import load_file

    single = out / SINGLE_FILE
    if not single.is_file():
        raise CheckpointError(f"{out}: save_pretrained wrote no {SINGLE_FILE}")
    tensors = load_file(str(single))
    if layout != family.native_layout:
        tensors = _convert_layout(tensors, family, config, layout)
    single.unlink()
    _save_sharded(tensors, out, max_shard_size)


def _convert_layout(tensors: dict[str, torch.Tensor], family: Family, config: Any, layout: str) -> dict[str, torch.Tensor]:
    """Convert every MoE layer's expert tensors between the two layouts."""
    tensors = dict(tensors)
    num_experts = family.num_experts(config)
    for layer in family.moe_layers(config):
        for param in family.param_names:
            if layout == FUSED:  # per-expert parts -> one [E, ...] tensor
                slices = []
                for e in range(num_experts):
                    names = family.per_expert_names(layer, e, param)
                    slices.append(torch.cat([tensors.pop(n) for n in names], dim=0))
                tensors[family.fused_name(layer, param)] = torch.stack(slices).contiguous()
            elif layout == PER_EXPERT:  # [E, ...] -> per-expert parts (equal chunks on dim 0)
                fused = tensors.pop(family.fused_name(layer, param))
                for e in range(num_experts):
                    names = family.per_expert_names(layer, e, param)
                    for n, chunk in zip(names, fused[e].chunk(len(names), dim=0)):
                        tensors[n] = chunk.contiguous().clone()
    return tensors


def _save_sharded(tensors: dict[str, torch.Tensor], out: Path, max_shard_size: int | None) -> None:
    """Write ``tensors`` as one file, or as shards + index when ``max_shard_size`` is set."""
    from safetensors.torch import save_file

    names = sorted(tensors)
    if max_shard_size is None:
        save_file({n: tensors[n] for n in names}, str(out / SINGLE_FILE), metadata={"format": "pt"})
        return
    shards: list[list[str]] = [[]]
    size = 0
    for n in names:
        nbytes = tensors[n].numel() * tensors[n].element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nbytes
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in shard}, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
