"""The Grafana dashboard: every query parses and asks for metrics that really exist.

A panel whose PromQL has a typo or names a metric nobody exports shows "No data" forever, which an operator
reads as "all quiet". These tests parse every panel query with promtool and hold each metric name to a
contract: the names the coordinator exports (below) and the names RabbitMQ 3.10's rabbitmq_prometheus plugin
was seen to export (ops/prometheus/rabbitmq_metric_names.txt).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DASHBOARD_PATH = REPO_ROOT / "ops" / "grafana" / "dashboards" / "fedmq.json"
DATASOURCE_PROVISIONING_PATH = REPO_ROOT / "ops" / "grafana" / "provisioning" / "datasources" / "fedmq.yml"
DASHBOARD_PROVISIONING_PATH = REPO_ROOT / "ops" / "grafana" / "provisioning" / "dashboards" / "fedmq.yml"
RABBITMQ_METRIC_NAMES_PATH = REPO_ROOT / "ops" / "prometheus" / "rabbitmq_metric_names.txt"

# The contract with coordinator/metrics: every sample name the coordinator exports, with its labels
# (job and instance are added by Prometheus). Counters appear as *_total, histograms as *_bucket/_sum/_count.
# A later test should cross-check this table against the coordinator's real CollectorRegistry.
_STALENESS_LABELS = frozenset({"site"})
FEDMQ_EXPORTED_METRICS: dict[str, frozenset[str]] = {
    "fedmq_model_version": frozenset(),
    "fedmq_updates_received_total": frozenset({"site"}),
    "fedmq_updates_applied_total": frozenset({"site"}),
    "fedmq_updates_rejected_total": frozenset({"site", "reason"}),
    "fedmq_updates_redelivered_total": frozenset({"site"}),
    "fedmq_update_delivery_count_max": frozenset(),
    "fedmq_status_errors_total": frozenset({"site"}),
    "fedmq_status_rejected_total": frozenset({"site", "kind", "reason"}),
    "fedmq_update_staleness_bucket": frozenset({"site", "le"}),
    "fedmq_update_staleness_sum": _STALENESS_LABELS,
    "fedmq_update_staleness_count": _STALENESS_LABELS,
    "fedmq_max_staleness": frozenset(),
    "fedmq_update_anomaly_score": frozenset({"site"}),
    "fedmq_updates_clipped_total": frozenset({"site"}),
    "fedmq_aggregation_seconds_bucket": frozenset({"le"}),
    "fedmq_aggregation_seconds_sum": frozenset(),
    "fedmq_aggregation_seconds_count": frozenset(),
    "fedmq_checkpoint_seconds_bucket": frozenset({"le"}),
    "fedmq_checkpoint_seconds_sum": frozenset(),
    "fedmq_checkpoint_seconds_count": frozenset(),
    "fedmq_checkpoint_bytes": frozenset(),
    "fedmq_commit_bytes": frozenset(),
    "fedmq_commits_deferred_total": frozenset(),
    "fedmq_state_dir_free_bytes": frozenset(),
    "fedmq_state_dir_reserve_bytes": frozenset(),
    "fedmq_buffer_fill": frozenset(),
    "fedmq_buffer_capacity": frozenset(),
    "fedmq_update_size_bytes_bucket": frozenset({"site", "le"}),
    "fedmq_update_size_bytes_sum": frozenset({"site"}),
    "fedmq_update_size_bytes_count": frozenset({"site"}),
    "fedmq_site_last_seen_timestamp_seconds": frozenset({"site"}),
    "fedmq_site_up": frozenset({"site"}),
    "fedmq_sites_registered": frozenset(),
    "fedmq_eval_metric": frozenset({"site", "metric"}),
    "fedmq_eval_global": frozenset({"metric", "aggregate"}),
    "fedmq_last_version_timestamp_seconds": frozenset(),
    "fedmq_seconds_since_last_version": frozenset(),
    "fedmq_coordinator_info": frozenset({"strategy", "task", "version"}),
}
TARGET_LABELS = frozenset({"job", "instance"})

# Grafana's own interval variables, replaced by a duration so that promtool can parse the query.
GRAFANA_INTERVAL_VARIABLES = ("$__rate_interval", "$__interval", "$__range")

_PROMQL_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}
)
_PROMQL_LITERALS = frozenset({"inf", "nan"})
_STRING_LITERAL = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING_CLAUSE = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![A-Za-z0-9_:.])[A-Za-z_:][A-Za-z0-9_:]*")
_SELECTOR = re.compile(r"(?<![A-Za-z0-9_:])([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER_LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")


def metric_names_in(expression: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords and label names left out)."""
    text = _STRING_LITERAL.sub('""', expression)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _GROUPING_CLAUSE.sub(" ", text)
    names: set[str] = set()
    for match in _IDENTIFIER.finditer(text):
        name = match.group(0)
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation operator
        if name in _PROMQL_KEYWORDS or name.lower() in _PROMQL_LITERALS:
            continue
        names.add(name)
    return names


