"""A real Prometheus scrapes a real federation, and the site-silent alert fires for the site that was killed.

What runs: the session's RabbitMQ node, a coordinator process (FedBuff, K = 2, heart-disease), two site agent
processes (cleveland, hungary), and Debian's ``prometheus`` started here on a free loopback port with a temporary
data dir. Its config and rules are derived from the shipped ``ops/prometheus/prometheus.yml`` and ``alerts.yml``
with PyYAML: only intervals, the target and FedmqSiteSilent's two thresholds are shortened, so the expression
under test is the one operators get. Every question is asked through Prometheus's HTTP API, as Grafana would.

Timeline (about 30 s on 2 cores): Prometheus up (~1 s), coordinator up (~4 s), agents up and several versions
(~10 s), SIGKILL hungary, the coordinator marks it down after ``site_timeout_seconds`` (3 s), the alert is pending
at the next scrape and evaluation, and firing ``for`` (3 s) later.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import pytest
import yaml

from tests.integration.conftest import BrokerEnv
from tests.integration.coordinator_process import CoordinatorProcess, free_port, write_coordinator_config

pytestmark = [pytest.mark.integration, pytest.mark.prometheus]

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_PROMETHEUS_CONFIG = REPO_ROOT / "ops" / "prometheus" / "prometheus.yml"
SHIPPED_ALERTS = REPO_ROOT / "ops" / "prometheus" / "alerts.yml"
COORDINATOR_JOB = "fedmq-coordinator"
SITE_SILENT = "FedmqSiteSilent"
SITES = ("cleveland", "hungary")
KILLED_SITE = "hungary"

SITE_TIMEOUT_SECONDS = 3  # the coordinator's [liveness]: fedmq_site_up drops to 0 after this much silence
SILENCE_THRESHOLD_SECONDS = 5  # replaces the rule's 600 s "time() - last seen >" literal
SITE_SILENT_FOR = "3s"  # replaces the rule's 5m
HEARTBEAT_SECONDS = 1

# Upper bounds for each wait, generous for a loaded 2-core CI runner; the usual figures are in the docstring.
PROMETHEUS_READY_TIMEOUT = 30.0
FEDERATION_TIMEOUT = 60.0
ALERT_TIMEOUT = 30.0


# ------------------------------------------------------------------------------------------ derived config


def rules_with_short_site_silence(alerts: dict[str, Any]) -> dict[str, Any]:
    """The shipped rules with FedmqSiteSilent's ``for`` and silence literal shortened, nothing else changed."""
    site_silent = [rule for group in alerts["groups"] for rule in group["rules"] if rule.get("alert") == SITE_SILENT]
    assert len(site_silent) == 1, f"expected one {SITE_SILENT} rule in {SHIPPED_ALERTS}"
    rule = site_silent[0]
    silence_literal = re.compile(r"(time\(\)\s*-\s*fedmq_site_last_seen_timestamp_seconds\s*>\s*)\d+(\.\d+)?")
    expression, replacements = silence_literal.subn(rf"\g<1>{SILENCE_THRESHOLD_SECONDS}", rule["expr"])
    assert replacements == 1, f"the silence threshold literal moved; update this test:\n{rule['expr']}"
    rule["expr"] = expression
    rule["for"] = SITE_SILENT_FOR
    return alerts


def prometheus_config_for_test(shipped: dict[str, Any], coordinator_port: int, rules_file: str) -> dict[str, Any]:
    """The shipped config with 1 s intervals, our rules copy, and only the coordinator job, aimed at our port."""
    jobs = [job for job in shipped["scrape_configs"] if job["job_name"] == COORDINATOR_JOB]
    assert len(jobs) == 1, f"{SHIPPED_PROMETHEUS_CONFIG} has no {COORDINATOR_JOB} job"
    job = dict(jobs[0], static_configs=[{"targets": [f"127.0.0.1:{coordinator_port}"]}])
    return {
        **shipped,
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [rules_file],
        "scrape_configs": [job],
    }


# ------------------------------------------------------------------------------------------------ processes


@dataclass
class PrometheusServer:
    """Debian's prometheus on a loopback port, queried through its HTTP API."""

    config_path: Path
    data_dir: Path
    port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    _log: TextIO | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, binary: str) -> None:
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.data_dir}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None and self.process.poll() is None, self.log_tail()
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{self.base_url}/-/ready", timeout=1) as response,
            ):
                if response.status == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"prometheus never became ready:\n{self.log_tail()}")

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.base_url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=5) as response:
            answer = json.loads(response.read())
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expression: str) -> list[dict[str, Any]]:
        """An instant query's result list (vector or matrix)."""
        data = self.api("query", query=expression)
        result: list[dict[str, Any]] = data["result"]
        return result

    def active_alerts(self, name: str) -> list[dict[str, Any]]:
        return [alert for alert in self.api("alerts")["alerts"] if alert["labels"].get("alertname") == name]

    def log_tail(self) -> str:
        return self.log_path.read_text()[-3000:] if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()


