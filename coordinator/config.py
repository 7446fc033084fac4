"""The coordinator's configuration, ``coordinator.toml``: one pydantic model, every option with a default and a
description (the models below are the reference), validated when it is built.

Only ``load_config`` touches a file; everything else receives a ``CoordinatorConfig``. A bad file is a
``ConfigError`` whose one-line message names the file, the key, the value and what is allowed. An example::

    task = "heart-disease"
    sites = ["cleveland", "hungary", "switzerland", "long-beach"]   # empty: every provisioned site

    [broker]
    url = "amqp://fedmq-coordinator:...@127.0.0.1:5682/fedmq"

    [strategy]
    name = "fedbuff"                 # fedasync | fedbuff | fedavg-sync; each takes its own options
    max_staleness = 20
    buffer_size = 3
    [strategy.staleness]             # constant | polynomial (a) | hinge (a, b)
    function = "polynomial"
    a = 0.5
    [strategy.server_optimizer]      # sgd | momentum | adam | yogi | adagrad
    name = "adam"
    learning_rate = 0.01

    [training]                       # sent to every site inside the global model
    local_steps = 100
    learning_rate = 0.01
    batch_size = 4

    [validation]
    max_update_norm = 1000.0
    max_message_mb = 256
    max_num_examples = 1000000     # evaluation reports claiming more examples are refused

    [storage]
    reserve_mb = 64                  # free space a commit must leave in the state dir, else it waits (unacked)

    [liveness]
    site_timeout_seconds = 30

    [stopping]
    max_versions = 60
    max_seconds = 0                  # 0: no wall-clock budget; counted from the run's first start, across restarts
    target_metric = ""               # e.g. "accuracy"
    target_value = 0.0
    target_aggregate = "pooled"      # or "mean"

    [metrics]
    port = 9464
    host = "127.0.0.1"

    [signing]                        # end-to-end Ed25519 signatures (schemas.signing, broker.keys)
    required = true                  # refuse an unsigned update (bad-signature); a wrong signature always is
    keys_dir = ""                    # default: <fedmq state dir>/keys (site public keys in keys/sites/)
    key_file = ""                    # default: <keys_dir>/coordinator.key, made at first start if missing
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, Tag, ValidationError, ValidationInfo, field_validator, model_validator

from coordinator.errors import ConfigError
from schemas import TrainingConfig
from schemas.config_files import BrokerTable, ConfigTable, choice_by, dataclass_table, describe, read_toml


class BrokerSettings(BrokerTable):
    """``[broker]``: where the coordinator connects. Relative TLS paths are relative to the config file."""

    url: str = Field(
        "amqp://fedmq-coordinator@127.0.0.1:5682/fedmq",
        pattern=r"^amqps?://",
        description="AMQP URL with the coordinator's credentials (amqps:// with the three files below for TLS).",
    )


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


# ---------------------------------------------------------------------------------------------- the other tables


class ValidationSettings(ConfigTable):
    """``[validation]``: bounds an update must meet before it is aggregated."""

    max_update_norm: float = Field(1e4, gt=0, description="Largest L2 norm of an update's delta.")
    max_message_mb: float = Field(256.0, gt=0, description="Largest update message, in MiB (checked before decoding).")
    # A site's num_examples is a claim nobody can check; example-weighted aggregation trusts it, so it is bounded.
    max_num_examples: int = Field(
        1_000_000,
        ge=1,
        description="Largest num_examples an update or evaluation report may claim (per site: site_max_num_examples).",
    )
    site_max_num_examples: dict[str, Annotated[int, Field(ge=1)]] = Field(
        default_factory=dict, description="Per-site bound on num_examples (e.g. the hospital's registered patients)."
    )
    num_examples_above_cap: Literal["clip", "reject"] = Field(
        "clip",
        description="An update's claim above the bound: clip it to the bound (the audit record says so) or reject "
        "the update (reason too-many-examples). An evaluation report above it is always rejected.",
    )
    # A copy of an applied update is known by its id and seq; per site, seqs above the settled floor are kept only
    # while an older one is missing (coordinator.validation.DuplicateFilter), so the checkpoint stays small.
    remembered_update_ids: int = Field(
        2_000, ge=1, description="Ids of the last applied updates remembered to recognise a copy of one."
    )


class StorageSettings(ConfigTable):
    """``[storage]``: the state dir's disk space."""

    reserve_mb: float = Field(
        64.0,
        ge=0,
        description="Free space a commit must leave in the state dir; a commit that would leave less is not started "
        "(its updates stay unacked in the broker) until there is room.",
    )


class LivenessSettings(ConfigTable):
    """``[liveness]``"""

    site_timeout_seconds: float = Field(60.0, gt=0, description="A site silent this long is counted as down.")


class StoppingSettings(ConfigTable):
    """``[stopping]``: the first rule met ends the run (0 or "" turns a rule off)."""

    max_versions: int = Field(0, ge=0, description="Stop at this global version (0: no limit).")
    max_seconds: float = Field(
        0.0, ge=0, description="Wall-clock budget from the run's first start, across restarts (0: none)."
    )
    target_metric: str = Field(
        "", description='Stop when this evaluation metric (e.g. "accuracy") reaches target_value.'
    )
    target_value: float = Field(0.0, description="The value target_metric must reach.")
    target_aggregate: Literal["pooled", "mean"] = Field(
        "pooled", description="How the sites' evaluations combine: pooled (example-weighted) or mean (per site)."
    )
    final_eval_timeout_seconds: float = Field(
        30.0, ge=0, description="How long to wait for the sites' evaluation of the final model."
    )


