"""coordinator.toml -> CoordinatorConfig: every option has a default, and a mistake is named, not ignored."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
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
    with_changes,
)
from coordinator.strategy_config import AdamOptimizer, FedBuffSettings, HingeStaleness
from schemas import TrainingConfig

REPO_ROOT = Path(__file__).resolve().parents[2]

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
buffer_size = 3
max_site_share = 0.67
example_weighted = true
[strategy.staleness]
function = "hinge"
a = 5.0
b = 2.0
[strategy.server_optimizer]
name = "adam"
learning_rate = 0.01
beta2 = 0.999

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
    assert config.strategy == FedBuffSettings(
        max_staleness=10,
        buffer_size=3,
        max_site_share=0.67,
        example_weighted=True,
        staleness=HingeStaleness(a=5.0, b=2.0),
        server_optimizer=AdamOptimizer(learning_rate=0.01, beta2=0.999),
    )
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
    with pytest.raises(ConfigError, match=r"broker = \"amqp://localhost\": must be a table"):
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
        ('sites = "cleveland"\n', 'sites = "cleveland": must be a list'),
        ("sites = [1]\n", "sites.0 = 1: must be a string"),
        ("[strategy]\nexample_weighted = 1\n", "strategy.example_weighted = 1: must be true or false"),
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
    assert view["strategy"]["buffer_size"] == 3
    assert view["strategy"]["server_optimizer"] == {
        "name": "adam",
        "learning_rate": 0.01,
        "beta1": 0.9,
        "beta2": 0.999,
        "tau": 0.001,
    }
    assert view["training"]["batch_size"] == 8


# ------------------------------------------------------------------------------------ choices, ranges, tables


@pytest.mark.parametrize(
    ("text", "line"),
    [
        (
            '[stopping]\ntarget_aggregate = "median"\n',
            "stopping.target_aggregate = \"median\": must be one of 'pooled' or 'mean'",
        ),
        ("[strategy]\nmax_staleness = -1\n", "strategy.max_staleness = -1: must be >= 0"),
        ("update_prefetch = 0\n", "update_prefetch = 0: must be >= 1"),
        ("[metrics]\nport = 999999\n", "metrics.port = 999999: must be <= 65535"),
        ('[strategy]\nname = "fedprox"\n', 'strategy.name = "fedprox": must be one of fedasync, fedbuff, fedavg-sync'),
        ("[strategy]\nname = 3\n", "strategy.name = 3: must be one of fedasync, fedbuff, fedavg-sync"),
        (
            "[strategy.server_optimizer]\nlearning_rate = 0\n",
            "strategy.server_optimizer.learning_rate = 0: must be > 0",
        ),
        (
            '[strategy.server_optimizer]\nname = "lamb"\n',
            'strategy.server_optimizer.name = "lamb": must be one of sgd, momentum, adam, yogi, adagrad',
        ),
        ('[strategy]\nname = "fedasync"\nalpha = 1.5\n', "strategy.alpha = 1.5: must be <= 1"),
        ("[strategy.staleness]\na = -1\n", "strategy.staleness.a = -1: must be >= 0"),
        ("[validation]\nmax_update_norm = inf\n", "validation.max_update_norm = inf: must be a finite number"),
        ('[broker]\nurl = "http://broker"\n', 'broker.url = "http://broker": must match ^amqps?://'),
        ('sites = ["a", "a"]\n', 'sites = ["a", "a"]: lists a more than once'),
    ],
    ids=lambda value: value.split("\n")[-2] if "\n" in value else None,
)
def test_a_choice_or_range_mistake_is_one_line_naming_the_file_key_value_and_what_is_allowed(
    tmp_path: Path, text: str, line: str
) -> None:
    path = write(tmp_path, text)

    with pytest.raises(ConfigError) as raised:
        load_config(path)

    assert str(raised.value) == f"{path}: {line}"


@pytest.mark.parametrize(
    ("text", "key", "allowed"),
    [
        ("colour = 1\n", "colour = 1", "task, task_options, sites, state_dir"),
        ("[strategy]\nbuffer_sise = 3\n", "strategy.buffer_sise = 3", "buffer_size, max_site_share"),
        ('[strategy]\nname = "fedasync"\nbuffer_size = 3\n', "strategy.buffer_size = 3", "alpha, staleness"),
        (
            '[strategy.server_optimizer]\nname = "adam"\nmomentum = 0.5\n',
            "strategy.server_optimizer.momentum = 0.5",
            "learning_rate, beta1, beta2, tau",
        ),
        ('[strategy.staleness]\nfunction = "constant"\na = 1\n', "strategy.staleness.a = 1", "function"),
        ("[training]\ntrain_on_same_version = false\n", "training.train_on_same_version = false", "local_steps"),
    ],
    ids=["top level", "strategy", "another strategy's option", "server optimiser", "staleness", "training"],
)
def test_an_unknown_key_names_itself_and_the_keys_allowed_there(
    tmp_path: Path, text: str, key: str, allowed: str
) -> None:
    with pytest.raises(ConfigError, match="unknown key") as raised:
        load_config(write(tmp_path, text))

    assert f": {key}: unknown key; allowed here: " in str(raised.value)
    assert allowed in str(raised.value)


def test_each_strategy_takes_its_own_options_with_their_defaults() -> None:
    fedasync = config_from_dict({"strategy": {"name": "fedasync", "staleness": {"function": "constant"}}}).strategy
    sync = config_from_dict({"strategy": {"name": "fedavg-sync", "round_timeout_seconds": 30}}).strategy
    fedbuff = config_from_dict({"strategy": {"server_optimizer": {"name": "yogi"}}}).strategy

    assert (fedasync.name, fedasync.alpha, fedasync.staleness.function) == ("fedasync", 0.6, "constant")
    assert (sync.name, sync.round_timeout_seconds, sync.min_updates) == ("fedavg-sync", 30.0, 1)
    assert (fedbuff.name, fedbuff.buffer_size, fedbuff.server_optimizer.learning_rate) == ("fedbuff", 10, 0.01)


def test_the_config_is_frozen_and_changes_are_validated_again() -> None:
    config = CoordinatorConfig()

    with pytest.raises(ValueError, match="frozen"):
        config.update_prefetch = 0  # type: ignore[misc]
    assert with_changes(config, sites=("a", "b")).sites == ("a", "b")
    with pytest.raises(ConfigError, match="update_prefetch = 0: must be >= 1"):
        with_changes(config, update_prefetch=0)


def test_a_full_file_round_trips_through_its_json_view(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL_TOML))

    assert config_from_dict(as_dict(config)) == config


def test_a_training_config_error_names_the_training_key() -> None:
    with pytest.raises(ConfigError, match=r"training\.batch_size = 0"):
        config_from_dict({"training": {"batch_size": 0}})


# ------------------------------------------------------------------------------------ the command line


def run_fedmq(tmp_path: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "fedmq", "--state-dir", str(tmp_path / "state"), *arguments],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": python_path},
        cwd=tmp_path,
        timeout=120,
    )


def test_coordinator_run_with_a_bad_file_exits_with_one_line_naming_the_key(tmp_path: Path) -> None:
    # Prepare: the broker would be unreachable, so getting past the config would hang or fail differently
    path = write(
        tmp_path, '[broker]\nurl = "amqp://u:p@127.0.0.1:1/fedmq"\n[strategy.server_optimizer]\nlearning_rate = -1\n'
    )

    # Execute
    result = run_fedmq(tmp_path, "coordinator", "run", "--config", str(path))

    # Assert
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {path}: strategy.server_optimizer.learning_rate = -1: must be > 0"
    ]


def test_coordinator_run_with_bad_task_options_exits_with_one_line_naming_the_option(tmp_path: Path) -> None:
    # Prepare: a tabular task without the options it needs
    path = write(
        tmp_path, 'sites = ["a"]\n[broker]\nurl = "amqp://u:p@127.0.0.1:1/fedmq"\n[task]\nname = "tabular-csv"\n'
    )

    # Execute
    result = run_fedmq(tmp_path, "coordinator", "run", "--config", str(path))

    # Assert
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {path}: task 'tabular-csv'") and "num_features" in line


def docstring_example(module_doc: str) -> str:
    block = module_doc.split("::\n", 1)[1].split('\n"""', 1)[0]
    return textwrap.dedent(block)