def variable_query_metric_names(query: str) -> set[str]:
    """Metric names in a Grafana variable query: label_values(SELECTOR, LABEL) or query_result(PROMQL)."""
    label_values = re.fullmatch(r"\s*label_values\((.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*", query)
    if label_values:
        return metric_names_in(label_values.group(1))
    query_result = re.fullmatch(r"\s*query_result\((.*)\)\s*", query)
    return metric_names_in(query_result.group(1) if query_result else query)


def selector_labels_in(expression: str) -> dict[str, set[str]]:
    """For each metric selected with matchers, the label names its matchers use."""
    text = _STRING_LITERAL.sub('""', expression)
    labels: dict[str, set[str]] = {}
    for match in _SELECTOR.finditer(text):
        labels.setdefault(match.group(1), set()).update(_MATCHER_LABEL.findall(match.group(2)))
    return labels


def rabbitmq_exported_metric_names() -> frozenset[str]:
    lines = RABBITMQ_METRIC_NAMES_PATH.read_text(encoding="utf-8").splitlines()
    return frozenset(line.strip() for line in lines if line.strip() and not line.startswith("#"))


def require_promtool() -> str:
    """promtool comes from Debian's `prometheus` package; .ci/run installs it, so its absence is a failure."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: install Debian's prometheus package (apt-get install prometheus)")
    return promtool


def run_promtool(*arguments: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_promtool(), *arguments], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD_PATH.read_text(encoding="utf-8"))
    return dashboard


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [panel for panel in iter_panels(dashboard["panels"]) if panel["type"] != "row"]


def dashboard_variable_names(dashboard: dict[str, Any]) -> list[str]:
    return [variable["name"] for variable in dashboard["templating"]["list"]]


def as_plain_promql(expression: str, variable_names: list[str]) -> str:
    """Replace Grafana's variables the way Grafana would, with durations and an all-matching regex."""
    for interval_variable in GRAFANA_INTERVAL_VARIABLES:
        expression = expression.replace(interval_variable, "5m")
    # Longest names first so that $site does not eat the start of a $site_group.
    for name in sorted(variable_names, key=len, reverse=True):
        expression = expression.replace("${" + name + "}", ".*").replace("$" + name, ".*")
    return expression


