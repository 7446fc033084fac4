"""``fedmq bench wire``: bytes on the wire per update, and what opt-in compression saves and costs.

1. **Bytes on the wire.** A site publishes real ``ModelUpdate`` messages (publisher confirms, its own broker
   user) through a byte-counting TCP relay on loopback in front of RabbitMQ; everything the client sends per
   update (AMQP method, header and body frames with their framing, the msgpack envelope) is divided by the raw
   float32 tensor bytes of the update. Models: heart-disease (14 parameters), the image task's CNN and the
   synthetic 1M / 11M models of ``fedmq bench throughput``; compressions ``none``, ``float16`` and ``int8``.
2. **Accuracy cost.** Real federations (``fedmq coordinator run`` + four ``fedmq site run``, FedBuff) with
   ``[agent] compression`` set to each choice, the same seeds and the same wall-clock budget: heart-disease
   (the demo's FedBuff) and the image task on a small generated MedMNIST-format file (four classes of noisy
   blob patterns, 28x28 grey; not real MedMNIST, which is not downloaded). Every global model is scored by the
   benchmark's referee; the final accuracy within the budget is compared with ``none``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import selectors
import socket
import statistics
import threading
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pika
import pika.exceptions
import torch

from benchmarks.harness import (
    BenchBroker,
    add_common_arguments,
    bench_broker,
    bench_root,
    command_line,
    describe_machine,
    figure_with_panels,
    free_tcp_ports,
    grouped_bars,
    markdown_table,
    median_or_none,
    publish_report,
    purge_queues,
    save_figure,
    with_plot,
)
from benchmarks.heart import HeartReferee, Scores
from benchmarks.straggler import FederationPlan, RunResult, fedmq_plan, run_fedmq
from benchmarks.synthetic import model_tensors
from broker.topology import Exchange, Kind, routing_key
from schemas import COMPRESSIONS, ModelUpdate, TrainingMetrics
from tasks.base import SiteData
from tasks.heart_disease import HeartDiseaseTask
from tasks.image_cnn import ImageCnnTask

HELP = "wire bytes per update / raw tensor bytes, and float16/int8 size ratios and accuracy cost"
SIZE_GOAL = 1.01
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_HEART_BUDGET = 20.0
DEFAULT_IMAGE_BUDGET = 40.0
IMAGE_SITES = ("imaging-a", "imaging-b", "imaging-c", "imaging-d")
IMAGE_CLASSES = 4
WIRE_SITE = "wire-site"


# ------------------------------------------------------------------------------------------- byte counting


class CountingRelay:
    """A TCP relay on 127.0.0.1 forwarding to the broker and counting the bytes each way."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.client_to_broker = 0
        self.broker_to_client = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name="bench-relay", daemon=True)

    def __enter__(self) -> CountingRelay:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.listener.close()

    def counted(self) -> tuple[int, int]:
        with self._lock:
            return self.client_to_broker, self.broker_to_client

    def _serve(self) -> None:
        selector = selectors.DefaultSelector()
        self.listener.setblocking(False)
        selector.register(self.listener, selectors.EVENT_READ, None)
        peers: dict[socket.socket, tuple[socket.socket, bool]] = {}
        while not self._stop.is_set():
            for key, _ in selector.select(timeout=0.1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self.listener:
                    client, _ = self.listener.accept()
                    upstream = socket.create_connection(("127.0.0.1", self.target_port))
                    for end in (client, upstream):
                        end.setblocking(True)
                        selector.register(end, selectors.EVENT_READ, None)
                    peers[client] = (upstream, True)
                    peers[upstream] = (client, False)
                    continue
                other, from_client = peers[sock]
                try:
                    data = sock.recv(1 << 20)
                except OSError:
                    data = b""
                if not data:
                    for end in (sock, other):
                        selector.unregister(end)
                        end.close()
                        peers.pop(end, None)
                    continue
                other.sendall(data)
                with self._lock:
                    if from_client:
                        self.client_to_broker += len(data)
                    else:
                        self.broker_to_client += len(data)
        for end in list(peers):
            end.close()
        selector.close()


@dataclass(frozen=True)
class WireRow:
    model: str
    params: int
    compression: str
    raw_bytes: int
    body_bytes: int
    wire_bytes: float

    @property
    def wire_ratio(self) -> float:
        return self.wire_bytes / self.raw_bytes


def _update(delta: dict[str, torch.Tensor]) -> ModelUpdate:
    return ModelUpdate(
        update_id=ModelUpdate.new_id(),
        site_id=WIRE_SITE,
        seq=1,
        base_version=0,
        num_examples=100,
        delta=delta,
        metrics=TrainingMetrics(loss=0.5, steps=100, seconds=1.0),
    )


def model_deltas() -> dict[str, dict[str, torch.Tensor]]:
    """Deltas shaped like each model, with values like a local training's (normal, std 0.01)."""
    generator = torch.Generator().manual_seed(0)
    shapes: dict[str, dict[str, torch.Size]] = {
        "heart-disease": {name: t.shape for name, t in HeartDiseaseTask().build_model().state_dict().items()},
        "image-cnn": {
            name: t.shape for name, t in ImageCnnTask(num_classes=IMAGE_CLASSES).build_model().state_dict().items()
        },
        "synthetic 1M": {name: t.shape for name, t in model_tensors(1_000_000).items()},
        "synthetic 11M": {name: t.shape for name, t in model_tensors(11_000_000).items()},
    }
    return {
        model: {name: torch.randn(shape, generator=generator) * 0.01 for name, shape in layers.items()}
        for model, layers in shapes.items()
    }


def measure_wire(broker: BenchBroker, *, models: Sequence[str] | None = None) -> list[WireRow]:
    url = broker.add_sites([WIRE_SITE])[WIRE_SITE]
    parts = urllib.parse.urlsplit(url)
    rows: list[WireRow] = []
    deltas = model_deltas()
    with CountingRelay(parts.port or 5672) as relay:
        relayed = urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.netloc.rsplit(':', 1)[0]}:{relay.port}"))
        connection = pika.BlockingConnection(pika.URLParameters(relayed))
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            for model, delta in deltas.items():
                if models is not None and model not in models:
                    continue
                raw = sum(tensor.numel() * tensor.element_size() for tensor in delta.values())
                params = sum(tensor.numel() for tensor in delta.values())
                repeats = max(2, min(50, int(40e6 // raw)))
                for compression in COMPRESSIONS:
                    bodies = [_update(delta).encode(compression) for _ in range(repeats)]
                    sent_before, _ = relay.counted()
                    for body in bodies:
                        # Nobody consumes here: once the site's update queue is full (flood control) the broker
                        # nacks, after the whole message crossed the wire, which is all this counts.
                        with contextlib.suppress(pika.exceptions.NackError):
                            channel.basic_publish(
                                Exchange.UPDATES.value,
                                routing_key(WIRE_SITE, Kind.UPDATE),
                                body,
                                pika.BasicProperties(
                                    delivery_mode=pika.DeliveryMode.Persistent,
                                    user_id=WIRE_SITE,
                                    message_id=ModelUpdate.new_id(),
                                    content_type="application/msgpack",
                                ),
                                mandatory=True,
                            )
                    sent_after, _ = relay.counted()
                    rows.append(
                        WireRow(
                            model=model,
                            params=params,
                            compression=compression,
                            raw_bytes=raw,
                            body_bytes=len(bodies[0]),
                            wire_bytes=(sent_after - sent_before) / repeats,
                        )
                    )
                purge_queues(broker.admin_url, [WIRE_SITE])
        finally:
            connection.close()
    return rows


# --------------------------------------------------------------------------------------------- image task


def write_medmnist_like(path: Path, *, seed: int = 0, train: int = 2000, test: int = 800) -> Path:
    """A small MedMNIST-format .npz: 28x28 grey uint8 images of four classes, each a noisy blob pattern
    (a class-specific position and shape), labels (N, 1). Deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    grid_y, grid_x = np.mgrid[0:28, 0:28].astype(np.float32)
    # Close centres, faint blobs and heavy noise: a CNN tops out well below 100%, so a cost can show.
    centres = [(10.0, 10.0, 3.0), (10.0, 18.0, 4.5), (18.0, 10.0, 4.5), (18.0, 18.0, 3.0)]

    def make(count: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, IMAGE_CLASSES, size=count)
        images = np.empty((count, 28, 28), dtype=np.uint8)
        for index, label in enumerate(labels):
            cy, cx, radius = centres[label]
            cy += rng.normal(0, 2.5)
            cx += rng.normal(0, 2.5)
            blob = np.exp(-((grid_y - cy) ** 2 + (grid_x - cx) ** 2) / (2 * radius**2))
            noisy = 90 * blob + rng.normal(70, 55, size=(28, 28))
            images[index] = np.clip(noisy, 0, 255).astype(np.uint8)
        return images, labels.reshape(-1, 1).astype(np.int64)

    train_images, train_labels = make(train)
    val_images, val_labels = make(max(1, test // 4))
    test_images, test_labels = make(test)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        path,
        train_images=train_images,
        train_labels=train_labels,
        val_images=val_images,
        val_labels=val_labels,
        test_images=test_images,
        test_labels=test_labels,
    )
    return path


class ImageReferee:
    """Scores a global CNN on each imaging site's test share (the split its site agent evaluates on)."""

    def __init__(self, options: Mapping[str, object]) -> None:
        self.task = ImageCnnTask(num_classes=IMAGE_CLASSES)
        self.model = self.task.build_model()
        self.data: dict[str, SiteData] = {site: self.task.load_data(site, options) for site in IMAGE_SITES}

    def score(self, tensors: Mapping[str, torch.Tensor]) -> Scores:
        self.model.load_state_dict({name: tensor.clone() for name, tensor in tensors.items()})
        accuracies = {site: self.task.evaluate(self.model, data)["accuracy"] for site, data in self.data.items()}
        total = sum(data.num_test for data in self.data.values())
        pooled = sum(accuracies[site] * data.num_test for site, data in self.data.items()) / total
        return Scores(pooled=pooled, mean=sum(accuracies.values()) / len(accuracies), per_site=accuracies)


def image_plan(
    broker: BenchBroker, npz: Path, seed: int, compression: str, budget_seconds: float, referee: ImageReferee
) -> FederationPlan:
    (metrics_port,) = free_tcp_ports(1)
    task_table = (
        f'[task]\nname = "image-cnn"\nnum_classes = {IMAGE_CLASSES}\nnpz = {json.dumps(str(npz))}\n'
        f"sites = {json.dumps(list(IMAGE_SITES))}\n"
    )
    coordinator = f"""# written by fedmq bench wire
sites = {json.dumps(list(IMAGE_SITES))}
seed = {seed}
{task_table}
[broker]
url = {json.dumps(broker.coordinator_url)}

[strategy]
name = "fedbuff"
max_staleness = 20
buffer_size = 3

[training]
local_steps = 20
learning_rate = 0.05
batch_size = 32

[liveness]
site_timeout_seconds = 60

[stopping]
max_seconds = {budget_seconds + 150}

[metrics]
host = "127.0.0.1"
port = {metrics_port}
"""
    site_tables = {
        site: f"\n# added by fedmq bench wire\n{task_table}\n[agent]\nseed = {seed}\nheartbeat_seconds = 2\n"
        f'compression = "{compression}"\n'
        for site in IMAGE_SITES
    }
    return FederationPlan(
        label=f"image-{compression}",
        seed=seed,
        coordinator_config=coordinator,
        site_tables=site_tables,
        referee=referee.score,
        budget_seconds=budget_seconds,
    )


# ---------------------------------------------------------------------------------------------------- report


def _final(results: Sequence[RunResult], label: str, aggregate: str) -> float | None:
    finals = [result.final() for result in results if result.system == label]
    return median_or_none(
        (final.pooled if aggregate == "pooled" else final.mean) if final is not None else None for final in finals
    )


def _paired_drop(results: Sequence[RunResult], label: str, baseline: str) -> float | None:
    """Median over seeds of (baseline final pooled - compressed final pooled): the accuracy cost."""
    drops = []
    for result in results:
        if result.system != label:
            continue
        base = next((other for other in results if other.system == baseline and other.seed == result.seed), None)
        mine, theirs = result.final(), base.final() if base else None
        if mine is not None and theirs is not None:
            drops.append(theirs.pooled - mine.pooled)
    return statistics.median(drops) if drops else None


def format_report(
    wire_rows: Sequence[WireRow],
    accuracy: Mapping[str, Sequence[RunResult]],
    *,
    machine: str,
    command: str,
    seeds: Sequence[int],
    budgets: Mapping[str, float],
) -> str:
    lines = [
        "## Wire: bytes per update and compression (`fedmq bench wire`)",
        "",
        f"Machine: {machine}.  ",
        f"Command: `{command}`",
        "",
        "Bytes a site sends to the broker per update (counted by a TCP relay on loopback: AMQP frames with their "
        "framing, properties, the msgpack envelope and the tensors) divided by the raw float32 tensor bytes. "
        "Values of the delta: normal, std 0.01.",
        "",
        markdown_table(
            ["model", "parameters", "compression", "raw KB", "message KB", "wire KB", "wire / raw", "goal"],
            [
                [
                    row.model,
                    f"{row.params:,}",
                    row.compression,
                    f"{row.raw_bytes / 1e3:.1f}",
                    f"{row.body_bytes / 1e3:.1f}",
                    f"{row.wire_bytes / 1e3:.1f}",
                    f"{row.wire_ratio:.4f}",
                    (("met" if row.wire_ratio <= SIZE_GOAL else "NOT met") if row.compression == "none" else "-"),
                ]
                for row in wire_rows
            ],
        ),
        "",
        "Fixed overhead per update on the wire (no compression): "
        + ", ".join(
            f"{row.model} {row.wire_bytes - row.raw_bytes:.0f} B" for row in wire_rows if row.compression == "none"
        )
        + ". The goal is met once a model's tensors outweigh that (about 100K parameters and up); a 14-parameter "
        "model is all envelope.",
    ]
    if accuracy:
        lines += [
            "",
            "Accuracy cost: real federations (FedBuff, four sites, `[agent] compression`), seeds "
            f"{', '.join(map(str, seeds))}, final global model within the budget scored by the benchmark's referee; "
            "cost = median over seeds of (pooled accuracy without compression - with). Heart-disease: the demo's "
            f"FedBuff, {budgets.get('heart', 0):.0f} s. Image: a generated MedMNIST-format file (4 classes of noisy "
            "blobs, 28x28, 2000 train / 800 test, IID over 4 sites; NOT real MedMNIST), SmallCnn, FedBuff K=3 "
            f"server SGD, 20 local steps of batch 32 at lr 0.05, {budgets.get('image', 0):.0f} s.",
            "",
            markdown_table(
                ["task", "compression", "size vs none", "final pooled (median)", "final mean", "cost (pooled)"],
                [
                    [
                        task,
                        compression,
                        _size_ratio(
                            wire_rows, "heart-disease" if task == "heart-disease" else "image-cnn", compression
                        ),
                        _cell(_final(results, f"{prefix}{compression}", "pooled")),
                        _cell(_final(results, f"{prefix}{compression}", "mean")),
                        "-"
                        if compression == "none"
                        else _signed(_paired_drop(results, f"{prefix}{compression}", f"{prefix}none")),
                    ]
                    for task, prefix, results in (
                        ("heart-disease", "heart-", accuracy.get("heart", [])),
                        ("image (generated)", "image-", accuracy.get("image", [])),
                    )
                    if results
                    for compression in COMPRESSIONS
                ],
            ),
        ]
    return "\n".join(lines)


def _size_ratio(rows: Sequence[WireRow], model: str, compression: str) -> str:
    base = next((row for row in rows if row.model == model and row.compression == "none"), None)
    mine = next((row for row in rows if row.model == model and row.compression == compression), None)
    if base is None or mine is None:
        return "-"
    return f"{mine.wire_bytes / base.wire_bytes:.3f}"


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3f}"


# ------------------------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds for the accuracy runs (default 0,1,2)")
    parser.add_argument("--heart-budget", type=float, default=DEFAULT_HEART_BUDGET, help="seconds per heart run")
    parser.add_argument("--image-budget", type=float, default=DEFAULT_IMAGE_BUDGET, help="seconds per image run")
    parser.add_argument(
        "--tasks",
        default="heart,image",
        help="accuracy runs to do: heart, image, both (default) or none (only the byte counts)",
    )
    parser.add_argument(
        "--models",
        default="",
        help="comma-separated subset of the byte-count models (default: all: heart-disease, image-cnn, "
        "synthetic 1M, synthetic 11M)",
    )
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    root = bench_root(args) / "wire"
    seeds = [int(part) for part in args.seeds.split(",") if part.strip()]
    tasks = {part.strip() for part in args.tasks.split(",")} - {"none", ""}
    models = [part.strip() for part in args.models.split(",") if part.strip()] or None
    accuracy: dict[str, list[RunResult]] = {}
    with bench_broker(args) as broker:
        wire_rows = measure_wire(broker, models=models)
        for row in wire_rows:
            print(f"{row.model} {row.compression}: wire/raw {row.wire_ratio:.4f}", flush=True)
        if "heart" in tasks:
            referee = HeartReferee()
            for seed in seeds:
                for compression in COMPRESSIONS:
                    plan = fedmq_plan(
                        "fedbuff",
                        seed,
                        budget_seconds=args.heart_budget,
                        slow={},
                        local_steps=100,
                        learning_rate=0.01,
                        broker=broker,
                        referee=referee,
                        compression=compression,
                        label=f"heart-{compression}",
                    )
                    accuracy.setdefault("heart", []).append(_report_run(run_fedmq(broker, root, plan)))
        if "image" in tasks:
            npz = write_medmnist_like(root / "medmnist_like.npz")
            options = {"npz": str(npz), "sites": list(IMAGE_SITES), "num_classes": IMAGE_CLASSES}
            image_referee = ImageReferee(options)
            for seed in seeds:
                for compression in COMPRESSIONS:
                    plan = image_plan(broker, npz, seed, compression, args.image_budget, image_referee)
                    accuracy.setdefault("image", []).append(_report_run(run_fedmq(broker, root, plan)))
        rabbitmq_version = broker.rabbitmq_version
    report = format_report(
        wire_rows,
        accuracy,
        machine=describe_machine(rabbitmq_version),
        command=command_line(),
        seeds=seeds,
        budgets={"heart": args.heart_budget, "image": args.image_budget},
    )
    report = with_plot(args, report, "wire", "bytes on the wire per raw tensor byte", partial(plot_wire, wire_rows))
    return publish_report(args, "wire", report)


def plot_wire(rows: Sequence[WireRow], path: Path) -> None:
    figure, (axis,) = figure_with_panels(1, width=8.0)
    models = list(dict.fromkeys(row.model for row in rows))
    ratios = {(row.model, row.compression): row.wire_ratio for row in rows}
    grouped_bars(
        axis,
        models,
        [(compression, [ratios.get((model, compression), 0.0) for model in models]) for compression in COMPRESSIONS],
    )
    axis.axhline(SIZE_GOAL, color="grey", linewidth=0.8, linestyle=":", label=f"goal {SIZE_GOAL} (no compression)")
    axis.set_yscale("log")
    axis.set_ylabel("bytes on the wire / raw float32 bytes")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    save_figure(figure, path, "bytes per update on the wire")


def _report_run(result: RunResult) -> RunResult:
    final = result.final()
    shown = "-" if final is None else f"{final.pooled:.3f}"
    print(f"  {result.system} seed {result.seed}: {len(result.models)} models, final pooled {shown} {result.error}")
    return result
