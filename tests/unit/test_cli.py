"""The ``fedmq`` command's surface that needs no broker: help texts, the state dir, clear errors."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from fedmq.cli import main, resolve_state_dir

BROKER_ACTIONS = ("up", "down", "status", "declare", "add-site", "remove-site", "list-sites")


def test_fedmq_help_lists_the_broker_command(capsys: pytest.CaptureFixture[str]) -> None:
    # Execute
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])

    # Assert
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--state-dir" in out and "broker" in out


def test_broker_help_lists_every_action(capsys: pytest.CaptureFixture[str]) -> None:
    # Execute
    with pytest.raises(SystemExit) as exit_info:
        main(["broker", "--help"])

    # Assert
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(action in out for action in BROKER_ACTIONS)


def test_state_dir_option_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Prepare
    monkeypatch.setenv("FEDMQ_STATE_DIR", str(tmp_path / "from-env"))

    # Execute / Assert
    assert resolve_state_dir(str(tmp_path / "from-option")) == tmp_path / "from-option"
    assert resolve_state_dir(None) == tmp_path / "from-env"


def test_state_dir_defaults_to_dot_fedmq_in_the_working_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Prepare
    monkeypatch.delenv("FEDMQ_STATE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)

    # Execute / Assert
    assert resolve_state_dir(None) == tmp_path.resolve() / ".fedmq"


def test_up_without_rabbitmq_says_how_to_install_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: a directory without rabbitmq-server stands for a machine without the package
    no_rabbitmq = tmp_path / "empty"
    no_rabbitmq.mkdir()

    # Execute
    exit_code = main(["--state-dir", str(tmp_path / "state"), "broker", "up", "--rabbitmq-dir", str(no_rabbitmq)])

    # Assert: one clear error, no traceback
    err = capsys.readouterr().err
    assert exit_code == 1
    assert "apt-get install rabbitmq-server" in err
    assert "rabbitmq:3.10-management" in err
    assert "Traceback" not in err


def test_commands_needing_a_broker_explain_how_to_set_one_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    add_exit_code = main(["--state-dir", str(tmp_path), "broker", "add-site", "hospital-a"])
    add_err = capsys.readouterr().err
    status_exit_code = main(["--state-dir", str(tmp_path), "broker", "status"])
    status_out = capsys.readouterr().out

    # Assert
    assert add_exit_code == 1 and "fedmq broker up" in add_err
    assert status_exit_code == 3 and "fedmq broker up" in status_out


def test_coordinator_with_its_metrics_port_taken_says_so_and_exits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: another program listens on the port the config names
    config = tmp_path / "coordinator.toml"
    config.write_text(
        'task = "heart-disease"\nsites = ["hospital-a"]\n[broker]\nurl = "amqp://u:p@127.0.0.1:1/fedmq"\n'
    )
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]

        # Execute
        exit_code = main(
            ["--state-dir", str(tmp_path), "coordinator", "run", "--config", str(config), "--metrics-port", str(port)]
        )

    # Assert: one clear error naming the port and the two ways to change it, no traceback
    err = capsys.readouterr().err
    assert exit_code == 1
    assert f"cannot serve metrics on 127.0.0.1:{port}" in err
    assert "[metrics] port" in err and "--metrics-port" in err
    assert "Traceback" not in err
