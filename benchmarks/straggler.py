"""``fedmq bench straggler``: time to accuracy on heart-disease when one hospital is 10x slower.

Four systems, each run for the same wall-clock budget per seed, all in one invocation, on one private RabbitMQ
node (fedmq) or gRPC over loopback (Flower):

- fedmq FedBuff, fedmq FedAsync and fedmq synchronous FedAvg: the demo's machinery (``fedmq.demo``'s
  coordinator config and strategy tables, ``fedmq coordinator run`` and four ``fedmq site run`` processes, each
  hospital its own broker user);
- Flower's FedAvg: a server and four client processes (``benchmarks.flower_heart``), if ``flwr`` is installed.

Every system uses the same initial model (seeded), the same local training (100 SGD steps, learning rate 0.01,
batch 4, the site agent's loop and seeding) and the same slowdown (the slow hospital sleeps ``9 x`` its busy
time after each local training). Sites of both systems run one throwaway training before connecting
(``WarmedHeartDiseaseTask``), so the slowdown multiplies steady-state training, not torch's one-off start-up.

One referee scores every global model either system produces (``benchmarks.heart.HeartReferee``): for fedmq
an observer with its own broker user receives every published version; Flower's server scores each round in
its ``evaluate_fn``. Times count from the moment training can start: all four sites are up and connected (their
logs say so) and the first global model exists. fedmq's sites are started first and version 0 is published
once all four wait for it, so no fast hospital gets a head start; Flower's server starts first, as deployed,
and its round 1 waits for all four clients. Process start-up is reported apart and charged to neither.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import torch

from benchmarks.flower_heart import READY_MARKER as FLOWER_READY_MARKER
from benchmarks.harness import (
    BenchBroker,
    add_common_arguments,
    bench_broker,
    bench_root,
    command_line,
    describe_machine,
    figure_with_panels,
    free_tcp_ports,
    markdown_table,
    median_or_none,
    publish_report,
    purge_queues,
    save_figure,
)
from benchmarks.heart import HEART_SITES, HeartReferee, Scores
from broker.topology import site_inbox
from fedmq.demo import STRATEGIES, STRATEGY_TABLES, DemoOptions, ProcessGroup, coordinator_toml, fedmq_command
from schemas import GlobalModel, SchemaError

if sys.version_info >= (3, 11):
    pass
else:  # pragma: no cover
    pass

HELP = "time to accuracy with one hospital 10x slower: fedmq FedBuff/FedAsync/sync FedAvg vs Flower FedAvg"
OBSERVER_SITE = "bench-observer"
WARMED_TASK = "benchmarks.heart:WarmedHeartDiseaseTask"
FLOWER = "flower-fedavg"
SYSTEM_LABELS = {
    "fedbuff": "fedmq FedBuff",
    "fedasync": "fedmq FedAsync",
    "fedavg-sync": "fedmq sync FedAvg",
    FLOWER: "Flower FedAvg",
}
ASYNC_SYSTEMS = ("fedbuff", "fedasync")
DEFAULT_SEEDS = (0, 1, 2, 3, 4)
DEFAULT_BUDGET_SECONDS = 30.0
DEFAULT_SLOW_SITE = "switzerland"
DEFAULT_SLOWDOWN = 10.0
POOLED_TARGET = 0.75
MEAN_TARGET = 0.70
FIRST_MODEL_TIMEOUT = 90.0
FEDMQ_READY_MARKER = "connected; waiting for the global model"  # site_agent.runner logs it once connected


@dataclass(frozen=True)
class ScoredModel:
    time: float
    version: int
    scores: Scores


@dataclass
class RunResult:
    """One system, one seed: when it was launched, its first global model, and every model scored."""

    system: str
    seed: int
    budget_seconds: float
    launched_at: float
    first_model_at: float | None = None
    sites_ready_at: float | None = None
    models: list[ScoredModel] = field(default_factory=list)
    error: str = ""

    @property
    def start_at(self) -> float | None:
        """When training could start: the first global model exists and every site is up and connected."""
        if self.first_model_at is None or self.sites_ready_at is None:
            return None
        return max(self.first_model_at, self.sites_ready_at)

    def _within_budget(self) -> list[ScoredModel]:
        if self.start_at is None:
            return []
        end = self.start_at + self.budget_seconds
        return [model for model in self.models if model.time <= end]

    def time_to(self, target: float, aggregate: str) -> float | None:
        """Seconds from the start of training to the first global model scoring ``>= target``; None if never."""
        for model in self._within_budget():
            value = model.scores.pooled if aggregate == "pooled" else model.scores.mean
            if value >= target and self.start_at is not None:
                return max(0.0, model.time - self.start_at)
        return None

    def final(self) -> Scores | None:
        """The last global model published within the budget."""
        within = self._within_budget()
        return within[-1].scores if within else None

    @property
    def startup_seconds(self) -> float | None:
        return None if self.start_at is None else self.start_at - self.launched_at

    @property
    def versions(self) -> int:
        within = self._within_budget()
        return within[-1].version if within else 0

    def as_json(self) -> dict[str, Any]:
        return {
            "system": self.system,
            "seed": self.seed,
            "budget_seconds": self.budget_seconds,
            "launched_at": self.launched_at,
            "first_model_at": self.first_model_at,
            "sites_ready_at": self.sites_ready_at,
            "error": self.error,
            "models": [
                {
                    "time": model.time,
                    "version": model.version,
                    "pooled": model.scores.pooled,
                    "mean": model.scores.mean,
                    "site_weighted": model.scores.site_weighted,
                }
                for model in self.models
            ],
        }


# ------------------------------------------------------------------------------------------------- observer


class ModelObserver:
    """A broker user of its own whose inbox receives every global model the coordinator broadcasts; each is
    scored by ``referee`` on arrival (the inbox keeps only the newest, so a slow referee skips versions)."""

    def __init__(self, url: str, site_id: str, referee: Callable[[Mapping[str, torch.Tensor]], Scores]) -> None:
        self.url = url
        self.site_id = site_id
        self.referee = referee
        self.models: list[ScoredModel] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-observer", daemon=True)
        self._ready = threading.Event()
        self.failure: BaseException | None = None

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError(f"the observer could not connect: {self.failure!r}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        try:
            connection = pika.BlockingConnection(pika.URLParameters(self.url))
        except pika.exceptions.AMQPError as exc:
            self.failure = exc
            return
        try:
            channel = connection.channel()
            channel.basic_qos(prefetch_count=1)

            def on_model(channel: Any, method: Any, properties: Any, body: bytes) -> None:
                received = time.time()
                channel.basic_ack(method.delivery_tag)
                try:
                    model = GlobalModel.decode(body)
                except SchemaError:
                    return
                self.models.append(ScoredModel(received, model.version, self.referee(model.tensors)))

            channel.basic_consume(site_inbox(self.site_id), on_model)
            self._ready.set()
            while not self._stop.is_set():
                connection.process_data_events(time_limit=0.1)
        except pika.exceptions.AMQPError as exc:
            self.failure = exc
        finally:
            if connection.is_open:
                connection.close()


# --------------------------------------------------------------------------------------------- fedmq runs


def heart_site_tables(seed: int, slowdown: float, compression: str = "none") -> str:
    """What ``fedmq demo`` appends to a hospital's config, with the warmed task and a compression choice."""
    return f"""
# added by fedmq bench
[task]
name = "{WARMED_TASK}"

[agent]
seed = {seed}
slowdown = {slowdown}
heartbeat_seconds = 2
compression = "{compression}"
"""