def panel_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target, Grafana variables replaced."""
    variable_names = dashboard_variable_names(dashboard)
    return [
        (
            f"panel {panel['id']} {panel['title']!r} target {target['refId']}",
            as_plain_promql(target["expr"], variable_names),
        )
        for panel in query_panels(dashboard)
        for target in panel["targets"]
    ]


def test_metric_name_extraction_finds_selected_metrics_only() -> None:
    # Prepare: an expression using functions, grouping, matchers with regexes, a range and a number.
    expression = (
        'histogram_quantile(0.9, sum by (site, le) (rate(fedmq_update_staleness_bucket{site=~"a|b"}[5m])))'
        ' > on (job, instance) 0.8 * fedmq_max_staleness or absent(up{job="x"}) and time() - 1e3'
    )

    # Execute
    names = metric_names_in(expression)
    labels = selector_labels_in(expression)
    variable_names = variable_query_metric_names('label_values(fedmq_eval_metric{site="a"}, metric)')

    # Assert
    assert names == {"fedmq_update_staleness_bucket", "fedmq_max_staleness", "up"}
    assert labels == {"fedmq_update_staleness_bucket": {"site"}, "up": {"job"}}
    assert variable_names == {"fedmq_eval_metric"}


def test_contract_matches_the_coordinators_registry() -> None:
    # Prepare: the coordinator's metrics on a fresh registry, as the service builds them.
    from prometheus_client import CollectorRegistry

    from coordinator.metrics import CoordinatorMetrics

    registry = CollectorRegistry()
    CoordinatorMetrics(registry)
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}

    # Execute
    exported = {family.name + suffix for family in registry.collect() for suffix in suffixes[family.type]}

    # Assert
    assert exported == set(FEDMQ_EXPORTED_METRICS)


def test_every_panel_has_a_title_and_the_provisioned_datasource() -> None:
    # Prepare
    dashboard = load_dashboard()
    provisioned = yaml.safe_load(DATASOURCE_PROVISIONING_PATH.read_text(encoding="utf-8"))
    provisioned_uids = {datasource["uid"] for datasource in provisioned["datasources"]}

    # Execute
    panels = list(iter_panels(dashboard["panels"]))
    untitled = [panel["id"] for panel in panels if not str(panel.get("title", "")).strip()]
    wrong_datasource = [
        panel["title"]
        for panel in query_panels(dashboard)
        for source in [panel.get("datasource"), *(target.get("datasource") for target in panel["targets"])]
        if not source or source.get("type") != "prometheus" or source.get("uid") not in provisioned_uids
    ]

    # Assert
    assert len(query_panels(dashboard)) >= 8
    assert untitled == []
    assert wrong_datasource == []
    assert all(panel["targets"] for panel in query_panels(dashboard)), "a panel without a query shows nothing"
    assert len({panel["id"] for panel in panels}) == len(panels), "Grafana needs unique panel ids"


def test_every_panel_query_parses_with_promtool(tmp_path: Path) -> None:
    # Prepare: one recording rule per panel target; JSON is valid YAML, so no YAML writer is needed.
    queries = panel_queries(load_dashboard())
    groups = [
        {"name": where, "rules": [{"record": f"dashboard_check:query_{index}", "expr": expression}]}
        for index, (where, expression) in enumerate(queries)
    ]
    rules_path = tmp_path / "dashboard_queries.yml"
    rules_path.write_text(json.dumps({"groups": groups}), encoding="utf-8")

    # Execute
    result = run_promtool("check", "rules", str(rules_path), cwd=tmp_path)

    # Assert
    assert all("$" not in expression for _, expression in queries), "a Grafana variable was left unreplaced"
    assert result.returncode == 0, f"a panel query does not parse:\n{result.stdout}\n{result.stderr}"
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


def test_panel_queries_use_only_metrics_that_fedmq_or_rabbitmq_export() -> None:
    # Prepare
    dashboard = load_dashboard()
    exported = set(FEDMQ_EXPORTED_METRICS) | rabbitmq_exported_metric_names()
    variables = dashboard["templating"]["list"]

    # Execute
    unknown_metrics = [
        (where, name)
        for where, expression in panel_queries(dashboard)
        for name in sorted(metric_names_in(expression))
        if name not in exported
    ]
    unknown_variable_metrics = [
        (variable["name"], name)
        for variable in variables
        for name in sorted(variable_query_metric_names(variable["query"]["query"]))
        if name not in exported
    ]
    unknown_labels = [
        (where, metric, label)
        for where, expression in panel_queries(dashboard)
        for metric, labels in selector_labels_in(expression).items()
        if metric in FEDMQ_EXPORTED_METRICS
        for label in sorted(labels - FEDMQ_EXPORTED_METRICS[metric] - TARGET_LABELS)
    ]

    # Assert
    assert unknown_metrics == []
    assert unknown_variable_metrics == []
    assert all(variable_query_metric_names(variable["query"]["query"]) for variable in variables)
    assert unknown_labels == []


def test_dashboard_shows_what_the_operators_asked_for() -> None:
    # Prepare: the views the issue names, each as the metric that carries it.
    required_metrics = {
        "model version over time": "fedmq_model_version",
        "updates per hospital": "fedmq_updates_applied_total",
        "staleness distribution": "fedmq_update_staleness_bucket",
        "rejections by reason": "fedmq_updates_rejected_total",
        "sites up/down": "fedmq_site_up",
        "evaluation per hospital": "fedmq_eval_metric",
        "evaluation mean and pooled": "fedmq_eval_global",
        "queue depths": "rabbitmq_queue_messages_ready",
        "dead-letter queue": "rabbitmq_queue_messages",
        "seconds since last version": "fedmq_seconds_since_last_version",
    }
    dashboard = load_dashboard()

    # Execute
    used = {name for _, expression in panel_queries(dashboard) for name in metric_names_in(expression)}
    heatmaps = [panel for panel in query_panels(dashboard) if panel["type"] == "heatmap"]

    # Assert
    assert {view: metric for view, metric in required_metrics.items() if metric not in used} == {}
    assert [target["format"] for panel in heatmaps for target in panel["targets"]] == ["heatmap"]


def test_dashboard_provisioning_points_at_the_dashboard_folder() -> None:
    # Prepare
    provisioning = yaml.safe_load(DASHBOARD_PROVISIONING_PATH.read_text(encoding="utf-8"))

    # Execute
    providers = provisioning["providers"]

    # Assert
    assert provisioning["apiVersion"] == 1
    assert [provider["type"] for provider in providers] == ["file"]
    assert providers[0]["options"]["path"] == "/var/lib/grafana/dashboards/fedmq"
    assert load_dashboard()["uid"] == "fedmq-overview"
