"""A KV cache of preallocated slots that batched decode steps read and write in place.

Each running sequence owns one row ("slot") of per-layer buffers ``[R, H, C, d]``; its
token at position ``p`` lives in column ``p`` (column = position, so sliding windows and
rotary positions stay exact). Running sequences occupy rows ``0 .. B-1``: a forward over
them reads the view ``buffer[:B, :, :L]`` (no copy) and writes each row's new keys and
values at that row's own column. A finished sequence's row is refilled by moving the last
row into it (a copy of one sequence, once), so the running rows stay a contiguous range.
Every row is allocated at once; columns grow by doubling up to ``max_columns``.

Per step the only work proportional to cached tokens is attention itself: the masks are
``[B, 1, q, L]`` and built from the row lengths (:func:`attention_masks`, pure).

This replaces the padded merge/split of per-sequence ``DynamicCache`` objects
(:mod:`eaas.gateway.kvbatch`), which copied every cached token twice per decode step.

Legend: ``R`` rows allocated, ``B`` rows in a forward, ``H`` KV heads, ``C`` columns
allocated, ``L`` columns a forward attends over, ``q`` new tokens per row, ``d`` head dim
(keys and values may differ, e.g. DeepSeek-V3's MLA).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache

MIN_COLUMNS = 64


def allowed(query_pos: torch.Tensor, lengths: torch.Tensor, span: int, window: int | None) -> torch.Tensor:
    """Which key columns each query may attend to (causal, within its row, within a sliding window).

    Args:
        query_pos: ``[B, q]`` int64, each query's position (= its column).
        lengths: ``[B]`` int64, valid columns per row once this forward has written (keys at
            columns ``>= lengths[b]`` are padding).
        span: ``L``, key columns in the view.
        window: sliding window (a query at ``p`` sees keys ``> p - window``), None = full.

    Returns:
        ``[B, 1, q, L]`` bool.
    """
    keys = torch.arange(span, device=query_pos.device)  # [L]
    q = query_pos.unsqueeze(-1)  # [B, q, 1]
    ok = (keys <= q) & (keys < lengths.view(-1, 1, 1))
    if window:
        ok &= keys > q - window
    return ok.unsqueeze(1)


def attention_masks(config: Any, query_pos: torch.Tensor, lengths: torch.Tensor, span: int,
                    dtype: torch.dtype) -> torch.Tensor | dict[str, torch.Tensor]:
    """The 4D additive masks a transformers decoder takes as ``attention_mask`` (used as-is).

    Models with ``config.layer_types`` (Qwen2-MoE, GPT-OSS) take a dict keyed by layer type;
    the others one tensor, sliding when ``config.sliding_window`` is set (Mixtral, Qwen3-MoE),
    as in their ``create_causal_mask`` / ``create_sliding_window_causal_mask`` choice
    (``transformers/models/*/modeling_*.py``).

    Returns:
        ``[B, 1, q, L]`` in ``dtype``: 0 where allowed, ``finfo(dtype).min`` elsewhere (the value
        transformers itself uses; eager attention adds it, SDPA takes it as a float mask).
    """
    floor = torch.finfo(dtype).min

    def make(window: int | None) -> torch.Tensor:
        ok = allowed(query_pos, lengths, span, window)
        return torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill_(~ok, floor)

    window = getattr(config, "sliding_window", None) or None
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return {kind: make(window if kind == "sliding_attention" else None) for kind in set(layer_types)}
    return make(window)


@dataclass(slots=True)
class _Forward:
    """One forward's rows and writes (see :meth:`SlotCache.begin`)."""

    row0: int = 0
    count: int = 0
    span: int = 0
    write: torch.Tensor | None = None  # [B] columns (decode) or None (prefill: columns 0..q-1)
    write_rows: torch.Tensor | None = None  # [B] the rows of a decode forward


class SlotCache(Cache):
    """Preallocated per-layer KV slots; one transformers ``Cache`` object serves every forward.

    Before each forward the runner calls :meth:`begin` with the rows the forward covers and
    where each row writes; the model's attention layers then call :meth:`update`.

    Args:
        max_rows: rows at most (the runner's batch size, plus room for one prefill batch).
        max_columns: columns at most (the model's context length).
    """

    def __init__(self, max_rows: int, max_columns: int) -> None:
        # no super().__init__: every method the decoders call is defined here
        self.layers: list[Any] = []
        self.max_rows = max_rows
        self.max_columns = max_columns
        self.keys: list[torch.Tensor] = []  # per layer [R, H, C, d]
        self.values: list[torch.Tensor] = []
        self.columns = 0  # columns allocated
        # the current forward of each thread (micro-batches run concurrently on disjoint rows)
        self._local = threading.local()
        self._count_lock = threading.Lock()
        self.bytes_written = 0  # new keys/values written by forwards
        self.bytes_copied = 0  # moved between rows (compaction, forks) or by growing the buffers

    @property
    def _fwd(self) -> _Forward:
        f = getattr(self._local, "f", None)
        if f is None:
            f = self._local.f = _Forward()
        return f

    # --- what the runner calls --------------------------------------------------------------

    def begin(self, row0: int, count: int, span: int, write_columns: torch.Tensor | None) -> None:
        """Set up the next forward over rows ``row0 .. row0+count-1``.

        Args:
            row0: first row.
            count: rows (the forward's batch size ``B``).
            span: ``L``: columns the attention reads (max row length after the write).
            write_columns: ``[B]`` int64, the column each row writes its one new token to
                (decode); None: a prefill, rows written from column 0.

        The state is the calling thread's: two threads may run forwards at once over
        disjoint rows (micro-batch overlap) once :meth:`reserve` has grown the columns.

        Raises:
            ValueError: more rows or columns than ``max_rows`` / ``max_columns``.
        """
        if row0 + count > self.max_rows or span > self.max_columns:  # noqa: SIM102
            raise ValueError(f"slot cache limits: rows {row0 + count} > {self.max_rows} or columns {span} > "
                             f"{self.max_columns}")
        f = self._fwd
        f.row0, f.count, f.span, f.write = row0, count, span, write_columns
        if write_columns is not None:  # the rows each layer's write indexes, made once per forward
            f.write_rows = torch.arange(row0, row0 + count, device=write_columns.device)
        self.reserve(span)

    def reserve(self, span: int) -> None:
        """Grow the columns (if the buffers exist) so that ``span`` fit; call before concurrent forwards."""
        if self.keys and span > self.columns:
            self._grow(span)

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy row ``src``'s first ``length`` columns to row ``dst`` (compaction, or a fork of ``n`` > 1)."""
        if src == dst or length == 0:
            return
        for buf in (*self.keys, *self.values):
            buf[dst, :, :length] = buf[src, :, :length]
            self.bytes_copied += buf[dst, :, :length].numel() * buf.element_size()

    def bytes(self) -> int:
        """Bytes held by the buffers."""
        return sum(b.numel() * b.element_size() for b in (*self.keys, *self.values))

    def _grow(self, columns: int) -> None:
        """Double the columns until ``columns`` fit (capped at ``max_columns``); one copy per doubling."""
        new_cols = self.columns
        while new_cols < columns:
            new_cols = max(MIN_COLUMNS, 2 * new_cols)
        new_cols = min(new_cols, self.max_columns)
        if new_cols == self.columns:
            return
        for bufs in (self.keys, self.values):
            for i, old in enumerate(bufs):
                new = old.new_zeros((old.shape[0], old.shape[1], new_cols, old.shape[3]))
                new[:, :, : self.columns] = old
                self.bytes_copied += old.numel() * old.element_size()
                bufs[i] = new
        self.columns = new_cols

    # --- what the model calls (transformers' Cache interface) -----------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one layer's new keys/values ``[B, H, q, d]`` and return the view ``[B, H, L, d]``."""
        f = self._fwd
        if layer_idx == len(self.keys):  # first forward: allocate this layer, every row at once
            if layer_idx == 0:
                cols = MIN_COLUMNS
                while cols < f.span:
                    cols *= 2
                self.columns = min(cols, self.max_columns)
            _, h, _, dk = key_states.shape
            self.keys.append(key_states.new_zeros((self.max_rows, h, self.columns, dk)))
            self.values.append(value_states.new_zeros((self.max_rows, value_states.shape[1], self.columns,
                                                       value_states.shape[3])))
        k, v = self.keys[layer_idx], self.values[layer_idx]
        with self._count_lock:
            self.bytes_written += key_states.numel() * key_states.element_size()
            self.bytes_written += value_states.numel() * value_states.element_size()
        r = slice(f.row0, f.row0 + f.count)
        if f.write is None:
            q = key_states.shape[2]
            k[r, :, :q] = key_states
            v[r, :, :q] = value_states
        else:
            k[f.write_rows, :, f.write] = key_states[:, :, 0]
            v[f.write_rows, :, f.write] = value_states[:, :, 0]
        return k[r, :, : f.span], v[r, :, : f.span]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Columns of the current view (transformers asks only when no position ids are given)."""
        return self._fwd.span

    def get_mask_sizes(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        raise NotImplementedError("SlotCache forwards pass their own 4D masks")

    @property
    def is_compileable(self) -> bool:
        return False
