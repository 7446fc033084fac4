"""``fedmq demo``: four real hospitals federate asynchronously on one machine, end to end.

It does what a real deployment does, with every part as a separate process: start a RabbitMQ node
(``fedmq broker up``), provision the four heart-disease hospitals (each makes its signing key with ``fedmq site
keygen``, then ``fedmq broker add-site --public-key`` registers it), start the
coordinator and one site agent per hospital, watch the coordinator's metrics endpoint for progress, and when the
coordinator's stopping rule ends the run, print per-hospital and pooled test accuracy next to FLamby's published
numbers, plot accuracy against time and version, and stop everything it started (also on Ctrl-C).
Everything it writes stays under the state dir.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import tomli_w

from broker.node import free_tcp_ports
from fedmq.status import FederationStatus, StatusError, federation_status, fetch_metrics_text, read_samples

HEART_SITES = ("cleveland", "hungary", "switzerland", "long-beach")
PLOTS_MISSING = "matplotlib is not installed; pip install 'fedmq[plots]' (or bash scripts/install.sh --demo) draws it"
STRATEGIES = ("fedbuff", "fedasync", "fedavg-sync")

# Tuned on the four hospitals over seeds 0-4, evenly fast and with switzerland 10x slower. FedBuff: FedOpt's Adam
# on the server, like FLamby's best FedAdam, but asynchronous, and example-weighted: with the paper's equal weights
# Switzerland's 30 all-positive rows pull as hard as Cleveland's 199 and the model drifts to a per-hospital average
# (pooled accuracy ~0.69); weighted, it settles by ~v20 where pooled training and sync FedAvg settle, and stays.
# FedAsync weights every update equally (the paper has no example weights), so it drifts the same way if run long:
# it stops at 60 local runs of 100 steps, FLamby's FedAvg budget, as sync FedAvg does (15 rounds x 4 sites).
# FedAsync's staleness bound is wide: it makes a version per update, ~30 a second with three fast hospitals, so a
# hospital 10x slower answers 25-40 versions late; a bound of 20 rejected every update it sent (its staleness
# weight, (1 + 40)^-0.5, already keeps it from pulling the model back).
STRATEGY_TABLES: dict[str, dict[str, Any]] = {
    "fedbuff": {
        "name": "fedbuff",
        "max_staleness": 20,
        "buffer_size": 3,
        "max_site_share": 0.67,
        "example_weighted": True,
        "server_optimizer": {"name": "adam", "learning_rate": 0.02},
    },
    "fedasync": {
        "name": "fedasync",
        "max_staleness": 100,
        "alpha": 0.3,
        "staleness": {"function": "polynomial", "a": 0.5},
    },
    "fedavg-sync": {"name": "fedavg-sync", "max_staleness": 0, "round_timeout_seconds": 120},
}
ROBUST_KEYS = ("robust", "aggregator", "trim_fraction")
NON_ROBUST_FEDBUFF: dict[str, Any] = {"max_site_share": 1.0, "example_weighted": True}  # what the demo ran before
UNBOUNDED_NUM_EXAMPLES = 2**63 - 1
# What each hospital registered with the consortium (its training rows, FLamby's split): the bound on its
# num_examples claim, as an operator would provision it.
REGISTERED_TRAINING_PATIENTS = {"cleveland": 199, "hungary": 172, "switzerland": 30, "long-beach": 85}
DEFAULT_VERSIONS = {"fedbuff": 60, "fedasync": 60, "fedavg-sync": 15}
BROKER_PORT_OPTIONS = ("amqp", "dist", "management", "prometheus")  # passed on to `fedmq broker up --X-port`


@dataclass(frozen=True)
class DemoOptions:
    state_dir: Path
    strategy: str = "fedbuff"
    seed: int = 0
    slow: dict[str, float] = field(default_factory=dict)
    versions: int | None = None
    max_seconds: float = 600.0
    local_steps: int = 100
    learning_rate: float = 0.01
    metrics_port: int = 0
    summary_json: Path | None = None
    keep_broker: bool = False
    # Poisoning attackers (site -> KIND[:SCALE], site_agent.attacks), and whether the robust options stay on.
    attack: dict[str, str] = field(default_factory=dict)
    robust: bool = True
    # Ports of the node it starts, by name ("amqp", "dist", "management", "prometheus"; one not named: `fedmq broker
    # up`'s default), so a test or a second demo can run beside a developer's own.
    broker_ports: dict[str, int] = field(default_factory=dict)


def register(subcommands: Any) -> None:
    demo = subcommands.add_parser(
        "demo",
        help="run the four-hospital heart-disease federation locally (the main job)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    demo.add_argument("--strategy", choices=STRATEGIES, default="fedbuff", help="aggregation (default fedbuff)")
    demo.add_argument("--seed", type=int, default=0, help="seed for the model and every site's training")
    demo.add_argument(
        "--slow",
        action="append",
        default=[],
        metavar="SITE=FACTOR",
        help="make a hospital FACTOR times slower, e.g. --slow switzerland=10 (repeatable)",
    )
    demo.add_argument(
        "--attack",
        action="append",
        default=[],
        metavar="SITE=KIND[:SCALE]",
        help="make a hospital's agent a poisoning attacker, e.g. --attack cleveland=sign-flip:10; KIND is sign-flip, "
        "scale, noise, inflate-examples or flood (repeatable; a test and demo facility)",
    )
    demo.add_argument(
        "--no-robust",
        action="store_true",
        help="turn the coordinator's robust options off (clipping, median, num_examples cap) to see an attack bite",
    )
    demo.add_argument("--versions", type=int, help="stop after this many global versions (default per strategy)")
    demo.add_argument("--max-seconds", type=float, default=600.0, help="wall-clock budget (default 600)")
    demo.add_argument("--local-steps", type=int, default=100, help="local optimiser steps per update")
    demo.add_argument("--learning-rate", type=float, default=0.01, help="sites' SGD learning rate")
    demo.add_argument("--metrics-port", type=int, default=0, help="coordinator metrics port (default: a free one)")
    demo.add_argument("--summary-json", type=Path, help="also write the results as JSON here")
    demo.add_argument("--keep-broker", action="store_true", help="leave the RabbitMQ node running afterwards")
    for port in BROKER_PORT_OPTIONS:
        demo.add_argument(
            f"--{port}-port", type=int, help=f"{port} port of the RabbitMQ node it starts (default: fedmq broker up's)"
        )
    demo.set_defaults(handler=demo_command)


def parse_slow(values: Sequence[str]) -> dict[str, float]:
    slow: dict[str, float] = {}
    for value in values:
        site, _, factor = value.partition("=")
        if site not in HEART_SITES or not factor:
            raise ValueError(f"--slow {value!r}: expected SITE=FACTOR with SITE one of {', '.join(HEART_SITES)}")
        slow[site] = float(factor)
        if slow[site] < 1:
            raise ValueError(f"--slow {value!r}: the factor must be >= 1")
    return slow


def parse_attack(values: Sequence[str]) -> dict[str, str]:
    from site_agent.attacks import Attack

    attacks: dict[str, str] = {}
    for value in values:
        site, _, spec = value.partition("=")
        if site not in HEART_SITES or not spec:
            raise ValueError(
                f"--attack {value!r}: expected SITE=KIND[:SCALE] with SITE one of {', '.join(HEART_SITES)}"
            )
        attacks[site] = str(Attack.parse(spec))
    return attacks


def demo_command(args: argparse.Namespace) -> int:
    try:
        options = DemoOptions(
            state_dir=args.state_dir,
            strategy=args.strategy,
            seed=args.seed,
            slow=parse_slow(args.slow),
            attack=parse_attack(args.attack),
            robust=not args.no_robust,
            versions=args.versions,
            max_seconds=args.max_seconds,
            local_steps=args.local_steps,
            learning_rate=args.learning_rate,
            metrics_port=args.metrics_port,
            summary_json=args.summary_json,
            keep_broker=args.keep_broker,
            broker_ports={
                port: getattr(args, f"{port}_port")
                for port in BROKER_PORT_OPTIONS
                if getattr(args, f"{port}_port") is not None
            },
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run_demo(options)


# ----------------------------------------------------------------------------------------------------- processes


def fedmq_command(state_dir: Path, *arguments: str) -> list[str]:
    return [sys.executable, "-m", "fedmq", "--state-dir", str(state_dir), *arguments]


class ProcessGroup:
    """Child processes with their own log files; all are stopped on exit, however the demo ends."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[TextIO] = []

    def start(
        self,
        name: str,
        command: list[str],
        *,
        append: bool = False,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        log_file = (self.log_dir / f"{name}.log").open("a" if append else "w")
        self._logs.append(log_file)
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=cwd
        )
        self.processes[name] = process
        return process

    def stop_all(self, grace_seconds: float = 15.0) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for log_file in self._logs:
            log_file.close()
        self._logs.clear()


