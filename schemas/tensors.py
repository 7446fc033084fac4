"""Tensors on the wire: dtype name + shape + raw little-endian bytes. Never pickle.

Decoding shares memory with the bytes msgpack handed out (the one copy out of the message body); decoded
tensors are therefore read-only in spirit: clone before any in-place edit.

Opt-in lossy encodings for sites on slow links shrink an update: ``float16`` (half the bytes) and ``int8``
quantisation with one float32 scale per tensor (a quarter of the bytes). float16 decodes as float16 (the
aggregation casts to each parameter's dtype), int8 as float32. Only floating-point tensors are compressed, and
int8 leaves a tensor holding NaN/inf uncompressed so that ``first_non_finite`` still sees it.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from schemas.errors import TensorError

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    raise ImportError("fedmq's tensor codec assumes a little-endian host")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
QUANTIZED_INT8 = "qint8"  # int8 values times a per-tensor float scale
COMPRESSIONS = ("none", "float16", "int8")
MAX_DIMENSIONS = 8
FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)

Params = dict[str, torch.Tensor]


def encode_tensor(tensor: torch.Tensor, compression: str = "none") -> dict[str, Any]:
    """A msgpack-ready map; the data is a view of the tensor's memory, copied once by the packer."""
    if compression not in COMPRESSIONS:
        raise ValueError(f"unknown compression {compression!r}; choose one of {COMPRESSIONS}")
    tensor = tensor.detach().cpu().contiguous()
    if compression != "none" and tensor.is_floating_point():
        if compression == "float16":
            tensor = tensor.to(torch.float16)
        else:
            quantized = _encode_int8(tensor)
            if quantized is not None:
                return quantized
            # int8 would turn NaN/inf (or float64 beyond float32) into ordinary numbers and hide them from
            # first_non_finite: such a tensor travels uncompressed.
    if tensor.dtype not in DTYPE_NAMES:
        raise TensorError(f"unsupported dtype {tensor.dtype}")
    return {
        "dtype": DTYPE_NAMES[tensor.dtype],
        "shape": list(tensor.shape),
        "data": raw_view(tensor),
    }


