"""A private RabbitMQ node for development, the demo and the tests, run from the installed rabbitmq-server.

Everything the node writes lives under ``<state dir>/broker/``::

    broker/
      admin.toml          how to reach and administer the broker (generated admin password; mode 0600)
      rabbitmq.conf       generated on every start: listeners, ports, plugins' settings, the default user
      advanced.config     generated on every start: with TLS, the AMQPS ssl_options with the CRL check
      enabled_plugins     management, prometheus, auth_mechanism_ssl
      rabbitmq-env.conf   empty, so /etc/rabbitmq/rabbitmq-env.conf cannot change this node
      .erlang.cookie      the node's own Erlang cookie (HOME points here for the node and for rabbitmqctl)
      rabbitmq.pid        the node's OS process id while it runs
      mnesia/  log/       data and logs

The node has its own name (``fedmq-<hash of the state dir>@localhost``) and ports, listens on 127.0.0.1 unless
told otherwise, and runs detached so it outlives the ``fedmq broker up`` that started it. Its only user is
the generated administrator (``default_user``), so the ``guest`` user never exists.

With ``tls`` the node has one AMQPS listener and no plain one: it requires a client certificate signed by the
federation's CA (``broker.certs``, under ``<state dir>/certs/``) and logs the client in as the certificate's CN
(EXTERNAL), after checking it against the CA's revocation list (``crl_check``, ``certs/crl/``). The
administrator then connects with its own certificate (CN ``fedmq-admin``), listed in the
``[tls]`` table of admin.toml; the management API stays plain HTTP, on 127.0.0.1 only, for provisioning.

``admin.toml`` is also how fedmq talks to a broker it did not start (Docker, a managed RabbitMQ): write its
top-level keys and ``[admin]`` by hand, leave out ``[node]``, and ``fedmq broker add-site`` etc. work as usual.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika
import pika.exceptions

from broker import topology
from broker.certs import CertificateStore, TlsFiles
from broker.errors import (
    BrokerError,
    BrokerNotConfigured,
    BrokerNotInstalled,
    BrokerNotReachable,
    BrokerStartError,
)
from broker.management import ManagementClient
from broker.pika_transport import ConnectionSettings
from broker.provisioning import amqp_url, amqps_url, read_toml, write_private_file, write_private_toml

logger = logging.getLogger(__name__)

DEFAULT_AMQP_PORT = 5682
DEFAULT_AMQPS_PORT = 5681
DEFAULT_DIST_PORT = 25682
DEFAULT_MANAGEMENT_PORT = 15682
DEFAULT_PROMETHEUS_PORT = 15702
LOOPBACK = "127.0.0.1"
WILDCARD_ADDRESSES = frozenset({"0.0.0.0", "::"})
ADMIN_USER = "fedmq-admin"
ENABLED_PLUGINS = ("rabbitmq_management", "rabbitmq_prometheus", "rabbitmq_auth_mechanism_ssl")
# The Debian/Ubuntu package puts the real scripts here; /usr/sbin holds wrappers that `su` to the rabbitmq
# user, which could not write to our state dir.
DEBIAN_SCRIPTS_DIR = Path("/usr/lib/rabbitmq/bin")
DEFAULT_START_TIMEOUT = 90.0
DEFAULT_STOP_TIMEOUT = 60.0

INSTALL_HINT = (
    "install it with `sudo apt-get install rabbitmq-server` (Debian/Ubuntu; fedmq starts its own private "
    "node, so the system service may stay disabled), or run the official Docker image "
    "`docker run -d -p 5672:5672 -p 15672:15672 rabbitmq:3.10-management` and describe it in "
    "<state dir>/broker/admin.toml"
)


@dataclass(frozen=True)
class NodeSettings:
    """What makes one local node: ports, address, name. Saved in admin.toml so later commands need no flags."""

    amqp_port: int = DEFAULT_AMQP_PORT
    dist_port: int = DEFAULT_DIST_PORT
    management_port: int = DEFAULT_MANAGEMENT_PORT
    prometheus_port: int = DEFAULT_PROMETHEUS_PORT
    node_name: str | None = None
    bind: str = LOOPBACK
    # RabbitMQ's Prometheus endpoint answers without a login and, per object, names every site and its queue depths:
    # on this machine only, unless the operator puts it where only their Prometheus can reach it.
    prometheus_bind: str = LOOPBACK
    # The host name written into URLs handed to sites (a real deployment's public name); default: bind.
    public_host: str | None = None
    # How often the broker refreshes queue/connection statistics for the management API and Prometheus.
    statistics_interval_ms: int = 5000
    # One AMQPS listener requiring client certificates (login by CN) instead of the plain AMQP listener.
    tls: bool = False
    amqps_port: int = DEFAULT_AMQPS_PORT


@dataclass(frozen=True)
class BrokerAccess:
    """How to reach and administer a broker: the AMQP endpoint, the HTTP APIs and the administrator."""

    amqp_host: str
    amqp_port: int
    management_url: str
    prometheus_url: str
    admin_user: str
    admin_password: str
    # With TLS: the CA and the administrator's client certificate; amqp_port is then the AMQPS port.
    tls: TlsFiles | None = None

    def admin_url(self, vhost: str = topology.VHOST) -> str:
        """With TLS an ``amqps://`` URL without credentials: connect with ``connection_parameters``."""
        if self.tls is not None:
            return amqps_url(self.amqp_host, self.amqp_port, vhost)
        return amqp_url(self.admin_user, self.admin_password, self.amqp_host, self.amqp_port, vhost)

    def connection_parameters(self, vhost: str = topology.VHOST) -> pika.ConnectionParameters:
        """The administrator's AMQP login: the password, or over TLS its client certificate."""
        if self.tls is None:
            return pika.URLParameters(self.admin_url(vhost))
        return ConnectionSettings(
            url=self.admin_url(vhost),
            ca_file=str(self.tls.ca_file),
            cert_file=str(self.tls.cert_file),
            key_file=str(self.tls.key_file),
            connection_name="fedmq-admin",
        ).parameters()

    def management(self, *, timeout: float = 10.0) -> ManagementClient:
        return ManagementClient(self.management_url, self.admin_user, self.admin_password, timeout=timeout)