def run_checked(command: list[str], what: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{result.stdout}{result.stderr}")
    return result.stdout


# ------------------------------------------------------------------------------------------------------- configs


def purge_leftovers(state_dir: Path) -> None:
    """A fresh run must not inherit updates or evaluations an earlier demo left in the durable queues."""
    from broker.declare import purge_queues_at
    from broker.node import load_access
    from broker.topology import VHOST, Queue, site_control_queue, site_inbox, site_update_queue

    access = load_access(state_dir)
    queues = [queue.value for queue in Queue]
    queues += [
        name for site in HEART_SITES for name in (site_inbox(site), site_control_queue(site), site_update_queue(site))
    ]
    dropped = purge_queues_at(access.connection_parameters(VHOST) if access.tls else access.admin_url(VHOST), queues)
    if dropped:
        print(f"dropped {dropped} messages an earlier run left in the queues", flush=True)


def coordinator_toml(options: DemoOptions, broker_url: str, metrics_port: int) -> str:
    versions = options.versions or DEFAULT_VERSIONS[options.strategy]
    tables = {
        "task": "heart-disease",
        "sites": list(HEART_SITES),
        "seed": options.seed,
        "broker": {"url": broker_url},
        "strategy": STRATEGY_TABLES[options.strategy] if options.robust else without_robust_options(options.strategy),
        "training": {"local_steps": options.local_steps, "learning_rate": options.learning_rate, "batch_size": 4},
        "liveness": {"site_timeout_seconds": 20},
        "stopping": {"max_versions": versions, "max_seconds": options.max_seconds, "final_eval_timeout_seconds": 60},
        "metrics": {"host": "127.0.0.1", "port": metrics_port},
    }
    if options.robust:
        tables["validation"] = {"site_max_num_examples": dict(REGISTERED_TRAINING_PATIENTS)}
    else:
        tables["validation"] = {"max_num_examples": UNBOUNDED_NUM_EXAMPLES}
    return "# written by `fedmq demo`\n" + tomli_w.dumps(tables)


def without_robust_options(strategy: str) -> dict[str, Any]:
    """The strategy table as it was before the robust options: no clipping, the plain mean (``--no-robust``)."""
    table = {key: value for key, value in STRATEGY_TABLES[strategy].items() if key not in ROBUST_KEYS}
    if strategy == "fedbuff":
        table.update(NON_ROBUST_FEDBUFF)
    return {**table, "robust": {"clip": False, "anomaly_score": True}}


def site_tables(options: DemoOptions, site: str) -> str:
    agent: dict[str, Any] = {
        "seed": options.seed,
        "slowdown": float(options.slow.get(site, 1.0)),
        "heartbeat_seconds": 2.0,
    }
    if site in options.attack:
        agent["attack"] = options.attack[site]
    tables = {"task": {"name": "heart-disease"}, "agent": agent}
    return "\n# added by `fedmq demo`\n" + tomli_w.dumps(tables)


# ------------------------------------------------------------------------------------------------------ progress


def progress_line(status: FederationStatus, elapsed: float) -> str:
    applied = {site.site: site.updates_applied for site in status.sites}
    per_site = " ".join(f"{site} {applied.get(site, 0)}" for site in HEART_SITES)
    accuracy = status.global_evaluation.get("accuracy", {})
    shown = " / ".join(
        f"{value:.3f}" if value is not None and not math.isnan(value) else "-"
        for value in (accuracy.get("mean"), accuracy.get("pooled"))
    )
    return f"[{elapsed:5.0f} s] model v{status.model_version:<4d} accuracy (mean / all) {shown}  updates: {per_site}"


# ------------------------------------------------------------------------------------------------------- results


def results_table(summary: dict[str, Any], strategy: str, flamby_pooled: float | None) -> str:
    """Per-hospital accuracy, their mean, and pooled test accuracy, next to FLamby's published figures.

    Two pooled figures, because FLamby's own is easy to misread: FLamby scores a model on the four test sets
    concatenated and z-scored with the pooled training statistics (what the demo's referee computes here from the
    final model, with the data all four hospitals hold); the coordinator, which sees no data, reports the
    accuracy over all test patients with each hospital's own normalisation (the test-size-weighted mean).
    """
    from tasks.heart_disease import read_flamby_baselines

    baselines = read_flamby_baselines()
    columns = [
        ("FLamby FedAvg", baselines["FedAvg100"]),
        ("FLamby FedAdam", baselines["FedAdam100"]),
        ("FLamby pooled", baselines["Pooled Training"]),
    ]
    final = summary.get("final_evaluation") or {}
    per_site = final.get("per_site", {})
    counts = final.get("num_examples", {})
    header = f"{'hospital':<30}{'test n':>7}{'fedmq ' + strategy:>18}" + "".join(f"{name:>16}" for name, _ in columns)
    lines = [header, "-" * len(header)]
    for site in HEART_SITES:
        ours = per_site.get(site, {}).get("accuracy")
        lines.append(
            f"{site:<30}{counts.get(site, 0):>7}{_cell(ours):>18}"
            + "".join(f"{baseline.site_test_means[site]:>16.3f}" for _, baseline in columns)
        )
    lines.append("-" * len(header))
    total = sum(counts.get(site, 0) for site in HEART_SITES)

    def weighted(baseline: Any) -> str:
        if not total:
            return f"{'-':>16}"
        value = sum(baseline.site_test_means[site] * counts.get(site, 0) for site in HEART_SITES) / total
        return f"{value:>16.3f}"

    lines.append(
        f"{'mean over hospitals':<37}{_cell(final.get('mean', {}).get('accuracy')):>18}"
        + "".join(f"{baseline.client_average_mean:>16.3f}" for _, baseline in columns)
    )
    lines.append(
        f"{'pooled test set (FLamby)':<37}{_cell(flamby_pooled):>18}"
        + "".join(f"{baseline.pooled_test_mean:>16.3f}" for _, baseline in columns)
    )
    lines.append(
        f"{'all patients, site-normalised':<37}{_cell(final.get('pooled', {}).get('accuracy')):>18}"
        + "".join(weighted(baseline) for _, baseline in columns)
    )
    return "\n".join(lines)


def flamby_pooled_accuracy(model_path: Path) -> float | None:
    """The final model scored as FLamby scores its pooled test set (pooled normalisation)."""
    if not model_path.exists():
        return None
    from coordinator.model_files import read_safetensors
    from tasks.heart_disease import HeartDiseaseTask, load_pooled

    task = HeartDiseaseTask()
    model = task.build_model()
    tensors, _ = read_safetensors(model_path)
    model.load_state_dict(tensors)
    pooled = load_pooled()
    return float(task.evaluate_split(model, pooled.test_features, pooled.test_labels)["accuracy"])


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def read_history(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def complete_evaluations(history: list[dict[str, Any]], num_sites: int) -> list[dict[str, Any]]:
    """The first row at which each version had been evaluated by every hospital."""
    rows: dict[int, dict[str, Any]] = {}
    for row in history:
        if len(row["sites_reported"]) >= num_sites and row["version"] not in rows:
            rows[row["version"]] = row
    return [rows[version] for version in sorted(rows)]


def plots_available() -> bool:
    """matplotlib is an extra (``fedmq[plots]``): a hospital's agent never draws, the demo does."""
    return importlib.util.find_spec("matplotlib") is not None


def plot_progress(history: list[dict[str, Any]], started_at: float, path: Path, title: str) -> bool:
    rows = complete_evaluations(history, len(HEART_SITES))
    if not rows or not plots_available():
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seconds = [row["time"] - started_at for row in rows]
    versions = [row["version"] for row in rows]
    figure, (by_time, by_version) = plt.subplots(1, 2, figsize=(11, 4.2))
    for aggregate, style in (("pooled", "-"), ("mean", "--")):
        values = [row[aggregate]["accuracy"] for row in rows]
        label = "all patients, site-normalised" if aggregate == "pooled" else "mean over hospitals"
        by_time.plot(seconds, values, style, label=label)
        by_version.plot(versions, values, style, label=label)
    for axis, xlabel in ((by_time, "wall-clock seconds"), (by_version, "global model version")):
        # FLamby's mean over hospitals, the same definition as the dashed curves.
        axis.axhline(0.685, color="grey", linewidth=0.8, linestyle=":", label="FLamby FedAvg (mean over hospitals)")
        axis.axhline(0.726, color="black", linewidth=0.8, linestyle=":", label="FLamby FedAdam (mean over hospitals)")
        axis.set_xlabel(xlabel)
        axis.set_ylabel("test accuracy")
        axis.set_ylim(0.4, 0.9)
        axis.grid(alpha=0.3)
    by_version.legend(loc="lower right", fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


# ----------------------------------------------------------------------------------------------------------- run


def run_demo(options: DemoOptions) -> int:
    state_dir = options.state_dir
    demo_dir = state_dir / "demo"
    demo_dir.mkdir(parents=True, exist_ok=True)
    group = ProcessGroup(demo_dir / "logs")
    started_broker = False
    interrupted = False
    if not plots_available():
        print(f"note: the accuracy plot will be skipped: {PLOTS_MISSING}", flush=True)

    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_signal)
    try:
        print(f"fedmq demo: four hospitals, strategy {options.strategy}, state dir {state_dir}", flush=True)
        status = subprocess.run(fedmq_command(state_dir, "broker", "status"), capture_output=True, text=True)
        if status.returncode != 0:
            print("starting a local RabbitMQ node ...", flush=True)
            port_arguments = [f"--{name}-port={port}" for name, port in options.broker_ports.items()]
            run_checked(fedmq_command(state_dir, "broker", "up", *port_arguments), "fedmq broker up")
            started_broker = True
        for site in HEART_SITES:
            # each hospital makes its own signing key (here all four live on this machine) and sends the .pub
            sites_dir = state_dir / "sites"
            public_key = sites_dir / f"{site}.signing.pub"
            if not (sites_dir / f"{site}.signing.key").exists():
                run_checked(fedmq_command(state_dir, "site", "keygen", site, "--dir", str(sites_dir)), f"keygen {site}")
            add_site = ["broker", "add-site", site, "--rotate-password", "--public-key", str(public_key)]
            path = Path(run_checked(fedmq_command(state_dir, *add_site), f"add-site {site}").strip().splitlines()[-1])
            with path.open("a") as handle:
                handle.write(site_tables(options, site))
        print(f"provisioned {len(HEART_SITES)} hospitals: configs in {state_dir / 'sites'}", flush=True)
        coordinator_dir = state_dir / "coordinator"
        if coordinator_dir.exists():  # a demo always starts a fresh run
            import shutil

            shutil.rmtree(coordinator_dir)
        purge_leftovers(state_dir)
        from broker.provisioning import coordinator_config_path, read_broker_url, write_private_file

        metrics_port = options.metrics_port or free_tcp_ports(1)[0]
        config_path = demo_dir / "coordinator.toml"
        # it holds the coordinator's broker password: 0600 from the first byte
        write_private_file(
            config_path, coordinator_toml(options, read_broker_url(coordinator_config_path(state_dir)), metrics_port)
        )
        started = time.time()
        coordinator = group.start(
            "coordinator", fedmq_command(state_dir, "coordinator", "run", "--config", str(config_path))
        )
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        print(f"coordinator started; metrics at {metrics_url}", flush=True)
        for site in HEART_SITES:
            group.start(
                site, fedmq_command(state_dir, "site", "run", "--config", str(state_dir / "sites" / f"{site}.toml"))
            )
        slow = ", ".join(f"{site} x{factor:g}" for site, factor in options.slow.items()) or "none"
        print(f"site agents started: {', '.join(HEART_SITES)} (slowed: {slow}); logs in {group.log_dir}", flush=True)
        for site, attack in options.attack.items():
            defence = "robust options on" if options.robust else "robust options OFF"
            print(f"{site} is a poisoning attacker ({attack}); {defence}", flush=True)
        _watch(coordinator, metrics_url, started)
        if coordinator.returncode != 0:
            print(
                f"the coordinator exited with code {coordinator.returncode}; see {group.log_dir}/coordinator.log",
                file=sys.stderr,
            )
            return 1
        return _report(options, coordinator_dir, started)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: stopping everything", flush=True)
        return 130
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        group.stop_all()
        if started_broker and not options.keep_broker:
            subprocess.run(fedmq_command(state_dir, "broker", "down"), capture_output=True)
        signal.signal(signal.SIGTERM, previous)
        if not interrupted:
            print("all demo processes stopped", flush=True)


def _watch(coordinator: subprocess.Popen[bytes], metrics_url: str, started: float) -> None:
    interactive = sys.stdout.isatty()
    last_printed = 0.0
    line = ""
    while coordinator.poll() is None:
        time.sleep(1.0)
        try:
            samples = read_samples(fetch_metrics_text(metrics_url), metrics_url)
            line = progress_line(federation_status(samples, time.time()), time.time() - started)
        except StatusError:
            continue
        if interactive:
            print("\r" + line, end="", flush=True)
        elif time.monotonic() - last_printed >= 5:
            print(line, flush=True)
            last_printed = time.monotonic()
    if interactive:
        print()


def _report(options: DemoOptions, coordinator_dir: Path, started: float) -> int:
    summary = json.loads((coordinator_dir / "run_summary.json").read_text())
    final = summary.get("final_evaluation") or {}
    seconds = time.time() - started
    print()
    print(
        f"finished: {summary['stop_reason']}; {summary['versions']} versions from {summary['updates_accepted']} "
        f"updates in {seconds:.0f} s"
    )
    print()
    flamby_pooled = flamby_pooled_accuracy(coordinator_dir / "final_model.safetensors")
    print(results_table(summary, options.strategy, flamby_pooled))
    print()
    history = read_history(coordinator_dir / "evaluations.jsonl")
    plot_path = options.state_dir / "demo" / "accuracy.png"
    if plot_progress(history, started, plot_path, f"fedmq {options.strategy}, four hospitals (seed {options.seed})"):
        print(f"plot: {plot_path}")
    elif not plots_available():
        print(f"no plot: {PLOTS_MISSING}")
    print(f"final model: {coordinator_dir / 'final_model.safetensors'}; audit log: {coordinator_dir / 'audit.jsonl'}")
    result = {
        "strategy": options.strategy,
        "seed": options.seed,
        "client_avg_accuracy": final.get("mean", {}).get("accuracy"),
        "pooled_accuracy": flamby_pooled,  # FLamby's definition, comparable with its published pooled figures
        "pooled_site_normalised_accuracy": final.get("pooled", {}).get("accuracy"),
        "per_site": {site: metrics.get("accuracy") for site, metrics in final.get("per_site", {}).items()},
        "versions": summary["versions"],
        "updates": summary["updates_accepted"],
        "seconds": seconds,
        "slow": options.slow,
    }
    if options.summary_json is not None:
        options.summary_json.parent.mkdir(parents=True, exist_ok=True)
        options.summary_json.write_text(json.dumps(result, indent=2))
        print(f"summary: {options.summary_json}")
    return 0
