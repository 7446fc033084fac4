"""TLS with per-hospital certificates against a real broker started by ``fedmq broker up --tls``.

The node has only an AMQPS listener that wants a client certificate from the federation's CA and logs the client
in as the certificate's CN, so a hospital's identity is its certificate. It cannot share the session's plain node,
so this module starts its own (about 10 s), provisions the sites with ``fedmq broker add-site`` and uses the
config files that command wrote, exactly as a hospital would.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pika
import pytest
from cryptography import x509

from broker import topology
from broker.certs import CertificateStore
from broker.node import LocalNode
from broker.pika_transport import ConnectionSettings, PikaTransport
from broker.topology import Exchange, Kind, routing_key
from broker.transport import PublishRefused, TransportConnectionError
from fedmq.cli import main
from site_agent.config import load_site_config
from site_agent.runner import connection_settings
from tests.integration.coordinator_process import free_port
from tests.integration.federation_helpers import (
    FedmqProcesses,
    accepted_updates,
    append_site_tables,
    coordinator_tables,
    read_audit,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SITES = ("cleveland", "hospital-a", "hospital-b")  # cleveland trains on its packaged Fed-Heart-Disease data


@dataclass(frozen=True)
class TlsBroker:
    state_dir: Path
    node: LocalNode
    plain_port: int

    def site_settings(self, site_id: str) -> ConnectionSettings:
        """What the site agent builds from the config file ``add-site`` wrote."""
        return connection_settings(load_site_config(self.state_dir / "sites" / f"{site_id}.toml"))

    @property
    def log_file(self) -> Path:
        return self.node.log_dir / f"{self.node.node_name}.log"

    def log_size(self) -> int:
        return self.log_file.stat().st_size

    def logged_since(self, offset: int, text: str, timeout: float = 10.0) -> bool:
        """Whether the broker's log gains ``text`` after ``offset`` (it writes asynchronously, so wait a little)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.log_file.open("rb") as log:
                log.seek(offset)
                if text.encode() in log.read():
                    return True
            time.sleep(0.1)
        return False

    def updates_waiting(self) -> int:
        """Updates waiting in hospital-a's update queue (the only queue its key reaches)."""
        connection = pika.BlockingConnection(self.node.access.connection_parameters())
        try:
            frame = connection.channel().queue_declare(topology.site_update_queue("hospital-a"), passive=True)
            return int(frame.method.message_count)
        finally:
            connection.close()


@pytest.fixture(scope="module")
def tls_broker(
    tmp_path_factory: pytest.TempPathFactory, free_tcp_ports: Callable[[int], list[int]]
) -> Iterator[TlsBroker]:
    state_dir = tmp_path_factory.mktemp("tls-broker")
    amqps, plain, dist, management, prometheus = free_tcp_ports(5)
    ports = ["--amqps-port", amqps, "--amqp-port", plain, "--dist-port", dist]
    ports += ["--management-port", management, "--prometheus-port", prometheus]
    command = ["--state-dir", str(state_dir), "broker"]
    try:
        assert main([*command, "up", "--tls", *map(str, ports)]) == 0
        sites_dir = state_dir / "sites"
        for site in SITES:  # each hospital makes its signing key; the operator registers the public half
            assert main(["site", "keygen", site, "--dir", str(sites_dir)]) == 0
            public_key = str(sites_dir / f"{site}.signing.pub")
            assert main([*command, "add-site", site, "--public-key", public_key]) == 0
        yield TlsBroker(state_dir, LocalNode.from_state_dir(state_dir), plain)
    finally:
        LocalNode.from_state_dir(state_dir).stop()


