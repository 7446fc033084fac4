"""``fedmq site run`` and ``fedmq site check``: the site's config file is read here, nowhere deeper."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from site_agent.agent import SiteAgent
    from site_agent.config import SiteConfig

log = logging.getLogger("fedmq.site")


def register(subcommands: Any) -> None:
    site = subcommands.add_parser(
        "site", help="run a hospital's site agent", description="The site agent a hospital runs."
    )
    actions = site.add_subparsers(dest="action", metavar="ACTION")
    run = actions.add_parser(
        "run",
        help="train on local data and send updates until the coordinator says stop",
        description="Connect outbound to the broker, take the newest global model, evaluate it, train on this "
        "site's data and send the delta; repeat. Patient data never leaves the site.",
    )
    run.add_argument("--config", type=Path, required=True, help="the site's TOML file (from fedmq broker add-site)")
    run.set_defaults(handler=run_command)
    check = actions.add_parser(
        "check", help="validate the config and load the local data without connecting (a health check)"
    )
    check.add_argument("--config", type=Path, required=True)
    check.set_defaults(handler=check_command)
    site.set_defaults(handler=lambda args: _help(site))


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _load(args: argparse.Namespace) -> tuple[SiteConfig, SiteAgent] | None:
    """The site's config and an agent with its data loaded, or None after printing why not."""
    from site_agent import runner
    from site_agent.config import SiteConfigError, load_site_config

    try:
        config = load_site_config(args.config)
        return config, runner.build_agent(config)
    except (SiteConfigError, ValueError, LookupError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def run_command(args: argparse.Namespace) -> int:
    from site_agent import runner

    loaded = _load(args)
    if loaded is None:
        return 1
    config, agent = loaded
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s: closing", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return runner.run(config, agent, stop)


def check_command(args: argparse.Namespace) -> int:
    from site_agent import runner

    loaded = _load(args)
    if loaded is None:
        return 1
    config, agent = loaded
    agent.close()
    print(f"OK: site {config.site_id}, task {config.task_name}, broker {runner.connection_settings(config).safe_url()}")
    return 0
