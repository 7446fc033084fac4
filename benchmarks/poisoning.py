"""``fedmq bench poisoning``: what one poisoning hospital costs the federation, with the robust options off and on.

The four heart-disease hospitals federate through a private RabbitMQ node exactly as ``fedmq demo`` runs them
(``fedmq.demo.run_demo``: ``fedmq coordinator run`` and four ``fedmq site run`` processes, each hospital its own
broker user, the demo's FedBuff table). One hospital's agent is an attacker (``[agent] attack``,
``site_agent.attacks``): it follows every rule the coordinator checks and forges only what it cannot check, the
delta and the claimed ``num_examples``. Each attack runs with the coordinator's robust options as the demo ships
them ("on": the defaults) and turned off ("off": the plain example-weighted mean, no clipping, no cap on
``num_examples``, no binding site share, as before they existed). The final model of each run is scored on
FLamby's pooled test set (``fedmq.demo.flamby_pooled_accuracy``) and compared with the clean run of the same
mode and seed; medians over seeds. The last line printed is the worst drop with the defaults.

The flood attack sends every honest update many times over, each a valid new update; flood control (a per-site
bound on updates in flight) belongs to the broker topology; this benchmark only counts what the honest sites
suffered: their updates rejected as stale.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.harness import (
    add_common_arguments,
    bench_broker,
    bench_root,
    command_line,
    describe_machine,
    figure_with_panels,
    grouped_bars,
    markdown_table,
    publish_report,
    save_figure,
)
from benchmarks.heart import HEART_SITES

HELP = "poisoning: one hospital attacks (sign flip, scaling, noise, inflated num_examples, flood), robust off vs on"
CLEAN = "clean"
DEFAULT_ATTACKS = (
    "sign-flip:1",
    "sign-flip:10",
    "sign-flip:100",
    "scale:10",
    "noise:1",
    "inflate-examples:1e12",
    "flood:50",
)
MODES = ("off", "on")
DEFAULT_ATTACKER = "cleveland"


@dataclass
class PoisonRun:
    """One federation: an attack (or clean), a mode, a seed, and what came of it."""

    attack: str
    mode: str
    seed: int
    pooled: float | None = None
    versions: int = 0
    seconds: float = 0.0
    rejected: dict[str, int] = field(default_factory=dict)  # "site:reason" -> count
    anomaly: dict[str, float] = field(default_factory=dict)  # site -> mean anomaly score of accepted updates
    error: str = ""


def audit_figures(audit_path: Path) -> tuple[dict[str, int], dict[str, float]]:
    """Rejections by site and reason, and each site's mean anomaly score, from a run's audit log."""
    rejected: Counter[str] = Counter()
    scores: dict[str, list[float]] = {}
    if not audit_path.exists():
        return {}, {}
    for line in audit_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("kind") != "update":
            continue
        site = str(record.get("site"))
        if record.get("outcome") == "rejected":
            rejected[f"{site}:{record.get('reason')}"] += 1
        detail = str(record.get("detail") or "")
        if record.get("outcome") == "accepted" and "anomaly score " in detail:
            value = detail.split("anomaly score ", 1)[1].split(";", 1)[0]
            with contextlib.suppress(ValueError):
                scores.setdefault(site, []).append(float(value))
    return dict(rejected), {site: statistics.fmean(values) for site, values in scores.items()}


def run_one(state_dir: Path, root: Path, attack: str, mode: str, seed: int, args: argparse.Namespace) -> PoisonRun:
    """One demo run, its console output into a log file; the final model scored as FLamby scores it."""
    from fedmq.demo import DemoOptions, run_demo

    label = f"{attack.replace(':', '-')}-{mode}-seed{seed}"
    summary_path = root / "runs" / f"{label}.json"
    log_path = root / "runs" / f"{label}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    options = DemoOptions(
        state_dir=state_dir,
        strategy="fedbuff",
        seed=seed,
        versions=args.versions,
        max_seconds=args.max_seconds,
        local_steps=args.local_steps,
        summary_json=summary_path,
        attack={} if attack == CLEAN else {args.attacker: attack},
        robust=mode == "on",
    )
    result = PoisonRun(attack, mode, seed)
    started = time.monotonic()
    with log_path.open("w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        exit_code = run_demo(options)
    result.seconds = time.monotonic() - started
    if exit_code != 0 or not summary_path.exists():
        result.error = f"the demo exited with {exit_code} (see {log_path})"
        return result
    summary = json.loads(summary_path.read_text())
    result.pooled = summary.get("pooled_accuracy")
    result.versions = int(summary.get("versions") or 0)
    result.rejected, result.anomaly = audit_figures(state_dir / "coordinator" / "audit.jsonl")
    return result


# ------------------------------------------------------------------------------------------------- report


def median_pooled(runs: Sequence[PoisonRun], attack: str, mode: str) -> float | None:
    values = [run.pooled for run in runs if run.attack == attack and run.mode == mode and run.pooled is not None]
    return statistics.median(values) if values else None


def points(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f}"


def accuracy(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def drop(runs: Sequence[PoisonRun], attack: str, mode: str) -> float | None:
    """Median over seeds of (clean - attacked) pooled accuracy, same mode and seed."""
    drops = []
    for run in runs:
        if run.attack != attack or run.mode != mode or run.pooled is None:
            continue
        clean = next(
            (other.pooled for other in runs if other.attack == CLEAN and other.mode == mode and other.seed == run.seed),
            None,
        )
        if clean is not None:
            drops.append(clean - run.pooled)
    return statistics.median(drops) if drops else None


def honest_stale(runs: Sequence[PoisonRun], attack: str, mode: str, attacker: str) -> int:
    return sum(
        count
        for run in runs
        if run.attack == attack and run.mode == mode
        for key, count in run.rejected.items()
        if key.endswith(":stale") and not key.startswith(f"{attacker}:")
    )


def attacker_rejections(runs: Sequence[PoisonRun], attack: str, mode: str, attacker: str) -> str:
    reasons: Counter[str] = Counter()
    for run in runs:
        if run.attack == attack and run.mode == mode:
            for key, count in run.rejected.items():
                site, _, reason = key.partition(":")
                if site == attacker:
                    reasons[reason] += count
    return ", ".join(f"{reason} {count}" for reason, count in reasons.most_common()) or "none"


def mean_score(runs: Sequence[PoisonRun], attack: str, mode: str, honest: bool, attacker: str) -> str:
    values = [
        score
        for run in runs
        if run.attack == attack and run.mode == mode
        for site, score in run.anomaly.items()
        if (site != attacker) == honest
    ]
    return "-" if not values else f"{statistics.fmean(values):+.2f}"


def worst_drop(runs: Sequence[PoisonRun], attacks: Sequence[str]) -> tuple[float | None, str]:
    drops = [(drop(runs, attack, "on"), attack) for attack in attacks]
    present = [(value, attack) for value, attack in drops if value is not None]
    if not present:
        return None, "-"
    return max(present)


def format_report(
    runs: Sequence[PoisonRun], args: argparse.Namespace, attacks: Sequence[str], machine: str, plot: str | None
) -> str:
    from fedmq.demo import STRATEGY_TABLES, without_robust_options

    seeds = sorted({run.seed for run in runs})
    modes = list(args.modes)
    header = ["attack"]
    for mode in modes:
        header += [f"pooled, robust {mode}", f"drop {mode} (points)"]
    header += [
        "anomaly score: attacker / honest (on)",
        "attacker's updates rejected (on)",
        "honest updates rejected as stale (off / on)",
    ]
    rows = []
    for attack in [CLEAN, *attacks]:
        row = [attack]
        for mode in modes:
            row += [
                accuracy(median_pooled(runs, attack, mode)),
                points(None if attack == CLEAN else drop(runs, attack, mode)),
            ]
        scored = "on" if "on" in modes else modes[0]
        row += [
            "-"
            if attack == CLEAN
            else f"{mean_score(runs, attack, scored, False, args.attacker)} / "
            f"{mean_score(runs, attack, scored, True, args.attacker)}",
            "-" if attack == CLEAN else attacker_rejections(runs, attack, scored, args.attacker),
            " / ".join(str(honest_stale(runs, attack, mode, args.attacker)) for mode in MODES if mode in modes),
        ]
        rows.append(row)
    worst, worst_attack = worst_drop(runs, attacks) if "on" in modes else (None, "-")
    errors = [f"{run.attack} {run.mode} seed {run.seed}: {run.error}" for run in runs if run.error]
    lines = [
        "## Poisoning: one hospital attacks (`fedmq bench poisoning`)",
        "",
        f"Machine: {machine}.  ",
        f"Command: `{command_line()}`",
        "",
        f"Heart-disease, the four hospitals as `fedmq demo` runs them (real broker, one process per hospital, "
        f"{args.versions} versions, {args.local_steps} local steps); {args.attacker}'s agent is the attacker "
        "(`[agent] attack`, `site_agent/attacks.py`), with its own credentials and the same broker permissions. "
        f"Robust on: the demo's table `{json.dumps(STRATEGY_TABLES['fedbuff'])}` with the coordinator's default "
        "`[strategy.robust]` (clipping to 3 x the median recent norm, the share cap at floor(0.67 x 3) = 2 places) "
        "and each hospital's num_examples claim capped at its registered training patients "
        "(`[validation] site_max_num_examples`). "
        f"Robust off: `{json.dumps(without_robust_options('fedbuff'))}`, num_examples unbounded. "
        f"Pooled = FLamby's pooled test accuracy of the final model; drop = clean minus attacked, same mode and "
        f"seed, in accuracy points; medians over seeds {', '.join(map(str, seeds))}. The anomaly score is the mean "
        "cosine of accepted updates to the recent ones (`fedmq_update_anomaly_score`).",
        "",
        markdown_table(header, rows),
        "",
        f"Worst drop with the defaults: {points(worst)} points ({worst_attack}).",
    ]
    lines += [
        "",
        "Clipping bounds what an update's size can do (scale, sign flip x100), the caps what a claim can do "
        "(inflated num_examples, a flood's extra places). A sign flip or noise at the honest norm passes every bound "
        "by construction; on four non-IID hospitals the honest updates near the federated optimum pull against each "
        "other, so the buffer's median and a cosine test against it do not single the attacker out, and with "
        "example weighting the largest hospital holds 41% of the weight. The anomaly score does separate it "
        "(column above): it is exported and alerted on.",
    ]
    if any(attack.startswith("flood") for attack in attacks):
        lines += [
            "",
            "Flood: the attacker sends each update many times, each a valid new update. What bounds it here is the "
            "strategy's per-site share of the buffer (site-share rejections) and the staleness bound; a per-site "
            "bound on updates in flight in the broker is flood control's job, measured by the stale column.",
        ]
    if errors:
        lines += ["", "Runs that failed:", *[f"- {error}" for error in errors]]
    if plot:
        lines += ["", f"![pooled accuracy per attack, robust off and on]({plot})"]
    return "\n".join(lines)


def plot_bars(runs: Sequence[PoisonRun], attacks: Sequence[str], modes: Sequence[str], path: Path) -> None:
    figure, (axis,) = figure_with_panels(1, width=11.0, height=4.2)
    groups = [CLEAN, *attacks]
    series = [(f"robust {mode}", [median_pooled(runs, attack, mode) or 0.0 for attack in groups]) for mode in modes]
    grouped_bars(axis, groups, series)
    axis.set_ylabel("FLamby pooled test accuracy")
    axis.set_ylim(0.0, 1.0)
    axis.axhline(0.779, color="grey", linewidth=0.8, linestyle=":", label="FLamby FedAdam (pooled)")
    axis.tick_params(axis="x", labelrotation=20)
    axis.legend(loc="lower left", fontsize=8)
    axis.grid(alpha=0.3, axis="y")
    save_figure(figure, path, "one poisoning hospital, heart-disease FedBuff")


# ---------------------------------------------------------------------------------------------------- CLI


def _list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _seeds(text: str) -> list[int]:
    try:
        return [int(part) for part in _list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _attacks(text: str) -> list[str]:
    from site_agent.attacks import Attack

    try:
        return [str(Attack.parse(part)) if part != CLEAN else part for part in _list(text)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _modes(text: str) -> list[str]:
    chosen = _list(text)
    if not chosen or set(chosen) - set(MODES):
        raise argparse.ArgumentTypeError(f"modes are a comma-separated subset of {', '.join(MODES)}, got {text!r}")
    return chosen


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=_seeds, default=[0, 1, 2], help="comma-separated (default 0,1,2)")
    parser.add_argument(
        "--attacks",
        type=_attacks,
        default=list(DEFAULT_ATTACKS),
        help=f"comma-separated KIND[:SCALE] (default {','.join(DEFAULT_ATTACKS)})",
    )
    parser.add_argument("--modes", type=_modes, default=list(MODES), help="off,on (default both)")
    parser.add_argument("--attacker", default=DEFAULT_ATTACKER, choices=HEART_SITES, help="the attacking hospital")
    parser.add_argument("--versions", type=int, default=60, help="global versions per run (default 60, the demo's)")
    parser.add_argument("--local-steps", type=int, default=100, help="local SGD steps per update (default 100)")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="wall-clock budget of one run")
    parser.add_argument(
        "--quick", action="store_true", help="one seed, sign-flip:10 only, robust on, 6 versions (the test suite's)"
    )
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.seeds, args.attacks, args.modes, args.versions = [0], ["sign-flip:10"], ["on"], 6
    attacks = [attack for attack in args.attacks if attack != CLEAN]
    root = bench_root(args) / "poisoning"
    runs: list[PoisonRun] = []
    with bench_broker(args) as broker:
        for seed in args.seeds:
            for mode in args.modes:
                for attack in [CLEAN, *attacks]:
                    print(f"seed {seed}, robust {mode}: {attack} ...", end=" ", flush=True)
                    result = run_one(broker.state_dir, root, attack, mode, seed, args)
                    runs.append(result)
                    print(
                        f"pooled {accuracy(result.pooled)} after {result.versions} versions in {result.seconds:.0f} s"
                        f"{' ' + result.error if result.error else ''}",
                        flush=True,
                    )
        rabbitmq_version = broker.rabbitmq_version
    root.mkdir(parents=True, exist_ok=True)
    (root / "results.json").write_text(json.dumps([run.__dict__ for run in runs], indent=1))
    plot_name = "bench_poisoning.png"
    if not args.no_doc:
        plot_bars(runs, attacks, args.modes, args.doc.parent / plot_name)
    report = format_report(runs, args, attacks, describe_machine(rabbitmq_version), None if args.no_doc else plot_name)
    publish_report(args, "poisoning", report)
    worst, worst_attack = worst_drop(runs, attacks) if "on" in args.modes else (None, "-")
    failed = sum(1 for run in runs if run.error)
    print(
        f"worst-case accuracy drop with the defaults: {points(worst)} points ({worst_attack})"
        + (f"; {failed} runs failed" if failed else "")
    )
    return 1 if failed else 0