def test_a_hospital_federates_over_tls_with_its_certificate(tls_broker: TlsBroker, tmp_path: Path) -> None:
    # Prepare: cleveland's config as add-site wrote it (amqps URL, CA, certificate, key; no password), and the
    # coordinator's identity from coordinator-broker.toml
    site_config = tls_broker.state_dir / "sites" / "cleveland.toml"
    written = tomllib.loads(site_config.read_text())["broker"]
    append_site_tables(site_config)
    coordinator_broker = tomllib.loads((tls_broker.state_dir / "coordinator-broker.toml").read_text())["broker"]
    coordinator_state = tmp_path / "coordinator"
    broker_table = "\n".join(f"{key} = {json.dumps(value)}" for key, value in coordinator_broker.items())
    coordinator_config = tmp_path / "coordinator.toml"
    coordinator_config.write_text(
        f'task = "heart-disease"\nsites = ["cleveland"]\nstate_dir = {json.dumps(str(coordinator_state))}\n'
        f"[broker]\n{broker_table}\n[metrics]\nport = {free_port()}\n"
        + coordinator_tables(strategy="fedasync", max_versions=3, local_steps=10)
    )
    processes = FedmqProcesses(tls_broker.state_dir, tmp_path / "logs")

    # Execute
    try:
        processes.start_site(site_config)
        processes.wait_for_log("cleveland", "connected; waiting for the global model", timeout=60)
        processes.start_coordinator(coordinator_config)
        exit_codes = (processes.wait_exit("coordinator", 90), processes.wait_exit("cleveland", 30))
    finally:
        processes.stop_all()

    # Assert: both logged in over AMQPS with certificates only, ran to the end, and the broker vouched for
    # cleveland's identity (user_id == the CN) on every accepted update
    assert written["url"].startswith("amqps://") and "@" not in written["url"]
    assert {"ca_file", "cert_file", "key_file"} <= set(written)
    assert coordinator_broker["url"].startswith("amqps://") and "@" not in coordinator_broker["url"]
    assert exit_codes == (0, 0), processes.logs()
    assert "connected to amqps://" in processes.log("cleveland")
    accepted = accepted_updates(read_audit(coordinator_state / "audit.jsonl"))
    assert len(accepted) >= 3, processes.logs()
    assert {(record["site"], record["user_id"]) for record in accepted} == {("cleveland", "cleveland")}


def test_the_plain_amqp_listener_is_off(tls_broker: TlsBroker) -> None:
    # Execute / Assert
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", tls_broker.plain_port), timeout=5).close()


def test_a_connection_without_a_certificate_is_refused(tls_broker: TlsBroker) -> None:
    # Prepare: hospital-a's settings with the CA (it trusts the broker) but no certificate of its own
    settings = dataclasses.replace(tls_broker.site_settings("hospital-a"), cert_file=None, key_file=None)

    log_offset = tls_broker.log_size()

    # Execute / Assert: the TLS handshake itself fails, before any AMQP login. The client may see the alert or
    # only the closed socket (TLS 1.3 checks the client certificate after the client thinks it is done), so the
    # specific reason is read where an operator reads it: the broker's log.
    with pytest.raises(TransportConnectionError, match="SSL"):
        PikaTransport.connect(settings).close()
    assert tls_broker.logged_since(log_offset, "generated SERVER ALERT: Fatal - Certificate required")


def test_a_certificate_from_another_ca_is_refused_even_with_a_hospitals_name(
    tls_broker: TlsBroker, tmp_path: Path
) -> None:
    # Prepare: another CA issues a certificate with CN = hospital-a
    intruder = CertificateStore(tmp_path / "intruder-certs")
    forged = intruder.ensure_all(clients=["hospital-a"])[-1].files
    settings = dataclasses.replace(
        tls_broker.site_settings("hospital-a"), cert_file=str(forged.cert_file), key_file=str(forged.key_file)
    )

    log_offset = tls_broker.log_size()

    # Execute / Assert: refused in the TLS handshake (see above for why the reason is read from the broker's log)
    with pytest.raises(TransportConnectionError, match="SSL"):
        PikaTransport.connect(settings).close()
    assert tls_broker.logged_since(log_offset, "generated SERVER ALERT: Fatal - Unknown CA")


