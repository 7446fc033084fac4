"""``[strategy]`` of coordinator.toml: which algorithm, and with it the options its table may hold.

One model per strategy (a union keyed on ``name``), with ``[strategy.staleness]`` (keyed on ``function``),
``[strategy.server_optimizer]`` (keyed on ``name``) and ``[strategy.robust]`` as nested tables; each model's fields
carry their default, range and description (docs/CONFIG.md is made from them). ``coordinator.aggregation.build``
turns the validated table into a Strategy.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, Tag, model_validator

from schemas.config_files import ConfigTable, choice_by

# ---------------------------------------------------------------------------------------------- staleness


class ConstantStaleness(ConfigTable):
    """s(tau) = 1: a stale update counts as much as a fresh one."""

    function: Literal["constant"] = Field("constant", description="The staleness function.")


class PolynomialStaleness(ConfigTable):
    """s(tau) = (tau + 1) ** -a; FedBuff's 1 / sqrt(1 + tau) is a = 0.5."""

    function: Literal["polynomial"] = Field("polynomial", description="The staleness function.")
    a: float = Field(0.5, ge=0, description="Decay exponent; 0 weighs every update alike.")


class HingeStaleness(ConfigTable):
    """s(tau) = 1 up to b versions behind, then 1 / (a (tau - b) + 1)."""

    function: Literal["hinge"] = Field("hinge", description="The staleness function.")
    a: float = Field(10.0, ge=0, description="Slope of the decay after the hinge.")
    b: float = Field(4.0, ge=0, description="Versions behind before the weight starts to fall.")


Staleness = Annotated[
    Annotated[ConstantStaleness, Tag("constant")]
    | Annotated[PolynomialStaleness, Tag("polynomial")]
    | Annotated[HingeStaleness, Tag("hinge")],
    choice_by("function", "polynomial", "constant", "polynomial", "hinge"),
]
"""``[strategy.staleness]``: how much an update trained tau versions ago still counts (FedAsync, FedBuff)."""


# ---------------------------------------------------------------------------------------------- server optimiser

_LEARNING_RATE = "Server learning rate eta: x <- x + eta * direction."
_BETA1 = "First-moment decay (0: no momentum)."
_TAU = "Adaptivity: v starts at tau^2 and the direction is m / (sqrt(v) + tau)."


class SgdOptimizer(ConfigTable):
    """Apply the mean delta as it is (FedAvg with rate 1)."""

    name: Literal["sgd"] = Field("sgd", description="The server optimiser.")
    learning_rate: float = Field(1.0, gt=0, description=_LEARNING_RATE)


class MomentumOptimizer(ConfigTable):
    """FedAvgM: m <- momentum * m + g."""

    name: Literal["momentum"] = Field("momentum", description="The server optimiser.")
    learning_rate: float = Field(1.0, gt=0, description=_LEARNING_RATE)
    momentum: float = Field(0.9, ge=0, lt=1, description="Momentum coefficient.")


class AdamOptimizer(ConfigTable):
    """FedAdam (Reddi et al. 2021, no bias correction)."""

    name: Literal["adam"] = Field("adam", description="The server optimiser.")
    learning_rate: float = Field(0.1, gt=0, description=_LEARNING_RATE)
    beta1: float = Field(0.9, ge=0, lt=1, description=_BETA1)
    beta2: float = Field(0.99, ge=0, lt=1, description="Second-moment decay.")
    tau: float = Field(1e-3, gt=0, description=_TAU)


class YogiOptimizer(ConfigTable):
    """FedYogi: Adam with an additive second-moment update."""

    name: Literal["yogi"] = Field("yogi", description="The server optimiser.")
    learning_rate: float = Field(0.01, gt=0, description=_LEARNING_RATE)
    beta1: float = Field(0.9, ge=0, lt=1, description=_BETA1)
    beta2: float = Field(0.99, ge=0, lt=1, description="Second-moment decay.")
    tau: float = Field(1e-3, gt=0, description=_TAU)


class AdagradOptimizer(ConfigTable):
    """FedAdagrad: v <- v + g^2."""

    name: Literal["adagrad"] = Field("adagrad", description="The server optimiser.")
    learning_rate: float = Field(0.1, gt=0, description=_LEARNING_RATE)
    beta1: float = Field(0.9, ge=0, lt=1, description=_BETA1)
    tau: float = Field(1e-3, gt=0, description=_TAU)


ServerOptimizerSettings = Annotated[
    Annotated[SgdOptimizer, Tag("sgd")]
    | Annotated[MomentumOptimizer, Tag("momentum")]
    | Annotated[AdamOptimizer, Tag("adam")]
    | Annotated[YogiOptimizer, Tag("yogi")]
    | Annotated[AdagradOptimizer, Tag("adagrad")],
    choice_by("name", "sgd", "sgd", "momentum", "adam", "yogi", "adagrad"),
]
"""``[strategy.server_optimizer]``: turns the mean delta into a step (FedBuff, fedavg-sync)."""


# ---------------------------------------------------------------------------------------------- robust options


