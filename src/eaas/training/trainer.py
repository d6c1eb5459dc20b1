"""Train a small MoE on Python's own documentation and write a real-format checkpoint.

The recipe (nano-GPT style, on CPU):

* text: :func:`eaas.training.corpus.load_corpus` (pydoc topics + stdlib
  docstrings), 5% of documents held out;
* tokenizer: a byte-level BPE trained with the ``tokenizers`` library on the
  training documents only (:func:`eaas.functions.checkpoint.train_tokenizer`);
* model: a transformers config of the family (:func:`eaas.functions.checkpoint.tiny_config`),
  loss = next-token cross-entropy + ``router_aux_loss_coef`` x transformers' own
  load-balancing loss (Switch Transformer, eq. 4; ``load_balancing_loss_func``
  in ``transformers.models.mixtral.modeling_mixtral``), which the model adds
  itself when called with ``output_router_logits=True``;
* optimiser: AdamW (betas 0.9/0.95, weight decay on matrices only), linear
  warm-up then cosine decay to ``min_lr_ratio`` x ``lr``, gradients clipped to norm 1;
* batches: ``batch_size`` windows of ``seq_len`` tokens at offsets drawn from a
  seeded generator over the concatenated training documents (``<|endoftext|>``
  between documents).

Everything random flows from ``seed``: same config, same Python and torch, same
thread count -> the same bytes. The checkpoint is saved with ``save_pretrained``
in ``dtype`` (float32 by default: EaaS's answers then equal transformers' token for
token, also in batches, where bfloat16 rounding flips near-ties), with the tokenizer,
a chat template, and ``training_report.json`` / ``training_report.png``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from eaas.errors import ConfigError
from eaas.training.corpus import Corpus, load_corpus
from eaas.training.routing import ExpertLoad, measure_expert_load

log = logging.getLogger(__name__)

TRAIN_ARCHS = ("mixtral", "qwen3_moe")
"""Families ``eaas checkpoint train`` builds (both take ``output_router_logits``)."""

REPORT_JSON = "training_report.json"
REPORT_PNG = "training_report.png"

Progress = Callable[[int, int, float], None]
"""``progress(step, steps, train_loss)`` after every optimiser step."""


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """Every knob of :func:`train` (defaults: the model ``eaas up`` ships, 4.8 M parameters, 19.1 MB
    in float32, 12 min on 2 vCPUs).

    Attributes:
        arch: ``"mixtral"`` or ``"qwen3_moe"``.
        layers: MoE decoder layers.
        hidden: ``D``.
        intermediate: one expert's ``I``.
        experts: routed experts per layer.
        top_k: experts per token.
        vocab_size: BPE target size.
        seq_len: tokens per training window.
        batch_size: windows per step.
        steps: optimiser steps.
        lr: peak learning rate.
        min_lr_ratio: final learning rate as a share of ``lr``.
        warmup_steps: linear warm-up steps.
        weight_decay: AdamW decay on 2-D parameters.
        router_aux_loss_coef: weight of the load-balancing loss (Switch Transformer's 0.01).
        eval_every: steps between held-out evaluations (and one at the end).
        eval_windows: held-out windows per evaluation (evenly spaced over the held-out text).
        source: corpus source (see :data:`eaas.training.corpus.SOURCES`).
        held_out_fraction: share of documents held out.
        max_documents: keep only the first N documents (tiny budgets in tests).
        seed: seed of the split, the weights and the batches.
        dtype: dtype the checkpoint is saved in (training is float32).
    """

    arch: str = "mixtral"
    layers: int = 4
    hidden: int = 192
    intermediate: int = 192
    experts: int = 8
    top_k: int = 2
    vocab_size: int = 2048
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 1800
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    router_aux_loss_coef: float = 0.01
    eval_every: int = 150
    eval_windows: int = 64
    source: str = "topics+docstrings"
    held_out_fraction: float = 0.05
    max_documents: int | None = None
    seed: int = 0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        from eaas.training.corpus import SOURCES

        if self.arch not in TRAIN_ARCHS:
            raise ConfigError(f"cannot train {self.arch!r}: expected one of {', '.join(TRAIN_ARCHS)}")
        if self.source not in SOURCES:
            raise ConfigError(f"unknown corpus source {self.source!r}: expected one of {', '.join(SOURCES)}")
        if self.vocab_size < 258:
            raise ConfigError(f"vocab_size {self.vocab_size} is too small: a byte-level BPE needs at least 258")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps={self.warmup_steps!r} must be >= 0")
        for name in ("steps", "seq_len", "batch_size", "eval_every", "eval_windows", "layers", "experts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be >= 1")
        if not 0 < self.lr < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"lr={self.lr!r} must be in (0, 1) and min_lr_ratio={self.min_lr_ratio!r} in [0, 1]")


@dataclass(slots=True)
class TrainResult:
    """What :func:`train` measured.

    Attributes:
        path: the checkpoint directory.
        curve: ``{"step", "train_loss", "held_out_loss"}`` points (``held_out_loss``
            only at evaluations; losses are mean cross-entropy in nats per token).
        held_out_loss: final held-out loss (nats per token).
        expert_load: per MoE layer, on the held-out text.
        tokens: ``{"train": N, "held_out": M}`` tokens after BPE.
        seconds: wall time of the whole run (s).
    """

    path: Path
    curve: list[dict[str, float]] = field(default_factory=list)
    held_out_loss: float = math.nan
    expert_load: list[ExpertLoad] = field(default_factory=list)
    tokens: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def held_out_perplexity(self) -> float:
        """``exp(held_out_loss)``."""
        return math.exp(self.held_out_loss)


def learning_rate(step: int, config: TrainConfig) -> float:
    """Learning rate at optimiser step ``step`` (0-based): linear warm-up, then cosine to ``min_lr_ratio * lr``."""
    if step < config.warmup_steps:  # (warmup_steps 0: no warm-up)
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1.0 + math.cos(math.pi * progress))


def _token_stream(docs: tuple[str, ...], tok: Any, eos_id: int) -> torch.Tensor:
    """Concatenate the encoded documents with ``eos_id`` after each: ``[N]`` int64."""
    ids: list[int] = []
    for enc in tok.encode_batch(list(docs)):
        ids.extend(enc.ids)
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.long)


def held_out_windows(stream: torch.Tensor, seq_len: int, count: int) -> torch.Tensor:
    """Up to ``count`` non-overlapping ``[seq_len]`` windows, evenly spaced over ``stream``: ``[n, seq_len]`` int64.

    Raises:
        ConfigError: the stream is shorter than one window.
    """
    available = stream.numel() // seq_len
    if available < 1:
        raise ConfigError(f"held-out text has {stream.numel()} tokens, fewer than one window of {seq_len}")
    picks = torch.linspace(0, available - 1, steps=min(count, available)).round().long().unique()
    return torch.stack([stream[i * seq_len:(i + 1) * seq_len] for i in picks.tolist()])


@torch.no_grad()
def _eval_loss(model: torch.nn.Module, windows: torch.Tensor, batch_size: int) -> float:
    model.eval()
    total, n = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        chunk = windows[start:start + batch_size]
        out = model(input_ids=chunk, labels=chunk, use_cache=False)
        total += float(out.loss) * chunk.shape[0]
        n += chunk.shape[0]
    model.train()
    return total / n


def _optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=config.lr, betas=(0.9, 0.95), eps=1e-8)


def train(config: TrainConfig, out: str | Path, *, progress: Progress | None = None,
          corpus: Corpus | None = None) -> TrainResult:
    """Train per ``config`` and write the checkpoint and its report to ``out``.

    Args:
        config: the recipe.
        out: directory to write (created; files in it are overwritten).
        progress: called after every step.
        corpus: pre-loaded documents (default: :func:`load_corpus` per ``config``).

    Returns:
        The measured curve, held-out loss and expert load.

    Raises:
        ConfigError: a bad knob, or too little text for one window.
    """
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    from eaas.functions.checkpoint import CHAT_TEMPLATE, EOS_TOKEN, PAD_TOKEN, tiny_config, train_tokenizer
    from eaas.functions.storage import parse_dtype

    started = time.perf_counter()
    out = Path(out)
    save_dtype = parse_dtype(config.dtype)
    corpus = corpus or load_corpus(config.source, held_out_fraction=config.held_out_fraction, seed=config.seed,
                                   max_documents=config.max_documents)
    tok = train_tokenizer(config.vocab_size, [line for doc in corpus.train for line in doc.splitlines() if line.strip()])
    eos_id = tok.token_to_id(EOS_TOKEN)
    train_ids = _token_stream(corpus.train, tok, eos_id)
    held_ids = _token_stream(corpus.held_out, tok, eos_id)
    if train_ids.numel() <= config.seq_len:
        raise ConfigError(f"training text has {train_ids.numel()} tokens, fewer than one window of {config.seq_len}")
    eval_windows = held_out_windows(held_ids, config.seq_len, config.eval_windows)
    log.info("train: %d training / %d held-out tokens, vocab %d", train_ids.numel(), held_ids.numel(),
             tok.get_vocab_size())

    hf_config = tiny_config(config.arch, layers=config.layers, hidden=config.hidden, intermediate=config.intermediate,
                            experts=config.experts, top_k=config.top_k, vocab_size=tok.get_vocab_size(),
                            eos_token_id=eos_id, pad_token_id=tok.token_to_id(PAD_TOKEN))
    hf_config.router_aux_loss_coef = config.router_aux_loss_coef
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        torch.manual_seed(config.seed)
        model = AutoModelForCausalLM.from_config(hf_config).float()
    finally:
        hf_logging.set_verbosity(verbosity)
    model.train()
    opt = _optimizer(model, config)
    gen = torch.Generator().manual_seed(config.seed)
    result = TrainResult(out, tokens={"train": int(train_ids.numel()), "held_out": int(held_ids.numel())})
    coef = config.router_aux_loss_coef
    high = train_ids.numel() - config.seq_len
    for step in range(config.steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, config)
        offsets = torch.randint(0, high, (config.batch_size,), generator=gen)
        batch = torch.stack([train_ids[o:o + config.seq_len] for o in offsets.tolist()])
        output = model(input_ids=batch, labels=batch, output_router_logits=True, use_cache=False)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        aux = float(output.aux_loss.detach())
        lm_loss = float(output.loss.detach()) - coef * aux
        point: dict[str, float] = {"step": step + 1, "train_loss": lm_loss, "aux_loss": aux}
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            point["held_out_loss"] = _eval_loss(model, eval_windows, config.batch_size)
            log.info("train: step %d/%d loss %.3f held-out %.3f", step + 1, config.steps, lm_loss,
                     point["held_out_loss"])
        result.curve.append(point)
        if progress is not None:
            progress(step + 1, config.steps, lm_loss)
    model.eval()
    result.held_out_loss = result.curve[-1]["held_out_loss"]
    moe_layers = list(range(config.layers))
    result.expert_load = measure_expert_load(model, eval_windows, config.top_k, moe_layers, config.batch_size)

    out.mkdir(parents=True, exist_ok=True)
    model = model.to(save_dtype)
    model.config.dtype = save_dtype
    model.generation_config.do_sample = False
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out, safe_serialization=True)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN,
                                       pad_token=PAD_TOKEN)
        fast.chat_template = CHAT_TEMPLATE
        fast.save_pretrained(out)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    result.seconds = time.perf_counter() - started
    write_report(result, config, corpus)
    return result


def report_dict(result: TrainResult, config: TrainConfig, corpus: Corpus) -> dict[str, Any]:
    """The JSON report: config, corpus size, curve, final held-out loss/perplexity, expert load."""
    train_chars, held_chars = corpus.chars
    return {
        "config": asdict(config),
        "corpus": {"source": corpus.source, "documents": {"train": len(corpus.train), "held_out": len(corpus.held_out)},
                   "chars": {"train": train_chars, "held_out": held_chars}, "tokens": result.tokens},
        "held_out_loss": result.held_out_loss,
        "held_out_perplexity": result.held_out_perplexity,
        "expert_load": [e.to_dict() for e in result.expert_load],
        "curve": result.curve,
        "seconds": result.seconds,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def write_report(result: TrainResult, config: TrainConfig, corpus: Corpus) -> tuple[Path, Path]:
    """Write ``training_report.json`` and ``training_report.png`` into the checkpoint directory."""
    from eaas.training.report import plot_report

    report = report_dict(result, config, corpus)
    json_path = result.path / REPORT_JSON
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    png_path = plot_report(report, result.path / REPORT_PNG)
    return json_path, png_path
