"""coordinator.toml -> CoordinatorConfig: every option has a default, and a mistake is named, not ignored."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.config import (
    BrokerSettings,
    ConfigError,
    CoordinatorConfig,
    StoppingSettings,
    as_dict,
    config_from_dict,
    load_config,
)
from schemas import TrainingConfig

FULL_TOML = """
sites = ["cleveland", "hungary", "switzerland", "long-beach"]
state_dir = "run-1"
seed = 3
update_prefetch = 4

[task]
name = "tabular-csv"
num_features = 13
path = "data/heart.csv"

[broker]
url = "amqps://fedmq-coordinator:secret@broker.example:5671/fedmq"
ca_file = "/etc/fedmq/ca.pem"

[strategy]
name = "fedbuff"
max_staleness = 10
[strategy.params]
buffer_size = 3
server_optimizer = "adam"
server_learning_rate = 0.01

[training]
local_steps = 50
learning_rate = 0.05
batch_size = 8

[validation]
max_update_norm = 1000.0
max_message_mb = 64

[liveness]
site_timeout_seconds = 30

[stopping]
max_versions = 60
max_seconds = 3600
target_metric = "accuracy"
target_value = 0.75
target_aggregate = "mean"
final_eval_timeout_seconds = 10

[metrics]
port = 9500
host = "0.0.0.0"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "coordinator.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_no_file_means_every_default() -> None:
    config = load_config(None)

    assert config == CoordinatorConfig()
    assert config.strategy.name == "fedbuff"
    assert config.strategy.max_staleness == 20
    assert config.stopping == StoppingSettings()
    assert config.training == TrainingConfig()
    assert config.metrics.port == 9464


def test_an_empty_file_means_every_default(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == CoordinatorConfig()


def test_a_full_file_sets_every_section(tmp_path: Path) -> None:
    # Execute
    config = load_config(write(tmp_path, FULL_TOML))

    # Assert
    assert config.task == "tabular-csv"
    assert config.task_options == {"num_features": 13, "path": "data/heart.csv"}
    assert config.sites == ("cleveland", "hungary", "switzerland", "long-beach")
    assert config.state_dir == tmp_path / "run-1"  # relative to the config file
    assert (config.seed, config.update_prefetch) == (3, 4)
    assert config.broker == BrokerSettings(
        url="amqps://fedmq-coordinator:secret@broker.example:5671/fedmq", ca_file="/etc/fedmq/ca.pem"
    )
    assert config.strategy.max_staleness == 10
    assert config.strategy.params == {"buffer_size": 3, "server_optimizer": "adam", "server_learning_rate": 0.01}
    assert (config.training.local_steps, config.training.learning_rate, config.training.batch_size) == (50, 0.05, 8)
    assert config.training.optimizer == "sgd"
    assert (config.validation.max_update_norm, config.validation.max_message_mb) == (1000.0, 64)
    assert config.liveness.site_timeout_seconds == 30
    assert config.stopping == StoppingSettings(
        max_versions=60,
        max_seconds=3600,
        target_metric="accuracy",
        target_value=0.75,
        target_aggregate="mean",
        final_eval_timeout_seconds=10,
    )
    assert (config.metrics.host, config.metrics.port) == ("0.0.0.0", 9500)


def test_an_absolute_state_dir_is_kept(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, f'state_dir = "{tmp_path / "elsewhere"}"\n'))

    assert config.state_dir == tmp_path / "elsewhere"


def test_a_plain_task_name_is_accepted() -> None:
    config = config_from_dict({"task": "image-cnn"})

    assert (config.task, config.task_options) == ("image-cnn", {})


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("colour = 1\n", "colour"),
        ("[stopping]\nmax_version = 3\n", "max_version"),
        ("[brokers]\nurl = 'x'\n", "brokers"),
        ("[training]\nlocal_step = 3\n", "local_step"),
        ("[validation]\nmax_norm = 3.0\n", "max_norm"),
    ],
    ids=["top level", "stopping", "table", "training", "validation"],
)
def test_an_unknown_key_is_refused_by_name(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_config(write(tmp_path, text))


def test_a_section_that_is_not_a_table_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[broker\] must be a table"):
        load_config(write(tmp_path, 'broker = "amqp://localhost"\n'))


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('[strategy]\nmax_staleness = "20"\n', "max_staleness"),
        ("[validation]\nmax_update_norm = true\n", "max_update_norm"),
        ("[metrics]\nport = 9464.5\n", "port"),
        ("seed = 'zero'\n", "seed"),
        ("[training]\nproximal_mu = 'a lot'\n", "proximal_mu"),
        ("[broker]\nca_file = 3\n", "ca_file"),
        ('sites = "cleveland"\n', "sites must be a list of strings"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_by_name(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_config(write(tmp_path, text))


def test_an_integer_is_a_float_and_none_is_allowed_where_optional() -> None:
    config = config_from_dict({"stopping": {"max_seconds": 10}, "training": {"proximal_mu": 0.01}})

    assert config.stopping.max_seconds == 10.0
    assert config.training.proximal_mu == 0.01


def test_a_missing_file_and_broken_toml_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[stopping\nmax_versions = 3\n"))


def test_the_summary_view_is_plain_json_values(tmp_path: Path) -> None:
    view = as_dict(load_config(write(tmp_path, FULL_TOML)))

    assert view["state_dir"] == str(tmp_path / "run-1")
    assert view["sites"] == ["cleveland", "hungary", "switzerland", "long-beach"]
    assert view["strategy"]["params"]["buffer_size"] == 3
    assert view["training"]["batch_size"] == 8
