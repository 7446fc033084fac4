"""``fedmq bench scale``: one coordinator against 10, 50, 100 and 200 sites.

Every site is provisioned as a real broker user (``fedmq broker add-site``'s code: own user, permissions,
inbox and control queue) and keeps its own AMQP connection open for the whole measurement, sending a heartbeat
every ``--heartbeat`` seconds, as a site agent does. For each site count the sites' update queues are pre-filled
with the same number of updates (spread round-robin over the sites, each with its own credentials and publisher
confirms; at most 8 per site, what flood control lets a site queue), then a real ``fedmq coordinator run``
(synthetic model, FedBuff K=10) that knows exactly those sites drains them while its resident memory and CPU
time are sampled from /proc. Updates per second come from the coordinator's audit log (first to last update), as
in ``fedmq bench throughput``.

Goal: memory independent of the number of sites (it should grow with the model and the buffer), throughput flat.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pika

from benchmarks.harness import (
    BenchBroker,
    add_common_arguments,
    bench_broker,
    bench_root,
    command_line,
    describe_machine,
    figure_with_panels,
    markdown_table,
    positive_int_list,
    publish_report,
    purge_queues,
    sample_process,
    save_figure,
    start_coordinator,
    stop_process,
    with_plot,
)
from benchmarks.synthetic import UpdateTemplate, model_tensors, write_synthetic_coordinator
from benchmarks.throughput import rate_of, update_records
from broker.topology import SITE_UPDATE_QUEUE_LENGTH, Exchange, Kind, routing_key
from schemas import Heartbeat, SiteState

HELP = "10..200 sites as real broker users against one coordinator: updates/s, coordinator RSS and CPU"
DEFAULT_SITE_COUNTS = (10, 50, 100, 200)
DEFAULT_PARAMS = 100_000
DEFAULT_UPDATES = 300
DEFAULT_HEARTBEAT_SECONDS = 5.0
DRAIN_TIMEOUT_SECONDS = 600.0
SAMPLE_SECONDS = 0.2


@dataclass(frozen=True)
class ScaleRow:
    sites: int
    updates: int
    rate: float
    rss_start_mb: float
    rss_end_mb: float
    peak_rss_mb: float
    cpu_percent: float
    cpu_ms_per_update: float
    heartbeats: int
    rejected: int


class SiteFleet:
    """One blocking connection per site, all owned by the calling thread until ``start_heartbeats`` hands them
    to a heartbeat thread."""

    def __init__(self, urls: dict[str, str], heartbeat_seconds: float) -> None:
        self.connections = {site: pika.BlockingConnection(pika.URLParameters(url)) for site, url in urls.items()}
        self.channels = {site: connection.channel() for site, connection in self.connections.items()}
        for channel in self.channels.values():
            channel.confirm_delivery()
        self.heartbeat_seconds = heartbeat_seconds
        self.heartbeats_sent = 0
        self.sent: dict[str, int] = dict.fromkeys(urls, 0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def publish_updates(self, templates: dict[str, UpdateTemplate], count: int) -> None:
        sites = list(self.channels)
        for number in range(count):
            site = sites[number % len(sites)]
            _, body = templates[site].body(self.sent[site])
            self.sent[site] += 1
            self.channels[site].basic_publish(
                Exchange.UPDATES.value,
                routing_key(site, Kind.UPDATE),
                body,
                pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent, user_id=site),
                mandatory=True,
            )

    def _heartbeat_loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            for site, channel in self.channels.items():
                if self._stop.is_set():
                    return
                body = Heartbeat(site_id=site, state=SiteState.TRAINING, agent_version="bench").encode()
                channel.basic_publish(
                    Exchange.STATUS.value,
                    routing_key(site, Kind.HEARTBEAT),
                    body,
                    pika.BasicProperties(user_id=site),
                )
                self.heartbeats_sent += 1
            self._stop.wait(max(0.0, self.heartbeat_seconds - (time.monotonic() - started)))

    def start_heartbeats(self) -> None:
        self._thread = threading.Thread(target=self._heartbeat_loop, name="bench-heartbeats", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        for connection in self.connections.values():
            if connection.is_open:
                connection.close()


def measure(
    broker: BenchBroker,
    site_ids: list[str],
    *,
    num_parameters: int,
    updates: int,
    heartbeat_seconds: float,
    work_dir: Path,
) -> ScaleRow:
    purge_queues(broker.admin_url, site_ids)
    # pre-filled queues: no more than the sites' update queues hold (flood control refuses the rest)
    updates = min(updates, SITE_UPDATE_QUEUE_LENGTH * len(site_ids))
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    shapes = {name: tensor.shape for name, tensor in model_tensors(num_parameters).items()}
    templates = {site: UpdateTemplate(site, shapes, seed=index) for index, site in enumerate(site_ids)}
    fleet = SiteFleet({site: broker.site_urls[site] for site in site_ids}, heartbeat_seconds)
    try:
        fleet.publish_updates(templates, updates)
        fleet.start_heartbeats()
        return _drain(broker, site_ids, fleet, num_parameters=num_parameters, updates=updates, work_dir=work_dir)
    finally:
        fleet.close()


def _drain(
    broker: BenchBroker,
    site_ids: list[str],
    fleet: SiteFleet,
    *,
    num_parameters: int,
    updates: int,
    work_dir: Path,
) -> ScaleRow:
    config_path, state_dir = write_synthetic_coordinator(
        work_dir, broker_url=broker.coordinator_url, num_parameters=num_parameters, sites=site_ids
    )
    audit = state_dir / "audit.jsonl"
    with (work_dir / "coordinator.log").open("w") as log:
        process = start_coordinator(broker, config_path, log)
        try:
            deadline = time.monotonic() + DRAIN_TIMEOUT_SECONDS
            first = None
            last = sample_process(process.pid)
            records: list[dict[str, object]] = []
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    raise RuntimeError(f"the coordinator exited early; see {work_dir / 'coordinator.log'}")
                records = update_records(audit)
                last = sample_process(process.pid)
                if records and first is None:
                    first = (time.monotonic(), last)
                if len(records) >= updates:
                    break
                time.sleep(SAMPLE_SECONDS)
            ended = time.monotonic()
        finally:
            stop_process(process)
    if first is None:
        raise RuntimeError(f"the coordinator applied nothing; see {work_dir / 'coordinator.log'}")
    started, first_sample = first
    wall = max(ended - started, 1e-9)
    cpu = last.cpu_seconds - first_sample.cpu_seconds
    accepted = sorted(float(str(record["time"])) for record in records if record["outcome"] == "accepted")
    return ScaleRow(
        sites=len(site_ids),
        updates=len(accepted),
        rate=rate_of(accepted),
        rss_start_mb=first_sample.rss_bytes / 1e6,
        rss_end_mb=last.rss_bytes / 1e6,
        peak_rss_mb=last.peak_rss_bytes / 1e6,
        cpu_percent=100 * cpu / wall,
        cpu_ms_per_update=1e3 * cpu / max(len(accepted), 1),
        heartbeats=fleet.heartbeats_sent,
        rejected=sum(1 for record in records if record["outcome"] != "accepted"),
    )


def combine(rows: list[ScaleRow]) -> list[ScaleRow]:
    """One row per site count: the median rate and CPU over its repeats, the largest memory figures."""
    combined = []
    for sites in sorted({row.sites for row in rows}):
        mine = [row for row in rows if row.sites == sites]
        combined.append(
            ScaleRow(
                sites=sites,
                updates=sum(row.updates for row in mine),
                rate=statistics.median(row.rate for row in mine),
                rss_start_mb=max(row.rss_start_mb for row in mine),
                rss_end_mb=max(row.rss_end_mb for row in mine),
                peak_rss_mb=max(row.peak_rss_mb for row in mine),
                cpu_percent=statistics.median(row.cpu_percent for row in mine),
                cpu_ms_per_update=statistics.median(row.cpu_ms_per_update for row in mine),
                heartbeats=sum(row.heartbeats for row in mine),
                rejected=sum(row.rejected for row in mine),
            )
        )
    return combined


def format_report(rows: list[ScaleRow], *, machine: str, command: str, num_parameters: int, heartbeat: float) -> str:
    lines = [
        "## Scale: sites against one coordinator (`fedmq bench scale`)",
        "",
        f"Machine: {machine}.  ",
        f"Command: `{command}`",
        "",
        f"Synthetic model of {num_parameters:,} float32 parameters, FedBuff K=10. Each site is a real broker user "
        f"with its own open connection and a heartbeat every {heartbeat:g} s; the update queue is pre-filled "
        "(round-robin over the sites, publisher confirms) and a real `fedmq coordinator run` drains it. RSS and CPU "
        "of the coordinator process from /proc (RSS when it applied its first update, at the end, and its peak). "
        "Each site count runs once per sweep, sweeps alternating up and down; updates/s and CPU are medians over "
        "the sweeps, memory the largest seen, updates the total.",
        "",
        markdown_table(
            [
                "sites",
                "updates",
                "updates/s",
                "RSS first MB",
                "RSS end MB",
                "peak RSS MB",
                "CPU %",
                "CPU ms/update",
                "heartbeats",
            ],
            [
                [
                    str(row.sites),
                    str(row.updates) + (f" ({row.rejected} rejected!)" if row.rejected else ""),
                    f"{row.rate:.1f}",
                    f"{row.rss_start_mb:.0f}",
                    f"{row.rss_end_mb:.0f}",
                    f"{row.peak_rss_mb:.0f}",
                    f"{row.cpu_percent:.0f}",
                    f"{row.cpu_ms_per_update:.1f}",
                    str(row.heartbeats),
                ]
                for row in rows
            ],
        ),
    ]
    if len(rows) >= 2:
        low, high = rows[0], rows[-1]
        lines += [
            "",
            f"Ratios in this run, {high.sites} sites vs {low.sites}: "
            f"peak RSS {_ratio(high.peak_rss_mb, low.peak_rss_mb)}, updates/s {_ratio(high.rate, low.rate)}, "
            f"CPU per update {_ratio(high.cpu_ms_per_update, low.cpu_ms_per_update)}.",
        ]
    return "\n".join(lines)


def _ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}x" if denominator > 0 else "-"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sites",
        type=positive_int_list("site counts"),
        default=list(DEFAULT_SITE_COUNTS),
        help="comma-separated (default 10,50,100,200)",
    )
    parser.add_argument("--params", type=int, default=DEFAULT_PARAMS, help=f"model size (default {DEFAULT_PARAMS:,})")
    parser.add_argument("--updates", type=int, default=DEFAULT_UPDATES, help="updates per run (default 300)")
    parser.add_argument(
        "--repeats", type=int, default=2, help="sweeps over the site counts, alternating up and down (default 2)"
    )
    parser.add_argument(
        "--heartbeat", type=float, default=DEFAULT_HEARTBEAT_SECONDS, help="seconds between a site's heartbeats"
    )
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    root = bench_root(args) / "scale"
    counts = sorted(args.sites)
    all_sites = [f"scale-site-{index:03d}" for index in range(max(counts))]
    rows: list[ScaleRow] = []
    with bench_broker(args) as broker:
        started = time.monotonic()
        broker.add_sites(all_sites)
        print(f"provisioned {len(all_sites)} sites in {time.monotonic() - started:.0f} s", flush=True)
        # Up and down again (ABBA): a machine whose load drifts during the run biases no site count.
        order = [count for sweep in range(args.repeats) for count in (counts if sweep % 2 == 0 else counts[::-1])]
        for count in order:
            rows.append(
                measure(
                    broker,
                    all_sites[:count],
                    num_parameters=args.params,
                    updates=args.updates,
                    heartbeat_seconds=args.heartbeat,
                    work_dir=root / f"run-{count}",
                )
            )
            row = rows[-1]
            print(
                f"{count} sites: {row.rate:.1f} updates/s, peak RSS {row.peak_rss_mb:.0f} MB, "
                f"CPU {row.cpu_percent:.0f}%",
                flush=True,
            )
        rabbitmq_version = broker.rabbitmq_version
    report = format_report(
        combine(rows),
        machine=describe_machine(rabbitmq_version),
        command=command_line(),
        num_parameters=args.params,
        heartbeat=args.heartbeat,
    )
    report = with_plot(
        args, report, "scale", "updates/s and coordinator memory against sites", partial(plot_scale, combine(rows))
    )
    return publish_report(args, "scale", report)


def plot_scale(rows: Sequence[ScaleRow], path: Path) -> None:
    figure, (rate_axis, memory_axis) = figure_with_panels(2)
    sites = [row.sites for row in rows]
    rate_axis.plot(sites, [row.rate for row in rows], marker="o")
    rate_axis.set_ylabel("updates applied per second")
    memory_axis.plot(sites, [row.peak_rss_mb for row in rows], marker="o", label="peak")
    memory_axis.plot(sites, [row.rss_start_mb for row in rows], marker=".", linestyle="--", label="at first update")
    memory_axis.set_ylabel("coordinator resident memory, MB")
    memory_axis.legend(fontsize=8)
    for axis in (rate_axis, memory_axis):
        axis.set_xlabel("sites (each its own broker user and connection)")
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
    save_figure(figure, path, "one coordinator, 10 to 200 sites")
