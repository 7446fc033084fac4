"""``fedmq bench throughput``: updates per second the coordinator applies, against the raw broker's rate.

For each model size (float32 parameters of the synthetic task, ResNet-18-shaped layers):

1. **Raw broker.** Scripted sites (each its own broker user, publisher confirms on) fill the coordinator's
   update queue with N pre-encoded updates; a bare pika consumer (the coordinator's user, the coordinator's
   prefetch, ack per message, nothing else) drains it. Rate = (N - 1) / (last delivery - first delivery).
   Twice: as pika ships (the goal's yardstick), and reading the socket in frame-sized chunks as fedmq's own
   transport does (``read_in_frame_sized_chunks``), which is what the broker can really deliver to Python.
2. **Coordinator.** The same sites fill the queue with N fresh updates; a real ``fedmq coordinator run``
   process (FedBuff, K = 10, server SGD) drains it: validate, aggregate, durable checkpoint, audit, ack and
   publish every new version. Rate from the audit log's per-update times, the same way.
3. **Per-update split, in process** (no broker, the same code the service runs): decode, validate (the rest
   of ``validate_update``), aggregate (``FedBuff.add``), checkpoint (the coordinator's own histogram) and the
   total of ``Coordinator.process_update``, each also as a ratio to ``x.add_(y)`` on a flat tensor of the same
   size, measured interleaved in the same run.

Both drains use the same queue, broker and message bytes, one after the other, so the ratio coordinator / raw
is a like-for-like consumer comparison; queue pre-filling keeps the publishers off the CPU while a consumer
is measured (this machine may have only 2 cores).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pika
import torch
from prometheus_client import CollectorRegistry

from benchmarks.harness import (
    BenchBroker,
    add_common_arguments,
    bench_broker,
    bench_root,
    command_line,
    describe_machine,
    figure_with_panels,
    grouped_bars,
    load_average,
    markdown_table,
    positive_int_list,
    publish_report,
    purge_queues,
    save_figure,
    start_coordinator,
    stop_process,
    with_plot,
)
from benchmarks.synthetic import UpdateTemplate, model_tensors, write_synthetic_coordinator
from broker.memory import MemoryBroker
from broker.pika_transport import read_in_frame_sized_chunks
from broker.topology import SITE_UPDATE_QUEUE_LENGTH, Exchange, Kind, routing_key, site_update_queues
from broker.transport import Delivery
from coordinator.aggregation import Contribution, FedBuff
from coordinator.audit import AuditLog
from coordinator.checkpoint import CheckpointStore, write_file_durably
from coordinator.config import CoordinatorConfig, ValidationSettings
from coordinator.evaluation import EvaluationBook
from coordinator.metrics import CoordinatorMetrics
from coordinator.service import Coordinator
from coordinator.strategy_config import FedBuffSettings
from coordinator.validation import DuplicateFilter, ValidUpdate, validate_update
from schemas import DecodeLimits, ModelFingerprint, ModelUpdate
from schemas.tensors import raw_view

HELP = "coordinator updates/s vs a bare pika consumer on the same broker, plus the per-update time split"
DEFAULT_SIZES = (100_000, 1_000_000, 11_000_000)
DEFAULT_BUDGET_MB = 1200.0
DEFAULT_SITES = 8
DEFAULT_BUFFER_SIZE = 10
DEFAULT_SPLIT_CYCLES = 1
DEFAULT_REPEATS = 3
GOAL_RATIO = 0.9
GOAL_FROM_PARAMS = 1_000_000
MIN_MESSAGES, MAX_MESSAGES = 12, 200
DRAIN_TIMEOUT_SECONDS = 600.0
ResultT = TypeVar("ResultT")


@dataclass(frozen=True)
class SplitRow:
    """Seconds per update for each phase (in process), and the same-size in-place add they are divided by."""

    params: int
    threads: int
    add: float
    decode: float
    validate: float
    aggregate: float
    checkpoint: float
    total: float
    packed_checkpoint: float

    @property
    def other(self) -> float:
        """Audit (sha256 + fsync'd append), metrics and bookkeeping: what the named phases leave of the total."""
        return max(0.0, self.total - self.decode - self.validate - self.aggregate - self.checkpoint)

    def phases(self) -> dict[str, float]:
        return {
            "decode": self.decode,
            "validate": self.validate,
            "aggregate": self.aggregate,
            "checkpoint": self.checkpoint,
            "other": self.other,
        }

    def bottleneck(self) -> str:
        phases = self.phases()
        return max(phases, key=lambda name: phases[name])


@dataclass(frozen=True)
class DrainRow:
    params: int
    message_bytes: int
    messages: int
    repeats: int
    publish_rate: float
    raw_rate: float
    frame_reads_rate: float
    coordinator_rate: float
    coordinator_rejected: int
    round_ratios: tuple[float, ...] = ()  # coordinator / raw consumer within each round of drains

    @property
    def ratio(self) -> float:
        return self.coordinator_rate / self.raw_rate if self.raw_rate > 0 else float("nan")

    @property
    def frame_reads_ratio(self) -> float:
        return self.coordinator_rate / self.frame_reads_rate if self.frame_reads_rate > 0 else float("nan")


# -------------------------------------------------------------------------------------------- in-process split


def _timed(function: Callable[..., ResultT], *arguments: Any, **keywords: Any) -> tuple[float, ResultT]:
    """Seconds one call takes with the garbage collector paused (as ``timeit`` does), and its result. No
    ``gc.collect()`` first: with torch loaded a full collection takes ~0.1 s, far longer than the calls timed, and
    the paused collector already keeps it out of the measurement."""
    gc.disable()
    try:
        started = time.perf_counter()
        result = function(*arguments, **keywords)
        return time.perf_counter() - started, result
    finally:
        gc.enable()


def measure_split(num_parameters: int, *, threads: int, cycles: int, buffer_size: int, work_dir: Path) -> SplitRow:
    """Drive a real ``Coordinator`` (no transport needed for accepted updates) and time its pieces alongside,
    with ``threads`` torch intra-op threads."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _measure_split(
            num_parameters, threads=threads, cycles=cycles, buffer_size=buffer_size, work_dir=work_dir
        )
    finally:
        torch.set_num_threads(previous_threads)


def _measure_split(num_parameters: int, *, threads: int, cycles: int, buffer_size: int, work_dir: Path) -> SplitRow:
    params = model_tensors(num_parameters)
    shapes = {name: tensor.shape for name, tensor in params.items()}
    template = UpdateTemplate("site-1", shapes)
    registry = CollectorRegistry()
    config = CoordinatorConfig(
        task="bench-synthetic",
        sites=("site-1",),
        state_dir=work_dir,
        strategy=FedBuffSettings(max_staleness=10**9, buffer_size=buffer_size),
        validation=ValidationSettings(max_update_norm=1e12, max_message_mb=1024),
    )
    coordinator = Coordinator(
        config,
        strategy=FedBuff(buffer_size=buffer_size),
        initial_params=params,
        fingerprint=ModelFingerprint(task="bench-synthetic", architecture="bench"),
        metrics=CoordinatorMetrics(registry),
        audit=AuditLog(work_dir / "audit.jsonl"),
        evaluations=EvaluationBook(None),
        checkpoints=CheckpointStore(work_dir / "checkpoint"),
    )
    memory = MemoryBroker()  # the model each new version publishes goes here, encoded as for RabbitMQ
    memory.declare(["site-1"])
    coordinator.attach(memory.connect("fedmq-coordinator"))

    def handle_one(delivery: Delivery) -> None:
        """The worst case of group commit: a batch of one update, committed (checkpoint, audit) on its own."""
        coordinator.process_update(delivery)
        coordinator.commit()

    side_strategy = FedBuff(buffer_size=buffer_size)
    side_params = {name: tensor.clone() for name, tensor in params.items()}
    side_version = 0
    limits = DecodeLimits(max_message_bytes=1024 * 1024 * 1024)
    flat = torch.randn(num_parameters)
    other = torch.randn(num_parameters)
    samples: dict[str, list[float]] = {
        name: [] for name in ("add", "decode", "validate", "aggregate", "total", "packed")
    }
    model_bytes = b"".join(bytes(raw_view(tensor.contiguous())) for tensor in params.values())
    # warm-up: page faults, lazy imports, the first checkpoint writing the whole model
    handle_one(_delivery(template.body(0)[1], 0))
    checkpoint_sum = registry.get_sample_value("fedmq_checkpoint_seconds_sum") or 0.0
    checkpoint_count = registry.get_sample_value("fedmq_checkpoint_seconds_count") or 0.0
    for index in range(1, 1 + cycles * buffer_size):
        _, body = template.body(index)
        delivery = _delivery(body, index)
        samples["add"].append(_timed(flat.add_, other)[0])
        samples["decode"].append(_timed(ModelUpdate.decode, body, limits)[0])
        seconds, valid = _timed(
            validate_update,
            delivery,
            known_sites=("site-1",),
            model=params,
            version=0,
            max_staleness=10**9,
            max_norm=1e12,
            duplicates=DuplicateFilter(),
            limits=limits,
        )
        samples["validate"].append(seconds)
        if not isinstance(valid, ValidUpdate):
            raise RuntimeError(f"the benchmark's update was rejected: {valid}")
        contribution = Contribution(
            site_id="site-1",
            update_id=valid.update.update_id,
            base_version=0,
            staleness=side_version,
            num_examples=valid.update.num_examples,
            delta=valid.update.delta,
        )
        seconds, new_params = _timed(side_strategy.add, side_params, side_version, contribution, params)
        samples["aggregate"].append(seconds)
        if new_params is not None:
            side_params, side_version = new_params, side_version + 1
        samples["total"].append(_timed(handle_one, delivery)[0])
        samples["packed"].append(_timed(_packed_checkpoint, work_dir, model_bytes)[0])
    coordinator.audit.close()
    checkpoints = (registry.get_sample_value("fedmq_checkpoint_seconds_count") or 0.0) - checkpoint_count
    checkpoint_seconds = (registry.get_sample_value("fedmq_checkpoint_seconds_sum") or 0.0) - checkpoint_sum
    decode = statistics.median(samples["decode"])
    return SplitRow(
        params=num_parameters,
        threads=threads,
        packed_checkpoint=statistics.median(samples["packed"]),
        add=statistics.median(samples["add"]),
        decode=decode,
        validate=max(0.0, statistics.median(samples["validate"]) - decode),
        aggregate=statistics.fmean(samples["aggregate"]),  # periodic (a server step every K): mean of cycles
        checkpoint=checkpoint_seconds / max(checkpoints, 1.0),
        total=statistics.fmean(samples["total"]),
    )


def _packed_checkpoint(work_dir: Path, model_bytes: bytes) -> None:
    """The least a checkpoint can cost: one model's worth of bytes in one file, one fsync, plus the manifest's
    own durable write (what ``CheckpointStore.save`` does, without its bookkeeping)."""
    write_file_durably(work_dir / "packed.bin", model_bytes)
    write_file_durably(work_dir / "packed.manifest", b"x" * 512)


def _delivery(body: bytes, tag: int) -> Delivery:
    return Delivery(body=body, routing_key=routing_key("site-1", Kind.UPDATE), delivery_tag=tag, user_id="site-1")


# ------------------------------------------------------------------------------------------------ broker drains


class ScriptedSites:
    """One blocking connection per site, with its own credentials, publishing pre-encoded updates with
    confirms, round-robin over the sites."""

    def __init__(self, urls: dict[str, str], shapes: dict[str, torch.Size]) -> None:
        self.templates = {site: UpdateTemplate(site, shapes, seed=index) for index, site in enumerate(urls)}
        self.connections = {site: pika.BlockingConnection(pika.URLParameters(url)) for site, url in urls.items()}
        self.channels = {site: connection.channel() for site, connection in self.connections.items()}
        for channel in self.channels.values():
            channel.confirm_delivery()
        self.sent = dict.fromkeys(urls, 0)

    @property
    def message_bytes(self) -> int:
        return len(next(iter(self.templates.values())).encoded)

    def publish(self, count: int) -> float:
        """Publish ``count`` updates (each confirmed); returns the seconds it took."""
        sites = list(self.templates)
        started = time.perf_counter()
        for number in range(count):
            site = sites[number % len(sites)]
            _, body = self.templates[site].body(self.sent[site])
            self.sent[site] += 1
            self.channels[site].basic_publish(
                Exchange.UPDATES.value,
                routing_key(site, Kind.UPDATE),
                body,
                pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent, user_id=site),
                mandatory=True,
            )
        return time.perf_counter() - started

    def close(self) -> None:
        for connection in self.connections.values():
            if connection.is_open:
                connection.close()


def drain_with_bare_consumer(
    url: str, site_ids: Sequence[str], count: int, prefetch: int, *, frame_reads: bool = False
) -> list[float]:
    """Delivery times of ``count`` messages consumed and acked by a plain pika consumer; ``frame_reads`` gives it
    fedmq's socket reads (a frame per read) instead of pika's 4 KiB."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    if frame_reads:
        read_in_frame_sized_chunks(connection)
    channel = connection.channel()
    channel.basic_qos(prefetch_count=prefetch)
    times: list[float] = []

    def on_message(
        channel: Any, method: pika.spec.Basic.Deliver, properties: pika.BasicProperties, body: bytes
    ) -> None:
        times.append(time.time())
        channel.basic_ack(method.delivery_tag)
        if len(times) >= count:
            channel.stop_consuming()

    for queue in site_update_queues(site_ids):
        channel.basic_consume(queue, on_message)
    timer = threading.Timer(DRAIN_TIMEOUT_SECONDS, lambda: connection.add_callback_threadsafe(channel.stop_consuming))
    timer.start()
    try:
        channel.start_consuming()
    finally:
        timer.cancel()
        connection.close()
    return times


def drain_with_coordinator(
    broker: BenchBroker,
    sites: list[str],
    num_parameters: int,
    count: int,
    work_dir: Path,
    buffer_size: int,
) -> tuple[list[float], int]:
    """Start ``fedmq coordinator run`` on the filled queue; per-update times from its audit log."""
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    config_path, state_dir = write_synthetic_coordinator(
        work_dir,
        broker_url=broker.coordinator_url,
        num_parameters=num_parameters,
        sites=sites,
        buffer_size=buffer_size,
    )
    audit_path = state_dir / "audit.jsonl"
    with (work_dir / "coordinator.log").open("w") as log:
        process = start_coordinator(broker, config_path, log)
        try:
            deadline = time.monotonic() + DRAIN_TIMEOUT_SECONDS
            records: list[dict[str, Any]] = []
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    raise RuntimeError(f"the coordinator exited early; see {work_dir / 'coordinator.log'}")
                records = update_records(audit_path)
                if len(records) >= count:
                    break
                time.sleep(0.2)
        finally:
            stop_process(process)
    accepted = sorted(record["time"] for record in records if record["outcome"] == "accepted")
    return accepted, sum(1 for record in records if record["outcome"] != "accepted")


def update_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written right now
        if record.get("kind") == "update":
            records.append(record)
    return records


def rate_of(times: Sequence[float]) -> float:
    if len(times) < 2 or times[-1] <= times[0]:
        return float("nan")
    return (len(times) - 1) / (times[-1] - times[0])


def messages_for(message_bytes: int, budget_mb: float) -> int:
    return max(MIN_MESSAGES, min(MAX_MESSAGES, int(budget_mb * 1e6 / message_bytes)))


def measure_drains(
    broker: BenchBroker,
    num_parameters: int,
    *,
    site_count: int,
    budget_mb: float,
    buffer_size: int,
    work_dir: Path,
    repeats: int,
) -> DrainRow:
    """``repeats`` rounds of the three drains, interleaved so that a busy spell of the machine hits all three;
    medians of the rates."""
    site_ids = [f"bench-site-{index:03d}" for index in range(site_count)]
    urls = {site: broker.site_urls.get(site) or broker.add_sites([site])[site] for site in site_ids}
    purge_queues(broker.admin_url, site_ids)
    shapes = {name: tensor.shape for name, tensor in model_tensors(num_parameters).items()}
    sites = ScriptedSites(urls, shapes)
    rates: dict[str, list[float]] = {"publish": [], "raw": [], "frame reads": [], "coordinator": []}
    rejected = 0
    try:
        # pre-filled queues: no more than the sites' update queues hold (flood control refuses the rest)
        count = min(messages_for(sites.message_bytes, budget_mb), SITE_UPDATE_QUEUE_LENGTH * site_count)
        prefetch = CoordinatorConfig().update_prefetch
        for _ in range(repeats):
            rates["publish"].append(count / sites.publish(count))
            rates["raw"].append(rate_of(drain_with_bare_consumer(broker.coordinator_url, site_ids, count, prefetch)))
            sites.publish(count)
            frame_read_times = drain_with_bare_consumer(
                broker.coordinator_url, site_ids, count, prefetch, frame_reads=True
            )
            rates["frame reads"].append(rate_of(frame_read_times))
            sites.publish(count)
            coordinator_times, drain_rejected = drain_with_coordinator(
                broker, site_ids, num_parameters, count, work_dir / "coordinator", buffer_size
            )
            rates["coordinator"].append(rate_of(coordinator_times))
            rejected += drain_rejected
    finally:
        sites.close()
    return DrainRow(
        params=num_parameters,
        message_bytes=sites.message_bytes,
        messages=count,
        repeats=repeats,
        publish_rate=statistics.median(rates["publish"]),
        raw_rate=statistics.median(rates["raw"]),
        frame_reads_rate=statistics.median(rates["frame reads"]),
        coordinator_rate=statistics.median(rates["coordinator"]),
        coordinator_rejected=rejected,
        round_ratios=tuple(
            coordinator / raw for coordinator, raw in zip(rates["coordinator"], rates["raw"], strict=True) if raw > 0
        ),
    )


# ---------------------------------------------------------------------------------------------------- report


def format_report(drains: list[DrainRow], splits: list[SplitRow], machine: str, command: str, load: str) -> str:
    lines = [
        "## Coordinator throughput (`fedmq bench throughput`)",
        "",
        f"Machine: {machine}. Load average when it started: {load}.  ",
        f"Command: `{command}`",
        "",
        "Drain of a pre-filled update queue (quorum, persistent messages) on the same broker, one after the other: "
        "a bare pika consumer (ack only) as pika ships, the same consumer reading the socket a frame at a time "
        "as fedmq's transport does, and a real `fedmq coordinator run` (FedBuff K=10, server SGD; validate, "
        "aggregate, fsync'd checkpoint and audit, ack, publish each new version). Updates are published by "
        "scripted sites, each its own broker user, with publisher confirms. The goal compares the coordinator "
        "with the bare consumer as pika ships; the last ratio compares it with a consumer that receives as "
        "cheaply as the coordinator does, i.e. what all the coordinator's own work costs. Rates are medians over "
        "the repeats, the three drains interleaved in each; the ratio in each round (the coordinator against the bare "
        "consumer of the same round) shows how much the two move from one round to the next on a shared machine.",
        "",
        markdown_table(
            [
                "parameters",
                "message MB",
                "updates x repeats",
                "publish+confirm /s",
                "raw consumer /s",
                "raw, frame reads /s",
                "coordinator /s",
                "coordinator / raw",
                "per round, lowest-highest",
                "goal >= 0.9",
                "coordinator / raw with frame reads",
            ],
            [
                [
                    f"{row.params:,}",
                    f"{row.message_bytes / 1e6:.2f}",
                    f"{row.messages} x {row.repeats}",
                    f"{row.publish_rate:.1f}",
                    f"{row.raw_rate:.1f}",
                    f"{row.frame_reads_rate:.1f}",
                    f"{row.coordinator_rate:.1f}",
                    f"{row.ratio:.2f}",
                    f"{min(row.round_ratios):.2f}-{max(row.round_ratios):.2f}" if row.round_ratios else "-",
                    (("met" if row.ratio >= GOAL_RATIO else "NOT met") if row.params >= GOAL_FROM_PARAMS else "-")
                    + (f" ({row.coordinator_rejected} rejected!)" if row.coordinator_rejected else ""),
                    f"{row.frame_reads_ratio:.2f}",
                ]
                for row in drains
            ],
        ),
        "",
        "Per-update coordinator time in process (no broker; the code `Coordinator.process_update` runs), in ms and "
        "as a ratio to an in-place `x.add_(y)` of the same number of float32 values measured in the same run with "
        "the same torch threads. decode = `ModelUpdate.decode`; validate = the rest of `validate_update` (names, "
        "shapes, finiteness, norm, staleness, duplicates); aggregate = `FedBuff.add` (a server step every K-th); "
        "checkpoint = the coordinator's own `fedmq_checkpoint_seconds`; other = audit (sha256 of the body + "
        "fsync'd append), metrics and bookkeeping; packed = one model's bytes written durably to one file plus a "
        "manifest (the least a checkpoint can cost). Medians, except aggregate, checkpoint and "
        "total: means over whole buffer cycles.",
        "",
        markdown_table(
            [
                "parameters",
                "torch threads",
                "add_ ms",
                "decode",
                "validate",
                "aggregate",
                "checkpoint",
                "other",
                "total",
                "bottleneck",
                "packed checkpoint",
            ],
            [
                [f"{row.params:,}", str(row.threads), f"{row.add * 1e3:.2f}"]
                + [_in_adds(seconds, row.add) for seconds in (*row.phases().values(), row.total)]
                + [row.bottleneck(), _in_adds(row.packed_checkpoint, row.add)]
                for row in splits
            ],
        ),
    ]
    return "\n".join(lines)


def _in_adds(seconds: float, add_seconds: float) -> str:
    ratio = seconds / add_seconds
    return f"{seconds * 1e3:.1f} ms = {ratio:.1f}x" if ratio < 10 else f"{seconds * 1e3:.1f} ms = {ratio:.0f}x"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sizes",
        type=positive_int_list("parameter counts"),
        default=list(DEFAULT_SIZES),
        help="comma-separated float32 parameter counts (default: 100000,1000000,11000000)",
    )
    parser.add_argument(
        "--budget-mb",
        type=float,
        default=DEFAULT_BUDGET_MB,
        help=f"MB of messages per drain and size, kept within {MIN_MESSAGES}..{MAX_MESSAGES} updates "
        f"(default {DEFAULT_BUDGET_MB:.0f})",
    )
    parser.add_argument("--sites", type=int, default=DEFAULT_SITES, help="scripted sites (broker users)")
    parser.add_argument("--buffer-size", type=int, default=DEFAULT_BUFFER_SIZE, help="FedBuff K (default 10)")
    parser.add_argument(
        "--split-cycles",
        type=int,
        default=DEFAULT_SPLIT_CYCLES,
        help="buffer cycles (K updates each) timed in process per size (default 1)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=DEFAULT_REPEATS,
        help=f"rounds of the three drains per size, medians reported (default {DEFAULT_REPEATS})",
    )
    parser.add_argument("--skip-broker", action="store_true", help="only the in-process split (no RabbitMQ)")
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    work_root = bench_root(args) / "throughput"
    work_root.mkdir(parents=True, exist_ok=True)
    load_before = load_average()
    splits: list[SplitRow] = []
    for size in args.sizes:
        for threads in sorted({torch.get_num_threads(), 1}, reverse=True):
            with tempfile.TemporaryDirectory(dir=work_root) as scratch:
                splits.append(
                    measure_split(
                        size,
                        threads=threads,
                        cycles=args.split_cycles,
                        buffer_size=args.buffer_size,
                        work_dir=Path(scratch),
                    )
                )
            row = splits[-1]
            print(f"split {size:,}, {threads} threads: {row.total * 1e3:.1f} ms per update", flush=True)
    drains: list[DrainRow] = []
    rabbitmq_version = None
    if not args.skip_broker:
        with bench_broker(args) as broker:
            rabbitmq_version = broker.rabbitmq_version
            for size in args.sizes:
                with tempfile.TemporaryDirectory(dir=work_root) as scratch:
                    drains.append(
                        measure_drains(
                            broker,
                            size,
                            site_count=args.sites,
                            budget_mb=args.budget_mb,
                            buffer_size=args.buffer_size,
                            work_dir=Path(scratch),
                            repeats=args.repeats,
                        )
                    )
                drain = drains[-1]
                print(
                    f"drain {size:,}: raw {drain.raw_rate:.1f}/s, raw with frame reads {drain.frame_reads_rate:.1f}/s, "
                    f"coordinator {drain.coordinator_rate:.1f}/s ({drain.ratio:.2f}x raw, "
                    f"{drain.frame_reads_ratio:.2f}x frame reads)",
                    flush=True,
                )
    report = format_report(drains, splits, describe_machine(rabbitmq_version), command_line(), load_before)
    if drains:
        report = with_plot(
            args,
            report,
            "throughput",
            "updates/s and the coordinator / raw ratio per round",
            partial(plot_drains, drains),
        )
    return publish_report(args, "throughput", report)


