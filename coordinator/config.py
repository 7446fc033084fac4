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

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from coordinator.errors import ConfigError
from coordinator.strategy_config import FedBuffSettings, StrategySettings
from schemas import TrainingConfig
from schemas.config_files import BrokerTable, ConfigTable, dataclass_table, describe, read_toml, relative_to_config


class BrokerSettings(BrokerTable):
    """``[broker]``: where the coordinator connects. Relative TLS paths are relative to the config file."""

    url: str = Field(
        "amqp://fedmq-coordinator@127.0.0.1:5682/fedmq",
        pattern=r"^amqps?://",
        description="AMQP URL with the coordinator's credentials (amqps:// with the three files below for TLS).",
    )


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
        return None if value is None else relative_to_config(value, info)


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
        return relative_to_config(value, info)

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
