"""Expert shards: the routed experts one worker hosts, loaded and computed.

A shard holds, per MoE layer, the family's own transformers experts module
(e.g. ``MixtralExperts``) built on the meta device with only the hosted experts
and then given real parameters sliced from the checkpoint (experts on dim 0).
``f_e(x)`` is that module's eager loop body for expert ``e``
(:mod:`eaas.functions.expert_math`, the same bits as its eager forward with
``top_k_index`` = the local expert index and routing weight 1.0, without the
routing preamble), so every family quirk (interleaved gate/up, transposed
weights, biases, clamped SwiGLU) is the reference's own code; a family without
a known body runs the eager forward itself. Routing weights are never applied here.

Legend: ``N`` rows, ``D`` hidden, ``E`` hosted experts of a layer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from pathlib import Path

import torch

from eaas.errors import CheckpointError, ShardInputError, UnknownFunction
from eaas.functions.expert_math import (
    EXPERT_KERNELS,
    Body,
    expert_body,
    grouped_forward,
    grouped_rows,
    onednn_linear_body,
    onednn_supported,
)
from eaas.functions.loader import Checkpoint, build_meta_experts, open_checkpoint
from eaas.functions.storage import dtype_name, parse_dtype

logger = logging.getLogger(__name__)

Segment = tuple[tuple[int, int], int]


ROUTING_CACHE_ROWS = 64  # batches of at most this many rows keep their routing tensors
ROUTING_CACHE_MAX = 1024


class ExpertShard:
    """The experts one worker hosts, callable on rows grouped by expert.

    Attributes:
        model: model name, if given at load.
        functions: hosted ``(layer, expert)`` pairs, sorted.
        hidden_size: ``D``.
        dtype: dtype of weights, inputs and outputs.
        device: device of weights, inputs and outputs.
        nbytes: bytes of the weights held (with the ``onednn`` kernel: the experts' twice).
        kernel: ``"eager"`` (transformers' eager loop body: its bits) or ``"onednn"`` (the same math
            on oneDNN-prepacked weights for 2+ rows; float32 CPU linear families only, see
            :func:`~eaas.functions.expert_math.onednn_linear_body`).

    Args:
        kernel: the kernel asked for (``EAAS_EXPERT_KERNEL``); ``"onednn"`` falls back to
            ``"eager"`` for a shard it cannot run (bf16, GPU, GPT-OSS).

    Raises:
        ValueError: an unknown ``kernel``.
    """

    def __init__(
        self,
        modules: dict[int, torch.nn.Module],
        experts: dict[int, list[int]],
        *,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
        model: str | None = None,
        kernel: str = "eager",
    ) -> None:
        if kernel not in EXPERT_KERNELS:
            raise ValueError(f"unknown expert kernel {kernel!r}; choose one of {', '.join(EXPERT_KERNELS)}")
        self.model = model
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.device = device
        self._modules = modules
        # (layer, expert) -> index of the expert inside its layer's module
        self._local: dict[tuple[int, int], int] = {
            (layer, e): i for layer, es in experts.items() for i, e in enumerate(es)
        }
        self.functions: tuple[tuple[int, int], ...] = tuple(sorted(self._local))
        self.nbytes = sum(
            p.numel() * p.element_size() for m in modules.values() for p in m.parameters()
        )
        # layer -> the per-expert body, when the family's is known (expert_math): the eager loop's,
        # or with kernel "onednn" the same math on prepacked weights for 2+ rows (a second copy)
        self._bodies: dict[int, Body | None] = {}
        packed = 0  # layers prepacked
        for layer, m in modules.items():
            if kernel == "onednn" and onednn_supported(m):
                self._bodies[layer], packed_bytes = onednn_linear_body(m)
                self.nbytes += packed_bytes
                packed += 1
            else:
                self._bodies[layer] = expert_body(m)
        #: the kernel every layer runs: "onednn" only where all could be prepacked (else "eager")
        self.kernel = "onednn" if modules and packed == len(modules) else "eager"
        # small batches' routing, per (counts, local experts, dtype): the rows of each
        # expert (direct body) or (local_index [n, 1], ones [n, 1]) (eager forward)
        self._routing: dict[tuple, object] = {}

    def __repr__(self) -> str:
        return (
            f"ExpertShard(model={self.model!r}, functions={len(self.functions)}, "
            f"dtype={dtype_name(self.dtype)}, device={self.device}, nbytes={self.nbytes})"
        )

    def has(self, layer: int, expert: int) -> bool:
        """Whether the shard hosts expert ``expert`` of layer ``layer``."""
        return (layer, expert) in self._local

    def module(self, layer: int) -> torch.nn.Module:
        """The experts module of ``layer`` (hosted experts only, in ascending order)."""
        return self._modules[layer]

    def forward(self, x: torch.Tensor, segments: Sequence[Segment]) -> torch.Tensor:
        """Compute ``y[r] = f_e(x[r])`` for each row ``r`` of each segment.

        Args:
            x: ``[N, D]`` rows, in ``self.dtype`` on ``self.device``.
            segments: ``((layer, expert), rows)`` in row order, covering ``x``
                contiguously; rows may be 0; an expert may appear several times.

        Returns:
            ``[N, D]``, same dtype and device; unweighted expert outputs.

        Raises:
            ShardInputError: ``x`` has the wrong shape, dtype or device, or the
                segments are malformed or do not cover exactly ``N`` rows.
            UnknownFunction: a segment names an expert the shard does not host.
        """
        self._check_input(x)
        layers: dict[int, tuple[list[int], list[int], list[int]]] = {}  # layer -> (starts, rows, local)
        start = 0
        for seg in segments:
            try:
                (layer, expert), rows = seg
                layer, expert, rows = int(layer), int(expert), int(rows)
            except (TypeError, ValueError):
                raise ShardInputError(f"malformed segment {seg!r}: expected ((layer, expert), rows)") from None
            local = self._local.get((layer, expert))
            if local is None:
                raise UnknownFunction(
                    f"expert ({layer}, {expert}) of model {self.model!r} is not hosted by this shard "
                    f"({len(self.functions)} functions)"
                )
            if rows < 0:
                raise ShardInputError(f"segment {seg!r}: negative row count")
            if rows:
                starts, counts, locals_ = layers.setdefault(layer, ([], [], []))
                starts.append(start)
                counts.append(rows)
                locals_.append(local)
            start += rows
        if start != x.shape[0]:
            raise ShardInputError(f"segments cover {start} rows, x has {x.shape[0]} (expected equal)")
        if torch.is_inference_mode_enabled():  # a worker's serve loop runs in it throughout
            return self._forward_layers(x, layers)
        with torch.inference_mode():
            return self._forward_layers(x, layers)

    __call__ = forward

    def _forward_layers(self, x: torch.Tensor, layers: dict[int, tuple[list[int], list[int], list[int]]]) -> torch.Tensor:
        if len(layers) == 1 and sum(next(iter(layers.values()))[1]) == x.shape[0]:
            layer, (_, counts, locals_) = next(iter(layers.items()))
            return self._run(layer, x, counts, locals_)
        out = torch.empty_like(x)  # [N, D]
        for layer, (starts, counts, locals_) in layers.items():
            rows = torch.cat([torch.arange(s, s + c) for s, c in zip(starts, counts)]).to(x.device)
            y = self._run(layer, x.index_select(0, rows), counts, locals_)
            out.index_copy_(0, rows, y)
        return out

    def _run(self, layer: int, x: torch.Tensor, counts: list[int], locals_: list[int]) -> torch.Tensor:
        """One forward of ``layer``'s hosted experts over ``x``; computes each expert once.

        With a known family the eager loop's per-expert body runs alone
        (:mod:`eaas.functions.expert_math`: the same bits without the routing preamble);
        otherwise the module's eager forward runs with ``top_k_index`` = local expert, weight 1.
        """
        body = self._bodies[layer]
        key = (tuple(counts), tuple(locals_), x.dtype, body is None)
        routing = self._routing.get(key)
        if routing is None:  # the same small groupings recur request after request at decode
            with torch.inference_mode(False):
                if body is not None:
                    routing = [(e, r if isinstance(r, slice) else r.to(x.device))
                               for e, r in grouped_rows(key[0], key[1])]
                else:
                    local_index = torch.repeat_interleave(
                        torch.tensor(locals_, dtype=torch.long), torch.tensor(counts, dtype=torch.long)
                    ).to(x.device)[:, None]  # [n, 1]
                    routing = (local_index, torch.ones((x.shape[0], 1), dtype=x.dtype, device=x.device))
            if x.shape[0] <= ROUTING_CACHE_ROWS:
                if len(self._routing) >= ROUTING_CACHE_MAX:
                    self._routing.clear()
                self._routing[key] = routing
        module = self._modules[layer]
        if body is not None:
            return grouped_forward(module, body, x, routing)  # type: ignore[arg-type]
        return module(x, *routing)  # type: ignore[misc]

    def _check_input(self, x: object) -> None:
        if not isinstance(x, torch.Tensor):
            raise ShardInputError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != self.hidden_size:
            raise ShardInputError(f"x has shape {list(x.shape)}, expected [N, {self.hidden_size}]")
        if x.dtype != self.dtype:
            raise ShardInputError(f"x has dtype {dtype_name(x.dtype)}, expected {dtype_name(self.dtype)}")
        if x.device != self.device:
            raise ShardInputError(f"x is on {x.device}, expected {self.device}")


def _canonical_device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def load_shard(
    path: str | Path | Checkpoint,
    experts: Iterable[tuple[int, int]],
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    *,
    model: str | None = None,
    kernel: str = "eager",
) -> ExpertShard:
    """Load the hosted experts of a checkpoint into an :class:`ExpertShard`.

    Only the hosted experts' tensors are read (``safe_open`` + ``get_slice``,
    memory-mapped), from a single file or a sharded index, per-expert or fused layout.

    Args:
        path: checkpoint directory (or an already opened :class:`Checkpoint`).
        experts: ``(layer, expert)`` pairs to host; duplicates are ignored.
        device: torch device for weights and compute.
        dtype: weight dtype (default: the checkpoint's).
        model: model name recorded on the shard.
        kernel: how the experts compute (:class:`ExpertShard`'s ``kernel``).

    Raises:
        CheckpointError: the checkpoint is unreadable, an expert does not exist,
            or a tensor is missing or has the wrong shape.
        UnsupportedArchitecture: the family is unknown.
        ShardInputError: no experts were asked for.
    """
    ckpt = path if isinstance(path, Checkpoint) else open_checkpoint(path)
    pairs = sorted({(int(layer), int(e)) for layer, e in experts})
    if not pairs:
        raise ShardInputError("a shard needs at least one (layer, expert)")
    by_layer: dict[int, list[int]] = {}
    for layer, e in pairs:
        by_layer.setdefault(layer, []).append(e)
    dev = _canonical_device(device)
    target = parse_dtype(dtype)
    modules: dict[int, torch.nn.Module] = {}
    weight_dtype = None
    with ExitStack() as stack:
        handles: dict[Path, object] = {}

        def handle(file: Path):  # noqa: ANN202
            if file not in handles:
                from safetensors import safe_open

                handles[file] = stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            return handles[file]

        for layer, layer_experts in by_layer.items():
            parts = [ckpt.expert_parts(layer, e) for e in layer_experts]
            module = build_meta_experts(ckpt.family, ckpt.config, len(layer_experts))
            for param, shape in ckpt.param_shapes.items():
                disk_dtype = parts[0][param][0].info.dtype
                weight_dtype = weight_dtype or target or disk_dtype
                dst = torch.empty((len(layer_experts), *shape), dtype=weight_dtype, device=dev)  # [E, ...]
                for i, expert_parts in enumerate(parts):
                    offset = 0
                    for part in expert_parts[param]:
                        sl = handle(part.info.file).get_slice(part.info.name)
                        src = sl[:] if part.index is None else sl[part.index : part.index + 1][0]
                        rows = src.shape[0]
                        dst[i, offset : offset + rows].copy_(src)
                        offset += rows
                        del src
                module._parameters[param] = torch.nn.Parameter(dst, requires_grad=False)
            _check_materialised(module, layer)
            modules[layer] = module.eval()
    shard = ExpertShard(
        modules,
        by_layer,
        hidden_size=int(ckpt.config.hidden_size),
        dtype=weight_dtype or torch.float32,
        device=dev,
        model=model,
        kernel=kernel,
    )
    logger.info("shard %s: loaded %d experts from %s (%d bytes, %s kernel)", model, len(pairs), ckpt.path,
                shard.nbytes, shard.kernel)
    return shard


def _check_materialised(module: torch.nn.Module, layer: int) -> None:
    """Refuse a module that still has meta tensors: on CPU ``F.linear`` with a meta
    weight returns garbage instead of raising (DESIGN.md)."""
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.is_meta:
            raise CheckpointError(f"layer {layer}: experts parameter {name!r} was not loaded from the checkpoint")
