"""``fedmq status``: one terminal screen about a running federation, read from the coordinator's /metrics.

It reads the same endpoint Prometheus scrapes, so it needs no broker login, no state dir and no Prometheus:
an operator on the coordinator's host (or anyone who can reach the port) sees the model version, how long
since the last one, the buffer, every hospital (up/down, last seen, updates applied, rejections by reason,
latest evaluation) and the global evaluation (mean over hospitals and pooled). ``--watch N`` redraws every
N seconds until Ctrl-C.

Errors::

    StatusError                 the endpoint cannot be read or does not serve a fedmq coordinator's metrics
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO

from prometheus_client.parser import text_string_to_metric_families

DEFAULT_PORT = 9464
FETCH_TIMEOUT_SECONDS = 5.0
CLEAR_SCREEN = "\x1b[H\x1b[2J"
# Evaluation metrics shown first, in this order; any other metric a task reports follows alphabetically.
PREFERRED_METRICS = ("accuracy", "loss", "num_examples")


class StatusError(Exception):
    """The coordinator's metrics could not be read; the message is one line naming the URL and the cause."""


@dataclass(frozen=True)
class SiteStatus:
    """One hospital as the coordinator sees it."""

    site: str
    up: bool | None  # None: the coordinator does not know the site (e.g. the "unknown" sender of rejections)
    last_seen_seconds_ago: float | None
    updates_applied: int
    rejections: dict[str, int] = field(default_factory=dict)
    evaluation: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class FederationStatus:
    """What ``fedmq status`` shows, taken from one scrape."""

    model_version: int
    seconds_since_last_version: float | None
    buffer_fill: int | None
    buffer_capacity: int | None
    strategy: str
    task: str
    max_staleness: int | None
    sites: tuple[SiteStatus, ...]
    global_evaluation: dict[str, dict[str, float]]  # metric -> aggregate ("mean", "pooled") -> value


Samples = dict[str, list[tuple[dict[str, str], float]]]


def metrics_url(port: int, host: str = "127.0.0.1") -> str:
    return f"http://{host}:{port}/metrics"


def fetch_metrics_text(url: str, timeout: float = FETCH_TIMEOUT_SECONDS) -> str:
    """The endpoint's text exposition; every network failure becomes one StatusError line."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body: bytes = response.read()
    except urllib.error.HTTPError as exc:
        raise StatusError(f"cannot read {url}: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise StatusError(f"cannot reach {url}: {exc.reason}") from exc
    except (OSError, ValueError) as exc:  # timeouts, resets, a malformed URL
        raise StatusError(f"cannot reach {url}: {exc}") from exc
    return body.decode("utf-8", errors="replace")


def read_samples(text: str, source: str) -> Samples:
    """Samples by name, parsed with prometheus_client's own parser (so we read exactly what Prometheus would)."""
    samples: Samples = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    except ValueError as exc:
        raise StatusError(f"{source} does not serve Prometheus metrics: {exc}") from exc
    if "fedmq_model_version" not in samples:
        raise StatusError(f"{source} serves no fedmq_model_version: is it a fedmq coordinator's metrics endpoint?")
    return samples


def _single(samples: Samples, name: str) -> float | None:
    values = [value for _, value in samples.get(name, [])]
    return values[0] if values and math.isfinite(values[0]) else None


def _by_site(samples: Samples, name: str) -> dict[str, float]:
    return {labels["site"]: value for labels, value in samples.get(name, []) if "site" in labels}


def coordinator_now(samples: Samples, local_now: float) -> float:
    """The coordinator's clock at scrape time when the metrics reveal it, else ours.

    "Last seen" is a unix timestamp taken by the coordinator; measuring it against the coordinator's own
    clock (last version time + seconds since it) keeps the "ago" column right when this terminal's clock is off.
    """
    last_version_at = _single(samples, "fedmq_last_version_timestamp_seconds")
    since = _single(samples, "fedmq_seconds_since_last_version")
    if last_version_at and since is not None:
        return last_version_at + since
    return local_now


def federation_status(samples: Samples, local_now: float) -> FederationStatus:
    now = coordinator_now(samples, local_now)
    up = _by_site(samples, "fedmq_site_up")
    last_seen = _by_site(samples, "fedmq_site_last_seen_timestamp_seconds")
    applied = _by_site(samples, "fedmq_updates_applied_total")
    rejections: dict[str, dict[str, int]] = {}
    for labels, value in samples.get("fedmq_updates_rejected_total", []):
        site, reason = labels.get("site", "?"), labels.get("reason", "?")
        rejections.setdefault(site, {})[reason] = int(value)
    evaluation: dict[str, dict[str, float]] = {}
    for labels, value in samples.get("fedmq_eval_metric", []):
        evaluation.setdefault(labels.get("site", "?"), {})[labels.get("metric", "?")] = value
    global_evaluation: dict[str, dict[str, float]] = {}
    for labels, value in samples.get("fedmq_eval_global", []):
        global_evaluation.setdefault(labels.get("metric", "?"), {})[labels.get("aggregate", "?")] = value

    site_names = sorted(set(up) | set(applied) | set(rejections) | set(evaluation))
    sites = tuple(
        SiteStatus(
            site=site,
            up=bool(up[site]) if site in up else None,
            last_seen_seconds_ago=max(0.0, now - last_seen[site]) if site in last_seen else None,
            updates_applied=int(applied.get(site, 0)),
            rejections=dict(sorted(rejections.get(site, {}).items())),
            evaluation=evaluation.get(site, {}),
        )
        for site in site_names
    )
    info = samples.get("fedmq_coordinator_info", [({}, 1.0)])[0][0]
    fill, capacity = _single(samples, "fedmq_buffer_fill"), _single(samples, "fedmq_buffer_capacity")
    max_staleness = _single(samples, "fedmq_max_staleness")
    return FederationStatus(
        model_version=int(_single(samples, "fedmq_model_version") or 0),
        seconds_since_last_version=_single(samples, "fedmq_seconds_since_last_version"),
        buffer_fill=None if fill is None else int(fill),
        buffer_capacity=None if capacity is None else int(capacity),
        strategy=info.get("strategy", "?"),
        task=info.get("task", "?"),
        max_staleness=None if max_staleness is None else int(max_staleness),
        sites=sites,
        global_evaluation=global_evaluation,
    )


