"""``fedmq coordinator run`` and ``fedmq audit verify``: config files are read here, nowhere deeper."""

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
    from coordinator.config import CoordinatorConfig

from prometheus_client import CollectorRegistry

log = logging.getLogger("fedmq.coordinator")

EXIT_STORAGE_ERROR = 74  # sysexits EX_IOERR: the state dir failed a write; systemd restarts the service


def register(subcommands: Any) -> None:
    coordinator = subcommands.add_parser(
        "coordinator", help="run the aggregation service", description="The long-running coordinator service."
    )
    actions = coordinator.add_subparsers(dest="action", metavar="ACTION")
    run = actions.add_parser(
        "run",
        help="aggregate site updates until the stopping rule is met (or SIGTERM)",
        description="Declare the topology, publish the global model and aggregate updates as they arrive. "
        "Resumes from the checkpoint in its state dir.",
    )
    run.add_argument("--config", type=Path, help="coordinator.toml (every option has a default)")
    run.add_argument("--metrics-port", type=port_number, help="override [metrics] port")
    run.set_defaults(handler=run_command)
    keygen = actions.add_parser(
        "keygen",
        help="make the coordinator's signing key pair (models and controls are signed with it)",
        description="Write the coordinator's Ed25519 private key (mode 0600) and its public key (.pub) to "
        "[signing] key_file (default <state dir>/keys/coordinator.key) and print the public key. `fedmq broker "
        "add-site` writes that public key into every site.toml; a coordinator on another machine than the "
        "provisioning makes its key here and the operator copies coordinator.pub to <state dir>/keys/.",
    )
    keygen.add_argument("--config", type=Path, help="coordinator.toml (for [signing] key_file)")
    keygen.add_argument("--force", action="store_true", help="replace an existing key (sites must get the new one)")
    keygen.set_defaults(handler=keygen_command)
    coordinator.set_defaults(handler=lambda args: _help(coordinator))

    audit = subcommands.add_parser("audit", help="check the audit trail", description="Audit trail tools.")
    audit_actions = audit.add_subparsers(dest="action", metavar="ACTION")
    verify = audit_actions.add_parser(
        "verify", help="check the hash chain of an audit log and report the first broken record"
    )
    verify.add_argument("path", type=Path, help="audit.jsonl (in the coordinator's state dir)")
    verify.set_defaults(handler=verify_command)
    audit.set_defaults(handler=lambda args: _help(audit))


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def port_number(text: str) -> int:
    """A TCP port for ``--metrics-port``, refused by argparse (one line, exit 2) when out of range."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not in 1..65535")
    return port


def resolve_config(args: argparse.Namespace) -> CoordinatorConfig:
    """The file (read once), with the state dir and (when the file names none) the provisioned sites filled in."""
    from coordinator.config import load_config, with_changes

    config = load_config(args.config)
    changes: dict[str, Any] = {}
    if "state_dir" not in config.model_fields_set:
        changes["state_dir"] = args.state_dir / "coordinator"
    if not config.sites:
        sites_dir = args.state_dir / "sites"
        changes["sites"] = tuple(sorted(path.stem for path in sites_dir.glob("*.toml")))
    if config.signing.keys_dir is None:
        changes["signing"] = config.signing.model_copy(update={"keys_dir": args.state_dir / "keys"})
    if getattr(args, "metrics_port", None) is not None:
        changes["metrics"] = config.metrics.model_copy(update={"port": args.metrics_port})
    return with_changes(config, **changes) if changes else config


def run_command(args: argparse.Namespace) -> int:
    from broker.errors import DeclarationError
    from coordinator import runner
    from coordinator.config import ConfigError
    from coordinator.errors import StorageError

    try:
        config = resolve_config(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not config.sites:
        print(
            "error: no sites: list them in the config (sites = [...]) or provision them with "
            "`fedmq broker add-site NAME`",
            file=sys.stderr,
        )
        return 1
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s: finishing the update in hand, then closing", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    import torch

    torch.set_num_threads(config.torch_threads)
    from broker.keys import KeyFileError
    from tasks.errors import TaskError

    registry = CollectorRegistry()
    try:
        coordinator = runner.build_coordinator(config, registry)
    except (TaskError, KeyFileError) as exc:  # an unknown task, bad [task] options, an unreadable signing key:
        # the program stops before it connects
        where = args.config or "the default config"
        print(f"error: {where}: {exc}", file=sys.stderr)
        return 1
    except StorageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_STORAGE_ERROR
    try:
        coordinator.metrics.serve(config.metrics.host, config.metrics.port)
    except OSError as exc:
        print(
            f"error: cannot serve metrics on {config.metrics.host}:{config.metrics.port} ({exc.strerror or exc}); "
            "choose a free port with [metrics] port in the config or --metrics-port",
            file=sys.stderr,
        )
        return 1
    print(f"metrics: http://{config.metrics.host}:{config.metrics.port}/metrics", flush=True)
    try:
        runner.run(coordinator, stop)
    except DeclarationError as exc:  # e.g. the update queue declared by an earlier release with other arguments
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except StorageError as exc:
        # Nothing of the failed commit was acked; the broker returns its updates when this process is gone, and
        # the next start rebuilds its state from the disk (coordinator.commit explains why exiting is the fix).
        log.critical("stopping: %s; nothing more is acked, the next start resumes from the state dir", exc)
        return EXIT_STORAGE_ERROR
    return 0


def keygen_command(args: argparse.Namespace) -> int:
    from broker.keys import KeyFileError, generate_private_key, public_key_text, write_key_pair
    from coordinator import runner
    from coordinator.config import ConfigError

    try:
        config = resolve_config(args)
        _, key_file = runner.signing_paths(config)
        key = generate_private_key()
        public_file = write_key_pair(key_file, key, overwrite=args.force)
    except (ConfigError, KeyFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"private key: {key_file} (mode 0600; it stays with the coordinator)")
    print(f"public key:  {public_file}")
    print(public_key_text(key))
    return 0


def verify_command(args: argparse.Namespace) -> int:
    from coordinator.audit import verify_chain

    if not args.path.exists():
        print(f"error: {args.path} does not exist", file=sys.stderr)
        return 1
    report = verify_chain(args.path)
    if report.ok:
        print(f"OK: {report.records} records, hash chain intact")
        return 0
    print(f"BROKEN at record {report.first_broken}: {report.problem} ({report.records} records verified before it)")
    return 1
