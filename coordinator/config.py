"""The coordinator's configuration: small typed objects, every option with a default.

Only ``load_config`` touches a file; everything else receives a ``CoordinatorConfig``. An example
``coordinator.toml``::

    task = "heart-disease"
    sites = ["cleveland", "hungary", "switzerland", "long-beach"]   # empty: every provisioned site

    [broker]
    url = "amqp://fedmq-coordinator:...@127.0.0.1:5682/fedmq"

    [strategy]
    name = "fedbuff"                 # fedasync | fedbuff | fedavg-sync
    max_staleness = 20
    [strategy.params]                # passed to the strategy as keyword arguments
    buffer_size = 3
    server_optimizer = "adam"
    server_learning_rate = 0.01

    [training]                       # sent to every site inside the global model
    local_steps = 100
    learning_rate = 0.01
    batch_size = 4

    [validation]
    max_update_norm = 1000.0
    max_message_mb = 256

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
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from types import UnionType
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from schemas import TrainingConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the key."""


@dataclass(frozen=True)
class BrokerSettings:
    url: str = "amqp://fedmq-coordinator@127.0.0.1:5682/fedmq"
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True)
class StrategySettings:
    name: str = "fedbuff"
    max_staleness: int = 20
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ValidationSettings:
    max_update_norm: float = 1e4
    max_message_mb: float = 256.0
    # Redelivered updates are caught by their id; resent ones also by their site's seq, so a short memory suffices
    # and keeps the per-update checkpoint small.
    remembered_update_ids: int = 2_000


@dataclass(frozen=True)
class LivenessSettings:
    site_timeout_seconds: float = 60.0


@dataclass(frozen=True)
class StoppingSettings:
    max_versions: int = 0
    max_seconds: float = 0.0
    target_metric: str = ""
    target_value: float = 0.0
    target_aggregate: str = "pooled"
    final_eval_timeout_seconds: float = 30.0


@dataclass(frozen=True)
class MetricsSettings:
    port: int = 9464
    host: str = "127.0.0.1"


@dataclass(frozen=True)
class CoordinatorConfig:
    task: str = "heart-disease"
    task_options: dict[str, Any] = field(default_factory=dict)
    sites: tuple[str, ...] = ()
    state_dir: Path = Path(".fedmq/coordinator")
    seed: int = 0
    update_prefetch: int = 16
    # One torch thread: on a small host, two threads fighting over cores made validation 10-60x slower
    # (docs/BENCHMARKS.md, coordinator throughput).
    torch_threads: int = 1
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    strategy: StrategySettings = field(default_factory=StrategySettings)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    liveness: LivenessSettings = field(default_factory=LivenessSettings)
    stopping: StoppingSettings = field(default_factory=StoppingSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)


ConfigT = TypeVar("ConfigT")

_NESTED = {
    "broker": BrokerSettings,
    "strategy": StrategySettings,
    "training": TrainingConfig,
    "validation": ValidationSettings,
    "liveness": LivenessSettings,
    "stopping": StoppingSettings,
    "metrics": MetricsSettings,
}


def _build(kind: type[ConfigT], values: dict[str, Any], where: str) -> ConfigT:
    known = {item.name for item in fields(kind)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"[{where}] unknown key(s) {unknown}; known: {sorted(known)}")
    hints = get_type_hints(kind)
    return kind(**{key: _checked(value, hints[key], f"[{where}] {key}") for key, value in values.items()})


def _checked(value: Any, hint: Any, where: str) -> Any:
    """The value as its field's type (an int is fine where a float is wanted), or a ConfigError naming the key:
    a wrong type caught here would otherwise fail deep in the service, on the first update."""
    arguments = get_args(hint)
    if get_origin(hint) in (Union, UnionType) and type(None) in arguments:
        if value is None:
            return None
        hint = next(argument for argument in arguments if argument is not type(None))
    expected = get_origin(hint) or hint
    if expected is float and type(value) in (int, float):
        return float(value)
    if expected is tuple and isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        return tuple(value)
    if expected in (int, str, bool, dict):
        if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
            return value
    elif expected not in (float, tuple):
        return value  # nested settings, Path: built or converted by the caller
    wanted = "a list of strings" if expected is tuple else getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{where} must be {wanted}, got {value!r}")


def config_from_dict(values: dict[str, Any], *, base_dir: Path | None = None) -> CoordinatorConfig:
    values = dict(values)
    if "task" in values and isinstance(values["task"], dict):  # [task] name = ..., other keys are options
        task_table = dict(values.pop("task"))
        values["task"] = task_table.pop("name", CoordinatorConfig.task)
        values["task_options"] = task_table
    nested: dict[str, Any] = {}
    for key, kind in _NESTED.items():
        if key in values:
            table = values.pop(key)
            if not isinstance(table, dict):
                raise ConfigError(f"[{key}] must be a table")
            nested[key] = _build(kind, table, key)
    if "broker" in nested and base_dir is not None:  # like a site config: TLS files relative to this file
        broker = nested["broker"]
        paths = {name: getattr(broker, name) for name in ("ca_file", "cert_file", "key_file")}
        nested["broker"] = replace(broker, **{name: str(base_dir / value) for name, value in paths.items() if value})
    if "state_dir" in values:
        state_dir = Path(values["state_dir"]).expanduser()
        values["state_dir"] = state_dir if state_dir.is_absolute() or base_dir is None else base_dir / state_dir
    config = _build(CoordinatorConfig, {**values, **nested}, "top level")
    return config


def load_config(path: Path | None) -> CoordinatorConfig:
    """Read coordinator.toml; a missing path means every default."""
    if path is None:
        return CoordinatorConfig()
    try:
        with path.open("rb") as handle:
            raw = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    try:
        return config_from_dict(raw, base_dir=path.parent)
    except TypeError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def as_dict(config: Any) -> Any:
    """A JSON-ready view of a config, for the run summary."""
    if is_dataclass(config):
        return {item.name: as_dict(getattr(config, item.name)) for item in fields(config)}
    if isinstance(config, Path):
        return str(config)
    if isinstance(config, (tuple, list)):
        return [as_dict(item) for item in config]
    return config
