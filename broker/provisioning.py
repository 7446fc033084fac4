"""Broker identities: one RabbitMQ user per hospital, one for the coordinator, and their config files.

A site's user is named exactly its site id, so the AMQP ``user_id`` property the broker validates on every
publish *is* the site id the coordinator trusts. Its permissions come from ``topology.site_permissions``:
write only to the update and status exchanges with routing keys ``site.<id>.*``, read only its own inbox and
control queue, declare nothing. The password is generated here and written only to the site's config file
(mode 0600), which the hospital's IT copies to the agent's machine.

Queues are declared through the management API (as the administrator), from the same topology specs that
``broker.declare`` uses over AMQP, so a site's inbox exists before the site first connects.

On a TLS broker (``certificates`` given) users get no password at all: the broker logs them in by the CN of
their client certificate, which is issued here, and the config file holds an ``amqps://`` URL without
credentials plus ``ca_file``, ``cert_file`` and ``key_file``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import tempfile
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import tomli_w

from broker import topology
from broker.certs import CertificateStore, TlsFiles
from broker.errors import BrokerNotConfigured, ManagementError, ProvisioningError
from broker.keys import (
    KeyFileError,
    coordinator_public_key,
    keys_dir,
    public_key_text,
    read_public_key,
    register_site_key,
    remove_site_key,
)
from broker.management import ManagementClient

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# A user tag marking RabbitMQ users that are fedmq sites (tags are free-form labels in RabbitMQ).
SITE_TAG = "fedmq-site"
SITES_DIRNAME = "sites"
COORDINATOR_CONFIG_NAME = "coordinator-broker.toml"
PASSWORD_BYTES = 24


@dataclass(frozen=True)
class SiteCredentials:
    """What a provisioned site needs: its id, its AMQP URL (with password) and its config file."""

    site_id: str
    url: str
    config_path: Path


@dataclass(frozen=True)
class SiteRecord:
    """One row of ``list_sites``: a site known to the broker, to the state dir, or to both."""

    site_id: str
    has_user: bool
    has_permissions: bool
    config_path: Path | None

    @property
    def provisioned(self) -> bool:
        return self.has_user and self.has_permissions


def amqp_url(user: str, password: str, host: str, port: int, vhost: str) -> str:
    """``amqp://user:password@host:port/vhost`` with every part quoted as URLParameters expects."""
    netloc_host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    quoted = [urllib.parse.quote(part, safe="") for part in (user, password, vhost)]
    return f"amqp://{quoted[0]}:{quoted[1]}@{netloc_host}:{port}/{quoted[2]}"


def amqps_url(host: str, port: int, vhost: str) -> str:
    """``amqps://host:port/vhost`` without credentials: the client certificate is the login (EXTERNAL)."""
    netloc_host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"amqps://{netloc_host}:{port}/{urllib.parse.quote(vhost, safe='')}"


