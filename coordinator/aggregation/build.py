"""The strategy a validated ``[strategy]`` table describes, built through the strategies' own constructors.

The config models (``coordinator.config``) have already checked every choice and range, so this module only maps
settings to constructor arguments: the option names of ``[strategy.staleness]`` and ``[strategy.server_optimizer]``
are the keyword arguments of ``staleness_function`` and ``ServerOptimizer``. The constructors keep their own checks
for callers that build strategies in code. Not re-exported by the package: the pure arithmetic needs no config.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from coordinator.aggregation.base import Strategy
from coordinator.aggregation.fedasync import FedAsync
from coordinator.aggregation.fedbuff import FedBuff
from coordinator.aggregation.robust import AdaptiveClip, AnomalyTracker, UpdateScreen
from coordinator.aggregation.server_optimizer import ServerOptimizer
from coordinator.aggregation.staleness import staleness_function
from coordinator.aggregation.sync_fedavg import SyncFedAvg
from coordinator.strategy_config import (
    FedAsyncSettings,
    FedBuffSettings,
    RobustSettings,
    ServerOptimizerSettings,
    StrategySettings,
)


def build_strategy(settings: StrategySettings, sites: Iterable[str]) -> Strategy:
    """The strategy of ``[strategy]``; ``sites`` (the run's site list) is the round a synchronous strategy waits
    for."""
    if isinstance(settings, FedAsyncSettings):
        staleness = settings.staleness
        return FedAsync(
            alpha=settings.alpha,
            staleness=staleness_function(staleness.function, **staleness.model_dump(exclude={"function"})),
            screen=update_screen(settings.robust),
        )
    if isinstance(settings, FedBuffSettings):
        staleness = settings.staleness
        return FedBuff(
            buffer_size=settings.buffer_size,
            staleness=staleness_function(staleness.function, **staleness.model_dump(exclude={"function"})),
            max_site_share=settings.max_site_share,
            server_optimizer=server_optimizer(settings.server_optimizer),
            example_weighted=settings.example_weighted,
            aggregator=settings.aggregator,
            trim_fraction=settings.trim_fraction,
            min_agreement=settings.min_agreement,
            screen=update_screen(settings.robust),
        )
    return SyncFedAvg(
        sites=list(sites),
        round_timeout_seconds=settings.round_timeout_seconds,
        min_updates=settings.min_updates,
        server_optimizer=server_optimizer(settings.server_optimizer),
        screen=update_screen(settings.robust),
    )


def update_screen(settings: RobustSettings) -> UpdateScreen | None:
    """The clipping and anomaly scoring of ``[strategy.robust]``; None when both are off."""
    if not settings.clip and not settings.anomaly_score:
        return None
    clip = (
        AdaptiveClip(
            multiplier=settings.clip_multiplier,
            window=settings.clip_window,
            min_norms=settings.clip_min_norms,
            warmup_bound=settings.clip_warmup_norm or math.inf,
        )
        if settings.clip
        else None
    )
    anomaly = AnomalyTracker(decay=settings.anomaly_decay) if settings.anomaly_score else None
    gate = settings.min_anomaly_score if settings.anomaly_score and settings.min_anomaly_score > -1 else None
    return UpdateScreen(clip=clip, anomaly=anomaly, min_anomaly_score=gate)


def server_optimizer(settings: ServerOptimizerSettings) -> ServerOptimizer:
    """A fresh optimiser of ``[strategy.server_optimizer]`` (its moments start at zero; a checkpoint restores them)."""
    return ServerOptimizer(settings.name, **settings.model_dump(exclude={"name"}))