@dataclass(frozen=True)
class FederationPlan:
    """Everything one fedmq run needs besides the broker: configs per process and the referee."""

    label: str
    seed: int
    coordinator_config: str
    site_tables: Mapping[str, str]
    referee: Callable[[Mapping[str, torch.Tensor]], Scores]
    budget_seconds: float


def run_fedmq(broker: BenchBroker, root: Path, plan: FederationPlan) -> RunResult:
    """Provision, purge, start the coordinator and the sites as processes, observe until the budget is spent."""
    sites = list(plan.site_tables)
    urls = broker.add_sites([*sites, OBSERVER_SITE] if OBSERVER_SITE not in broker.site_urls else sites)
    observer_url = urls.get(OBSERVER_SITE) or broker.site_urls[OBSERVER_SITE]
    for site, tables in plan.site_tables.items():
        with broker.site_config_path(site).open("a") as handle:
            handle.write(tables)
    purge_queues(broker.admin_url, [*sites, OBSERVER_SITE])
    shutil.rmtree(broker.state_dir / "coordinator", ignore_errors=True)
    run_dir = root / "runs" / f"{plan.label}-seed{plan.seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    config_path = run_dir / "coordinator.toml"
    run_dir.mkdir(parents=True)
    config_path.write_text(plan.coordinator_config)
    observer = ModelObserver(observer_url, OBSERVER_SITE, plan.referee)
    observer.start()
    group = ProcessGroup(run_dir / "logs")
    result = RunResult(plan.label, plan.seed, plan.budget_seconds, launched_at=time.time())
    try:
        # Sites first, all connected and waiting before version 0 exists: no hospital gets a head start.
        agents = [
            group.start(
                site, fedmq_command(broker.state_dir, "site", "run", "--config", str(broker.site_config_path(site)))
            )
            for site in sites
        ]
        _wait_until_ready(
            result,
            [group.log_dir / f"{site}.log" for site in sites],
            FEDMQ_READY_MARKER,
            still_running=lambda: all(agent.poll() is None for agent in agents),
            what=f"a site agent (see {run_dir / 'logs'})",
        )
        coordinator = group.start(
            "coordinator", fedmq_command(broker.state_dir, "coordinator", "run", "--config", str(config_path))
        )
        _wait_for_budget(
            result,
            lambda: observer.models,
            still_running=lambda: coordinator.poll() is None,
            what=f"the coordinator (see {run_dir / 'logs'})",
        )
    except RuntimeError as exc:
        result.error = str(exc)
    finally:
        group.stop_all()
        observer.stop()
    result.models = list(observer.models)
    if (broker.state_dir / "coordinator").is_dir():  # kept with the run's logs for a post-mortem
        shutil.copytree(broker.state_dir / "coordinator", run_dir / "coordinator", dirs_exist_ok=True)
    return result