@pytest.mark.parametrize(
    ("user_id", "key_site", "reply_code", "reply_text"),
    [
        (
            "hospital-b",
            "hospital-a",
            406,
            "user_id property set to 'hospital-b' but authenticated user was 'hospital-a'",
        ),
        ("hospital-a", "hospital-b", 403, "access to topic 'site.hospital-b.update'"),
    ],
    ids=["user_id-of-hospital-b", "routing-key-of-hospital-b"],
)
def test_hospital_a_certificate_cannot_publish_as_hospital_b(
    tls_broker: TlsBroker, user_id: str, key_site: str, reply_code: int, reply_text: str
) -> None:
    # Prepare: logged in with hospital-a's own certificate
    transport = PikaTransport.connect(tls_broker.site_settings("hospital-a"))
    waiting_before = tls_broker.updates_waiting()

    # Execute
    try:
        with pytest.raises(PublishRefused) as refusal:
            transport.publish(Exchange.UPDATES.value, routing_key(key_site, Kind.UPDATE), b"forged", user_id=user_id)
    finally:
        transport.close()

    # Assert: refused with the specific AMQP code, and nothing reached the coordinator
    assert refusal.value.reply_code == reply_code
    assert reply_text in str(refusal.value)
    assert tls_broker.updates_waiting() == waiting_before


# ------------------------------------------------------------------------------------------------ revocation


def _copy_identity(tls_broker: TlsBroker, site_id: str, destination: Path) -> ConnectionSettings:
    """The site's connection settings with a copy of its current certificate and key (what a thief would keep)."""
    settings = tls_broker.site_settings(site_id)
    assert settings.cert_file is not None and settings.key_file is not None
    destination.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = destination / "cert.pem", destination / "key.pem"
    shutil.copyfile(settings.cert_file, cert_file)
    shutil.copyfile(settings.key_file, key_file)
    return dataclasses.replace(settings, cert_file=str(cert_file), key_file=str(key_file))


def _connects(settings: ConnectionSettings) -> bool:
    try:
        PikaTransport.connect(settings).close()
    except TransportConnectionError:
        return False
    return True


def test_after_remove_site_and_add_site_the_old_certificate_cannot_connect_and_the_new_one_can(
    tls_broker: TlsBroker, tmp_path: Path
) -> None:
    # Prepare: a provisioned site whose certificate and key someone kept a copy of
    command = ["--state-dir", str(tls_broker.state_dir), "broker"]
    assert main([*command, "add-site", "revoked-site"]) == 0
    old = _copy_identity(tls_broker, "revoked-site", tmp_path / "old")
    assert _connects(old)

    # Execute: the operator removes the site and adds it again
    assert main([*command, "remove-site", "revoked-site"]) == 0
    assert main([*command, "add-site", "revoked-site"]) == 0
    log_offset = tls_broker.log_size()

    # Assert: the old certificate is refused in the TLS handshake as revoked; the new one logs in
    try:
        new = tls_broker.site_settings("revoked-site")
        assert Path(str(new.cert_file)).read_bytes() != Path(str(old.cert_file)).read_bytes()
        assert not _connects(old)
        assert tls_broker.logged_since(log_offset, "Certificate Revoked")
        assert _connects(new)
    finally:
        main([*command, "remove-site", "revoked-site"])


def test_after_a_certificate_rotation_the_previous_certificate_cannot_connect(
    tls_broker: TlsBroker, tmp_path: Path
) -> None:
    # Prepare
    command = ["--state-dir", str(tls_broker.state_dir), "broker"]
    assert main([*command, "add-site", "rotated-site"]) == 0
    first = _copy_identity(tls_broker, "rotated-site", tmp_path / "first")

    # Execute: two rotations in a row
    try:
        assert main([*command, "add-site", "rotated-site", "--rotate-password"]) == 0
        second = _copy_identity(tls_broker, "rotated-site", tmp_path / "second")
        assert main([*command, "add-site", "rotated-site", "--rotate-password"]) == 0

        # Assert: only the newest certificate connects; every certificate it replaced is on the CRL
        assert not _connects(first)
        assert not _connects(second)
        assert _connects(tls_broker.site_settings("rotated-site"))
        revoked = CertificateStore.for_state_dir(tls_broker.state_dir).revoked_serials()
        for settings in (first, second):
            certificate = x509.load_pem_x509_certificate(Path(str(settings.cert_file)).read_bytes())
            assert certificate.serial_number in revoked
    finally:
        main([*command, "remove-site", "rotated-site"])