@dataclass(frozen=True)
class NodeStatus:
    running: bool
    node_name: str
    pid: int | None
    access: BrokerAccess
    rabbitmq_version: str | None = None


def _url_host(bind: str, public_host: str) -> str:
    """The host a URL for a listener on ``bind`` should name (bracketed when IPv6)."""
    host = public_host if bind in WILDCARD_ADDRESSES else bind
    return f"[{host}]" if ":" in host else host


def admin_file_path(state_dir: Path) -> Path:
    return state_dir / "broker" / "admin.toml"


def default_node_name(state_dir: Path) -> str:
    """Unique per state dir, stable across restarts (the data directory is named after it)."""
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:8]
    return f"fedmq-{digest}@localhost"


def load_access(state_dir: Path) -> BrokerAccess:
    """Read ``<state dir>/broker/admin.toml``; say how to create it when it is missing."""
    path = admin_file_path(state_dir)
    if not path.exists():
        raise BrokerNotConfigured(
            f"no broker set up under {state_dir}: run `fedmq broker up` (or describe an existing broker in {path})"
        )
    raw = read_toml(path)
    admin = raw.get("admin", {})
    tls_table = raw.get("tls")
    try:
        tls = None
        if isinstance(tls_table, dict):  # relative paths are read from admin.toml's directory
            tls = TlsFiles(*(path.parent / str(tls_table[key]) for key in ("ca_file", "cert_file", "key_file")))
        return BrokerAccess(
            amqp_host=str(raw["amqp_host"]),
            amqp_port=int(raw["amqp_port"]),
            management_url=str(raw["management_url"]),
            prometheus_url=str(raw.get("prometheus_url", "")),
            admin_user=str(admin["user"]),
            admin_password=str(admin["password"]),
            tls=tls,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BrokerNotConfigured(f"{path} lacks or garbles {exc}: rewrite it or run `fedmq broker up`") from exc


def saved_node_settings(state_dir: Path) -> NodeSettings | None:
    """The settings ``fedmq broker up`` last used under this state dir, or None if it never ran there."""
    path = admin_file_path(state_dir)
    if not path.exists():
        return None
    raw = read_toml(path)
    node = raw.get("node")
    if not isinstance(node, dict):
        return None
    defaults = NodeSettings()
    try:
        return NodeSettings(
            # With TLS the top-level amqp_port is the AMQPS port; [node] keeps the plain one.
            amqp_port=int(node.get("amqp_port", raw.get("amqp_port", defaults.amqp_port))),
            dist_port=int(node.get("dist_port", defaults.dist_port)),
            management_port=int(node.get("management_port", defaults.management_port)),
            prometheus_port=int(node.get("prometheus_port", defaults.prometheus_port)),
            node_name=str(node["name"]) if node.get("name") else None,
            bind=str(node.get("bind", defaults.bind)),
            prometheus_bind=str(node.get("prometheus_bind", defaults.prometheus_bind)),
            public_host=str(node["public_host"]) if node.get("public_host") else None,
            statistics_interval_ms=int(node.get("statistics_interval_ms", defaults.statistics_interval_ms)),
            tls=bool(node.get("tls", defaults.tls)),
            amqps_port=int(node.get("amqps_port", defaults.amqps_port)),
        )
    except (TypeError, ValueError) as exc:
        raise BrokerNotConfigured(f"{path} has a malformed [node] table: {exc}") from exc


def find_rabbitmq_scripts(explicit_dir: Path | None = None) -> Path:
    """The directory holding the real ``rabbitmq-server`` and ``rabbitmqctl`` scripts."""
    if explicit_dir is not None:
        candidates = [explicit_dir]
    else:
        candidates = [DEBIAN_SCRIPTS_DIR]
        on_path = shutil.which("rabbitmq-server")
        if on_path:
            candidates.append(Path(on_path).resolve().parent)
    for directory in candidates:
        if all(os.access(directory / script, os.X_OK) for script in ("rabbitmq-server", "rabbitmqctl")):
            return directory
    where = f"in {explicit_dir}" if explicit_dir is not None else "on this machine"
    raise BrokerNotInstalled(f"RabbitMQ (rabbitmq-server) is not installed {where}: {INSTALL_HINT}")


RABBITMQCTL_PORTS = range(35672, 35683)  # rabbitmqctl's own distribution ports: never hand them out
FIRST_PICKED_PORT = 20000


def _ephemeral_port_range() -> range:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return range(low, high + 1)


def free_tcp_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports nothing listens on right now, for servers started a moment later.

    Picked at random below the kernel's ephemeral range: a port from that range (what binding port 0 returns)
    can be taken by any outgoing connection between this pick and the server's bind, which is how a benchmark's
    coordinator once found its metrics port in use. All candidates are held open together, so they are distinct.
    """
    ephemeral = _ephemeral_port_range()
    if ephemeral.start > FIRST_PICKED_PORT + 1000:
        candidates = range(FIRST_PICKED_PORT, ephemeral.start)
    else:  # an unusual kernel setting: any unprivileged port
        candidates = range(1024, 65536)
    chooser = secrets.SystemRandom()
    ports: list[int] = []
    with contextlib.ExitStack() as stack:
        for _attempt in range(count * 200):
            if len(ports) == count:
                break
            port = chooser.choice(candidates)
            if port in ports or port in RABBITMQCTL_PORTS:
                continue
            probe = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            try:
                probe.bind((host, port))
            except OSError:
                continue
            ports.append(port)
    if len(ports) < count:
        raise OSError(f"found only {len(ports)} of {count} free TCP ports on {host} in {candidates}")
    return ports


def _port_is_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _erlang_string(path: Path) -> str:
    """A path as an Erlang string literal (advanced.config)."""
    return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


class LocalNode:
    """Start, stop and inspect one private RabbitMQ node living under ``<state dir>/broker``."""

    def __init__(
        self,
        state_dir: Path,
        *,
        amqp_port: int = DEFAULT_AMQP_PORT,
        dist_port: int = DEFAULT_DIST_PORT,
        management_port: int = DEFAULT_MANAGEMENT_PORT,
        prometheus_port: int = DEFAULT_PROMETHEUS_PORT,
        node_name: str | None = None,
        bind: str = LOOPBACK,
        prometheus_bind: str = LOOPBACK,
        public_host: str | None = None,
        statistics_interval_ms: int = 5000,
        tls: bool = False,
        amqps_port: int = DEFAULT_AMQPS_PORT,
        rabbitmq_scripts_dir: Path | None = None,
    ) -> None:
        self.state_dir = state_dir.resolve()
        self.settings = NodeSettings(
            amqp_port=amqp_port,
            dist_port=dist_port,
            management_port=management_port,
            prometheus_port=prometheus_port,
            node_name=node_name,
            bind=bind,
            prometheus_bind=prometheus_bind,
            public_host=public_host,
            statistics_interval_ms=statistics_interval_ms,
            tls=tls,
            amqps_port=amqps_port,
        )
        self.node_name = node_name or default_node_name(self.state_dir)
        self.certificates = CertificateStore.for_state_dir(self.state_dir)
        self.rabbitmq_scripts_dir = rabbitmq_scripts_dir
        self.broker_dir = self.state_dir / "broker"
        self.admin_file = self.broker_dir / "admin.toml"
        self.config_file = self.broker_dir / "rabbitmq.conf"
        self.advanced_config_file = self.broker_dir / "advanced.config"
        self.enabled_plugins_file = self.broker_dir / "enabled_plugins"
        self.env_file = self.broker_dir / "rabbitmq-env.conf"
        self.cookie_file = self.broker_dir / ".erlang.cookie"
        self.pid_file = self.broker_dir / "rabbitmq.pid"
        self.mnesia_dir = self.broker_dir / "mnesia"
        self.log_dir = self.broker_dir / "log"
        self._process: subprocess.Popen[bytes] | None = None
        self.access = self._make_access()

    @classmethod
    def from_state_dir(cls, state_dir: Path, *, rabbitmq_scripts_dir: Path | None = None) -> LocalNode:
        """The node ``fedmq broker up`` set up under this state dir, with the settings it used."""
        settings = saved_node_settings(state_dir)
        if settings is None:
            raise BrokerNotConfigured(f"no local broker node set up under {state_dir}: run `fedmq broker up`")
        return cls.from_settings(state_dir, settings, rabbitmq_scripts_dir=rabbitmq_scripts_dir)

    @classmethod
    def from_settings(
        cls, state_dir: Path, settings: NodeSettings, *, rabbitmq_scripts_dir: Path | None = None
    ) -> LocalNode:
        return cls(state_dir, rabbitmq_scripts_dir=rabbitmq_scripts_dir, **dataclasses.asdict(settings))

    # files

    def _make_access(self) -> BrokerAccess:
        """Keep the admin password of an existing node: the broker only takes default_pass on first boot."""
        password: str | None = None
        if self.admin_file.exists():
            # An unreadable file falls through to a new password; the login check at start then explains.
            with contextlib.suppress(BrokerError):
                password = load_access(self.state_dir).admin_password
        settings = self.settings
        host = settings.public_host or ("localhost" if settings.bind in WILDCARD_ADDRESSES else settings.bind)
        url_host = f"[{host}]" if ":" in host else host
        return BrokerAccess(
            amqp_host=host,
            amqp_port=settings.amqps_port if settings.tls else settings.amqp_port,
            management_url=f"http://{LOOPBACK if settings.tls else url_host}:{settings.management_port}",
            prometheus_url=f"http://{_url_host(settings.prometheus_bind, host)}:{settings.prometheus_port}/metrics",
            admin_user=ADMIN_USER,
            admin_password=password or secrets.token_hex(24),
            tls=self.certificates.client_files(ADMIN_USER) if settings.tls else None,
        )

    def broker_hosts(self) -> list[str]:
        """Names the broker certificate must carry, besides localhost and 127.0.0.1."""
        settings = self.settings
        hosts = [self.access.amqp_host]
        if settings.bind not in WILDCARD_ADDRESSES:
            hosts.append(settings.bind)
        return hosts

    def _write_admin_file(self) -> None:
        access, settings = self.access, self.settings
        document: dict[str, Any] = {
            "amqp_host": access.amqp_host,
            "amqp_port": access.amqp_port,
            "management_url": access.management_url,
            "prometheus_url": access.prometheus_url,
            "admin": {"user": access.admin_user, "password": access.admin_password},
        }
        if access.tls is not None:  # the administrator's AMQPS login: the CA and its client certificate
            document["tls"] = {
                "ca_file": str(access.tls.ca_file),
                "cert_file": str(access.tls.cert_file),
                "key_file": str(access.tls.key_file),
            }
        node: dict[str, Any] = {
            "name": self.node_name,
            "bind": settings.bind,
            "prometheus_bind": settings.prometheus_bind,
            "dist_port": settings.dist_port,
            "management_port": settings.management_port,
            "prometheus_port": settings.prometheus_port,
            "statistics_interval_ms": settings.statistics_interval_ms,
            "amqp_port": settings.amqp_port,
            "tls": settings.tls,
            "amqps_port": settings.amqps_port,
        }
        if settings.public_host:
            node["public_host"] = settings.public_host
        document["node"] = node
        write_private_toml(
            self.admin_file,
            document,
            comments=[
                "How fedmq reaches and administers its RabbitMQ broker; written by `fedmq broker up`.",
                "It holds the administrator's password: keep it private (mode 0600). [tls], when present, is the",
                "administrator's AMQPS login: the CA and its client certificate (CN = the admin user).",
            ],
        )

    def _listener_conf(self) -> list[str]:
        """The plain AMQP listener, or only an AMQPS one that wants a client certificate and logs in by its CN."""
        settings = self.settings
        # RabbitMQ splits at the last colon, so IPv6 addresses go in without brackets (:::5682).
        if not settings.tls:
            return [f"listeners.tcp.1 = {settings.bind}:{settings.amqp_port}"]
        return [
            "listeners.tcp = none",
            f"listeners.ssl.1 = {settings.bind}:{settings.amqps_port}",
            "# ssl_options are in advanced.config: the CRL cache cannot be set in this file",
            "auth_mechanisms.1 = EXTERNAL",
            "ssl_cert_login_from = common_name",
        ]

    def _advanced_config(self) -> str:
        """With TLS, the AMQPS listener's ssl_options, which check every client certificate against the CRL in
        ``certs/crl/`` (``broker.certs``; Erlang's ssl_crl_hash_dir reads it at each handshake, so a revocation
        takes effect without a restart). All of ssl_options live here, not in rabbitmq.conf: advanced.config
        replaces the whole list."""
        if not self.settings.tls:
            return "%% Generated by fedmq: nothing beyond rabbitmq.conf.\n[].\n"
        broker = self.certificates.broker_files()
        crl_dir = _erlang_string(self.certificates.crl_dir)
        options = [
            f"{{cacertfile, {_erlang_string(broker.ca_file)}}}",
            f"{{certfile, {_erlang_string(broker.cert_file)}}}",
            f"{{keyfile, {_erlang_string(broker.key_file)}}}",
            "{verify, verify_peer}",
            "{fail_if_no_peer_cert, true}",
            "{versions, ['tlsv1.3', 'tlsv1.2']}",
            "{crl_check, peer}",
            f"{{crl_cache, {{ssl_crl_hash_dir, {{internal, [{{dir, {crl_dir}}}]}}}}}}",
        ]
        body = ",\n      ".join(options)
        return (
            "%% Generated by fedmq on every `fedmq broker up`; edits are overwritten.\n"
            f"[{{rabbit, [{{ssl_options, [\n      {body}\n  ]}}]}}].\n"
        )

    def _rabbitmq_conf(self) -> str:
        settings, access = self.settings, self.access
        return "\n".join(
            [
                "# Generated by fedmq on every `fedmq broker up`; edits are overwritten.",
                *self._listener_conf(),
                # With TLS the plain-HTTP management API (admin password, provisioning) stays on this machine.
                f"management.tcp.ip = {LOOPBACK if settings.tls else settings.bind}",
                f"management.tcp.port = {settings.management_port}",
                # No login on this endpoint, and per-object series name every site: loopback unless told otherwise.
                f"prometheus.tcp.ip = {settings.prometheus_bind}",
                f"prometheus.tcp.port = {settings.prometheus_port}",
                "prometheus.return_per_object_metrics = true",
                f"collect_statistics_interval = {settings.statistics_interval_ms}",
                f"default_vhost = {topology.VHOST}",
                f"default_user = {access.admin_user}",
                f"default_pass = {access.admin_password}",
                "default_user_tags.administrator = true",
                "default_permissions.configure = .*",
                "default_permissions.read = .*",
                "default_permissions.write = .*",
                "log.console = false",
                "log.file.level = info",
                "",
            ]
        )

    def write_files(self) -> None:
        """Everything the node reads at boot; safe to call again (the cookie is kept)."""
        for directory in (self.broker_dir, self.mnesia_dir, self.log_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self.broker_dir.chmod(0o700)  # the data holds password hashes and queued model updates
        if self.settings.tls:  # the CA, the broker's certificate and the administrator's, made if missing
            self.certificates.ensure_ca()
            self.certificates.ensure_broker(self.broker_hosts())
            self.certificates.ensure_client(ADMIN_USER)
            self.certificates.ensure_crl()  # fresh dates: a CRL past its nextUpdate would refuse every client
        self._write_admin_file()
        write_private_file(self.config_file, self._rabbitmq_conf())
        write_private_file(self.advanced_config_file, self._advanced_config())
        write_private_file(self.enabled_plugins_file, f"[{','.join(ENABLED_PLUGINS)}].\n")
        write_private_file(self.env_file, "# Intentionally empty: this node takes its settings from fedmq.\n")
        if not self.cookie_file.exists():
            write_private_file(self.cookie_file, secrets.token_hex(20).upper())
            self.cookie_file.chmod(0o400)

    def _environment(self) -> dict[str, str]:
        """One environment for the node and rabbitmqctl, so both find the same cookie (``$HOME``)."""
        inherited = {key: value for key, value in os.environ.items() if not key.startswith("RABBITMQ_")}
        settings = self.settings
        environment = {
            **inherited,
            "HOME": str(self.broker_dir),
            "RABBITMQ_NODENAME": self.node_name,
            "RABBITMQ_DIST_PORT": str(settings.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.mnesia_dir),
            "RABBITMQ_LOG_BASE": str(self.log_dir),
            "RABBITMQ_CONFIG_FILE": str(self.config_file),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.advanced_config_file),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.enabled_plugins_file),
            "RABBITMQ_CONF_ENV_FILE": str(self.env_file),
            "RABBITMQ_PID_FILE": str(self.pid_file),
        }
        if not settings.tls:  # with TLS there is no plain listener for it to name
            environment["RABBITMQ_NODE_PORT"] = str(settings.amqp_port)
        if settings.bind == LOOPBACK:  # keep the Erlang distribution port off the network too
            environment["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"] = "-kernel inet_dist_use_interface {127,0,0,1}"
        return environment

    # process

    def _read_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def _is_our_node(self, pid: int) -> bool:
        """Guard against a stale pid file whose number now belongs to another process."""
        cmdline = Path(f"/proc/{pid}/cmdline")
        if not Path("/proc/self/cmdline").exists():
            return True  # no procfs: trust the pid file
        try:
            arguments = cmdline.read_bytes().split(b"\0")
        except OSError:
            return False
        return str(self.broker_dir).encode() in arguments

    def running_pid(self) -> int | None:
        if self._process is not None and self._process.poll() is not None:
            return None
        pid = self._read_pid()
        if pid is None or not _process_alive(pid) or not self._is_our_node(pid):
            return None
        return pid

    def is_running(self) -> bool:
        return self.running_pid() is not None

    def _rabbitmqctl(self, *arguments: str, timeout: float) -> subprocess.CompletedProcess[str]:
        scripts = find_rabbitmq_scripts(self.rabbitmq_scripts_dir)
        command = [str(scripts / "rabbitmqctl"), "-n", self.node_name, *arguments]
        try:
            return subprocess.run(
                command,
                env=self._environment(),
                cwd=self.broker_dir,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise BrokerStartError(f"`rabbitmqctl {' '.join(arguments)}` took longer than {timeout:.0f} s") from exc

    def _check_ports_free(self) -> None:
        settings = self.settings
        for option, port in (
            ("amqps", settings.amqps_port) if settings.tls else ("amqp", settings.amqp_port),
            ("dist", settings.dist_port),
            ("management", settings.management_port),
            ("prometheus", settings.prometheus_port),
        ):
            if not _port_is_free(settings.bind, port):
                raise BrokerStartError(
                    f"port {port} on {settings.bind} ({option}) is already in use: pick another with --{option}-port"
                )

    def start(self, timeout: float = DEFAULT_START_TIMEOUT) -> bool:
        """Start the node and wait until it accepts AMQP logins; return False if it was already running."""
        scripts = find_rabbitmq_scripts(self.rabbitmq_scripts_dir)
        if self.is_running():
            logger.info("RabbitMQ node %s is already running (pid %s)", self.node_name, self._read_pid())
            return False
        self._check_ports_free()
        self.write_files()
        self.pid_file.unlink(missing_ok=True)
        startup_log = self.log_dir / "startup.log"
        with startup_log.open("wb") as output:
            self._process = subprocess.Popen(
                [str(scripts / "rabbitmq-server")],
                env=self._environment(),
                cwd=self.broker_dir,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # outlive the CLI and its Ctrl-C
            )
        logger.info("starting RabbitMQ node %s (pid %s)", self.node_name, self._process.pid)
        try:
            self._await_ready(time.monotonic() + timeout, startup_log)
        except BaseException:
            self._kill_process()
            raise
        return True

    def _await_ready(self, deadline: float, startup_log: Path) -> None:
        assert self._process is not None
        last_answer = ""
        while True:
            remaining = deadline - time.monotonic()
            exit_code = self._process.poll()
            if exit_code is not None:
                raise BrokerStartError(
                    f"RabbitMQ exited with code {exit_code} while starting; see {self.log_dir}. "
                    f"Last lines of {startup_log}:\n{_tail(startup_log)}"
                )
            if remaining <= 0:
                raise BrokerStartError(
                    f"RabbitMQ did not start within the timeout; see {self.log_dir}. "
                    f"rabbitmqctl last said: {last_answer or 'nothing'}"
                )
            result = self._rabbitmqctl(
                "await_startup", "--timeout", str(max(1, int(remaining))), timeout=remaining + 10
            )
            if result.returncode == 0:
                break
            last_answer = (result.stderr or result.stdout).strip()
            time.sleep(0.3)
        self._verify_logins(deadline)

    def _verify_logins(self, deadline: float) -> None:
        """await_startup says the broker booted; prove our admin can use both AMQP and the management API."""
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                connection = pika.BlockingConnection(self.access.connection_parameters())
                connection.close()
                self.access.management(timeout=5).overview()
                return
            except pika.exceptions.ProbableAuthenticationError as exc:
                raise BrokerNotReachable(
                    f"the node refused the administrator in {self.admin_file}; the data in {self.mnesia_dir} "
                    f"was created with another password (delete {self.broker_dir} to start afresh)"
                ) from exc
            except (pika.exceptions.AMQPError, BrokerError) as exc:
                last_error = exc
                time.sleep(0.3)
        raise BrokerStartError(f"RabbitMQ started but does not accept logins: {last_error!r}")

    def _kill_process(self) -> None:
        """Undo a failed start: the script and the Erlang VM share the new session's process group."""
        if self._process is None or self._process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, signal.SIGTERM)
        try:
            self._process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()

    def _wait_until_gone(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while _process_alive(pid) and self._is_our_node(pid):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)
        if self._process is not None:  # reap the start script we launched (else it stays a zombie)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=max(1.0, deadline - time.monotonic()))
        return True

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> bool:
        """Stop the node cleanly (rabbitmqctl stop, else SIGTERM); return False if it was not running."""
        pid = self.running_pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        try:
            result = self._rabbitmqctl("stop", timeout=timeout)
            stopped_cleanly = result.returncode == 0
        except BrokerError:
            stopped_cleanly = False
        if not stopped_cleanly:
            logger.warning("rabbitmqctl stop failed; sending SIGTERM to %s", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        if not self._wait_until_gone(pid, timeout):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self._wait_until_gone(pid, 10)
            raise BrokerStartError(f"RabbitMQ node {self.node_name} did not stop within {timeout:.0f} s; killed it")
        self.pid_file.unlink(missing_ok=True)
        self._process = None
        return True

    def close_user_connections(self, user: str, reason: str = "closed by fedmq") -> None:
        """Force-close every connection of ``user`` now (clients see 320 CONNECTION_FORCED).

        Unlike the management API's connection list, which lags by several seconds, rabbitmqctl sees
        connections the moment they open, so reconnect tests need no polling.
        """
        result = self._rabbitmqctl("close_all_user_connections", user, reason, timeout=60)
        if result.returncode != 0:
            raise BrokerNotReachable(f"rabbitmqctl could not close {user}'s connections: {result.stderr.strip()}")

    def status(self) -> NodeStatus:
        pid = self.running_pid()
        version: str | None = None
        if pid is not None:
            with contextlib.suppress(BrokerError):
                version = str(self.access.management(timeout=5).overview().get("rabbitmq_version"))
        return NodeStatus(
            running=pid is not None,
            node_name=self.node_name,
            pid=pid,
            access=self.access,
            rabbitmq_version=version,
        )