def raw_view(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes, little-endian, without copying (the tensor must be contiguous)."""
    return tensor.reshape(-1).view(torch.uint8).numpy().data


def _encode_int8(tensor: torch.Tensor) -> dict[str, Any] | None:
    """None when the tensor holds a value int8 cannot carry (NaN, inf, beyond float32)."""
    values = tensor.to(torch.float32)
    lowest, highest = _extremes(values)
    if not (math.isfinite(lowest) and math.isfinite(highest)):
        return None
    scale = _int8_scale(max(-lowest, highest))
    scaled = values / scale  # a new tensor: ``values`` may be the caller's own
    scaled.round_().clamp_(-127, 127)  # in place: the out-of-place chain is ~5x slower on 11M values
    quantized = scaled.to(torch.int8)
    return {
        "dtype": QUANTIZED_INT8,
        "shape": list(tensor.shape),
        "data": raw_view(quantized),
        "scale": scale,
    }


def _int8_scale(peak: float) -> float:
    """The step as the float32 both sides apply: never zero, never so large that 127 steps overflow to inf."""
    if peak <= 0:
        return 1.0
    scale = torch.tensor(max(peak / 127.0, FLOAT32_TINY), dtype=torch.float32)
    while not bool(torch.isfinite(scale * 127)):
        scale = torch.nextafter(scale, torch.zeros_like(scale))
    return float(scale)


def encode_tensors(tensors: Mapping[str, torch.Tensor], compression: str = "none") -> dict[str, Any]:
    return {name: encode_tensor(tensor, compression) for name, tensor in tensors.items()}


def decode_tensor(encoded: object, field: str) -> torch.Tensor:
    """Check every part of an encoded tensor before touching its bytes."""
    if not isinstance(encoded, dict):
        raise TensorError(f"expected a map with dtype, shape and data, got {type(encoded).__name__}", field)
    keys = set(encoded)
    allowed = {"dtype", "shape", "data", "scale"}
    if keys - allowed or not {"dtype", "shape", "data"} <= keys:
        raise TensorError(
            f"expected keys dtype, shape, data (and scale for {QUANTIZED_INT8}), got {sorted(map(str, keys))}",
            field,
        )
    dtype_name, shape, data = encoded["dtype"], encoded["shape"], encoded["data"]
    quantized = dtype_name == QUANTIZED_INT8
    if not isinstance(dtype_name, str) or (dtype_name not in DTYPES and not quantized):
        raise TensorError(
            f"unsupported dtype {dtype_name!r}; supported: {sorted(DTYPES)} and {QUANTIZED_INT8}",
            f"{field}.dtype",
        )
    if ("scale" in keys) != quantized:
        raise TensorError(f"a scale goes with dtype {QUANTIZED_INT8} and only with it", f"{field}.scale")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMENSIONS
        or not all(type(size) is int and size >= 0 for size in shape)
    ):
        raise TensorError(
            f"shape must be a list of at most {MAX_DIMENSIONS} non-negative ints, got {shape!r}",
            f"{field}.shape",
        )
    if not isinstance(data, bytes):
        raise TensorError(f"data must be bytes, got {type(data).__name__}", f"{field}.data")
    dtype = torch.int8 if quantized else DTYPES[dtype_name]
    numel = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if numel * itemsize != len(data):
        raise TensorError(
            f"shape {shape} of {dtype_name} needs {numel * itemsize} bytes, got {len(data)}", f"{field}.data"
        )
    if numel == 0:
        try:
            tensor = torch.empty(shape, dtype=dtype)
        except (RuntimeError, TypeError, ValueError, OverflowError):  # a zero next to sizes above int64
            raise TensorError(f"shape {shape} is out of range", f"{field}.shape") from None
    else:
        with warnings.catch_warnings():
            # bytes are immutable; the tensor shares them read-only
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.frombuffer(data, dtype=dtype).reshape(shape)
    if dtype == torch.bool and numel and int(tensor.view(torch.uint8).max()) > 1:
        raise TensorError("bool data must be bytes 0 or 1", f"{field}.data")
    if quantized:
        scale = encoded["scale"]
        if type(scale) is not float or not math.isfinite(scale) or scale <= 0:
            raise TensorError(f"scale must be a positive finite float, got {scale!r}", f"{field}.scale")
        return tensor.to(torch.float32).mul_(scale)  # the one copy, scaled in place
    return tensor


def decode_tensors(encoded: object, field: str, max_tensors: int) -> Params:
    if not isinstance(encoded, dict):
        raise TensorError(f"expected a map of name -> tensor, got {type(encoded).__name__}", field)
    if len(encoded) > max_tensors:
        raise TensorError(f"{len(encoded)} tensors exceed the limit of {max_tensors}", field)
    tensors: Params = {}
    for name, value in encoded.items():
        if not isinstance(name, str) or not name:
            raise TensorError(f"tensor names must be non-empty strings, got {name!r}", field)
        tensors[name] = decode_tensor(value, f"{field}[{name!r}]")
    return tensors


def _extremes(tensor: torch.Tensor) -> tuple[float, float]:
    """Smallest and largest value in one pass; both are NaN-propagating, so NaN or inf shows in them."""
    if tensor.numel() == 0:
        return 0.0, 0.0
    lowest, highest = torch.aminmax(tensor)
    return float(lowest), float(highest)


def first_non_finite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding NaN or +/-inf, or None when all are finite."""
    for name, tensor in tensors.items():
        # aminmax rather than isfinite().all(): same answer, about ten times faster on CPU.
        if tensor.is_floating_point() and not all(map(math.isfinite, _extremes(tensor))):
            return name
    return None


def raw_size(tensors: Mapping[str, torch.Tensor]) -> int:
    """Bytes of tensor payload, the yardstick for wire overhead."""
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
