"""FedAsync (Xie, Koyejo, Gupta 2019): mix each update into the model as it arrives."""

from __future__ import annotations

import math
from typing import ClassVar

from coordinator.aggregation.base import Contribution, Strategy
from coordinator.aggregation.robust import UpdateScreen
from coordinator.aggregation.staleness import StalenessFunction
from coordinator.aggregation.tensor_math import Params, add_scaled, check_compatible, interpolate
from coordinator.errors import AggregationError


class FedAsync(Strategy):
    """Xie et al. 2019: mix each update into the model as it arrives, ``alpha_t = alpha * s(tau)``."""

    name: ClassVar[str] = "fedasync"

    def __init__(
        self, *, alpha: float = 0.6, staleness: StalenessFunction | None = None, screen: UpdateScreen | None = None
    ) -> None:
        if not (math.isfinite(alpha) and 0.0 < alpha <= 1.0):
            raise AggregationError(f"fedasync alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.screen = screen  # clipping and anomaly scoring (Strategy.take); FedAsync has no buffer to take a median of
        self.staleness = staleness if staleness is not None else StalenessFunction("polynomial")

    @property
    def keeps_base_history(self) -> bool:
        """Each update is mixed in as ``base + delta``, so the base version must still be at hand."""
        return True

    def mixing_weight(self, staleness: int) -> float:
        """``alpha_t``, exposed for the audit log and metrics."""
        return self.alpha * self.staleness(staleness)

    def add(
        self, global_params: Params, version: int, contribution: Contribution, base_params: Params
    ) -> Params | None:
        """``x_t = (1 - alpha_t) x_{t-1} + alpha_t (x_base + delta)``; every update makes a version."""
        self._require_accepted(contribution, version)
        check_compatible(global_params, base_params, "base parameters")
        local_model = add_scaled(base_params, contribution.delta, 1.0)
        return interpolate(global_params, local_model, self.mixing_weight(contribution.staleness))
