"""What the broker-backed benchmarks share: a private RabbitMQ node on free ports, provisioned sites, the
machine description, process sampling, and the writer of ``docs/BENCHMARKS.md`` sections.

Every benchmark starts its own node under its own state dir (``<state dir>/bench/<name>``), on ports nobody
listens on, so it never disturbs a demo or a test session running next to it, and stops it at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import pika
import pika.exceptions

from broker import topology
from broker.declare import declare_topology_at
from broker.errors import BrokerError
from broker.keys import generate_private_key, public_key_path, write_key_pair
from broker.node import LocalNode, free_tcp_ports
from broker.provisioning import add_site, ensure_coordinator_user, read_broker_url

DEFAULT_DOC = Path("docs/BENCHMARKS.md")
DOC_TITLE = "# fedmq benchmarks"
DOC_INTRO = (
    "Written by `fedmq bench NAME` (one section per benchmark, replaced when it runs again). Each section states "
    "the machine it ran on and the command that reproduces it; ratios are measured within one run, so they "
    "compare across machines better than the absolute figures."
)
NODE_START_TIMEOUT = 120.0


# ---------------------------------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _memory_gib() -> float:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024**2
    return float("nan")


def describe_machine(rabbitmq_version: str | None = None) -> str:
    """One line: cores, memory, CPU, OS, Python, torch (and RabbitMQ when known)."""
    import torch

    parts = [
        f"{os.cpu_count()} cores (nproc {len(os.sched_getaffinity(0))})",
        f"{_memory_gib():.1f} GiB RAM",
        _cpu_model(),
        f"{platform.system()} {platform.release()}",
        f"Python {platform.python_version()}",
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)",
    ]
    if rabbitmq_version:
        parts.append(f"RabbitMQ {rabbitmq_version}")
    parts.append(f"load average {load_average()} (1/5/15 min, as the run ended; other work shares this machine)")
    return ", ".join(parts)


def load_average() -> str:
    return " ".join(f"{value:.1f}" for value in os.getloadavg())


def command_line(arguments: Sequence[str] | None = None) -> str:
    """The command as it was invoked (``fedmq bench ...`` or ``python -m benchmarks ...``), for the reproduce
    line of a section."""
    words = list(sys.argv[1:] if arguments is None else arguments)
    program = "python -m benchmarks" if Path(sys.argv[0]).parent.name == "benchmarks" else "fedmq"
    return " ".join([program, *words])


# -------------------------------------------------------------------------------------------------- the doc


def _markers(key: str) -> tuple[str, str]:
    return f"<!-- bench:{key} start -->", f"<!-- bench:{key} end -->"


def publish_report(args: argparse.Namespace, name: str, report: str) -> int:
    """Print a benchmark's report and, unless ``--no-doc``, replace its section in the markdown file."""
    print()
    print(report)
    if not args.no_doc:
        replace_section(args.doc, name, report)
        print(f"\nwritten to {args.doc}")
    return 0


def figure_with_panels(panels: int, *, width: float = 11.0, height: float = 4.2) -> tuple[Any, list[Any]]:
    """An off-screen matplotlib figure with ``panels`` axes side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, panels, figsize=(width, height))
    return figure, list(axes) if panels > 1 else [axes]


def save_figure(figure: Any, path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def grouped_bars(axis: Any, groups: Sequence[str], series: Sequence[tuple[str, Sequence[float]]]) -> None:
    """One bar per series side by side in each group (a value per group in each series), groups on the x axis."""
    width = 0.8 / len(series)
    for offset, (label, values) in enumerate(series):
        shift = (offset - (len(series) - 1) / 2) * width
        axis.bar([index + shift for index in range(len(groups))], values, width, label=label)
    axis.set_xticks(range(len(groups)), groups)


def with_plot(args: argparse.Namespace, report: str, name: str, caption: str, draw: Callable[[Path], None]) -> str:
    """Unless ``--no-doc``: draw the benchmark's plot next to the markdown file and link it under the report."""
    if args.no_doc:
        return report
    path = args.doc.parent / f"bench_{name}.png"
    draw(path)
    return f"{report.rstrip()}\n\n![{caption}]({path.name})"