def _wait_until_ready(
    result: RunResult, site_logs: Sequence[Path], ready_marker: str, *, still_running: Callable[[], bool], what: str
) -> None:
    """Poll (every 50 ms) until every site's log shows ``ready_marker``; note the time."""
    deadline = time.time() + FIRST_MODEL_TIMEOUT
    ready: set[Path] = set()
    while len(ready) < len(site_logs):
        if not still_running():
            raise RuntimeError(f"{what} exited before every site was ready")
        if time.time() > deadline:
            raise RuntimeError(f"only {len(ready)}/{len(site_logs)} sites ready after {FIRST_MODEL_TIMEOUT:.0f} s")
        for log in site_logs:
            if log not in ready and log.exists() and ready_marker in log.read_text(errors="replace"):
                ready.add(log)
        time.sleep(0.05)
    result.sites_ready_at = time.time()


def _wait_for_budget(
    result: RunResult, models: Callable[[], Sequence[ScoredModel]], *, still_running: Callable[[], bool], what: str
) -> None:
    """Wait for the first global model, then for the budget counted from when training could start."""
    deadline = time.time() + FIRST_MODEL_TIMEOUT
    while not models():
        if not still_running():
            raise RuntimeError(f"{what} exited before its first global model")
        if time.time() > deadline:
            raise RuntimeError(f"no global model within {FIRST_MODEL_TIMEOUT:.0f} s from {what}")
        time.sleep(0.05)
    result.first_model_at = models()[0].time
    assert result.start_at is not None
    end = result.start_at + result.budget_seconds
    while time.time() < end and still_running():
        time.sleep(0.2)