def test_the_module_docstring_example_is_a_valid_file(tmp_path: Path) -> None:
    import coordinator.config

    assert coordinator.config.__doc__ is not None
    config = load_config(write(tmp_path, docstring_example(coordinator.config.__doc__)))

    assert config.strategy.name == "fedbuff" and config.strategy.server_optimizer.name == "adam"


@pytest.mark.parametrize("strategy", ["fedbuff", "fedasync", "fedavg-sync"])
def test_the_file_the_demo_writes_is_valid(tmp_path: Path, strategy: str) -> None:
    from fedmq.demo import DemoOptions, coordinator_toml

    text = coordinator_toml(DemoOptions(state_dir=tmp_path, strategy=strategy), "amqp://u:p@127.0.0.1:5682/x", 9464)

    assert load_config(write(tmp_path, text)).strategy.name == strategy


def test_coordinator_run_reads_its_file_once_and_fills_in_the_state_dir_sites_and_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import argparse

    import coordinator.config
    from coordinator.cli import resolve_config

    # Prepare: a file without state_dir or sites, and two provisioned sites
    path = write(tmp_path, "[metrics]\nport = 9500\n")
    (tmp_path / "state" / "sites").mkdir(parents=True)
    for site in ("hungary", "cleveland"):
        (tmp_path / "state" / "sites" / f"{site}.toml").write_text("")
    reads: list[Path] = []
    real_read = coordinator.config.read_toml

    def counted_read(file: Path, error: type[Exception]) -> dict[str, object]:
        reads.append(file)
        return real_read(file, error)

    monkeypatch.setattr(coordinator.config, "read_toml", counted_read)
    args = argparse.Namespace(config=path, state_dir=tmp_path / "state", metrics_port=9600)

    # Execute
    config = resolve_config(args)

    # Assert
    assert reads == [path]
    assert config.state_dir == tmp_path / "state" / "coordinator"
    assert config.sites == ("cleveland", "hungary")
    assert config.metrics.port == 9600
