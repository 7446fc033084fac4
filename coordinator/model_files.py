"""The final model on disk in the safetensors layout: 8-byte little-endian header length, a JSON header
(dtype, shape and byte offsets per tensor, plus string metadata), then the raw little-endian bytes.

Any safetensors reader loads it; nothing here pickles or unpickles.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from coordinator.checkpoint import write_file_durably
from schemas.tensors import raw_view

SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


class ModelFileError(ValueError):
    """A model file that is not a well-formed safetensors file."""


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    chunks: list[bytes] = []
    offset = 0
    for name, tensor in tensors.items():
        raw = bytes(raw_view(tensor.detach().cpu().contiguous()))
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    write_file_durably(path, len(encoded).to_bytes(8, "little") + encoded + b"".join(chunks))


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (in file order) and metadata of a safetensors file."""
    data = path.read_bytes()
    if len(data) < 8:
        raise ModelFileError(f"{path} is too short to be a safetensors file")
    header_length = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + header_length])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path}: unreadable header ({exc})") from exc
    metadata = header.pop("__metadata__", {})
    body = memoryview(bytearray(data[8 + header_length :]))
    tensors: dict[str, torch.Tensor] = {}
    for name, entry in header.items():
        dtype = _TORCH_DTYPES.get(entry.get("dtype"))
        start, end = entry.get("data_offsets", (0, -1))
        shape = entry.get("shape")
        if dtype is None or not isinstance(shape, list) or not 0 <= start <= end <= len(body):
            raise ModelFileError(f"{path}: bad entry for tensor {name!r}")
        if (end - start) != math.prod(shape) * torch.empty((), dtype=dtype).element_size():
            raise ModelFileError(f"{path}: tensor {name!r} has {end - start} bytes for shape {shape}")
        chunk = body[start:end]
        tensors[name] = (
            torch.frombuffer(chunk, dtype=dtype).reshape(shape) if len(chunk) else torch.empty(shape, dtype=dtype)
        )
    return tensors, dict(metadata)
