"""Pure tensor arithmetic for the strategies: no broker, no clock, no I/O.

Tensors handed in or out are never edited in place: inputs may be read-only views of a message body, and the
checkpoint skips tensors it has written before. The one exception is ``accumulate_scaled``, for a running sum only
its strategy sees. Arithmetic runs in float32 (float64 when the parameter is float64, or is an integer buffer such
as BatchNorm's ``num_batches_tracked``) and results keep each global parameter's dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from coordinator.errors import AggregationError

Params = dict[str, torch.Tensor]
"""Ordered parameter name -> tensor, as in a ``state_dict``."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for speed; float64 keeps float64 models and integer counters exact."""
    if dtype == torch.float64 or not dtype.is_floating_point:
        return torch.float64
    return torch.float32


def cast_like(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Back to the parameter's dtype; integer buffers are rounded rather than truncated."""
    if dtype.is_floating_point:
        return value.to(dtype)
    if dtype == torch.bool:
        return value != 0
    return torch.round(value).to(dtype)


def check_compatible(reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], what: str) -> None:
    """Name the first mismatch so a rejection reason is readable in the audit log."""
    if reference.keys() != other.keys():
        missing = sorted(set(reference) - set(other))
        unexpected = sorted(set(other) - set(reference))
        raise AggregationError(f"{what} does not match the model: missing {missing}, unexpected {unexpected}")
    for name, tensor in reference.items():
        if other[name].shape != tensor.shape:
            raise AggregationError(
                f"{what}[{name!r}] has shape {tuple(other[name].shape)}, the model has {tuple(tensor.shape)}"
            )


def add_scaled(base: Mapping[str, torch.Tensor], direction: Mapping[str, torch.Tensor], scale: float) -> Params:
    """``base + scale * direction`` as new tensors in ``base``'s dtypes (a delta applied to a model)."""
    check_compatible(base, direction, "direction")
    result: Params = {}
    for name, tensor in base.items():
        dtype = compute_dtype(tensor.dtype)
        value = torch.add(tensor.detach().to(dtype), direction[name].detach().to(dtype), alpha=scale)
        result[name] = cast_like(value, tensor.dtype)
    return result


def accumulate_scaled(accumulator: Params, direction: Mapping[str, torch.Tensor], scale: float) -> None:
    """``accumulator += scale * direction``, in place: only for a running sum its strategy owns and hands out
    as copies (``state_dict``), so no checkpoint or caller ever sees it change. Same result as ``add_scaled``
    into the accumulator's (compute) dtypes, without allocating a new model's worth of memory per update."""
    check_compatible(accumulator, direction, "direction")
    for name, tensor in accumulator.items():
        tensor.add_(direction[name].detach().to(tensor.dtype), alpha=scale)


def interpolate(start: Mapping[str, torch.Tensor], end: Mapping[str, torch.Tensor], weight: float) -> Params:
    """``(1 - weight) * start + weight * end`` (FedAsync's mixing), in ``start``'s dtypes.

    ``torch.lerp`` is used because it returns ``start`` exactly where ``start == end``, so a weight in [0, 1]
    never leaves the segment between the two models through rounding.
    """
    check_compatible(start, end, "end")
    result: Params = {}
    for name, tensor in start.items():
        dtype = compute_dtype(tensor.dtype)
        value = torch.lerp(tensor.detach().to(dtype), end[name].detach().to(dtype), weight)
        result[name] = cast_like(value, tensor.dtype)
    return result


def zeros_for(params: Mapping[str, torch.Tensor]) -> Params:
    """An accumulator in compute precision, shaped like the model."""
    return {name: torch.zeros(tensor.shape, dtype=compute_dtype(tensor.dtype)) for name, tensor in params.items()}


def params_from_state(value: Any, key: str) -> Params:
    if not isinstance(value, Mapping) or not all(
        isinstance(name, str) and isinstance(tensor, torch.Tensor) for name, tensor in value.items()
    ):
        raise AggregationError(f"checkpoint field {key!r} is not a map of name -> tensor")
    return {name: tensor.detach().clone() for name, tensor in value.items()}


def string_list_from_state(value: Any, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise AggregationError(f"checkpoint field {key!r} is not a list of strings")
    return list(value)
