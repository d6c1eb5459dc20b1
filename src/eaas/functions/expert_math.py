"""The eager experts loop's per-expert body, without its routing preamble.

Every family's eager experts ``forward`` in transformers 5.24 starts with a routing
preamble — ``one_hot(top_k_index)``, ``permute``, ``sum``, ``greater``, ``nonzero``,
then per hit expert ``torch.where(mask[e])`` and a gather — before the few ops that are
the expert itself. A worker already receives its rows grouped by expert, so it can run
the body alone. At decode sizes the preamble is most of the cost: one row through a
4-expert ``MixtralExperts`` (D=256, I=512, 1 thread, this 2-vCPU VM) takes 382 µs
eagerly and 72 µs as the body alone; at D=1024, I=2816 2292 µs against 2076 µs.

The bodies below are the eager loops' own lines (``modeling_mixtral.MixtralExperts.forward``
and its copies in Qwen2-MoE, Qwen3-MoE, OLMoE and DeepSeek-V3; ``modeling_gpt_oss.GptOssExperts.forward``),
minus the multiplication by a routing weight of exactly 1.0 and the ``index_add_`` into
zeros, which change no value. Rows are grouped per expert exactly as the eager loop does
(every row of one expert in one GEMM, in row order, from a 64-byte-aligned buffer),
because a GEMM's result may depend on its row count and on the alignment of its input.
``tests/test_functions_parity.py`` checks the bodies bit for bit against the module's own
forward for all six families, fp32 and bf16.

A family not listed here keeps the eager forward (:func:`expert_body` returns None).

Legend: ``n`` rows of one expert, ``D`` hidden, ``I`` expert intermediate size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

#: experts classes whose eager body is ``linear(gate_up) -> chunk -> act(gate) * up -> linear(down)``
LINEAR_BODY_CLASSES = frozenset(
    {"MixtralExperts", "Qwen2MoeExperts", "Qwen3MoeExperts", "OlmoeExperts", "DeepseekV3Experts"}
)
#: experts classes whose eager body is ``x @ gate_up + b -> _apply_gate -> @ down + b`` (transposed, biases)
MATMUL_BIAS_BODY_CLASSES = frozenset({"GptOssExperts"})

Body = Callable[[torch.nn.Module, int, torch.Tensor], torch.Tensor]


def _matmul_bias_body(module: torch.nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """``x[n, D]`` -> ``[n, D]`` through expert ``e`` (``GptOssExperts.forward``'s loop body)."""
    gate_up = x @ module.gate_up_proj[e] + module.gate_up_proj_bias[e]  # [n, 2I], interleaved
    return module._apply_gate(gate_up) @ module.down_proj[e] + module.down_proj_bias[e]


def _bound_linear_body(module: torch.nn.Module) -> Body:
    """``MixtralExperts.forward``'s loop body, ``x[n, D]`` -> ``[n, D]`` through expert ``e``,
    with every expert's weight views and the activation looked up once.

    A decode request runs one expert on one row, where ``nn.Module.__getattr__`` for the two
    weights, the ``[e]`` views and the activation module's ``__call__`` are a tenth of the
    time. The ops and their inputs are the same, so are the bits. The activation's own
    ``forward`` is called (experts modules carry no hooks).
    """
    with torch.inference_mode(False):  # plain views: usable inside and outside inference mode
        gate_up = [w for w in module.gate_up_proj]  # [2I, D] per expert
        down = [w for w in module.down_proj]  # [D, I] per expert
    act = module.act_fn
    act = act.forward if isinstance(act, torch.nn.Module) else act

    def body(_module: torch.nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, gate_up[e]).chunk(2, dim=-1)  # [n, I] each
        return F.linear(act(gate) * up, down[e])

    return body


EXPERT_KERNELS = ("eager", "onednn")
"""How a worker's linear experts compute (``EAAS_EXPERT_KERNEL``): ``eager``, transformers' eager
loop body (the same bits as transformers); ``onednn``, the same math on oneDNN-prepacked weights
for two or more rows (:func:`onednn_linear_body`)."""


def onednn_supported(module: torch.nn.Module) -> bool:
    """Whether :func:`onednn_linear_body` can run ``module``: a linear family, float32 weights on
    the CPU, and a torch built with oneDNN (``torch.backends.mkldnn``)."""
    if type(module).__name__ not in LINEAR_BODY_CLASSES or not torch.backends.mkldnn.is_available():
        return False
    weights = (module.gate_up_proj, module.down_proj)
    return all(w.dtype == torch.float32 and w.device.type == "cpu" for w in weights)


def onednn_linear_body(module: torch.nn.Module) -> tuple[Body, int]:
    """The linear families' loop body, with rows of two or more on weights prepacked for oneDNN.

    ``F.linear`` on a plain ``[N, K]`` weight makes MKL repack the weight on every call; with
    the 2 to 8 rows an expert gets per decode step that repacking is most of the call. Here each
    expert's ``gate_up [2I, D]`` and ``down [D, I]`` are also reordered once
    (``torch.ops.mkldnn._reorder_linear_weight``, the prepacking torch inductor's freezing pass
    uses), and a call with two or more rows is one ``torch.ops.mkldnn._linear_pointwise`` per
    weight. A single row stays on the eager body (a GEMV: oneDNN's packed layout is slower there).
    Measured per 16 expert calls at D=1024, I=2816, 1 thread, this 2-vCPU VM (eager → prepacked):
    1 row 43 → 55 ms, 2 rows 80 → 58, 4 rows 152 → 75, 8 rows 193 → 104, 32 rows 380 → 273.

    The math is the eager body's. One row gives transformers' bits; more rows oneDNN's
    rounding, not MKL's (within float32 rounding of transformers', ~1e-6 relative). The
    weights are held twice: the module's own and the prepacked copy.

    Returns:
        ``(body, packed_bytes)``: the body (bound to ``module``) and the bytes of the prepacked copy.

    Raises:
        ValueError: :func:`onednn_supported` is false for ``module``.
    """
    if not onednn_supported(module):
        raise ValueError(f"the onednn expert kernel needs a linear family with float32 CPU weights, got"
                         f" {type(module).__name__} ({module.gate_up_proj.dtype}, {module.gate_up_proj.device})")
    reorder = torch.ops.mkldnn._reorder_linear_weight
    linear = torch.ops.mkldnn._linear_pointwise
    single = _bound_linear_body(module)
    with torch.inference_mode(False):
        gate_up = [reorder(w.contiguous()) for w in module.gate_up_proj]  # [2I, D] per expert, prepacked
        down = [reorder(w.contiguous()) for w in module.down_proj]  # [D, I] per expert, prepacked
    packed_bytes = sum(w.numel() * w.element_size() for w in (module.gate_up_proj, module.down_proj))
    act = module.act_fn
    act = act.forward if isinstance(act, torch.nn.Module) else act

    def body(_module: torch.nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            return single(_module, e, x)
        gate, up = linear(x, gate_up[e], None, "none", [], "").chunk(2, dim=-1)  # [n, I] each
        return linear(act(gate) * up, down[e], None, "none", [], "")

    return body, packed_bytes


def expert_body(module: torch.nn.Module) -> Body | None:
    """The per-expert body of ``module``'s eager forward, or None for an unlisted class.

    ``body(module, e, x)`` maps ``x[n, D]`` (all rows routed to local expert ``e``, in
    row order) to the unweighted outputs ``[n, D]``, the same bits as the module's
    eager forward with ``top_k_index = e`` and weight 1.0. The linear families' body is
    bound to ``module``'s weights (:func:`_bound_linear_body`): call it with that module only.
    """
    name = type(module).__name__
    if name in LINEAR_BODY_CLASSES:
        return _bound_linear_body(module)
    if name in MATMUL_BIAS_BODY_CLASSES:
        return _matmul_bias_body
    return None


def aligned(x: torch.Tensor, align: int = 64) -> torch.Tensor:
    """``x`` itself when its data is ``align``-byte aligned, else a copy (the torch CPU
    allocator aligns to 64 bytes, as the eager loop's gathered rows are)."""
    return x if x.data_ptr() % align == 0 else x.clone()


def grouped_rows(counts: tuple[int, ...], locals_: tuple[int, ...]) -> list[tuple[int, slice | torch.Tensor]]:
    """Rows per local expert, in the eager loop's order (ascending expert).

    Args:
        counts: rows per segment, in row order (zero-row segments allowed).
        locals_: the local expert of each segment (an expert may repeat).

    Returns:
        ``[(e, rows)]`` with ``rows`` a ``slice`` when expert ``e``'s rows are one
        contiguous range, else an int64 index tensor of its rows, ascending.
    """
    ranges: dict[int, list[tuple[int, int]]] = {}
    start = 0
    for c, e in zip(counts, locals_):
        if c:
            ranges.setdefault(e, []).append((start, start + c))
        start += c
    out: list[tuple[int, slice | torch.Tensor]] = []
    for e in sorted(ranges):
        rs = ranges[e]
        if len(rs) == 1:
            out.append((e, slice(*rs[0])))
        else:
            out.append((e, torch.cat([torch.arange(a, b) for a, b in rs])))
    return out


def grouped_forward(module: torch.nn.Module, body: Body, x: torch.Tensor,
                    groups: list[tuple[int, slice | torch.Tensor]]) -> torch.Tensor:
    """Unweighted expert outputs ``[N, D]`` for ``x[N, D]`` whose rows ``groups`` assigns to experts.

    Args:
        module: the family's experts module (hosted experts only).
        body: :func:`expert_body` of ``module``.
        x: ``[N, D]``; every row belongs to exactly one group.
        groups: from :func:`grouped_rows`.
    """
    if len(groups) == 1 and isinstance(groups[0][1], slice) and groups[0][1] == slice(0, x.shape[0]):
        return body(module, groups[0][0], aligned(x))
    out = torch.empty_like(x)
    for e, rows in groups:
        if isinstance(rows, slice):
            out[rows] = body(module, e, aligned(x[rows]))
        else:
            out.index_copy_(0, rows, body(module, e, x.index_select(0, rows)))
    return out