# ------------------------------------------------------------------------------------------------- rendering


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def format_metric(name: str, value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    if name == "num_examples":
        return f"{value:.0f}"
    return f"{value:.3f}"


def ordered_metrics(names: Iterable[str]) -> list[str]:
    unique = set(names)
    return [name for name in PREFERRED_METRICS if name in unique] + sorted(unique - set(PREFERRED_METRICS))


def _table(rows: list[list[str]], numeric_columns: set[int]) -> list[str]:
    """Columns padded to their widest cell; numbers right-aligned so digits line up."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(width) if column in numeric_columns else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def render(status: FederationStatus, source: str) -> str:
    """The screen, as plain text (no colours, so it reads the same in a log or over ssh)."""
    since = status.seconds_since_last_version
    buffer = "-" if status.buffer_fill is None else f"{status.buffer_fill}/{status.buffer_capacity or '?'}"
    up_count = sum(1 for site in status.sites if site.up)
    known_count = sum(1 for site in status.sites if site.up is not None)
    lines = [
        f"fedmq coordinator at {source}",
        f"task {status.task}, strategy {status.strategy}"
        + ("" if status.max_staleness is None else f", max staleness {status.max_staleness}"),
        f"model version {status.model_version}   last new version "
        f"{'-' if since is None else format_duration(since)}   buffer {buffer}   sites up {up_count}/{known_count}",
        "",
    ]
    metric_names = ordered_metrics(name for site in status.sites for name in site.evaluation)
    header = ["site", "state", "last seen", "applied", *metric_names, "rejected"]
    rows = [header]
    for site in status.sites:
        state = "-" if site.up is None else ("up" if site.up else "DOWN")
        rejected = ", ".join(f"{reason} {count}" for reason, count in site.rejections.items()) or "-"
        rows.append(
            [
                site.site,
                state,
                format_duration(site.last_seen_seconds_ago),
                str(site.updates_applied),
                *(format_metric(name, site.evaluation.get(name)) for name in metric_names),
                rejected,
            ]
        )
    if len(rows) == 1:
        lines.append("no sites known yet")
    else:
        table = _table(rows, numeric_columns=set(range(3, 4 + len(metric_names))))
        lines.extend([table[0], "-" * max(len(line) for line in table), *table[1:]])
    lines.append("")
    if status.global_evaluation:
        lines.append("global evaluation (over each site's latest report)")
        global_rows = [["metric", "mean over sites", "pooled"]]
        for name in ordered_metrics(status.global_evaluation):
            values = status.global_evaluation[name]
            global_rows.append(
                [name, format_metric(name, values.get("mean")), format_metric(name, values.get("pooled"))]
            )
        lines.extend(_table(global_rows, numeric_columns={1, 2}))
    else:
        lines.append("global evaluation: none yet")
    return "\n".join(lines) + "\n"


def status_screen(url: str, local_now: float) -> str:
    text = fetch_metrics_text(url)
    return render(federation_status(read_samples(text, url), local_now), url)


# ------------------------------------------------------------------------------------------------------- CLI


def register(subcommands: Any) -> None:
    status = subcommands.add_parser(
        "status",
        help="show the federation on one screen, from the coordinator's metrics endpoint",
        description="Model version, buffer, every site (up/down, last seen, updates, rejections, evaluation) "
        "and the global evaluation, read from the coordinator's /metrics (the endpoint Prometheus scrapes).",
    )
    status.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"the coordinator's [metrics] port (default {DEFAULT_PORT})"
    )
    status.add_argument("--url", help="full metrics URL (default http://127.0.0.1:PORT/metrics)")
    status.add_argument(
        "--watch", type=float, metavar="N", help="redraw every N seconds until Ctrl-C (default: show once)"
    )
    status.set_defaults(handler=status_command)


def status_command(args: argparse.Namespace) -> int:
    url = args.url or metrics_url(args.port)
    if args.watch is not None and args.watch <= 0:
        print("error: --watch needs a positive number of seconds", file=sys.stderr)
        return 2
    return show_status(url, args.watch)


def show_status(
    url: str,
    watch_seconds: float | None,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Print the screen once, or redraw it until Ctrl-C.

    The first read must succeed (a wrong URL should fail fast, exit 1); once watching, a failed read is shown on
    the screen and retried, so a coordinator restart does not end the watch.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        screen = status_screen(url, clock())
    except StatusError as exc:
        print(f"error: {exc}", file=err)
        return 1
    if watch_seconds is None:
        out.write(screen)
        return 0
    try:
        while True:
            stamp = time.strftime("%H:%M:%S", time.localtime(clock()))
            out.write(f"{CLEAR_SCREEN}{screen}\nrefreshed {stamp}, every {watch_seconds:g} s (Ctrl-C to quit)\n")
            out.flush()
            sleep(watch_seconds)
            try:
                screen = status_screen(url, clock())
            except StatusError as exc:
                screen = f"error: {exc}\n"
    except KeyboardInterrupt:
        out.write("\n")
    return 0
