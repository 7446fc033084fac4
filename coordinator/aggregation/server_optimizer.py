"""The server optimiser (FedAvgM, FedOpt): turns a pseudo-gradient into the next global parameters."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from coordinator.aggregation.tensor_math import (
    Params,
    cast_like,
    check_compatible,
    compute_dtype,
    params_from_state,
)
from coordinator.errors import AggregationError

SERVER_OPTIMIZERS = ("sgd", "momentum", "adam", "yogi", "adagrad")

_DEFAULT_SERVER_LEARNING_RATES: Mapping[str, float] = {
    # Flower's defaults: plain and momentum steps apply the mean delta as is; adaptive steps are normalised
    # per coordinate, so a rate of 1 would move every weight by about 1.
    "sgd": 1.0,
    "momentum": 1.0,
    "adam": 0.1,
    "yogi": 0.01,
    "adagrad": 0.1,
}


class ServerOptimizer:
    """Turns a pseudo-gradient (a mean delta, pointing downhill) into a step: ``x <- x + eta * direction``.

    ``sgd``: direction g. ``momentum``: ``m <- beta m + g``. ``adam``/``yogi``/``adagrad`` (Reddi et al. 2021,
    Algorithm 2, no bias correction): ``m <- b1 m + (1 - b1) g``; ``v`` by Adam ``b2 v + (1 - b2) g^2``, Yogi
    ``v - (1 - b2) g^2 sign(v - g^2)`` or Adagrad ``v + g^2``, starting at ``tau^2``; direction
    ``m / (sqrt(v) + tau)``. Set ``beta1=0`` for Adagrad without momentum.
    """

    def __init__(
        self,
        kind: str = "sgd",
        *,
        learning_rate: float | None = None,
        momentum: float = 0.9,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        if kind not in SERVER_OPTIMIZERS:
            raise AggregationError(f"unknown server optimiser {kind!r}; choose one of {SERVER_OPTIMIZERS}")
        self.kind = kind
        self.learning_rate = _DEFAULT_SERVER_LEARNING_RATES[kind] if learning_rate is None else learning_rate
        self.momentum = momentum
        self.beta1 = beta1
        self.beta2 = beta2
        self.tau = tau
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise AggregationError(f"server learning rate must be > 0, got {self.learning_rate}")
        for label, value in (("momentum", momentum), ("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= value < 1.0:
                raise AggregationError(f"server {label} must be in [0, 1), got {value}")
        if not tau > 0:
            raise AggregationError(f"server tau must be > 0, got {tau}")
        self.steps = 0
        self._first_moment: Params = {}
        self._second_moment: Params = {}

    def step(self, params: Mapping[str, torch.Tensor], pseudo_gradient: Mapping[str, torch.Tensor]) -> Params:
        """The next parameters; the moments advance only if the whole step succeeds."""
        check_compatible(params, pseudo_gradient, "pseudo-gradient")
        first_moment: Params = {}
        second_moment: Params = {}
        result: Params = {}
        for name, tensor in params.items():
            dtype = compute_dtype(tensor.dtype)
            gradient = pseudo_gradient[name].detach().to(dtype)
            if self.kind == "sgd":
                direction = gradient
            elif self.kind == "momentum":
                previous = self._moment(self._first_moment, name, gradient, 0.0)
                first_moment[name] = self.momentum * previous + gradient
                direction = first_moment[name]
            else:
                previous_first = self._moment(self._first_moment, name, gradient, 0.0)
                previous_second = self._moment(self._second_moment, name, gradient, self.tau**2)
                first_moment[name] = self.beta1 * previous_first + (1.0 - self.beta1) * gradient
                squared = gradient * gradient
                if self.kind == "adam":
                    second = self.beta2 * previous_second + (1.0 - self.beta2) * squared
                elif self.kind == "yogi":
                    second = previous_second - (1.0 - self.beta2) * squared * torch.sign(previous_second - squared)
                else:
                    second = previous_second + squared
                second_moment[name] = second
                direction = first_moment[name] / (torch.sqrt(second) + self.tau)
            value = torch.add(tensor.detach().to(dtype), direction, alpha=self.learning_rate)
            result[name] = cast_like(value, tensor.dtype)
        self._first_moment = first_moment
        self._second_moment = second_moment
        self.steps += 1
        return result

    @staticmethod
    def _moment(moments: Params, name: str, like: torch.Tensor, initial: float) -> torch.Tensor:
        if name in moments and moments[name].shape == like.shape:
            return moments[name].to(like.dtype)
        if moments:
            raise AggregationError(f"server optimiser state has no moment for {name!r} of shape {tuple(like.shape)}")
        return torch.full(like.shape, initial, dtype=like.dtype)

    def state_dict(self) -> dict[str, Any]:
        """Moments and step count, so a resumed run takes the identical next step."""
        return {
            "kind": self.kind,
            "steps": self.steps,
            "first_moment": dict(self._first_moment),
            "second_moment": dict(self._second_moment),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; another optimiser kind is refused, not reinterpreted."""
        if state.get("kind") != self.kind:
            raise AggregationError(
                f"checkpoint holds server optimiser {state.get('kind')!r}, the config says {self.kind!r}"
            )
        steps = state.get("steps")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise AggregationError(f"checkpoint field 'steps' must be an integer >= 0, got {steps!r}")
        first_moment = params_from_state(state.get("first_moment"), "first_moment")
        second_moment = params_from_state(state.get("second_moment"), "second_moment")
        self.steps, self._first_moment, self._second_moment = steps, first_moment, second_moment
