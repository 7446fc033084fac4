"""A validated [strategy] table -> the strategy it describes, through the strategies' own constructors."""

from __future__ import annotations

from typing import Any

import pytest

from coordinator.aggregation import FedAsync, FedBuff, ServerOptimizer, SyncFedAvg, staleness_function
from coordinator.aggregation.build import build_strategy, server_optimizer
from coordinator.config import CoordinatorConfig, config_from_dict
from coordinator.strategy_config import (
    AdagradOptimizer,
    AdamOptimizer,
    HingeStaleness,
    MomentumOptimizer,
    PolynomialStaleness,
    ServerOptimizerSettings,
    SgdOptimizer,
    Staleness,
    YogiOptimizer,
)


def strategy_of(table: dict[str, Any], sites: tuple[str, ...] = ("a", "b")) -> Any:
    return build_strategy(config_from_dict({"strategy": table}).strategy, sites)


def test_each_strategy_is_built_with_the_options_of_its_table() -> None:
    fedasync = strategy_of({"name": "fedasync", "alpha": 0.8, "staleness": {"function": "hinge", "a": 5, "b": 2}})
    fedbuff = strategy_of(
        {"name": "fedbuff", "buffer_size": 4, "server_optimizer": {"name": "yogi", "learning_rate": 0.02}}
    )
    weighted = strategy_of({"name": "fedbuff", "example_weighted": True, "max_site_share": 0.5})
    sync = strategy_of({"name": "fedavg-sync", "round_timeout_seconds": 30, "min_updates": 2})

    assert isinstance(fedasync, FedAsync) and fedasync.mixing_weight(3) == pytest.approx(0.8 / (5 * 1 + 1))
    assert isinstance(fedbuff, FedBuff) and fedbuff.buffer_size == 4
    assert (fedbuff.server_optimizer.kind, fedbuff.server_optimizer.learning_rate) == ("yogi", 0.02)
    assert fedbuff.staleness(3) == pytest.approx(0.5) and not fedbuff.example_weighted
    assert isinstance(weighted, FedBuff) and weighted.example_weighted and weighted.max_updates_per_site == 5
    assert isinstance(sync, SyncFedAvg) and sync.sites == frozenset({"a", "b"})
    assert (sync.round_timeout_seconds, sync.min_updates) == (30.0, 2)


def test_the_default_strategy_is_the_constructors_default() -> None:
    built = build_strategy(CoordinatorConfig().strategy, ())
    plain = FedBuff()

    assert isinstance(built, FedBuff)
    assert (built.buffer_size, built.max_site_share, built.example_weighted) == (10, 1.0, False)
    assert str(built.staleness) == str(plain.staleness)
    assert built.server_optimizer.kind == plain.server_optimizer.kind
    assert built.server_optimizer.learning_rate == plain.server_optimizer.learning_rate


@pytest.mark.parametrize(
    "settings",
    [SgdOptimizer(), MomentumOptimizer(), AdamOptimizer(), YogiOptimizer(), AdagradOptimizer()],
    ids=lambda settings: settings.name,
)
def test_a_server_optimizers_documented_defaults_are_the_ones_aggregation_uses(
    settings: ServerOptimizerSettings,
) -> None:
    """The config declares each optimiser's defaults for the reference; they must not drift from the code's."""
    built = server_optimizer(settings)
    plain = ServerOptimizer(settings.name)

    for option in ("learning_rate", "momentum", "beta1", "beta2", "tau"):
        assert getattr(built, option) == getattr(plain, option), option


@pytest.mark.parametrize("settings", [PolynomialStaleness(), HingeStaleness()], ids=lambda item: item.function)
def test_a_staleness_functions_documented_defaults_are_the_papers(settings: Staleness) -> None:
    assert str(staleness_function(settings.function)) == str(
        staleness_function(settings.function, **settings.model_dump(exclude={"function"}))
    )