class RobustSettings(ConfigTable):
    """``[strategy.robust]``: defences against one misbehaving site, applied to every accepted update (any strategy).

    Clipping scales an update down to ``clip_multiplier`` times the median L2 norm of the last ``clip_window``
    accepted updates (their norms after clipping); until ``clip_min_norms`` norms were seen the bound is
    ``clip_warmup_norm`` (0: none beyond ``[validation] max_update_norm``). The anomaly score is the cosine of an
    update to a decaying mean of recent accepted update directions, exported as ``fedmq_update_anomaly_score``;
    an update scoring below ``min_anomaly_score`` is refused as ``anomalous`` (its direction still joins the
    reference, so a reference that began with an attacker's update returns to the majority's).
    """

    clip: bool = Field(True, description="Clip each update to the adaptive norm bound.")
    clip_multiplier: float = Field(
        3.0, ge=1, le=1000, description="The bound is this many times the median recent norm."
    )
    clip_window: int = Field(50, ge=1, le=100_000, description="Accepted updates whose norms the median is over.")
    clip_min_norms: int = Field(3, ge=1, description="Norms needed before the adaptive bound applies (warm-up).")
    clip_warmup_norm: float = Field(
        0.0, ge=0, description="Bound during the warm-up (0: none beyond [validation] max_update_norm)."
    )
    anomaly_score: bool = Field(True, description="Score each update against recent ones (a metric, not a weight).")
    anomaly_decay: float = Field(
        0.2, gt=0, le=1, description="Weight of each new update direction in the reference the score compares to."
    )
    # Off by default: on the four heart-disease hospitals it refused honest updates (clean pooled accuracy
    # 0.764 -> 0.728) and did not stop a sign flip (docs/BENCHMARKS.md, poisoning).
    min_anomaly_score: float = Field(
        -1.0,
        ge=-1,
        le=1,
        description="Refuse an update (reason anomalous) whose anomaly score is below this, once the reference has "
        "seen 4 updates (-1: never refuse; ignored when anomaly_score = false).",
    )

    @model_validator(mode="after")
    def _warm_up_within_the_window(self) -> RobustSettings:
        if self.clip_min_norms > self.clip_window:
            raise ValueError(f"clip_min_norms ({self.clip_min_norms}) must be <= clip_window ({self.clip_window})")
        return self


# ---------------------------------------------------------------------------------------------- strategies

_MAX_STALENESS = "Updates trained on a model more than this many versions old are refused as too stale."


class FedAsyncSettings(ConfigTable):
    """FedAsync (Xie et al. 2019): every accepted update makes a version, mixed in with alpha * s(tau)."""

    name: Literal["fedasync"] = Field("fedasync", description="The strategy.")
    max_staleness: int = Field(20, ge=0, description=_MAX_STALENESS)
    alpha: float = Field(0.6, gt=0, le=1, description="Mixing weight of a fresh update.")
    staleness: Staleness = Field(PolynomialStaleness(), description="Weight of a stale update.")
    robust: RobustSettings = Field(RobustSettings(), description="[strategy.robust]: clipping, anomaly score.")


class FedBuffSettings(ConfigTable):
    """FedBuff (Nguyen et al. 2022): buffer K weighted deltas, then step the server optimiser with their mean."""

    name: Literal["fedbuff"] = Field("fedbuff", description="The strategy.")
    max_staleness: int = Field(20, ge=0, description=_MAX_STALENESS)
    buffer_size: int = Field(10, ge=1, description="K: updates per version.")
    max_site_share: float = Field(
        1.0, gt=0, le=1, description="Share of the buffer one site may hold (max(1, floor(share * K)) places)."
    )
    example_weighted: bool = Field(
        False, description="Weight each delta by its site's example count too (mean only: a claimed count)."
    )
    aggregator: Literal["mean", "median", "trimmed-mean"] = Field(
        "mean",
        description="How the K buffered deltas combine: the paper's mean, or the coordinate-wise median or trimmed "
        "mean (unweighted: each delta counts once; they keep K deltas, not one sum).",
    )
    trim_fraction: float = Field(
        0.2, ge=0, lt=0.5, description="trimmed-mean: drop floor(fraction * K) values at each end, per coordinate."
    )
    min_agreement: float = Field(
        -1.0,
        ge=-1,
        le=1,
        description="mean: leave out of the mean a delta whose cosine to the buffer's coordinate-wise median is "
        "below this (-1: off; keeps K deltas, not one sum).",
    )
    staleness: Staleness = Field(PolynomialStaleness(), description="Weight of a stale update.")
    server_optimizer: ServerOptimizerSettings = Field(SgdOptimizer(), description="The server step.")
    robust: RobustSettings = Field(RobustSettings(), description="[strategy.robust]: clipping, anomaly score.")

    @model_validator(mode="after")
    def _unweighted_robust_aggregators(self) -> FedBuffSettings:
        if self.aggregator != "mean" and self.min_agreement > -1:
            raise ValueError(f"min_agreement filters the mean; aggregator {self.aggregator!r} takes none")
        if self.aggregator != "mean" and self.example_weighted:
            raise ValueError(
                f'aggregator {self.aggregator!r} is unweighted; example_weighted = true needs aggregator = "mean"'
            )
        return self


class SyncFedAvgSettings(ConfigTable):
    """Synchronous FedAvg: one update per site per round on the current version, example-weighted."""

    name: Literal["fedavg-sync"] = Field("fedavg-sync", description="The strategy.")
    max_staleness: int = Field(20, ge=0, description=_MAX_STALENESS)
    round_timeout_seconds: float = Field(
        600.0, gt=0, description="A round this old is aggregated with what it has (at least min_updates)."
    )
    min_updates: int = Field(1, ge=1, description="Updates a timed-out round needs to be aggregated.")
    server_optimizer: ServerOptimizerSettings = Field(SgdOptimizer(), description="The server step.")
    robust: RobustSettings = Field(RobustSettings(), description="[strategy.robust]: clipping, anomaly score.")


StrategySettings = Annotated[
    Annotated[FedAsyncSettings, Tag("fedasync")]
    | Annotated[FedBuffSettings, Tag("fedbuff")]
    | Annotated[SyncFedAvgSettings, Tag("fedavg-sync")],
    choice_by("name", "fedbuff", "fedasync", "fedbuff", "fedavg-sync"),
]
"""``[strategy]``: ``name`` picks the algorithm, and with it the options the table may hold."""
