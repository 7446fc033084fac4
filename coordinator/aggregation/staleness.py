"""Staleness functions s(tau): how much an update trained ``tau`` versions ago still counts."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from coordinator.errors import AggregationError

STALENESS_KINDS = ("constant", "polynomial", "hinge")

_STALENESS_DEFAULTS: Mapping[str, Mapping[str, float]] = {
    "constant": {},
    "polynomial": {"a": 0.5},
    "hinge": {"a": 10.0, "b": 4.0},
}


@dataclass(frozen=True)
class StalenessFunction:
    """s(tau) of FedAsync: how much an update trained ``tau`` versions ago still counts.

    ``constant``: 1; ``polynomial``: ``(tau + 1) ** -a``; ``hinge``: 1 if ``tau <= b`` else
    ``1 / (a (tau - b) + 1)``. Missing parameters take the paper's values (polynomial a=0.5, hinge a=10, b=4);
    FedBuff's ``1 / sqrt(1 + tau)`` is polynomial with a=0.5.
    """

    kind: str = "constant"
    a: float | None = None
    b: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in STALENESS_KINDS:
            raise AggregationError(f"unknown staleness function {self.kind!r}; choose one of {STALENESS_KINDS}")
        defaults = _STALENESS_DEFAULTS[self.kind]
        for parameter in ("a", "b"):
            value = getattr(self, parameter)
            if parameter not in defaults:
                if value is not None:
                    raise AggregationError(f"staleness function {self.kind!r} takes no parameter {parameter!r}")
                continue
            if value is None:
                value = defaults[parameter]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise AggregationError(f"staleness parameter {parameter} must be a finite number, got {value!r}")
            if value < 0:
                raise AggregationError(f"staleness parameter {parameter} must be >= 0, got {value}")
            object.__setattr__(self, parameter, float(value))

    def __call__(self, staleness: int) -> float:
        """The weight in (0, 1] for an update ``staleness`` versions behind."""
        if staleness < 0:
            raise AggregationError(f"staleness must be >= 0, got {staleness}")
        if self.kind == "constant":
            return 1.0
        assert self.a is not None  # set by __post_init__ for polynomial and hinge
        if self.kind == "polynomial":
            return float((staleness + 1) ** (-self.a))
        assert self.b is not None
        if staleness <= self.b:
            return 1.0
        return 1.0 / (self.a * (staleness - self.b) + 1.0)

    def __str__(self) -> str:
        parameters = ", ".join(f"{name}={getattr(self, name):g}" for name in _STALENESS_DEFAULTS[self.kind])
        return f"{self.kind}({parameters})"


def staleness_function(name: str, **params: float) -> StalenessFunction:
    """Build from config, e.g. ``staleness_function("hinge", a=10, b=4)``; unknown parameters are refused."""
    unexpected = sorted(set(params) - {"a", "b"})
    if unexpected:
        raise AggregationError(f"staleness function {name!r} takes no parameters {unexpected}")
    return StalenessFunction(name, a=params.get("a"), b=params.get("b"))
