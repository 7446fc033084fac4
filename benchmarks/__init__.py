"""Benchmarks that print figures as ratios measured within one run, never timed tests.

They live beside the product, not in it: a source checkout runs them as ``python -m benchmarks NAME`` or
``fedmq bench NAME``; an installed fedmq has neither the folder nor the weight (torch, matplotlib at import).

Adding a benchmark is one entry in ``BENCHMARKS``: a module-level ``add_arguments(parser)`` and ``run(args)``
next to a one-line help.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from benchmarks import codec, faults, poisoning, scale, straggler, throughput, wire

# The checkout holding this folder: child processes (coordinators, agents, the Flower side) import the benchmarks'
# own tasks by dotted path (benchmarks.synthetic:SyntheticTask), so they get it on their PYTHONPATH.
CHECKOUT_DIR = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Benchmark:
    """One ``NAME`` of ``python -m benchmarks NAME``."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


BENCHMARKS: Mapping[str, Benchmark] = MappingProxyType(
    {
        "codec": Benchmark(help=codec.HELP, add_arguments=codec.add_arguments, run=codec.run),
        "poisoning": Benchmark(help=poisoning.HELP, add_arguments=poisoning.add_arguments, run=poisoning.run),
        "straggler": Benchmark(help=straggler.HELP, add_arguments=straggler.add_arguments, run=straggler.run),
        "throughput": Benchmark(help=throughput.HELP, add_arguments=throughput.add_arguments, run=throughput.run),
        "scale": Benchmark(help=scale.HELP, add_arguments=scale.add_arguments, run=scale.run),
        "wire": Benchmark(help=wire.HELP, add_arguments=wire.add_arguments, run=wire.run),
        "faults": Benchmark(help=faults.HELP, add_arguments=faults.add_arguments, run=faults.run),
    }
)


def build_parser(prog: str, *, with_state_dir: bool) -> argparse.ArgumentParser:
    """One sub-command per entry of ``BENCHMARKS``; ``--state-dir`` unless ``fedmq`` has resolved it already."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Benchmarks that print their figures as ratios measured in the same run."
    )
    if with_state_dir:
        from fedmq.cli import DEFAULT_STATE_DIR, STATE_DIR_ENV

        parser.add_argument(
            "--state-dir",
            default=None,
            help=f"where the benchmarks' broker and runs live, under bench/ (default: ${STATE_DIR_ENV} or "
            f"{DEFAULT_STATE_DIR})",
        )
        parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    benchmarks = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    for name, benchmark in BENCHMARKS.items():
        sub = benchmarks.add_parser(name, help=benchmark.help, description=benchmark.help)
        benchmark.add_arguments(sub)
        sub.set_defaults(handler=benchmark.run)
    return parser


def main(
    argv: Sequence[str] | None = None, *, state_dir: Path | None = None, prog: str = "python -m benchmarks"
) -> int:
    """Run one benchmark; ``fedmq bench`` passes the state dir it resolved, ``python -m benchmarks`` reads its own."""
    from fedmq.cli import resolve_state_dir

    parser = build_parser(prog, with_state_dir=state_dir is None)
    args = parser.parse_args(argv)
    if state_dir is None:
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO,
            format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )
        logging.getLogger("pika").setLevel(logging.WARNING)
    if not getattr(args, "handler", None):
        parser.print_help()  # alone it lists the benchmarks, like ``fedmq`` alone lists the subcommands
        return 2
    if not getattr(args, "no_doc", True) and importlib.util.find_spec("matplotlib") is None:
        print(
            f"{prog} {args.benchmark}: the benchmarks draw their plots with matplotlib, which is not installed: "
            "pip install -e '.[plots]' (or run with --no-doc)",
            file=sys.stderr,
        )
        return 1
    args.state_dir = state_dir or resolve_state_dir(args.state_dir)
    path = os.environ.get("PYTHONPATH", "")
    if str(CHECKOUT_DIR) not in path.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(part for part in (str(CHECKOUT_DIR), path) if part)
    result: int = args.handler(args)
    return result