def write_private_file(path: Path, text: str) -> None:
    """Write atomically with mode 0600 from the first byte: these files hold passwords."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(descriptor, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def write_private_toml(path: Path, document: Mapping[str, Any], *, comments: Iterable[str] = ()) -> None:
    """``document`` as TOML (tomli-w), mode 0600, below comment lines that say what the file is."""
    header = "".join(f"# {line}\n" for line in comments)
    write_private_file(path, header + tomli_w.dumps(document))


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError as exc:
        raise BrokerNotConfigured(f"{path} does not exist") from exc
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise BrokerNotConfigured(f"cannot read {path}: {exc}") from exc


def read_broker_url(config_path: Path) -> str:
    """The ``[broker] url`` of a site or coordinator config file."""
    broker = read_toml(config_path).get("broker")
    url = broker.get("url") if isinstance(broker, dict) else None
    if not isinstance(url, str) or not url:
        raise BrokerNotConfigured(f"{config_path} has no [broker] url")
    return url


def site_config_path(state_dir: Path, site_id: str) -> Path:
    return state_dir / SITES_DIRNAME / f"{site_id}.toml"


def coordinator_config_path(state_dir: Path) -> Path:
    return state_dir / COORDINATOR_CONFIG_NAME


def generate_password() -> str:
    return secrets.token_urlsafe(PASSWORD_BYTES)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _tls_table(tls: TlsFiles, relative_to: Path | None) -> dict[str, str]:
    def shown(path: Path) -> str:
        return os.path.relpath(path, relative_to) if relative_to is not None else str(path)

    return {"ca_file": shown(tls.ca_file), "cert_file": shown(tls.cert_file), "key_file": shown(tls.key_file)}


def _write_site_config(path: Path, site_id: str, url: str, coordinator_key: str, tls: TlsFiles | None = None) -> None:
    comments = [f"fedmq site agent configuration for {site_id}, written by `fedmq broker add-site` on {_now()}."]
    broker: dict[str, str] = {"url": url}
    if tls is None:
        comments += [
            "It holds this hospital's broker password: keep it private (mode 0600) and copy it only to the",
            "machine that runs the site agent.",
        ]
    else:
        comments += [
            "It and the key it names are this hospital's identity: keep them private and copy them only to the",
            "machine that runs the site agent.",
            "The broker knows this site by the CN of cert_file. Relative paths are read from this file's",
            "directory: point them at where the CA, the certificate and its key are installed.",
        ]
        broker |= _tls_table(tls, relative_to=path.parent)
    comments += [
        "[signing]: the agent signs its updates with its own key (signing.key_file, default",
        f"{site_id}.signing.key next to this file, made at the hospital by `fedmq site keygen {site_id}`) and",
        "refuses any model or control message not signed by the coordinator's key below.",
    ]
    signing = {"coordinator_public_key": coordinator_key}
    write_private_toml(path, {"site_id": site_id, "broker": broker, "signing": signing}, comments=comments)


def _create_certificate_user(management: ManagementClient, user: str, *, tags: list[str]) -> None:
    """A user without any password (password_hash ""): only its client certificate can log it in."""
    management.request(
        "PUT", f"users/{urllib.parse.quote(user, safe='')}", {"password_hash": "", "tags": ",".join(tags)}
    )


def _user_tags(user: dict[str, Any]) -> list[str]:
    tags = user.get("tags") or []
    if isinstance(tags, str):  # older brokers answer "a,b"
        return [tag for tag in tags.split(",") if tag]
    return [str(tag) for tag in tags]


def _checked_site_id(site_id: str) -> str:
    try:
        return topology.validate_site_id(site_id)
    except topology.TopologyError as exc:
        raise ProvisioningError(str(exc)) from exc


def _require_vhost(management: ManagementClient, vhost: str) -> None:
    if vhost not in management.list_vhosts():
        raise ProvisioningError(f"the broker has no vhost {vhost!r}: run `fedmq broker up` (or declare) first")


def declare_site_queues(management: ManagementClient, *, site_id: str, vhost: str) -> None:
    """The site's inbox and control queue with their bindings (idempotent)."""
    try:
        for queue in topology.site_queues(site_id):
            management.declare_queue(vhost, queue)
        for binding in topology.site_bindings(site_id):
            management.bind_queue(vhost, binding)
    except ManagementError as exc:
        raise ProvisioningError(f"cannot declare the queues of site {site_id!r} in {vhost!r}: {exc}") from exc


def add_site(
    management: ManagementClient,
    *,
    site_id: str,
    amqp_host: str,
    amqp_port: int,
    vhost: str,
    state_dir: Path,
    rotate_password: bool = False,
    certificates: CertificateStore | None = None,
    public_key_file: Path | None = None,
) -> Path:
    """Create the site's user, permissions and queues, write its config file and return the file's path.

    An existing site is refused unless ``rotate_password``: then it gets a new password, its open connections
    are closed (they were opened with the old one) and its config file is rewritten. With ``certificates``
    (a TLS broker; ``amqp_port`` is then the AMQPS port) the site gets a client certificate with CN = its id
    instead of a password, kept if one was issued before and reissued on rotation, which revokes the old one.

    ``public_key_file`` is the public key the hospital made with ``fedmq site keygen``: it is registered in
    ``<state dir>/keys/sites`` (``broker.keys``), and the site's file gets the coordinator's public key.
    """
    _checked_site_id(site_id)
    _require_vhost(management, vhost)
    keys = keys_dir(state_dir)
    try:
        coordinator_key = public_key_text(coordinator_public_key(keys))
        if public_key_file is not None:
            read_public_key(public_key_file)  # refused before anything is created
    except KeyFileError as exc:
        raise ProvisioningError(str(exc)) from None
    existing = management.get_user(site_id)
    if existing is not None:
        if SITE_TAG not in _user_tags(existing):
            raise ProvisioningError(f"the broker already has a user {site_id!r} that is not a fedmq site")
        if not rotate_password:
            raise ProvisioningError(
                f"site {site_id!r} exists already; use --rotate-password to issue a new password or remove-site first"
            )
    password = generate_password()
    if certificates is None:
        management.create_user(site_id, password, tags=[SITE_TAG])
    else:
        _create_certificate_user(management, site_id, tags=[SITE_TAG])
    try:
        management.apply_permissions(vhost, site_id, topology.site_permissions(site_id))
        declare_site_queues(management, site_id=site_id, vhost=vhost)
        path = site_config_path(state_dir, site_id)
        if certificates is None:
            _write_site_config(path, site_id, amqp_url(site_id, password, amqp_host, amqp_port, vhost), coordinator_key)
        else:
            tls = certificates.ensure_client(site_id, reissue=existing is not None).files
            _write_site_config(path, site_id, amqps_url(amqp_host, amqp_port, vhost), coordinator_key, tls)
        if public_key_file is not None:
            register_site_key(keys, site_id, public_key_file)
    except BaseException:
        if existing is None:  # leave no half-provisioned site behind
            management.delete_user(site_id)
        raise
    if existing is not None:
        management.close_user_connections(site_id, reason="site password rotated")
    return path


