"""``fedmq broker ...``: run a private RabbitMQ node, declare the federation's topology, provision hospitals.

This is the only place of the broker package that talks to the operator: it turns arguments into calls to
``broker.node`` / ``broker.provisioning`` and every ``BrokerError`` into one clear line on stderr (exit 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

from broker import topology
from broker.certs import CertificateSettings, CertificateStore
from broker.declare import declare_topology_at
from broker.errors import BrokerError, BrokerNotConfigured
from broker.keys import keys_dir, site_key_path
from broker.node import (
    ADMIN_USER,
    DEFAULT_START_TIMEOUT,
    DEFAULT_STOP_TIMEOUT,
    WILDCARD_ADDRESSES,
    BrokerAccess,
    LocalNode,
    NodeSettings,
    load_access,
    saved_node_settings,
)
from broker.provisioning import (
    SITES_DIRNAME,
    add_site,
    ensure_coordinator_user,
    list_sites,
    read_broker_url,
    remove_site,
    rotate_site_key,
)
from broker.urls import redact_url

Handler = Callable[[argparse.Namespace], int]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3  # like `systemctl status` for a stopped service

BROKER_DESCRIPTION = """\
Run a private RabbitMQ node for development and demos, declare the federation's exchanges and queues, and
give each hospital its own broker user and config file.

Typical use:
  fedmq broker up                    start the node, declare the topology, print the URLs
  fedmq broker add-site hospital-a   create hospital-a's user; prints the path of its config file
  fedmq broker list-sites
  fedmq broker down

