"""Safetensors bodies of the raw tensor API, checked before any tensor is allocated.

Format (https://huggingface.co/docs/safetensors): 8-byte little-endian header length
``n``, ``n`` bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}}``
(plus an optional ``__metadata__``), then the raw data.
"""

from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from eaas.gateway.errors import bad_request

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_ITEM_BYTES = {"F32": 4, "F16": 2, "BF16": 2}
MAX_HEADER_BYTES = 1 << 20


def read_matrix(body: bytes, name: str, hidden_size: int | None, max_rows: int) -> torch.Tensor:
    """Parse and check one 2-D float tensor ``name`` of a safetensors body.

    Args:
        body: the request body.
        name: the tensor to read (``hidden_states`` or ``x``).
        hidden_size: the expected last dim ``D`` (None: any).
        max_rows: largest ``T`` accepted.

    Returns:
        The tensor ``[T, D]`` in its own dtype (F32, F16 or BF16).

    Raises:
        APIError: 400 with the expected vs actual value, for any malformed body, a
            missing tensor, a wrong dtype or shape, or a non-finite value.
    """
    if len(body) < 8:
        raise bad_request(f"body is not safetensors: {len(body)} bytes, need at least 8", code="bad_tensor")
    (header_len,) = struct.unpack("<Q", body[:8])
    if header_len > min(MAX_HEADER_BYTES, len(body) - 8):
        raise bad_request(f"safetensors header length {header_len} exceeds the body", code="bad_tensor")
    try:
        header = json.loads(body[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"safetensors header is not JSON: {exc}", code="bad_tensor") from None
    if not isinstance(header, dict) or not isinstance(header.get(name), dict):
        keys = sorted(k for k in header if k != "__metadata__") if isinstance(header, dict) else []
        raise bad_request(f"safetensors body must hold a tensor {name!r}; found {keys}", param=name, code="bad_tensor")
    info = header[name]
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in _DTYPES:
        raise bad_request(f"{name}: dtype must be one of {sorted(_DTYPES)}, got {dtype!r}", param=name, code="bad_dtype")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s >= 0 for s in shape)):
        raise bad_request(f"{name}: shape must be [T, D], got {shape!r}", param=name, code="bad_shape")
    rows, cols = shape
    if hidden_size is not None and cols != hidden_size:
        raise bad_request(f"{name}: shape must be [T, {hidden_size}], got {shape}", param=name, code="bad_shape")
    if rows < 1 or rows > max_rows:
        raise bad_request(f"{name}: T must be in [1, {max_rows}], got {rows}", param=name, code="bad_shape")
    data_len = len(body) - 8 - header_len
    need = rows * cols * _ITEM_BYTES[dtype]
    if not (isinstance(offsets, list) and len(offsets) == 2 and offsets[1] - offsets[0] == need
            and 0 <= offsets[0] and offsets[1] <= data_len):
        raise bad_request(f"{name}: data_offsets {offsets!r} do not match {need} bytes of data", param=name, code="bad_tensor")
    try:
        tensor = st_load(body)[name]
    except Exception as exc:  # safetensors' own checks (overlaps, ...)
        raise bad_request(f"invalid safetensors body: {exc}", code="bad_tensor") from None
    if not bool(torch.isfinite(tensor).all()):
        raise bad_request(f"{name}: contains NaN or infinite values", param=name, code="non_finite")
    return tensor


def write_tensors(tensors: dict[str, torch.Tensor]) -> bytes:
    """Serialize tensors (made contiguous, on CPU) as a safetensors body."""
    return st_save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
