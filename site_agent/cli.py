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
    keygen = actions.add_parser(
        "keygen",
        help="make this hospital's signing key pair; the private key never leaves this machine",
        description="Write NAME.signing.key (Ed25519, mode 0600 from its first byte) and NAME.signing.pub into "
        "--dir. Keep the .key next to the site's config file (its [signing] key_file default); send only the "
        ".pub to the federation operator, who registers it with `fedmq broker add-site NAME --public-key FILE` "
        "(or `rotate-site-key` for a new key).",
    )
    keygen.add_argument("name", metavar="NAME", help="this site's id")
    keygen.add_argument("--dir", type=Path, default=Path("."), help="where to write the two files (default: .)")
    keygen.add_argument("--force", action="store_true", help="replace an existing key (then rotate-site-key)")
    keygen.set_defaults(handler=keygen_command)
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


def keygen_command(args: argparse.Namespace) -> int:
    from broker.keys import KeyFileError, generate_private_key, public_key_text, write_key_pair

    key_file = args.dir / f"{args.name}.signing.key"
    key = generate_private_key()
    try:
        public_file = write_key_pair(key_file, key, overwrite=args.force)
    except (KeyFileError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"private key: {key_file} (mode 0600; it never leaves this machine)")
    print(f"public key:  {public_file}")
    print(public_key_text(key))
    print(f"send {public_file.name} to the federation operator: fedmq broker add-site {args.name} --public-key FILE")
    return 0
