"""``fedmq status``: the screen an operator reads, rendered from a real coordinator's metrics exposition.

The metrics text comes from a real ``CoordinatorMetrics`` on a fresh registry, so a renamed metric or label in
coordinator/metrics.py breaks these tests rather than leaving the status screen silently empty.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest, start_http_server

from broker.node import free_tcp_ports
from coordinator.metrics import CoordinatorMetrics
from fedmq.cli import main
from fedmq.status import federation_status, read_samples, render, show_status

NOW = 1_700_000_000.0


def free_port() -> int:
    (port,) = free_tcp_ports(1)
    return port


def busy_federation(registry: CollectorRegistry) -> CoordinatorMetrics:
    """Two hospitals, one of them down with stale updates, an unknown sender, and evaluations."""
    metrics = CoordinatorMetrics(registry, clock=lambda: NOW)
    metrics.info.labels(strategy="fedbuff", task="heart-disease", version="0.1.0").set(1)
    metrics.max_staleness.set(20)
    metrics.buffer_fill.set(1)
    metrics.buffer_capacity.set(2)
    metrics.new_version(7, at=NOW - 42)
    for site, up, last_seen, applied in (("cleveland", 1, NOW - 3, 12), ("hungary", 0, NOW - 95, 4)):
        metrics.site_up.labels(site=site).set(up)
        metrics.site_last_seen.labels(site=site).set(last_seen)
        metrics.updates_applied.labels(site=site).inc(applied)
    metrics.updates_rejected.labels(site="hungary", reason="stale").inc(2)
    metrics.updates_rejected.labels(site="hungary", reason="duplicate").inc()
    metrics.updates_rejected.labels(site="unknown", reason="unknown-site").inc()
    metrics.eval_metric.labels(site="cleveland", metric="accuracy").set(0.8125)
    metrics.eval_metric.labels(site="cleveland", metric="loss").set(0.45)
    metrics.eval_global.labels(metric="accuracy", aggregate="mean").set(0.701)
    metrics.eval_global.labels(metric="accuracy", aggregate="pooled").set(0.752)
    return metrics


def row_of(screen: str, site: str) -> str:
    rows = [line for line in screen.splitlines() if line.startswith(site + " ")]
    assert len(rows) == 1, screen
    return rows[0]


def test_screen_shows_version_buffer_every_site_and_the_global_evaluation() -> None:
    # Prepare
    registry = CollectorRegistry()
    busy_federation(registry)
    text = generate_latest(registry).decode()

    # Execute
    screen = render(federation_status(read_samples(text, "test"), local_now=NOW), "http://coordinator/metrics")

    # Assert
    assert "task heart-disease, strategy fedbuff, max staleness 20" in screen
    assert "model version 7" in screen and "last new version 42 s ago" in screen
    assert "buffer 1/2" in screen and "sites up 1/2" in screen
    cleveland, hungary = row_of(screen, "cleveland").split(), row_of(screen, "hungary").split()
    assert cleveland[:5] == ["cleveland", "up", "3", "s", "ago"] and "12" in cleveland
    assert "0.812" in cleveland and "0.450" in cleveland
    assert hungary[:4] == ["hungary", "DOWN", "95", "s"] and "4" in hungary
    assert "duplicate 1, stale 2" in row_of(screen, "hungary")
    assert "unknown-site 1" in row_of(screen, "unknown")
    assert row_of(screen, "accuracy").split() == ["accuracy", "0.701", "0.752"]


def test_last_seen_is_measured_on_the_coordinators_clock_not_the_terminals() -> None:
    # Prepare: the terminal's clock is an hour ahead of the coordinator's.
    registry = CollectorRegistry()
    busy_federation(registry)
    text = generate_latest(registry).decode()

    # Execute
    status = federation_status(read_samples(text, "test"), local_now=NOW + 3600)

    # Assert
    ago = {site.site: site.last_seen_seconds_ago for site in status.sites}
    assert ago["cleveland"] == pytest.approx(3.0) and ago["hungary"] == pytest.approx(95.0)


def test_a_coordinator_that_has_heard_from_no_one_yet_says_so() -> None:
    # Prepare: what a freshly started coordinator exports for its known sites.
    registry = CollectorRegistry()
    metrics = CoordinatorMetrics(registry, clock=lambda: NOW)
    for site in ("cleveland", "hungary"):
        metrics.site_up.labels(site=site).set(0)
    text = generate_latest(registry).decode()

    # Execute
    screen = render(federation_status(read_samples(text, "test"), local_now=NOW), "test")

    # Assert
    assert "model version 0" in screen and "sites up 0/2" in screen
    assert row_of(screen, "cleveland").split()[:3] == ["cleveland", "DOWN", "never"]
    assert "global evaluation: none yet" in screen


@pytest.fixture
def served_registry() -> Iterator[tuple[CollectorRegistry, str]]:
    """A registry served over HTTP exactly as the coordinator serves its own (prometheus_client's server)."""
    registry = CollectorRegistry()
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        yield registry, f"http://127.0.0.1:{port}/metrics"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_fedmq_status_reads_a_live_endpoint(
    served_registry: tuple[CollectorRegistry, str], capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    registry, url = served_registry
    busy_federation(registry)

    # Execute
    exit_code = main(["status", "--url", url])

    # Assert
    out = capsys.readouterr().out
    assert exit_code == 0
    assert f"fedmq coordinator at {url}" in out and "model version 7" in out
    assert "cleveland" in out and "hungary" in out


def test_unreachable_endpoint_is_one_clear_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: a port nobody listens on.
    port = free_port()

    # Execute
    exit_code = main(["status", "--port", str(port)])

    # Assert
    captured = capsys.readouterr()
    assert exit_code == 1
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot reach http://127.0.0.1:{port}/metrics")


def test_an_endpoint_without_fedmq_metrics_is_refused(
    served_registry: tuple[CollectorRegistry, str], capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a metrics endpoint, but an empty one (e.g. RabbitMQ's port by mistake would look similar).
    _, url = served_registry

    # Execute
    exit_code = main(["status", "--url", url])

    # Assert
    err = capsys.readouterr().err
    assert exit_code == 1 and "fedmq_model_version" in err and len(err.strip().splitlines()) == 1


def test_watch_redraws_with_new_values_survives_a_restart_and_ends_on_ctrl_c(
    served_registry: tuple[CollectorRegistry, str],
) -> None:
    # Prepare: between refreshes the model moves on, then the endpoint goes away, then the operator hits Ctrl-C.
    registry, url = served_registry
    metrics = busy_federation(registry)
    out, err = io.StringIO(), io.StringIO()
    naps: list[float] = []

    def sleep(seconds: float) -> None:
        naps.append(seconds)
        if len(naps) == 1:
            metrics.new_version(8, at=NOW)
        elif len(naps) == 2:
            registry.unregister(metrics.model_version)  # the endpoint stops looking like a coordinator
        else:
            raise KeyboardInterrupt

    # Execute
    exit_code = show_status(url, 2.0, out=out, err=err, clock=lambda: NOW, sleep=sleep)

    # Assert
    screens = out.getvalue().split("\x1b[H\x1b[2J")[1:]
    assert exit_code == 0 and naps == [2.0, 2.0, 2.0] and len(screens) == 3
    assert "model version 7" in screens[0] and "model version 8" in screens[1]
    assert screens[2].startswith("error: ") and "every 2 s" in screens[2]
    assert err.getvalue() == ""
