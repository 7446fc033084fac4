"""Prometheus configuration and alert rules: valid for promtool, and every alert proven by promtool unit tests.

An alert that never fires (a wrong metric name, a threshold in the wrong unit) is worse than none: the ops team
trusts the silence. ops/prometheus/alerts_test.yml holds a firing and a silent case for every rule; these
tests run it, and also show that it catches a broken threshold.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.test_ops_grafana import (
    FEDMQ_EXPORTED_METRICS,
    metric_names_in,
    rabbitmq_exported_metric_names,
    run_promtool,
)

pytestmark = pytest.mark.prometheus

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO_ROOT / "ops" / "prometheus"
ALERTS_PATH = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST_PATH = PROMETHEUS_DIR / "alerts_test.yml"
DOCKER_PROMETHEUS_CONFIG_PATH = REPO_ROOT / "ops" / "docker" / "prometheus.yml"

REQUIRED_ALERTS = {
    "FedmqSiteSilent",
    "FedmqNoNewModel",
    "FedmqRejectedUpdatesHigh",
    "FedmqStalenessHigh",
    "FedmqCoordinatorDown",
    "FedmqUpdateReturnedRepeatedly",
    "FedmqStateDirLowSpace",
    "FedmqStateDirFillingUp",
    "FedmqCommitsDeferred",
    "FedmqDeadLetterQueueGrowing",
    "RabbitmqMemoryAlarm",
    "RabbitmqDiskAlarm",
    "FedmqUpdateQueueBacklog",
    "FedmqSiteUpdatesAnomalous",
}
# Series Prometheus writes itself for every target.
PROMETHEUS_SYNTHETIC_METRICS = {"up"}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS_PATH)["groups"] for rule in group["rules"] if "alert" in rule]


def test_prometheus_config_and_its_rule_files_are_valid() -> None:
    # Execute
    result = run_promtool("check", "config", "prometheus.yml", cwd=PROMETHEUS_DIR)

    # Assert
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(REQUIRED_ALERTS)} rules found" in result.stdout


def scrape_targets(config_path: Path) -> dict[str, list[str]]:
    """Job name -> static targets of one Prometheus config."""
    return {
        job["job_name"]: [target for static in job["static_configs"] for target in static["targets"]]
        for job in load_yaml(config_path)["scrape_configs"]
    }


def test_prometheus_configs_scrape_the_coordinator_and_rabbitmq() -> None:
    # Execute
    host_targets = scrape_targets(PROMETHEUS_DIR / "prometheus.yml")
    compose_targets = scrape_targets(DOCKER_PROMETHEUS_CONFIG_PATH)

    # Assert: the job names are what the alert rules select on.
    assert host_targets == {"fedmq-coordinator": ["localhost:9464"], "rabbitmq": ["localhost:15692"]}
    assert compose_targets == {"fedmq-coordinator": ["coordinator:9464"], "rabbitmq": ["rabbitmq:15692"]}
    assert load_yaml(DOCKER_PROMETHEUS_CONFIG_PATH)["rule_files"] == ["alerts.yml"]


def test_docker_prometheus_config_is_valid_with_the_shared_rules(tmp_path: Path) -> None:
    # Prepare: the compose file mounts both files side by side into /etc/prometheus/.
    shutil.copy(DOCKER_PROMETHEUS_CONFIG_PATH, tmp_path / "prometheus.yml")
    shutil.copy(ALERTS_PATH, tmp_path / "alerts.yml")

    # Execute
    result = run_promtool("check", "config", "prometheus.yml", cwd=tmp_path)

    # Assert
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_are_valid() -> None:
    # Execute
    result = run_promtool("check", "rules", "alerts.yml", cwd=PROMETHEUS_DIR)

    # Assert
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rule_unit_tests_pass() -> None:
    # Execute
    result = run_promtool("test", "rules", "alerts_test.yml", cwd=PROMETHEUS_DIR)

    # Assert
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize(
    ("alert", "original", "broken"),
    [
        ("FedmqSiteSilent", "time() - fedmq_site_last_seen_timestamp_seconds > 600", "time() - x > 600"),
        ("FedmqStalenessHigh", "0.8 * fedmq_max_staleness", "8 * fedmq_max_staleness"),
        ("FedmqCoordinatorDown", 'absent(up{job="fedmq-coordinator"})', 'absent(up{job="coordinator"})'),
    ],
)
def test_alert_unit_tests_catch_a_broken_rule(alert: str, original: str, broken: str, tmp_path: Path) -> None:
    # Prepare: a copy of the rules with one expression broken the way a typo would break it.
    rules_text = ALERTS_PATH.read_text(encoding="utf-8")
    assert rules_text.count(original) == 1, f"{alert}: the expression to break is not in alerts.yml"
    (tmp_path / "alerts.yml").write_text(rules_text.replace(original, broken), encoding="utf-8")
    shutil.copy(ALERTS_TEST_PATH, tmp_path / "alerts_test.yml")

    # Execute
    result = run_promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)

    # Assert
    assert result.returncode != 0
    assert alert in result.stdout + result.stderr


def test_every_required_alert_exists_with_for_severity_and_annotations() -> None:
    # Execute
    rules = alert_rules()
    incomplete = [
        rule["alert"]
        for rule in rules
        if not rule.get("for")
        or rule.get("labels", {}).get("severity") not in {"warning", "critical"}
        or not rule.get("annotations", {}).get("summary")
        or not rule.get("annotations", {}).get("description")
    ]

    # Assert
    assert {rule["alert"] for rule in rules} == REQUIRED_ALERTS
    assert incomplete == []


def test_every_alert_has_a_firing_and_a_silent_unit_test() -> None:
    # Prepare
    cases = [case for test in load_yaml(ALERTS_TEST_PATH)["tests"] for case in test["alert_rule_test"]]

    # Execute
    firing = {case["alertname"] for case in cases if case.get("exp_alerts")}
    silent = {case["alertname"] for case in cases if not case.get("exp_alerts")}

    # Assert
    assert REQUIRED_ALERTS - firing == set()
    assert REQUIRED_ALERTS - silent == set()


def test_alert_rules_use_only_metrics_that_fedmq_or_rabbitmq_export() -> None:
    # Prepare
    exported = set(FEDMQ_EXPORTED_METRICS) | rabbitmq_exported_metric_names() | PROMETHEUS_SYNTHETIC_METRICS

    # Execute
    unknown = [
        (rule["alert"], name)
        for rule in alert_rules()
        for name in sorted(metric_names_in(rule["expr"]))
        if name not in exported
    ]

    # Assert
    assert unknown == []