def plot_drains(drains: Sequence[DrainRow], path: Path) -> None:
    """Left: the three drain rates per model size; right: the coordinator / raw ratio of every round."""
    figure, (rates_axis, ratio_axis) = figure_with_panels(2)
    labels = [f"{row.params:,}" for row in drains]
    grouped_bars(
        rates_axis,
        labels,
        [
            ("bare consumer (pika as shipped)", [row.raw_rate for row in drains]),
            ("bare consumer, frame reads", [row.frame_reads_rate for row in drains]),
            ("fedmq coordinator", [row.coordinator_rate for row in drains]),
        ],
    )
    rates_axis.set_yscale("log")
    rates_axis.set_xlabel("float32 parameters per update")
    rates_axis.set_ylabel("updates drained per second (median)")
    rates_axis.legend(fontsize=8)
    for index, row in enumerate(drains):
        first = index == 0
        ratio_axis.scatter(
            [index] * len(row.round_ratios),
            row.round_ratios,
            color="tab:green",
            alpha=0.6,
            label="one round" if first else None,
        )
        ratio_axis.scatter([index], [row.ratio], color="black", marker="_", s=400, label="median" if first else None)
    ratio_axis.axhline(GOAL_RATIO, color="grey", linewidth=0.8, linestyle=":", label=f"goal {GOAL_RATIO} (from 1M)")
    ratio_axis.set_xticks(range(len(drains)), labels)
    ratio_axis.set_xlabel("float32 parameters per update")
    ratio_axis.set_ylabel("coordinator / bare consumer (pika as shipped)")
    ratio_axis.set_ylim(0, max(1.2, max(max(row.round_ratios, default=0.0) for row in drains) * 1.1))
    ratio_axis.legend(fontsize=8)
    for axis in (rates_axis, ratio_axis):
        axis.grid(alpha=0.3)
    save_figure(figure, path, "coordinator throughput against a bare pika consumer, same broker, same run")
