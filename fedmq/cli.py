"""The ``fedmq`` command: one entry point, a subcommand per role.

Each package contributes its own subcommands through a ``register(subcommands)`` function in its ``cli``
module; this module only assembles them, resolves the state dir and sets up logging. Environment variables
and config files are read here and in those ``cli`` modules, never deeper in the logic.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from fedmq import __version__

DEFAULT_STATE_DIR = Path(".fedmq")
STATE_DIR_ENV = "FEDMQ_STATE_DIR"

# Modules with a ``register(subcommands)`` function, in the order their subcommands appear in --help.
SUBCOMMAND_MODULES = (
    "broker.cli",
    "coordinator.cli",
    "site_agent.cli",
    "fedmq.demo",
    "fedmq.status",
    "fedmq.bench",
    "fedmq.config_reference",
)


def resolve_state_dir(explicit: str | None) -> Path:
    """``--state-dir`` wins, then FEDMQ_STATE_DIR, then ./.fedmq."""
    chosen = explicit or os.environ.get(STATE_DIR_ENV) or str(DEFAULT_STATE_DIR)
    return Path(chosen).expanduser().resolve()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedmq",
        description="Asynchronous, staleness-aware federated learning for hospitals over RabbitMQ.",
    )
    parser.add_argument(
        "--state-dir",
        default=None,
        help=f"where broker data, site configs, checkpoints and results live "
        f"(default: ${STATE_DIR_ENV} or {DEFAULT_STATE_DIR})",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    parser.add_argument("--version", action="version", version=f"fedmq {__version__}")
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue  # a role not built yet
            raise
        module.register(subcommands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("pika").setLevel(logging.WARNING)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    args.state_dir = resolve_state_dir(args.state_dir)
    result: int = args.handler(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