def fedmq_plan(
    strategy: str,
    seed: int,
    *,
    budget_seconds: float,
    slow: Mapping[str, float],
    local_steps: int,
    learning_rate: float,
    broker: BenchBroker,
    referee: HeartReferee,
    compression: str = "none",
    label: str | None = None,
) -> FederationPlan:
    (metrics_port,) = free_tcp_ports(1)
    options = DemoOptions(
        state_dir=broker.state_dir,
        strategy=strategy,
        seed=seed,
        slow=dict(slow),
        versions=1_000_000,  # the budget ends the run, not a version count
        max_seconds=budget_seconds + FIRST_MODEL_TIMEOUT + 60,  # a safety net: the benchmark stops it sooner
        local_steps=local_steps,
        learning_rate=learning_rate,
    )
    return FederationPlan(
        label=label or strategy,
        seed=seed,
        coordinator_config=coordinator_toml(options, broker.coordinator_url, metrics_port),
        site_tables={site: heart_site_tables(seed, slow.get(site, 1.0), compression) for site in HEART_SITES},
        referee=referee.score,
        budget_seconds=budget_seconds,
    )


# -------------------------------------------------------------------------------------------- Flower runs


def flower_available(python: str) -> str:
    """'' when ``python`` can import flwr, else why not (one line)."""
    probe = subprocess.run(
        [python, "-c", "import flwr; print(flwr.__version__)"], capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        return f"{python} cannot import flwr ({last}); install it with `pip install flwr`"
    return ""


def flower_version(python: str) -> str:
    probe = subprocess.run(
        [python, "-c", "import flwr; print(flwr.__version__)"], capture_output=True, text=True, check=False
    )
    return probe.stdout.strip()


def run_flower(
    root: Path,
    python: str,
    seed: int,
    *,
    budget_seconds: float,
    slow: Mapping[str, float],
    local_steps: int,
    learning_rate: float,
) -> RunResult:
    run_dir = root / "runs" / f"{FLOWER}-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    history = run_dir / "rounds.jsonl"
    (port,) = free_tcp_ports(1)
    address = f"127.0.0.1:{port}"
    module = [python, "-m", "benchmarks.flower_heart"]
    group = ProcessGroup(run_dir / "logs")
    result = RunResult(FLOWER, seed, budget_seconds, launched_at=time.time())
    models: list[ScoredModel] = []

    def read_models() -> list[ScoredModel]:
        if history.exists():
            rows = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
            models[:] = [
                ScoredModel(
                    row["time"],
                    row["round"],
                    Scores(row["pooled"], row["mean"], row["per_site"], row.get("site_weighted")),
                )
                for row in rows
            ]
        return models

    try:
        server = group.start(
            "server", [*module, "server", "--address", address, "--seed", str(seed), "--history", str(history)]
        )
        for site in HEART_SITES:
            group.start(
                site,
                [
                    *module,
                    "client",
                    "--address",
                    address,
                    "--site",
                    site,
                    "--seed",
                    str(seed),
                    "--slowdown",
                    str(slow.get(site, 1.0)),
                    "--local-steps",
                    str(local_steps),
                    "--learning-rate",
                    str(learning_rate),
                ],
            )
        # The server first (as Flower is deployed); round 1 waits for all four clients anyway.
        _wait_until_ready(
            result,
            [group.log_dir / f"{site}.log" for site in HEART_SITES],
            FLOWER_READY_MARKER,
            still_running=lambda: server.poll() is None,
            what="the Flower server",
        )
        _wait_for_budget(result, read_models, still_running=lambda: server.poll() is None, what="the Flower server")
    except RuntimeError as exc:
        result.error = str(exc)
    finally:
        group.stop_all(grace_seconds=5)
    result.models = list(read_models())
    return result


# ------------------------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class SystemSummary:
    system: str
    runs: int
    reached_pooled: int
    reached_mean: int
    time_to_pooled: float | None
    time_to_mean: float | None
    final_pooled: float | None
    final_mean: float | None
    final_site_weighted: float | None
    versions: float | None
    startup: float | None


def summarise(results: Sequence[RunResult], system: str) -> SystemSummary:
    """Medians over seeds; a seed that never reached a target counts as the budget (so the median is a lower
    bound when fewer than half reached it) and is reported in the 'reached' count."""
    runs = [result for result in results if result.system == system and result.start_at is not None]

    def time_median(target: float, aggregate: str) -> float | None:
        times = [result.time_to(target, aggregate) for result in runs]
        if not runs:
            return None
        return statistics.median(
            time if time is not None else result.budget_seconds for time, result in zip(times, runs, strict=True)
        )

    finals = [result.final() for result in runs]
    return SystemSummary(
        system=system,
        runs=len(runs),
        reached_pooled=sum(result.time_to(POOLED_TARGET, "pooled") is not None for result in runs),
        reached_mean=sum(result.time_to(MEAN_TARGET, "mean") is not None for result in runs),
        time_to_pooled=time_median(POOLED_TARGET, "pooled"),
        time_to_mean=time_median(MEAN_TARGET, "mean"),
        final_pooled=median_or_none(final.pooled if final else None for final in finals),
        final_mean=median_or_none(final.mean if final else None for final in finals),
        final_site_weighted=median_or_none(final.site_weighted if final else None for final in finals),
        versions=median_or_none(float(result.versions) for result in runs),
        startup=median_or_none(result.startup_seconds for result in runs),
    )


def _seconds(value: float | None, reached: int, runs: int) -> str:
    if value is None:
        return "-"
    marker = "" if reached == runs else (" (not reached: > budget)" if reached * 2 < runs else f" ({reached}/{runs})")
    return f"{value:.1f}{marker}"


def _accuracy(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def speedups(summaries: Mapping[str, SystemSummary], reference: str) -> list[str]:
    """'X is N x faster than reference to the pooled target' lines, from the medians of this run."""
    lines = []
    base = summaries.get(reference)
    if base is None or base.runs == 0:
        return [f"no {SYSTEM_LABELS[reference]} runs to compare against"]
    for system in ASYNC_SYSTEMS:
        mine = summaries.get(system)
        if mine is None or mine.runs == 0:
            continue
        for label, ours, theirs, reached_ours, reached_theirs in (
            (
                f"pooled >= {POOLED_TARGET}",
                mine.time_to_pooled,
                base.time_to_pooled,
                mine.reached_pooled,
                base.reached_pooled,
            ),
            (f"mean >= {MEAN_TARGET}", mine.time_to_mean, base.time_to_mean, mine.reached_mean, base.reached_mean),
        ):
            if ours is None or theirs is None or ours <= 0:
                continue
            bound = "at least " if reached_theirs * 2 < base.runs else ""
            caveat = " (but fedmq did not reach it in most seeds)" if reached_ours * 2 < mine.runs else ""
            lines.append(
                f"{SYSTEM_LABELS[system]} vs {SYSTEM_LABELS[reference]}, time to {label}: {bound}{theirs / ours:.2f}x "
                f"faster{caveat}"
            )
        if mine.final_pooled is not None and base.final_pooled is not None:
            lines.append(
                f"{SYSTEM_LABELS[system]} final pooled accuracy {mine.final_pooled:.3f} vs {base.final_pooled:.3f} "
                f"({'no lower' if mine.final_pooled >= base.final_pooled else 'LOWER'})"
            )
    return lines


def plot_curves(results: Sequence[RunResult], seed: int, path: Path, title: str) -> bool:
    chosen = [result for result in results if result.seed == seed and result.start_at is not None]
    if not chosen:
        return False
    figure, (pooled_axis, mean_axis) = figure_with_panels(2)
    for result in chosen:
        assert result.start_at is not None
        end = result.start_at + result.budget_seconds
        models = [model for model in result.models if model.time <= end]
        seconds = [max(0.0, model.time - result.start_at) for model in models]
        pooled_axis.step(
            seconds, [model.scores.pooled for model in models], where="post", label=SYSTEM_LABELS[result.system]
        )
        mean_axis.step(
            seconds, [model.scores.mean for model in models], where="post", label=SYSTEM_LABELS[result.system]
        )
    for axis, target, name in (
        (pooled_axis, POOLED_TARGET, "pooled test accuracy"),
        (mean_axis, MEAN_TARGET, "mean over hospitals"),
    ):
        axis.axhline(target, color="grey", linewidth=0.8, linestyle=":")
        axis.set_xlabel("seconds since training could start")
        axis.set_ylabel(name)
        axis.set_ylim(0.4, 0.9)
        axis.grid(alpha=0.3)
    mean_axis.legend(loc="lower right", fontsize=8)
    save_figure(figure, path, title)
    return True


def strategy_settings() -> str:
    """The demo's strategy tables as this run used them, e.g. ``fedasync (alpha=0.3, ...)``."""
    described = []
    for name, strategy in STRATEGY_TABLES.items():
        settings = {
            f"{key}.{inner}" if isinstance(value, dict) else key: inner_value
            for key, value in strategy.items()
            if key != "name"
            for inner, inner_value in (value.items() if isinstance(value, dict) else [(key, value)])
        }
        described.append(f"{name} ({', '.join(f'{key}={value}' for key, value in settings.items())})")
    return "; ".join(described)


def format_report(
    results: Sequence[RunResult],
    *,
    machine: str,
    command: str,
    budget_seconds: float,
    slow: Mapping[str, float],
    seeds: Sequence[int],
    flower_note: str,
    plot: str | None,
    local_steps: int = 100,
    learning_rate: float = 0.01,
) -> str:
    systems = [system for system in SYSTEM_LABELS if any(result.system == system for result in results)]
    summaries = {system: summarise(results, system) for system in systems}
    slow_text = ", ".join(f"{site} x{factor:g}" for site, factor in slow.items())
    lines = [
        "## Straggler: time to accuracy (`fedmq bench straggler`)",
        "",
        f"Machine: {machine}.  ",
        f"Command: `{command}`",
        "",
        f"Heart-disease, four hospitals, slowed: {slow_text}; every system: {local_steps} local SGD steps, "
        f"learning rate {learning_rate:g}, "
        f"batch 4, the same seeded initial model, seeds {', '.join(map(str, seeds))}, a budget of "
        f"{budget_seconds:.0f} s counted from when training can start (first global model published and all four "
        "sites connected; the start-up before that is in its own column). fedmq strategies as `fedmq demo` configures "
        f"them: {strategy_settings()}; {flower_note}. Every global model is scored by the same referee "
        "(`benchmarks.heart`): pooled = FLamby's pooled test set (the four test splits, pooled normalisation; the "
        "figure FLamby publishes), mean = the mean over the four hospitals' own test splits (FLamby's client average), "
        "site-weighted = those four weighted by test rows (what the coordinator's federated evaluation calls pooled). "
        "Medians over seeds; a seed that missed a target within the budget counts as the budget.",
        "",
        markdown_table(
            [
                "system",
                "seeds",
                f"s to pooled >= {POOLED_TARGET}",
                f"s to mean >= {MEAN_TARGET}",
                "final pooled",
                "final mean",
                "final site-weighted",
                "versions/rounds",
                "start-up s",
            ],
            [
                [
                    SYSTEM_LABELS[system],
                    str(summary.runs),
                    _seconds(summary.time_to_pooled, summary.reached_pooled, summary.runs),
                    _seconds(summary.time_to_mean, summary.reached_mean, summary.runs),
                    _accuracy(summary.final_pooled),
                    _accuracy(summary.final_mean),
                    _accuracy(summary.final_site_weighted),
                    "-" if summary.versions is None else f"{summary.versions:.0f}",
                    "-" if summary.startup is None else f"{summary.startup:.1f}",
                ]
                for system, summary in summaries.items()
            ],
        ),
        "",
        "Ratios measured in this run (FLamby's published FedAvg: 0.748 pooled / 0.685 mean; FedAdam 0.779 / 0.726):",
        "",
    ]
    reference = FLOWER if FLOWER in summaries else "fedavg-sync"
    lines += [f"- {line}" for line in speedups(summaries, reference)]
    if reference == FLOWER and "fedavg-sync" in summaries:
        lines += [f"- {line}" for line in speedups(summaries, "fedavg-sync")]
    errors = [
        f"{SYSTEM_LABELS[result.system]} seed {result.seed}: {result.error}" for result in results if result.error
    ]
    if errors:
        lines += ["", "Runs that failed:", *[f"- {error}" for error in errors]]
    if plot:
        lines += ["", f"![pooled and mean accuracy against time, seed {seeds[0]}]({plot})"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- CLI


def _seeds(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _systems(text: str) -> list[str]:
    chosen = [part.strip() for part in text.split(",") if part.strip()]
    unknown = sorted(set(chosen) - set(SYSTEM_LABELS))
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"unknown system(s) {unknown}; choose from {', '.join(SYSTEM_LABELS)}")
    return chosen


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=_seeds, default=list(DEFAULT_SEEDS), help="comma-separated (default 0,1,2,3,4)")
    parser.add_argument(
        "--budget", type=float, default=DEFAULT_BUDGET_SECONDS, help="seconds per run once training can start"
    )
    parser.add_argument(
        "--systems",
        type=_systems,
        default=[*STRATEGIES, FLOWER],
        help=f"comma-separated subset of {', '.join(SYSTEM_LABELS)} (default: all)",
    )
    parser.add_argument("--slow-site", default=DEFAULT_SLOW_SITE, choices=HEART_SITES, help="the slow hospital")
    parser.add_argument("--slowdown", type=float, default=DEFAULT_SLOWDOWN, help="how much slower (default 10)")
    parser.add_argument("--local-steps", type=int, default=100, help="local SGD steps per update (default 100)")
    parser.add_argument("--learning-rate", type=float, default=0.01, help="sites' SGD learning rate (default 0.01)")
    parser.add_argument(
        "--flower-python",
        default=sys.executable,
        help="the Python that runs Flower's processes (needs flwr; default: this one)",
    )
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    root = bench_root(args) / "straggler"
    slow = {args.slow_site: args.slowdown}
    systems: list[str] = list(args.systems)
    flower_note = ""
    if FLOWER in systems:
        missing = flower_available(args.flower_python)
        if missing:
            print(f"Flower is skipped: {missing}", file=sys.stderr)
            systems.remove(FLOWER)
            flower_note = f"Flower was NOT run: {missing}"
        else:
            flower_note = (
                f"Flower {flower_version(args.flower_python)} FedAvg via `flwr.server.start_server` + four "
                "`flwr.client.start_client` processes over gRPC on loopback"
            )
    else:
        flower_note = "Flower not requested"
    results: list[RunResult] = []
    referee = HeartReferee()
    with bench_broker(args) as broker:
        for seed in args.seeds:
            for system in systems:
                print(f"seed {seed}: {SYSTEM_LABELS[system]} for {args.budget:.0f} s ...", flush=True)
                if system == FLOWER:
                    result = run_flower(
                        root,
                        args.flower_python,
                        seed,
                        budget_seconds=args.budget,
                        slow=slow,
                        local_steps=args.local_steps,
                        learning_rate=args.learning_rate,
                    )
                else:
                    plan = fedmq_plan(
                        system,
                        seed,
                        budget_seconds=args.budget,
                        slow=slow,
                        local_steps=args.local_steps,
                        learning_rate=args.learning_rate,
                        broker=broker,
                        referee=referee,
                    )
                    result = run_fedmq(broker, root, plan)
                results.append(result)
                final = result.final()
                print(
                    f"  {len(result.models)} models scored; to pooled {POOLED_TARGET}: "
                    f"{result.time_to(POOLED_TARGET, 'pooled')}; final "
                    f"{'-' if final is None else f'{final.pooled:.3f} / {final.mean:.3f}'} {result.error}",
                    flush=True,
                )
        rabbitmq_version = broker.rabbitmq_version
    (root / "results.json").write_text(json.dumps([result.as_json() for result in results], indent=1))
    plot_name = "bench_straggler.png"
    plot_path = args.doc.parent / plot_name
    plotted = not args.no_doc and plot_curves(
        results,
        args.seeds[0],
        plot_path,
        f"heart-disease, {args.slow_site} x{args.slowdown:g} slower, seed {args.seeds[0]}",
    )
    report = format_report(
        results,
        machine=describe_machine(rabbitmq_version),
        command=command_line(),
        budget_seconds=args.budget,
        slow=slow,
        seeds=args.seeds,
        flower_note=flower_note,
        plot=plot_name if plotted else None,
        local_steps=args.local_steps,
        learning_rate=args.learning_rate,
    )
    return publish_report(args, "straggler", report)