def positive_int_list(what: str) -> Callable[[str], list[int]]:
    """An argparse type for comma-separated positive counts (``1e6`` allowed), naming ``what`` in errors."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(float(part)) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None
        if not values or min(values) < 1:
            raise argparse.ArgumentTypeError(f"{what} must be >= 1, got {text!r}")
        return values

    return parse


def replace_section(path: Path, key: str, body: str) -> None:
    """Put ``body`` between this benchmark's markers in ``path``, replacing what a previous run wrote there;
    other sections are left as they are. The file is created with a title when missing."""
    start, end = _markers(key)
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else f"{DOC_TITLE}\n\n{DOC_INTRO}\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _match: block, text, count=1)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def median_or_none(values: Iterable[float | None]) -> float | None:
    """The median of the values that exist; None when none does."""
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


# --------------------------------------------------------------------------------------------------- broker


class BenchBroker:
    """A private RabbitMQ node under ``state_dir`` on free ports, with the fedmq vhost, the coordinator's user
    and the topology, exactly as ``fedmq broker up`` prepares one. A node already running there (left by a
    benchmark run with ``keep_running``) is reused; otherwise a fresh one is started. Stopped at exit unless
    ``keep_running``."""

    def __init__(self, state_dir: Path, *, keep_running: bool = False, statistics_interval_ms: int = 5000) -> None:
        self.state_dir = state_dir.resolve()
        self.keep_running = keep_running
        self.statistics_interval_ms = statistics_interval_ms
        self.node: LocalNode | None = None
        self.vhost = topology.VHOST
        self.site_urls: dict[str, str] = {}
        self.rabbitmq_version: str | None = None

    def __enter__(self) -> BenchBroker:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        node = self.node = self._running_node() or self._fresh_node()
        management = node.access.management()
        management.create_vhost(self.vhost)
        management.set_permissions(self.vhost, node.access.admin_user, configure=".*", write=".*", read=".*")
        ensure_coordinator_user(
            management,
            vhost=self.vhost,
            amqp_host=node.access.amqp_host,
            amqp_port=node.access.amqp_port,
            state_dir=self.state_dir,
        )
        declare_topology_at(self.admin_url)
        self.rabbitmq_version = str(management.overview().get("rabbitmq_version", "")) or None

    def _running_node(self) -> LocalNode | None:
        if not (self.state_dir / "broker" / "admin.toml").exists():
            return None
        with contextlib.suppress(BrokerError):
            node = LocalNode.from_state_dir(self.state_dir)
            if node.is_running():
                return node
        return None

    def _fresh_node(self) -> LocalNode:
        shutil.rmtree(self.state_dir / "broker", ignore_errors=True)
        shutil.rmtree(self.state_dir / "sites", ignore_errors=True)
        amqp_port, dist_port, management_port, prometheus_port = free_tcp_ports(4)
        node = LocalNode(
            self.state_dir,
            amqp_port=amqp_port,
            dist_port=dist_port,
            management_port=management_port,
            prometheus_port=prometheus_port,
            statistics_interval_ms=self.statistics_interval_ms,
        )
        node.start(timeout=NODE_START_TIMEOUT)
        return node

    def stop(self) -> None:
        if self.node is not None and not self.keep_running:
            with contextlib.suppress(BrokerError):
                self.node.stop()
        self.node = None

    def _node(self) -> LocalNode:
        if self.node is None:
            raise RuntimeError("the benchmark broker is not running")
        return self.node

    @property
    def admin_url(self) -> str:
        return self._node().access.admin_url(self.vhost)

    @property
    def coordinator_url(self) -> str:
        return read_broker_url(self.state_dir / "coordinator-broker.toml")

    def add_sites(self, site_ids: Iterable[str]) -> dict[str, str]:
        """Provision each site as ``fedmq broker add-site --rotate-password`` does (its own user, permissions,
        queues, config file under ``<state dir>/sites``). Returns site -> AMQP URL."""
        node = self._node()
        management = node.access.management()
        urls: dict[str, str] = {}
        for site_id in site_ids:
            # the site's signing key, as `fedmq site keygen` makes it at a hospital, beside its config file
            key_file = self.state_dir / "sites" / f"{site_id}.signing.key"
            if not key_file.exists():
                write_key_pair(key_file, generate_private_key())
            path = add_site(
                management,
                site_id=site_id,
                amqp_host=node.access.amqp_host,
                amqp_port=node.access.amqp_port,
                vhost=self.vhost,
                state_dir=self.state_dir,
                rotate_password=True,  # a site left by an earlier run gets a new password and file
                public_key_file=public_key_path(key_file),
            )
            urls[site_id] = read_broker_url(path)
        self.site_urls.update(urls)
        return urls

    def site_config_path(self, site_id: str) -> Path:
        return self.state_dir / "sites" / f"{site_id}.toml"


def purge_queues(admin_url: str, site_ids: Sequence[str]) -> None:
    """Empty every queue of the federation, so a run never sees the leftovers of the previous one."""
    connection = pika.BlockingConnection(pika.URLParameters(admin_url))
    try:
        channel = connection.channel()
        names = [queue.value for queue in topology.Queue]
        for site in site_ids:
            names += [spec.name for spec in topology.site_queues(site)]
        for name in names:
            try:
                channel.queue_purge(name)
            except pika.exceptions.ChannelClosedByBroker:
                channel = connection.channel()  # a queue not declared yet: nothing to purge
    finally:
        connection.close()


# ------------------------------------------------------------------------------------------------ processes


@dataclass(frozen=True)
class ProcessSample:
    """Resident memory now, its peak, and CPU seconds used so far by one process (from /proc)."""

    rss_bytes: int
    peak_rss_bytes: int
    cpu_seconds: float


def sample_process(pid: int) -> ProcessSample:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in status.splitlines() if ":" in line}
    stat = Path(f"/proc/{pid}/stat").read_text()
    after_name = stat[stat.rindex(")") + 2 :].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu_seconds = (int(after_name[11]) + int(after_name[12])) / ticks  # utime + stime
    return ProcessSample(
        rss_bytes=int(fields.get("VmRSS", "0 kB").split()[0]) * 1024,
        peak_rss_bytes=int(fields.get("VmHWM", "0 kB").split()[0]) * 1024,
        cpu_seconds=cpu_seconds,
    )


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """``--doc``, ``--no-doc`` and ``--keep-broker``, shared by every broker-backed benchmark."""
    parser.add_argument(
        "--doc", type=Path, default=DEFAULT_DOC, help=f"markdown file to write the section into ({DEFAULT_DOC})"
    )
    parser.add_argument("--no-doc", action="store_true", help="print only; leave the markdown file alone")
    parser.add_argument(
        "--keep-broker",
        action="store_true",
        help="leave the benchmarks' RabbitMQ node running (the next benchmark reuses it)",
    )


def bench_broker(args: argparse.Namespace) -> BenchBroker:
    """The node every benchmark of this state dir shares: ``<state dir>/bench``."""
    return BenchBroker(bench_root(args), keep_running=args.keep_broker)


def bench_root(args: argparse.Namespace) -> Path:
    return Path(args.state_dir / "bench").resolve()


def python_command(module: str, *arguments: str) -> list[str]:
    return [sys.executable, "-m", module, *arguments]


def start_coordinator(
    broker: BenchBroker, config_path: Path, log: Any, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """A real ``fedmq coordinator run`` against the benchmark's broker, its output going to ``log``."""
    return subprocess.Popen(
        python_command(
            "fedmq", "--state-dir", str(broker.state_dir), "coordinator", "run", "--config", str(config_path)
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )


def stop_process(process: subprocess.Popen[bytes], grace_seconds: float = 20.0) -> None:
    """SIGTERM, then SIGKILL after the grace period; always reaped."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
