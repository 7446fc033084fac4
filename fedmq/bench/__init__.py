"""``fedmq bench``: benchmarks that print figures as ratios measured within one run, never timed tests.

Adding a benchmark is one entry in ``BENCHMARKS``: a module-level ``add_arguments(parser)`` and ``run(args)``
next to a one-line help.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from fedmq.bench import codec, scale, straggler, throughput, wire


@dataclass(frozen=True)
class Benchmark:
    """One ``fedmq bench NAME`` sub-subcommand."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


BENCHMARKS: Mapping[str, Benchmark] = MappingProxyType(
    {
        "codec": Benchmark(help=codec.HELP, add_arguments=codec.add_arguments, run=codec.run),
        "straggler": Benchmark(help=straggler.HELP, add_arguments=straggler.add_arguments, run=straggler.run),
        "throughput": Benchmark(help=throughput.HELP, add_arguments=throughput.add_arguments, run=throughput.run),
        "scale": Benchmark(help=scale.HELP, add_arguments=scale.add_arguments, run=scale.run),
        "wire": Benchmark(help=wire.HELP, add_arguments=wire.add_arguments, run=wire.run),
    }
)


def register(subcommands: argparse._SubParsersAction[Any]) -> None:
    """Add ``fedmq bench`` with one sub-subcommand per entry of ``BENCHMARKS``."""
    bench_parser = subcommands.add_parser(
        "bench",
        help="measure performance figures (ratios within one run)",
        description="Benchmarks that print their figures as ratios measured in the same run.",
    )
    benchmarks = bench_parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    for name, benchmark in BENCHMARKS.items():
        parser = benchmarks.add_parser(name, help=benchmark.help, description=benchmark.help)
        benchmark.add_arguments(parser)
        parser.set_defaults(handler=benchmark.run)
    bench_parser.set_defaults(handler=lambda _args: _print_help(bench_parser))


def _print_help(parser: argparse.ArgumentParser) -> int:
    """``fedmq bench`` alone lists the benchmarks, like ``fedmq`` alone lists the subcommands."""
    parser.print_help()
    return 2
