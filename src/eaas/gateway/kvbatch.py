"""Padded batching of per-sequence KV caches for iteration-level decoding.

Every running sequence owns its own :class:`transformers.DynamicCache` (filled by its
own prefill, so a lone request computes exactly what ``model.generate`` computes).
A decode step over several sequences left-pads their caches to a common length,
stacks them on the batch dim, runs one forward with an attention mask that hides the
padding and explicit per-row position ids, then slices each row back out.

Legend: ``B`` sequences in the step, ``H`` KV heads, ``S`` cached positions of one
sequence, ``L`` = max S over the batch, ``d`` head dim (keys and values may differ,
e.g. DeepSeek-V3's MLA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache


@dataclass(frozen=True, slots=True)
class DecodeBatch:
    """Inputs of one batched decode forward.

    Attributes:
        cache: the merged cache, tensors ``[B, H, L, d]``.
        attention_mask: ``[B, L + 1]`` int64, 0 on left padding.
        position_ids: ``[B, 1]`` int64, each row's own next position.
        pads: left padding per row (``L - S_b``).
    """

    cache: DynamicCache
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    pads: tuple[int, ...]


def cache_length(cache: DynamicCache) -> int:
    """Number of cached positions ``S`` of a one-sequence cache."""
    return int(cache.get_seq_length())


def _layer_kv(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def merge_caches(caches: list[DynamicCache]) -> DecodeBatch:
    """Left-pad and stack one-sequence caches into a batch cache.

    Args:
        caches: ``B >= 1`` caches, each with tensors ``[1, H, S_b, d]``.

    Returns:
        A :class:`DecodeBatch` for a forward on input ids ``[B, 1]``.
    """
    lengths = [cache_length(c) for c in caches]
    max_len = max(lengths)
    pads = tuple(max_len - n for n in lengths)
    per_seq = [_layer_kv(c) for c in caches]
    data = []
    for layer_idx in range(len(per_seq[0])):
        keys = [F.pad(kv[layer_idx][0], (0, 0, p, 0)) for kv, p in zip(per_seq, pads)]
        values = [F.pad(kv[layer_idx][1], (0, 0, p, 0)) for kv, p in zip(per_seq, pads)]
        data.append((torch.cat(keys, dim=0), torch.cat(values, dim=0)))  # [B, H, L, d]
    mask = torch.ones(len(caches), max_len + 1, dtype=torch.long)
    for row, p in enumerate(pads):
        mask[row, :p] = 0
    positions = torch.tensor(lengths, dtype=torch.long).unsqueeze(1)  # [B, 1]
    return DecodeBatch(DynamicCache(ddp_cache_data=data), mask, positions, pads)


def split_cache(batch: DecodeBatch, cache: DynamicCache) -> list[DynamicCache]:
    """Slice a batch cache (after the forward appended one position) back into rows.

    Args:
        batch: the :class:`DecodeBatch` the forward ran with (for the paddings).
        cache: the cache the forward returned, tensors ``[B, H, L + 1, d]``.

    Returns:
        ``B`` one-sequence caches with tensors ``[1, H, S_b + 1, d]`` (contiguous copies,
        so the batch tensors can be freed).
    """
    kv = _layer_kv(cache)
    out = []
    for row, p in enumerate(batch.pads):
        data = [
            (k[row : row + 1, :, p:].contiguous(), v[row : row + 1, :, p:].contiguous()) for k, v in kv
        ]
        out.append(DynamicCache(ddp_cache_data=data))
    return out


def copy_cache(cache: DynamicCache) -> DynamicCache:
    """An independent copy of a one-sequence cache (the other choices of an ``n`` > 1 request
    start from one prefill's cache): tensors ``[1, H, S, d]`` cloned."""
    return DynamicCache(ddp_cache_data=[(k.clone(), v.clone()) for k, v in _layer_kv(cache)])