class MetricsSettings(ConfigTable):
    """``[metrics]``: the Prometheus endpoint."""

    port: int = Field(9464, ge=1, le=65535, description="TCP port of /metrics.")
    host: str = Field("127.0.0.1", min_length=1, description="Address to listen on.")


class SigningSettings(ConfigTable):
    """``[signing]``: the hospitals' keys the updates are checked against, and the key models are signed with."""

    required: bool = Field(
        True,
        description="Refuse an update without a signature (bad-signature); one with a wrong signature is always "
        "refused. false only while migrating hospitals to signed agents.",
    )
    keys_dir: Path | None = Field(
        None,
        strict=False,
        description="The key registry (broker.keys): sites/NAME.pub per hospital (default: <fedmq state "
        "dir>/keys; relative: to the config file).",
    )
    key_file: Path | None = Field(
        None,
        strict=False,
        description="The coordinator's Ed25519 private key, made (0600) at first start if missing (default: "
        "<keys_dir>/coordinator.key; relative: to the config file).",
    )

    @field_validator("keys_dir", "key_file", mode="before")
    @classmethod
    def _empty_is_the_default(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("keys_dir", "key_file")
    @classmethod
    def _relative_to_the_file(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            return None
        base_dir = (info.context or {}).get("base_dir")
        value = value.expanduser()
        return value if value.is_absolute() or base_dir is None else base_dir / value


class CoordinatorConfig(ConfigTable):
    """``coordinator.toml``. ``task`` is a name, or a ``[task]`` table whose ``name`` picks the task and whose other
    keys are the task's options (checked by the task itself)."""

    task: str = Field("heart-disease", min_length=1, description="The task (model and data) to federate.")
    task_options: dict[str, Any] = Field(
        default_factory=dict, description="The [task] table's other keys, passed to the task."
    )
    sites: tuple[Annotated[str, Field(min_length=1)], ...] = Field(
        (), strict=False, description="Site ids taking part (empty: every site provisioned in the state dir)."
    )
    state_dir: Path = Field(
        Path(".fedmq/coordinator"),
        strict=False,
        description="Checkpoint, audit log and results (relative: to the config file).",
    )
    seed: int = Field(0, ge=0, description="Seed of the initial model.")
    update_prefetch: int = Field(
        16, ge=1, le=65535, description="Updates in flight from the broker; also the group-commit batch."
    )
    # One torch thread: on a small host, two threads fighting over cores made validation 10-60x slower
    # (docs/BENCHMARKS.md, coordinator throughput).
    torch_threads: int = Field(1, ge=1, description="torch CPU threads for validation and aggregation.")
    broker: BrokerSettings = Field(BrokerSettings(), description="[broker]")
    strategy: StrategySettings = Field(FedBuffSettings(), description="[strategy]")
    training: Annotated[TrainingConfig, dataclass_table(TrainingConfig, exclude=("train_on_same_version",))] = Field(
        TrainingConfig(), description="[training]: how every site trains, sent inside the global model."
    )
    validation: ValidationSettings = Field(ValidationSettings(), description="[validation]")
    storage: StorageSettings = Field(StorageSettings(), description="[storage]")
    liveness: LivenessSettings = Field(LivenessSettings(), description="[liveness]")
    stopping: StoppingSettings = Field(StoppingSettings(), description="[stopping]")
    metrics: MetricsSettings = Field(MetricsSettings(), description="[metrics]")
    signing: SigningSettings = Field(SigningSettings(), description="[signing]")

    @model_validator(mode="before")
    @classmethod
    def _task_table(cls, values: Any) -> Any:
        """``[task] name = ..., other = ...`` -> ``task`` and ``task_options``."""
        if isinstance(values, Mapping) and isinstance(values.get("task"), Mapping):
            values = dict(values)
            options = dict(values.pop("task"))
            values["task"] = options.pop("name", "heart-disease")
            values["task_options"] = options
        return values

    @field_validator("state_dir")
    @classmethod
    def _relative_to_the_file(cls, value: Path, info: ValidationInfo) -> Path:
        base_dir = (info.context or {}).get("base_dir")
        value = value.expanduser()
        return value if value.is_absolute() or base_dir is None else base_dir / value

    @field_validator("sites")
    @classmethod
    def _each_site_once(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        repeated = sorted({site for site in value if value.count(site) > 1})
        if repeated:
            raise ValueError(f"lists {', '.join(repeated)} more than once")
        return value


def config_from_dict(
    values: Mapping[str, Any], *, base_dir: Path | None = None, source: str = "config"
) -> CoordinatorConfig:
    """Validate a parsed file; relative paths in it are taken relative to ``base_dir``."""
    try:
        return CoordinatorConfig.model_validate(values, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise ConfigError(describe(exc, CoordinatorConfig, source)) from None


def load_config(path: Path | None) -> CoordinatorConfig:
    """Read coordinator.toml once; a missing path means every default."""
    if path is None:
        return CoordinatorConfig()
    return config_from_dict(read_toml(path, ConfigError), base_dir=path.parent, source=str(path))


def with_changes(config: CoordinatorConfig, **changes: Any) -> CoordinatorConfig:
    """A copy with some top-level fields replaced, validated again (``model_copy`` would not check them)."""
    return config_from_dict({**dict(config), **changes}, source="the command line")


def as_dict(config: CoordinatorConfig) -> dict[str, Any]:
    """A JSON-ready view of a config, for the run summary."""
    return config.model_dump(mode="json")
