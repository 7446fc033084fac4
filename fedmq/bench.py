"""``fedmq bench NAME``: the benchmarks of a source checkout, run through the ``fedmq`` command.

The benchmarks are not part of the installed product (they live in ``benchmarks/`` beside ``fedmq/``, with
torch and matplotlib at import); this command only finds that folder and hands it the arguments, so
``fedmq --help`` stays light and an installed fedmq says where to get them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

CHECKOUT_DIR = Path(__file__).resolve().parent.parent
NOT_HERE = (
    "fedmq bench: the benchmarks are not part of the installed package. They live in the benchmarks/ folder of a "
    "source checkout of fedmq: clone the repository, `bash scripts/install.sh --test` there, then run "
    "`fedmq bench NAME` or `python -m benchmarks NAME` from it."
)


def register(subcommands: argparse._SubParsersAction[Any]) -> None:
    bench = subcommands.add_parser(
        "bench",
        help="measure performance figures (ratios within one run; source checkout only)",
        add_help=False,  # --help goes to the benchmarks' own parser, which knows every benchmark's options
        prefix_chars="\0",  # every argument, options included, is the benchmarks'
    )
    bench.add_argument("arguments", nargs=argparse.REMAINDER)
    bench.set_defaults(handler=run_command)


def benchmarks_dir() -> Path | None:
    """The checkout's ``benchmarks/`` folder when fedmq runs from a source checkout, else None."""
    folder = CHECKOUT_DIR / "benchmarks"
    return folder if (folder / "__init__.py").is_file() else None


def run_command(args: argparse.Namespace) -> int:
    folder = benchmarks_dir()
    if folder is None:
        print(NOT_HERE, file=sys.stderr)
        return 1
    if str(CHECKOUT_DIR) not in sys.path:
        sys.path.insert(0, str(CHECKOUT_DIR))
    module = importlib.import_module("benchmarks")
    if Path(module.__file__ or "").resolve().parent != folder:
        print(f"fedmq bench: `benchmarks` imports from {module.__file__}, not from {folder}", file=sys.stderr)
        return 1
    result: int = module.main(args.arguments, state_dir=args.state_dir, prog="fedmq bench")
    return result
