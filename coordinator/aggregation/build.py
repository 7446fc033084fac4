"""Construction of a strategy from the flat keys of a config table."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from coordinator.aggregation.base import Strategy
from coordinator.aggregation.fedasync import FedAsync
from coordinator.aggregation.fedbuff import FedBuff
from coordinator.aggregation.server_optimizer import ServerOptimizer
from coordinator.aggregation.staleness import StalenessFunction, staleness_function
from coordinator.aggregation.sync_fedavg import SyncFedAvg
from coordinator.errors import AggregationError

STRATEGY_NAMES = ("fedasync", "fedbuff", "fedavg-sync")
_STALENESS_KEYS = ("staleness", "staleness_a", "staleness_b")
_OPTIMIZER_KEYS = (
    "server_optimizer",
    "server_learning_rate",
    "server_momentum",
    "server_beta1",
    "server_beta2",
    "server_tau",
)
_STRATEGY_KEYS: Mapping[str, tuple[str, ...]] = {
    "fedasync": ("alpha", *_STALENESS_KEYS),
    "fedbuff": ("buffer_size", "max_site_share", "example_weighted", *_STALENESS_KEYS, *_OPTIMIZER_KEYS),
    "fedavg-sync": ("sites", "round_timeout_seconds", "min_updates", *_OPTIMIZER_KEYS),
}


def build_strategy(name: str, **params: Any) -> Strategy:
    """Build a strategy from the flat keys of a config table, e.g.
    ``build_strategy("fedbuff", buffer_size=5, staleness="hinge", staleness_a=10, server_optimizer="adam")``.

    Unknown keys are refused by name, so a typo in the config fails at start-up rather than being ignored.
    """
    if name not in _STRATEGY_KEYS:
        raise AggregationError(f"unknown strategy {name!r}; choose one of {STRATEGY_NAMES}")
    unexpected = sorted(set(params) - set(_STRATEGY_KEYS[name]))
    if unexpected:
        raise AggregationError(f"strategy {name!r} takes no parameters {unexpected}")
    options = {key: value for key, value in params.items() if key not in _STALENESS_KEYS + _OPTIMIZER_KEYS}
    if name != "fedavg-sync":
        options["staleness"] = _staleness_from_params(params)
    if name != "fedasync":
        options["server_optimizer"] = _server_optimizer_from_params(params)
    try:
        if name == "fedasync":
            return FedAsync(**options)
        if name == "fedbuff":
            return FedBuff(**options)
        return SyncFedAvg(**options)
    except TypeError as exc:
        raise AggregationError(f"strategy {name!r}: {exc}") from exc


def _staleness_from_params(params: Mapping[str, Any]) -> StalenessFunction | None:
    chosen = params.get("staleness")
    if isinstance(chosen, StalenessFunction):
        if "staleness_a" in params or "staleness_b" in params:
            raise AggregationError("give staleness_a/staleness_b with a staleness name, not a StalenessFunction")
        return chosen
    if chosen is None:
        if "staleness_a" in params or "staleness_b" in params:
            raise AggregationError("staleness_a/staleness_b need a staleness function name")
        return None
    shape = {key: params[f"staleness_{key}"] for key in ("a", "b") if f"staleness_{key}" in params}
    return staleness_function(str(chosen), **shape)


def _server_optimizer_from_params(params: Mapping[str, Any]) -> ServerOptimizer | None:
    chosen = params.get("server_optimizer")
    settings = {
        keyword: params[key]
        for key, keyword in (
            ("server_learning_rate", "learning_rate"),
            ("server_momentum", "momentum"),
            ("server_beta1", "beta1"),
            ("server_beta2", "beta2"),
            ("server_tau", "tau"),
        )
        if key in params
    }
    if isinstance(chosen, ServerOptimizer):
        if settings:
            raise AggregationError("give server_* settings with a server optimiser name, not an instance")
        return chosen
    return ServerOptimizer("sgd" if chosen is None else str(chosen), **settings)