def remove_site(
    management: ManagementClient,
    *,
    site_id: str,
    vhost: str,
    state_dir: Path,
    certificates: CertificateStore | None = None,
) -> None:
    """Delete the site's user (and so its permissions), close its connections, drop its queues, its file and its
    registered public key. With ``certificates`` (a TLS broker) its client certificate is revoked (the CRL the
    broker checks) and deleted, so adding the site again issues a new one and the old one never connects again."""
    _checked_site_id(site_id)
    path = site_config_path(state_dir, site_id)
    user = management.get_user(site_id)
    if user is None and not path.exists():
        raise ProvisioningError(f"no site named {site_id!r} (no broker user, no {path})")
    if user is not None:
        if SITE_TAG not in _user_tags(user):
            raise ProvisioningError(f"the broker user {site_id!r} is not a fedmq site; not removing it")
        management.delete_user(site_id)
        management.close_user_connections(site_id, reason="site removed")
    if vhost in management.list_vhosts():
        for queue in topology.site_queues(site_id):
            management.delete_queue(vhost, queue.name)
    path.unlink(missing_ok=True)
    remove_site_key(keys_dir(state_dir), site_id)
    if certificates is not None:
        certificates.revoke_client(site_id)


def rotate_site_key(*, site_id: str, state_dir: Path, public_key_file: Path) -> Path:
    """Replace a provisioned hospital's registered public key; the coordinator uses the new one from the next
    update on (an update signed with the old key and still queued is refused as ``bad-signature``)."""
    _checked_site_id(site_id)
    if not site_config_path(state_dir, site_id).exists():
        raise ProvisioningError(f"no site named {site_id!r} is provisioned here (run add-site first)")
    return register_site_key(keys_dir(state_dir), site_id, public_key_file)


def list_sites(management: ManagementClient, *, vhost: str, state_dir: Path) -> list[SiteRecord]:
    """Sites with a user permitted in ``vhost`` and sites with a config file, sorted by id."""
    site_users = {user["name"] for user in management.list_users() if SITE_TAG in _user_tags(user)}
    permitted = (
        {entry["user"] for entry in management.list_permissions(vhost)} if vhost in management.list_vhosts() else set()
    )
    sites_dir = state_dir / SITES_DIRNAME
    config_files = {path.stem: path for path in sites_dir.glob("*.toml")} if sites_dir.is_dir() else {}
    site_ids = (site_users & permitted) | set(config_files)
    return [
        SiteRecord(
            site_id=site_id,
            has_user=site_id in site_users,
            has_permissions=site_id in permitted,
            config_path=config_files.get(site_id),
        )
        for site_id in sorted(site_ids)
    ]


def _password_from_config(path: Path, user: str) -> str | None:
    try:
        parts = urllib.parse.urlsplit(read_broker_url(path))
    except BrokerNotConfigured:
        return None
    if parts.username is None or urllib.parse.unquote(parts.username) != user or parts.password is None:
        return None
    return urllib.parse.unquote(parts.password)


def ensure_coordinator_user(
    management: ManagementClient,
    *,
    vhost: str,
    amqp_host: str,
    amqp_port: int,
    state_dir: Path,
    certificates: CertificateStore | None = None,
) -> Path:
    """Make sure the coordinator's user exists with its permissions on ``vhost``; (re)write its config file.

    The password already in ``<state dir>/coordinator-broker.toml`` is kept, so running ``fedmq broker up``
    again does not break a running coordinator; a new one is generated only when there is none. With
    ``certificates`` (a TLS broker) the user has no password and the file names the coordinator's client
    certificate (CN ``fedmq-coordinator``) by absolute paths, kept if still good.
    """
    user = topology.COORDINATOR_USER
    path = coordinator_config_path(state_dir)
    if certificates is not None:
        _create_certificate_user(management, user, tags=[])
        management.apply_permissions(vhost, user, topology.coordinator_permissions())
        tls = certificates.ensure_client(user).files
        write_private_toml(
            path,
            {"broker": {"url": amqps_url(amqp_host, amqp_port, vhost), **_tls_table(tls, relative_to=None)}},
            comments=[f"broker identity of the fedmq coordinator, written by fedmq on {_now()}. Keep private."],
        )
        return path
    password = _password_from_config(path, user) if path.exists() else None
    if password is None or management.get_user(user) is None:
        password = password or generate_password()
        management.create_user(user, password)
    management.apply_permissions(vhost, user, topology.coordinator_permissions())
    write_private_toml(
        path,
        {"broker": {"url": amqp_url(user, password, amqp_host, amqp_port, vhost)}},
        comments=[f"broker credentials of the fedmq coordinator, written by fedmq on {_now()}. Keep private."],
    )
    return path
