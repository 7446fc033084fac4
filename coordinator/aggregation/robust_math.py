"""The robust statistics of ``coordinator.aggregation.robust``, as pure functions over deltas: norms, clipping,
the coordinate-wise median and trimmed mean over a buffer (unweighted: every buffered delta counts once, whatever
``num_examples`` its site claims), the agreeing mean, and the cosine similarity the anomaly score uses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from coordinator.aggregation.tensor_math import Params, cast_like, check_compatible, compute_dtype
from coordinator.errors import AggregationError

AGGREGATORS = ("mean", "median", "trimmed-mean")


def delta_norm(delta: Mapping[str, torch.Tensor]) -> float:
    """L2 norm over the floating-point tensors (integer buffers such as BatchNorm's counters are not weights)."""
    squares = 0.0
    for tensor in delta.values():
        if tensor.is_floating_point():
            squares += float(torch.linalg.vector_norm(tensor.detach(), dtype=torch.float64)) ** 2
    return math.sqrt(squares)


def scaled(delta: Mapping[str, torch.Tensor], factor: float) -> Params:
    """``factor * delta`` as new tensors (floating-point tensors only; others are kept as they are)."""
    return {
        name: cast_like(tensor.detach().to(compute_dtype(tensor.dtype)) * factor, tensor.dtype)
        if tensor.is_floating_point()
        else tensor
        for name, tensor in delta.items()
    }


def clip_to_norm(delta: Mapping[str, torch.Tensor], norm: float, bound: float) -> tuple[Params, float]:
    """``delta * min(1, bound / norm)`` and the factor used (1.0 when the delta is within the bound)."""
    if not norm > bound:
        return dict(delta), 1.0
    factor = bound / norm
    return scaled(delta, factor), factor


def _stacked(deltas: Sequence[Mapping[str, torch.Tensor]], name: str) -> torch.Tensor:
    dtype = compute_dtype(deltas[0][name].dtype)
    return torch.stack([delta[name].detach().to(dtype) for delta in deltas])


def coordinate_median(deltas: Sequence[Mapping[str, torch.Tensor]]) -> Params:
    """Per coordinate, the median of the deltas' values; for an even count, the mean of the two middle values
    (the textbook median, not torch's lower one). In compute precision (see ``tensor_math``)."""
    if not deltas:
        raise AggregationError("the median of no deltas is undefined")
    for delta in deltas[1:]:
        check_compatible(deltas[0], delta, "delta")
    result: Params = {}
    count = len(deltas)
    for name in deltas[0]:
        values = _stacked(deltas, name).sort(dim=0).values
        middle = count // 2
        result[name] = values[middle] if count % 2 else (values[middle - 1] + values[middle]) / 2
    return result


def trimmed_count(count: int, trim_fraction: float) -> int:
    """How many values are dropped at each end: ``floor(trim_fraction * count)``, keeping at least one value."""
    trimmed = math.floor(round(trim_fraction * count, 9))
    return min(trimmed, (count - 1) // 2)


def trimmed_mean(deltas: Sequence[Mapping[str, torch.Tensor]], trim_fraction: float) -> Params:
    """Per coordinate, drop the ``b = trimmed_count(K, trim_fraction)`` smallest and ``b`` largest values and
    average the ``K - 2b`` left (Yin et al. 2018). ``trim_fraction = 0`` is the plain mean."""
    if not deltas:
        raise AggregationError("the trimmed mean of no deltas is undefined")
    if not (math.isfinite(trim_fraction) and 0.0 <= trim_fraction < 0.5):
        raise AggregationError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    for delta in deltas[1:]:
        check_compatible(deltas[0], delta, "delta")
    trimmed = trimmed_count(len(deltas), trim_fraction)
    result: Params = {}
    for name in deltas[0]:
        values = _stacked(deltas, name).sort(dim=0).values
        result[name] = values[trimmed : len(deltas) - trimmed].mean(dim=0)
    return result


def robust_mean(deltas: Sequence[Mapping[str, torch.Tensor]], aggregator: str, trim_fraction: float) -> Params:
    """The buffer's centre by ``aggregator``: ``mean``, ``median`` or ``trimmed-mean``."""
    if aggregator == "median":
        return coordinate_median(deltas)
    if aggregator == "trimmed-mean":
        return trimmed_mean(deltas, trim_fraction)
    if aggregator == "mean":
        return trimmed_mean(deltas, 0.0)
    raise AggregationError(f"unknown aggregator {aggregator!r}; choose one of {AGGREGATORS}")


def agreeing_mean(
    deltas: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], min_agreement: float
) -> tuple[Params, list[int]]:
    """The weighted mean of the deltas that agree with the buffer's coordinate-wise median, and which they are.

    A delta agrees when its cosine to the median is at least ``min_agreement`` (a zero delta or median: it
    agrees). The median of K deltas from K different sites is pulled by an attacker no further than the
    honest values around it, so a delta pointing against it is the odd one out; the rest keep their weights
    (their example counts, say). When none agrees the median itself is the step.
    """
    if len(deltas) != len(weights) or not deltas:
        raise AggregationError("agreeing_mean needs one weight per delta, and at least one delta")
    centre = coordinate_median(deltas)
    kept = []
    for index, delta in enumerate(deltas):
        agreement = cosine_similarity(delta, centre)
        if agreement is None or agreement >= min_agreement:
            kept.append(index)
    total = sum(weights[index] for index in kept)
    if not kept or not total > 0:
        return centre, kept
    result: Params = {}
    for name, tensor in centre.items():
        value = torch.zeros_like(tensor)
        for index in kept:
            value = value + deltas[index][name].detach().to(tensor.dtype) * (weights[index] / total)
        result[name] = value
    return result, kept


def cosine_similarity(first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor]) -> float | None:
    """Cosine of the angle between two deltas (floating-point tensors only); None when either is zero."""
    dot = first_squares = second_squares = 0.0
    for name, tensor in first.items():
        if not tensor.is_floating_point():
            continue
        a = tensor.detach().to(torch.float64).flatten()
        b = second[name].detach().to(torch.float64).flatten()
        dot += float(a @ b)
        first_squares += float(a @ a)
        second_squares += float(b @ b)
    if first_squares == 0.0 or second_squares == 0.0:
        return None
    return max(-1.0, min(1.0, dot / math.sqrt(first_squares * second_squares)))