@dataclass
class SiteAgentProcesses:
    """One ``fedmq site run`` process per hospital, each with its own log."""

    log_dir: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _logs: list[TextIO] = field(default_factory=list)

    def start(self, site: str, config_path: Path) -> None:
        log = (self.log_dir / f"site-{site}.log").open("w")
        self._logs.append(log)
        self.processes[site] = subprocess.Popen(
            [sys.executable, "-m", "fedmq", "site", "run", "--config", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def sigkill(self, site: str) -> None:
        process = self.processes[site]
        process.kill()  # SIGKILL: no goodbye message, the connection just drops
        process.wait(timeout=10)

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for log in self._logs:
            log.close()


def poll_until(condition: Callable[[], bool], timeout: float, describe: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.25)
    raise TimeoutError(describe())


@pytest.fixture
def prometheus_binary() -> str:
    """Debian's prometheus package; .ci/run installs it, so its absence is a failure, not a skip."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus not found: install Debian's prometheus package (apt-get install prometheus)")
    return binary


@dataclass
class Federation:
    prometheus: PrometheusServer
    coordinator: CoordinatorProcess
    agents: SiteAgentProcesses
    tmp_path: Path

    def diagnostics(self) -> str:
        logs = [self.coordinator.log_path, *sorted(self.tmp_path.glob("site-*.log"))]
        tails = "\n".join(f"--- {path.name}\n{path.read_text()[-1500:]}" for path in logs if path.exists())
        return f"{tails}\n--- prometheus\n{self.prometheus.log_tail()}"


@pytest.fixture
def federation(broker_env: BrokerEnv, tmp_path: Path, prometheus_binary: str) -> Iterator[Federation]:
    """Prometheus, a coordinator and two site agents, all stopped at teardown whatever the test did."""
    # Site configs: what `fedmq broker add-site` wrote, plus what the hospital adds.
    site_configs = {}
    for site in SITES:
        credentials = broker_env.add_site(site)
        with credentials.config_path.open("a") as site_file:
            site_file.write(f'\n[task]\nname = "heart-disease"\n\n[agent]\nheartbeat_seconds = {HEARTBEAT_SECONDS}\n')
        site_configs[site] = credentials.config_path

    metrics_port = free_port()
    coordinator_config = write_coordinator_config(
        tmp_path / "coordinator.toml",
        url=broker_env.coordinator_url,
        sites=list(SITES),
        state_dir=tmp_path / "coordinator",
        metrics_port=metrics_port,
        keys_dir=broker_env.keys_dir,
        extra=f"""[strategy]
name = "fedbuff"
max_staleness = 20
buffer_size = 2
[training]
local_steps = 10
[liveness]
site_timeout_seconds = {SITE_TIMEOUT_SECONDS}
""",
    )

    prometheus_dir = tmp_path / "prometheus"
    prometheus_dir.mkdir()
    rules = rules_with_short_site_silence(yaml.safe_load(SHIPPED_ALERTS.read_text()))
    (prometheus_dir / "alerts.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    config = prometheus_config_for_test(
        yaml.safe_load(SHIPPED_PROMETHEUS_CONFIG.read_text()), metrics_port, "alerts.yml"
    )
    (prometheus_dir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    prometheus = PrometheusServer(
        prometheus_dir / "prometheus.yml", tmp_path / "tsdb", free_port(), tmp_path / "prometheus.log"
    )
    coordinator = CoordinatorProcess(
        coordinator_config, tmp_path / "coordinator", metrics_port, tmp_path / "coordinator.log"
    )
    agents = SiteAgentProcesses(tmp_path)
    try:
        prometheus.start(prometheus_binary)
        coordinator.start()
        for site, config_path in site_configs.items():
            agents.start(site, config_path)
        prometheus.wait_ready(PROMETHEUS_READY_TIMEOUT)
        coordinator.wait_ready()
        yield Federation(prometheus, coordinator, agents, tmp_path)
    finally:
        agents.stop_all()
        coordinator.stop()
        prometheus.stop()


# -------------------------------------------------------------------------------------------------- the test


def test_prometheus_sees_the_federation_progress_and_alerts_on_the_killed_site_only(
    federation: Federation,
) -> None:
    prometheus = federation.prometheus

    def applied_sites() -> set[str]:
        return {series["metric"]["site"] for series in prometheus.query("fedmq_updates_applied_total > 0")}

    def version() -> float:
        result = prometheus.query("fedmq_model_version")
        return float(result[0]["value"][1]) if result else -1.0

    def stored_versions() -> list[float]:
        """Every model version Prometheus stored so far, in scrape order."""
        result = prometheus.query("fedmq_model_version[5m]")
        return [float(value) for _, value in result[0]["values"]] if result else []

    # Prepare: a running federation, as Prometheus sees it: every site contributed, several versions made,
    # and no site-silent alert left over from the start (the coordinator reports sites down until they speak).
    poll_until(
        lambda: applied_sites() == set(SITES) and version() >= 4 and len(set(stored_versions())) >= 3,
        FEDERATION_TIMEOUT,
        lambda: (
            f"federation never progressed (applied {applied_sites()}, stored versions {stored_versions()}):\n"
            f"{federation.diagnostics()}"
        ),
    )
    poll_until(
        lambda: not prometheus.active_alerts(SITE_SILENT),
        FEDERATION_TIMEOUT,
        lambda: f"sites still silent: {prometheus.active_alerts(SITE_SILENT)}\n{federation.diagnostics()}",
    )
    versions = stored_versions()

    # Execute: SIGKILL one hospital's agent; watch the alerts Prometheus computes, every quarter second.
    killed_at = time.time()
    federation.agents.sigkill(KILLED_SITE)
    seen: list[tuple[float, str, str]] = []  # (time, site, state) of every active site-silent alert we saw

    def killed_site_fires() -> bool:
        now = time.time()
        alerts = prometheus.active_alerts(SITE_SILENT)
        seen.extend((now, alert["labels"].get("site", "?"), alert["state"]) for alert in alerts)
        return any(site == KILLED_SITE and state == "firing" for _, site, state in seen)

    poll_until(killed_site_fires, ALERT_TIMEOUT, lambda: f"never fired; seen {seen}\n{federation.diagnostics()}")
    firing_seconds = seen[-1][0] - killed_at
    window = math.ceil(time.time() - killed_at) + 2
    alert_series = prometheus.query(f'ALERTS{{alertname="{SITE_SILENT}"}}[{window}s]')
    status = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedmq",
            "status",
            "--url",
            f"http://127.0.0.1:{federation.coordinator.metrics_port}/metrics",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )

    # Assert: the model version, as stored by Prometheus, rose over time, and every site's updates were applied.
    assert versions == sorted(versions) and len(set(versions)) >= 3, versions
    assert versions[-1] >= 4
    # Assert: the alert, live, went pending then firing, for the killed site and no other.
    states = [state for _, site, state in seen if site == KILLED_SITE]
    assert states[0] == "pending" and states[-1] == "firing", seen
    assert {site for _, site, _ in seen} == {KILLED_SITE}, seen
    firing = [alert for alert in prometheus.active_alerts(SITE_SILENT) if alert["state"] == "firing"]
    assert [alert["labels"]["site"] for alert in firing] == [KILLED_SITE]
    assert firing[0]["labels"]["severity"] == "warning"
    # Assert: Prometheus's own record (the ALERTS series) agrees: pending strictly before firing, after the kill.
    after_kill = {
        (series["metric"]["site"], series["metric"]["alertstate"]): [
            float(at) for at, _ in series["values"] if float(at) >= killed_at
        ]
        for series in alert_series
    }
    after_kill = {key: times for key, times in after_kill.items() if times}
    assert set(after_kill) == {(KILLED_SITE, "pending"), (KILLED_SITE, "firing")}, after_kill
    assert max(after_kill[(KILLED_SITE, "pending")]) < min(after_kill[(KILLED_SITE, "firing")])
    # Assert: `fedmq status` against the live coordinator shows both sites, the killed one down.
    assert status.returncode == 0, status.stderr
    rows = {line.split()[0]: line.split() for line in status.stdout.splitlines() if line.split()}
    assert rows["cleveland"][1] == "up" and rows["hungary"][1] == "DOWN", status.stdout
    print(
        f"\nversions seen by Prometheus before the kill: {versions[0]:.0f} -> {versions[-1]:.0f}; "
        f"site-silent pending at +{min(after_kill[(KILLED_SITE, 'pending')]) - killed_at:.1f} s, "
        f"firing at +{min(after_kill[(KILLED_SITE, 'firing')]) - killed_at:.1f} s "
        f"(seen firing through /api/v1/alerts at +{firing_seconds:.1f} s)"
    )
