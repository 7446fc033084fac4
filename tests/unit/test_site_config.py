"""A site's TOML file -> SiteConfig: what `fedmq broker add-site` writes is valid, a mistake is named in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from site_agent.config import AgentSettings, SiteConfigError, load_site_config

REPO_ROOT = Path(__file__).resolve().parents[2]

PROVISIONED = """# as `fedmq broker add-site` writes it
site_id = "cleveland"

[broker]
url = "amqps://127.0.0.1:5671/fedmq"
ca_file = "certs/ca.pem"
cert_file = "certs/cleveland.pem"
key_file = "/etc/fedmq/cleveland.key"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cleveland.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_provisioned_file_is_valid_with_paths_relative_to_it(tmp_path: Path) -> None:
    config = load_site_config(write(tmp_path, PROVISIONED))

    assert (config.site_id, config.broker_url) == ("cleveland", "amqps://127.0.0.1:5671/fedmq")
    assert config.ca_file == str(tmp_path.resolve() / "certs" / "ca.pem")
    assert config.cert_file == str(tmp_path.resolve() / "certs" / "cleveland.pem")
    assert config.key_file == "/etc/fedmq/cleveland.key"
    assert config.task == {"name": "heart-disease"} and config.task_name == "heart-disease"
    assert config.agent == AgentSettings(state_dir=str(tmp_path.resolve()))
    assert config.state_dir == tmp_path.resolve()


def test_the_hospitals_tables_are_read(tmp_path: Path) -> None:
    text = PROVISIONED + (
        '\n[task]\nname = "tabular-csv"\ndata_dir = "data"\n'
        '\n[agent]\nseed = 3\nslowdown = 2\nheartbeat_seconds = 1\ncompression = "int8"\nstate_dir = "agent"\n'
    )

    config = load_site_config(write(tmp_path, text))

    assert config.task == {"name": "tabular-csv", "data_dir": str(tmp_path.resolve() / "data")}
    assert (config.agent.seed, config.agent.slowdown, config.agent.compression) == (3, 2.0, "int8")
    assert config.state_dir == tmp_path.resolve() / "agent"


@pytest.mark.parametrize(
    ("text", "line"),
    [
        (
            '\n[agent]\ncompression = "zstd"\n',
            "agent.compression = \"zstd\": must be one of 'none', 'float16' or 'int8'",
        ),
        ("\n[agent]\nslowdown = 0.5\n", "agent.slowdown = 0.5: must be >= 1"),
        ("\n[agent]\nheartbeat_seconds = 0\n", "agent.heartbeat_seconds = 0: must be > 0"),
        ("\n[agent]\nthread = 2\n", "agent.thread = 2: unknown key; allowed here: seed, slowdown"),
        ("colour = 1\n", "colour = 1: unknown key; allowed here: site_id, broker, task, agent"),
        ("\n[task]\nname = 3\n", "task.name = 3: must be a task name (a non-empty string)"),
    ],
    ids=["choice", "range", "positive", "unknown agent key", "unknown top-level key", "task name"],
)
def test_a_mistake_is_one_line_naming_the_file_and_the_key(tmp_path: Path, text: str, line: str) -> None:
    path = write(tmp_path, text + PROVISIONED if text.startswith("colour") else PROVISIONED + text)

    with pytest.raises(SiteConfigError) as raised:
        load_site_config(path)

    assert str(raised.value).startswith(f"{path}: {line}")


def test_a_missing_site_id_or_broker_url_is_named(tmp_path: Path) -> None:
    with pytest.raises(SiteConfigError, match="site_id is missing: it is required; broker is missing"):
        load_site_config(write(tmp_path, "\n"))
    with pytest.raises(SiteConfigError, match=r"broker\.url is missing"):
        load_site_config(write(tmp_path, 'site_id = "x"\n[broker]\n'))


def test_the_compressions_offered_are_the_ones_the_wire_knows() -> None:
    from typing import get_args

    from schemas import COMPRESSIONS

    assert set(get_args(AgentSettings.model_fields["compression"].annotation)) == set(COMPRESSIONS)


@pytest.mark.parametrize("action", ["run", "check"])
def test_site_commands_with_a_bad_file_exit_with_one_line_naming_the_key(tmp_path: Path, action: str) -> None:
    path = write(tmp_path, PROVISIONED + "\n[agent]\nslowdown = 0\n")
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))

    result = subprocess.run(
        [sys.executable, "-m", "fedmq", "site", action, "--config", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": python_path},
        cwd=tmp_path,
        timeout=120,
    )

    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {path}: agent.slowdown = 0: must be >= 1"]


def test_the_module_docstring_example_is_a_valid_file(tmp_path: Path) -> None:
    import textwrap

    import site_agent.config

    assert site_agent.config.__doc__ is not None
    example = textwrap.dedent(site_agent.config.__doc__.split("::\n", 1)[1])

    assert load_site_config(write(tmp_path, example)).site_id == "cleveland"