With TLS (client certificates; the broker logs each hospital in by its certificate's CN):
  fedmq broker up --tls              AMQPS only (port 5681 unless --amqps-port); makes the CA if missing
  fedmq broker add-site hospital-a   issues hospital-a's certificate; its config names it
  fedmq broker certs                 (re)issue what is missing or expiring: CA, broker, clients

Everything lives under the state dir (--state-dir, $FEDMQ_STATE_DIR or ./.fedmq): broker/ holds the node's
data, logs and admin.toml (the administrator's credentials), sites/NAME.toml each hospital's config file,
certs/ the private CA and every certificate it issued.
"""


def register(subcommands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    broker = subcommands.add_parser(
        "broker",
        help="run a local RabbitMQ node and provision hospitals",
        description=BROKER_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    broker.set_defaults(handler=lambda args: _print_help(broker))
    actions = broker.add_subparsers(dest="broker_command", metavar="ACTION")

    vhost_option = argparse.ArgumentParser(add_help=False)
    vhost_option.add_argument(
        "--vhost", default=topology.VHOST, help=f"the federation's RabbitMQ vhost (default: {topology.VHOST})"
    )
    scripts_option = argparse.ArgumentParser(add_help=False)
    scripts_option.add_argument(
        "--rabbitmq-dir",
        type=Path,
        default=None,
        help="directory holding the rabbitmq-server and rabbitmqctl scripts "
        "(default: /usr/lib/rabbitmq/bin, then the PATH)",
    )

    up = actions.add_parser(
        "up",
        parents=[vhost_option, scripts_option],
        help="start the local node (if needed), declare the topology, print the URLs",
        description="Start a private RabbitMQ node under <state dir>/broker (ports and data of its own, listening "
        "on 127.0.0.1 unless --bind says otherwise), wait until it accepts logins, create the vhost and the "
        "coordinator's user (its URL goes to <state dir>/coordinator-broker.toml) and declare the topology. "
        "Running it again is harmless. Ports not given are those of the last `up` (or the defaults).",
    )
    defaults = NodeSettings()
    up.add_argument("--amqp-port", type=int, help=f"AMQP port (default {defaults.amqp_port})")
    up.add_argument("--dist-port", type=int, help=f"Erlang distribution port (default {defaults.dist_port})")
    up.add_argument("--management-port", type=int, help=f"management UI/API port (default {defaults.management_port})")
    up.add_argument("--prometheus-port", type=int, help=f"Prometheus metrics port (default {defaults.prometheus_port})")
    up.add_argument(
        "--bind",
        help=f"address to listen on (default {defaults.bind}; 0.0.0.0 to accept hospitals on the network)",
    )
    up.add_argument(
        "--prometheus-bind",
        help=(
            f"address of RabbitMQ's Prometheus endpoint (default {defaults.prometheus_bind}: it needs no login and "
            "lists every site's queues, so keep it off the hospitals' network)"
        ),
    )
    up.add_argument(
        "--public-host", help="host name written into the URLs handed to sites (default: the --bind address)"
    )
    up.add_argument(
        "--tls",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="listen only for AMQPS with client certificates, logging clients in by their CN; the plain AMQP "
        "listener is off and certificates missing under <state dir>/certs are made (default: as last time)",
    )
    up.add_argument("--amqps-port", type=int, help=f"AMQPS port with --tls (default {defaults.amqps_port})")
    up.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_START_TIMEOUT,
        help=f"seconds to wait for the node (default {DEFAULT_START_TIMEOUT:.0f})",
    )
    up.set_defaults(handler=_guarded(_up))

    down = actions.add_parser(
        "down",
        parents=[scripts_option],
        help="stop the local node cleanly",
        description="Stop the node started by `fedmq broker up` under this state dir (its data is kept).",
    )
    down.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_STOP_TIMEOUT,
        help=f"seconds to wait (default {DEFAULT_STOP_TIMEOUT:.0f})",
    )
    down.set_defaults(handler=_guarded(_down))

    status = actions.add_parser(
        "status",
        help="is the local node running? (exit 0 if so, 3 if not)",
        description="Show whether the node of this state dir runs, its name, pid and URLs. "
        f"Exit code {EXIT_OK} when it runs, {EXIT_NOT_RUNNING} when it does not.",
    )
    status.set_defaults(handler=_guarded(_status))

    declare = actions.add_parser(
        "declare",
        parents=[vhost_option],
        help="(re)declare the vhost, the coordinator's user, exchanges and queues (idempotent)",
        description="Declare everything the federation needs on the broker described by "
        "<state dir>/broker/admin.toml: the vhost, the coordinator's user, the exchanges, the shared queues and "
        "the queues of every provisioned site. Declaring again changes nothing.",
    )
    declare.set_defaults(handler=_guarded(_declare))

    add = actions.add_parser(
        "add-site",
        parents=[vhost_option],
        help="create a hospital's broker user and config file; prints the file's path",
        description="Create a RabbitMQ user named NAME with a generated password, allowed to publish only its own "
        "updates, heartbeats and evaluations (routing keys site.NAME.*) and to read only its own inbox and "
        "control queue; declare those queues; write <state dir>/sites/NAME.toml (mode 0600) with its AMQP URL "
        "and print that path. Give the file to the hospital's IT for the site agent.",
    )
    add.add_argument("name", metavar="NAME", help="the site id: lowercase letters, digits and '-'")
    add.add_argument(
        "--rotate-password",
        action="store_true",
        help="the site exists: give it a new password (with TLS: a new certificate, and the old one is revoked), "
        "close its connections and rewrite its file",
    )
    add.add_argument(
        "--public-key",
        type=Path,
        metavar="FILE",
        help="the hospital's signing public key, made at the hospital by `fedmq site keygen NAME`; registered "
        "in <state dir>/keys/sites/NAME.pub. Without it (and no key registered before) the coordinator refuses "
        "the site's updates as bad-signature while [signing] required = true",
    )
    add.add_argument("--public-host", help="broker host written into the URL (default: from admin.toml)")
    add.add_argument("--public-port", type=int, help="broker AMQP port written into the URL (default: admin.toml)")
    add.set_defaults(handler=_guarded(_add_site))

    certs = actions.add_parser(
        "certs",
        help="make the private CA and the broker's, coordinator's and hospitals' certificates (idempotent)",
        description="Under <state dir>/certs: a private CA (ca.pem, ca.key), the broker's server certificate "
        "(broker.pem; SAN localhost, 127.0.0.1, the node's host and every --host) and client certificates "
        "clients/NAME.pem with CN = NAME for the administrator, the coordinator (fedmq-coordinator), every "
        "provisioned site and every --site. Keys are mode 0600. What exists and is still good is kept; a "
        "certificate is reissued when missing, expiring within 30 days, not signed by the current CA or "
        "lacking a host name.",
    )
    certs.add_argument(
        "--site", action="append", default=[], metavar="NAME", help="also issue a certificate for this site"
    )
    certs.add_argument(
        "--host", action="append", default=[], metavar="NAME", help="a host name or address for the broker"
    )
    certs.add_argument(
        "--renew-ca",
        action="store_true",
        help="replace the CA and reissue every certificate (restart the broker, send each hospital its new files)",
    )
    certs.add_argument(
        "--days", type=int, default=CertificateSettings.leaf_days, help="validity of new certificates in days"
    )
    certs.set_defaults(handler=_guarded(_certs))

    remove = actions.add_parser(
        "remove-site",
        parents=[vhost_option],
        help="delete a hospital's user, queues, config file and signing key; revoke its certificate",
        description="Delete the site's RabbitMQ user (closing its connections), its inbox and control queue, "
        "<state dir>/sites/NAME.toml and its registered signing key (keys/sites/NAME.pub). On a TLS broker its "
        "client certificate is revoked (added to the CRL the broker checks at every TLS handshake) and deleted, so "
        "a later add-site NAME issues a new one and the old certificate and key cannot connect again.",
    )
    remove.add_argument("name", metavar="NAME", help="the site id")
    remove.set_defaults(handler=_guarded(_remove_site))

    rotate_key = actions.add_parser(
        "rotate-site-key",
        help="replace a hospital's registered signing public key",
        description="Register FILE (made by `fedmq site keygen NAME` at the hospital) as site NAME's signing key "
        "in <state dir>/keys/sites/NAME.pub, replacing the old one. A running coordinator uses it from the next "
        "update on; updates signed with the old key are refused as bad-signature. To remove a key, remove the "
        "site (remove-site).",
    )
    rotate_key.add_argument("name", metavar="NAME", help="the site id")
    rotate_key.add_argument("--public-key", type=Path, required=True, metavar="FILE", help="the new public key")
    rotate_key.set_defaults(handler=_guarded(_rotate_site_key))

    listing = actions.add_parser(
        "list-sites",
        parents=[vhost_option],
        help="list the provisioned hospitals",
        description="List sites known to the broker (a user with permissions in the vhost) or to the state dir "
        "(a config file), and flag any that has one without the other.",
    )
    listing.set_defaults(handler=_guarded(_list_sites))


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return EXIT_USAGE


def _guarded(handler: Handler) -> Handler:
    """Turn the broker package's errors into one line on stderr and exit code 1."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except BrokerError as exc:  # TopologyError too
            print(f"fedmq broker {args.broker_command}: error: {exc}", file=sys.stderr)
            return EXIT_ERROR

    return run


def _requested_settings(args: argparse.Namespace, saved: NodeSettings | None) -> NodeSettings:
    base = saved or NodeSettings()
    overrides = {
        "amqp_port": args.amqp_port,
        "dist_port": args.dist_port,
        "management_port": args.management_port,
        "prometheus_port": args.prometheus_port,
        "bind": args.bind,
        "prometheus_bind": args.prometheus_bind,
        "public_host": args.public_host,
        "tls": args.tls,
        "amqps_port": args.amqps_port,
    }
    return dataclasses.replace(base, **{key: value for key, value in overrides.items() if value is not None})


def _certificates(access: BrokerAccess, state_dir: Path) -> CertificateStore | None:
    """The CA that issues client certificates when the broker logs clients in by certificate."""
    return CertificateStore.for_state_dir(state_dir) if access.tls is not None else None


def _declare_as_admin(access: BrokerAccess, vhost: str, sites: list[str]) -> None:
    """Declare as the administrator: by password, or by certificate when the broker wants one."""
    declare_topology_at(access.connection_parameters(vhost) if access.tls else access.admin_url(vhost), sites)


def _prepare_broker(access: BrokerAccess, vhost: str, state_dir: Path) -> tuple[Path, int]:
    """Vhost, the administrator's and the coordinator's permissions on it, the topology; idempotent."""
    management = access.management()
    management.create_vhost(vhost)
    management.set_permissions(vhost, access.admin_user, configure=".*", write=".*", read=".*")
    coordinator_file = ensure_coordinator_user(
        management,
        vhost=vhost,
        amqp_host=access.amqp_host,
        amqp_port=access.amqp_port,
        state_dir=state_dir,
        certificates=_certificates(access, state_dir),
    )
    sites = [site.site_id for site in list_sites(management, vhost=vhost, state_dir=state_dir) if site.provisioned]
    _declare_as_admin(access, vhost, sites)
    return coordinator_file, len(sites)


def _up(args: argparse.Namespace) -> int:
    state_dir: Path = args.state_dir
    saved = saved_node_settings(state_dir)
    requested = _requested_settings(args, saved)
    node = LocalNode.from_settings(state_dir, requested, rabbitmq_scripts_dir=args.rabbitmq_dir)
    if saved is not None and saved != requested:
        running = LocalNode.from_settings(state_dir, saved, rabbitmq_scripts_dir=args.rabbitmq_dir)
        if running.is_running():
            print(
                "fedmq broker up: the node is already running with the settings in "
                f"{running.admin_file}; run `fedmq broker down` first to change them",
                file=sys.stderr,
            )
            node = running
    started = node.start(args.timeout)
    access = node.access
    coordinator_file, site_count = _prepare_broker(access, args.vhost, state_dir)
    verb = "started" if started else "is already running"
    print(f"RabbitMQ node {node.node_name} {verb} (pid {node.running_pid()}); data in {node.broker_dir}")
    print(f"  AMQP URL (coordinator): {redact_url(read_broker_url(coordinator_file))}")
    credentials = "URL and certificate paths" if access.tls is not None else "full URL with password"
    print(f"                          {credentials} in {coordinator_file}")
    print(f"  management UI and API:  {access.management_url}  (user {access.admin_user}, see {node.admin_file})")
    print(f"  Prometheus metrics:     {access.prometheus_url}")
    if access.tls is not None:
        print(f"  TLS: AMQPS only, client certificates required; CA and certificates in {node.certificates.directory}")
    print(f"  topology declared in vhost {args.vhost!r} ({site_count} provisioned sites)")
    if site_count == 0:
        print("Next: fedmq broker add-site NAME")
    return EXIT_OK


def _down(args: argparse.Namespace) -> int:
    try:
        node = LocalNode.from_state_dir(args.state_dir, rabbitmq_scripts_dir=args.rabbitmq_dir)
    except BrokerNotConfigured:
        print(f"no local broker node under {args.state_dir}; nothing to stop")
        return EXIT_OK
    if node.stop(args.timeout):
        print(f"stopped RabbitMQ node {node.node_name}")
    else:
        print(f"RabbitMQ node {node.node_name} was not running")
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    try:
        node = LocalNode.from_state_dir(args.state_dir)
    except BrokerNotConfigured as exc:
        print(f"not running: {exc}")
        return EXIT_NOT_RUNNING
    status = node.status()
    if not status.running:
        print(f"RabbitMQ node {status.node_name} is not running (start it with `fedmq broker up`)")
        return EXIT_NOT_RUNNING
    access = status.access
    print(f"RabbitMQ node {status.node_name} is running (pid {status.pid}, RabbitMQ {status.rabbitmq_version})")
    print(f"  {('AMQPS' if access.tls else 'AMQP') + ':':<23}{access.amqp_host}:{access.amqp_port}")
    print(f"  management UI and API: {access.management_url}")
    print(f"  Prometheus metrics:    {access.prometheus_url}")
    return EXIT_OK


def _declare(args: argparse.Namespace) -> int:
    access = load_access(args.state_dir)
    coordinator_file, site_count = _prepare_broker(access, args.vhost, args.state_dir)
    print(
        f"declared the topology in vhost {args.vhost!r} with {site_count} provisioned sites; "
        f"coordinator URL in {coordinator_file}"
    )
    return EXIT_OK


def _add_site(args: argparse.Namespace) -> int:
    access = load_access(args.state_dir)
    path = add_site(
        access.management(),
        site_id=args.name,
        amqp_host=args.public_host or access.amqp_host,
        amqp_port=args.public_port or access.amqp_port,
        vhost=args.vhost,
        state_dir=args.state_dir,
        rotate_password=args.rotate_password,
        certificates=_certificates(access, args.state_dir),
        public_key_file=args.public_key,
    )
    if args.public_key is None and not site_key_path(keys_dir(args.state_dir), args.name).exists():
        print(
            f"warning: site {args.name} has no signing key registered: the coordinator refuses its updates "
            f"(bad-signature) until you run `fedmq broker rotate-site-key {args.name} --public-key FILE` with the "
            f"key the hospital made by `fedmq site keygen {args.name}`",
            file=sys.stderr,
        )
    print(path)
    return EXIT_OK


def _rotate_site_key(args: argparse.Namespace) -> int:
    path = rotate_site_key(site_id=args.name, state_dir=args.state_dir, public_key_file=args.public_key)
    print(f"registered the signing key of site {args.name}: {path}")
    return EXIT_OK


def _certs(args: argparse.Namespace) -> int:
    state_dir: Path = args.state_dir
    store = CertificateStore.for_state_dir(state_dir, CertificateSettings(leaf_days=args.days))
    hosts = list(args.host)
    settings = saved_node_settings(state_dir)
    if settings is not None:  # the names the local node is reached by
        hosts += [name for name in (settings.public_host, settings.bind) if name and name not in WILDCARD_ADDRESSES]
    sites_dir = state_dir / SITES_DIRNAME
    provisioned = sorted(path.stem for path in sites_dir.glob("*.toml")) if sites_dir.is_dir() else []
    for site_id in args.site:
        topology.validate_site_id(site_id)
    clients = [ADMIN_USER, topology.COORDINATOR_USER, *provisioned, *args.site]
    outcomes = store.ensure_all(hosts=hosts, clients=clients, renew_ca=args.renew_ca)
    for outcome in outcomes:
        verb = "issued" if outcome.issued else "kept  "
        print(f"{verb}  {outcome.name:<24} {outcome.files.cert_file}")
    print(f"CA certificate (give it to every hospital): {store.ca_file}; its key {store.ca_key_file} stays here")
    if args.renew_ca:
        print("The CA is new: restart the broker (fedmq broker down; fedmq broker up) and send every hospital its new")
        print("certificate, key and ca.pem.")
    return EXIT_OK


def _remove_site(args: argparse.Namespace) -> int:
    access = load_access(args.state_dir)
    remove_site(
        access.management(),
        site_id=args.name,
        vhost=args.vhost,
        state_dir=args.state_dir,
        certificates=_certificates(access, args.state_dir),
    )
    print(f"removed site {args.name}")
    return EXIT_OK


def _list_sites(args: argparse.Namespace) -> int:
    access = load_access(args.state_dir)
    sites = list_sites(access.management(), vhost=args.vhost, state_dir=args.state_dir)
    if not sites:
        print(f"no sites in vhost {args.vhost!r} (add one with `fedmq broker add-site NAME`)")
        return EXIT_OK
    width = max(len("SITE"), *(len(site.site_id) for site in sites))
    print(f"{'SITE':<{width}}  {'STATE':<22}  CONFIG FILE")
    for site in sites:
        if site.provisioned and site.config_path is not None:
            state = "ok"
        elif not site.has_user:
            state = "no broker user"
        elif not site.has_permissions:
            state = "no permissions"
        else:
            state = "config file missing"
        print(f"{site.site_id:<{width}}  {state:<22}  {site.config_path or '-'}")
    return EXIT_OK
