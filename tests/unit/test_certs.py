"""The private CA behind TLS logins (``broker.certs``, ``fedmq broker certs``), read back with ``cryptography``.

No broker here: what a hospital's IT or the broker would see in the files (CN, SAN, chain, key modes), and that
the client side turns the files into a certificate login.
"""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pika
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from broker.certs import CertificateError, CertificateSettings, CertificateStore, name_hash
from broker.node import LocalNode, load_access
from broker.pika_transport import ConnectionSettings
from coordinator.config import config_from_dict
from fedmq.cli import main


def certificate(cert_file: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(cert_file.read_bytes())


def subject(cert_file: Path) -> str:
    return certificate(cert_file).subject.rfc4514_string()


def alt_names(cert_file: Path) -> set[str]:
    """The SAN entries as a TLS client reads them: ``DNS:name`` and ``IP:address``."""
    extension = certificate(cert_file).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {f"DNS:{name}" for name in extension.get_values_for_type(x509.DNSName)} | {
        f"IP:{address}" for address in extension.get_values_for_type(x509.IPAddress)
    }


def verifies(ca_file: Path, cert_file: Path) -> bool:
    """Signed by this CA and valid now (the broker's certificate also passes a TLS client's full RFC 5280 check)."""
    leaf, ca = certificate(cert_file), certificate(ca_file)
    if leaf.subject.rfc4514_string() == "CN=fedmq-broker":
        verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(x509.DNSName("localhost"))
        try:
            verifier.verify(leaf, [])
        except VerificationError:
            return False
        return True
    try:
        leaf.verify_directly_issued_by(ca)
    except (ValueError, InvalidSignature):
        return False
    return leaf.not_valid_before_utc < leaf.not_valid_after_utc


def public_key_of_certificate(cert_file: Path) -> bytes:
    return (
        certificate(cert_file)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def public_key_of_key(key_file: Path) -> bytes:
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    return key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def store(tmp_path: Path) -> CertificateStore:
    return CertificateStore.for_state_dir(tmp_path / "state")


def test_each_party_gets_a_certificate_named_for_its_broker_user_and_signed_by_the_ca(
    store: CertificateStore,
) -> None:
    # Execute
    outcomes = store.ensure_all(hosts=["broker.example.org", "10.1.2.3"], clients=["hospital-a", "fedmq-coordinator"])

    # Assert: everything was issued, every certificate chains to the CA, and the CN is the broker user
    assert {outcome.name: outcome.issued for outcome in outcomes} == {
        "ca": True,
        "broker": True,
        "fedmq-coordinator": True,
        "hospital-a": True,
    }
    hospital, coordinator, broker = (
        store.client_files("hospital-a"),
        store.client_files("fedmq-coordinator"),
        store.broker_files(),
    )
    for files in (hospital, coordinator, broker):
        assert verifies(store.ca_file, files.cert_file), files.cert_file
    assert subject(hospital.cert_file) == "CN=hospital-a"
    assert subject(coordinator.cert_file) == "CN=fedmq-coordinator"
    names = alt_names(broker.cert_file)
    for expected in ("DNS:localhost", "IP:127.0.0.1", "DNS:broker.example.org", "IP:10.1.2.3"):
        assert expected in names


def test_private_keys_are_readable_by_their_owner_only(store: CertificateStore) -> None:
    # Execute
    store.ensure_all(clients=["hospital-a"])

    # Assert
    keys = [store.ca_key_file, store.broker_files().key_file, store.client_files("hospital-a").key_file]
    assert [mode(key) for key in keys] == [0o600, 0o600, 0o600]
    assert mode(store.directory) == 0o700 and mode(store.clients_dir) == 0o700
    assert mode(store.client_files("hospital-a").cert_file) == 0o644
    assert not list(store.directory.rglob(".*")), "no temporary files are left behind"


def test_a_certificate_from_another_ca_does_not_verify(store: CertificateStore, tmp_path: Path) -> None:
    # Prepare: a second, unrelated CA issues a certificate with the same CN
    store.ensure_all(clients=["hospital-a"])
    intruder = CertificateStore(tmp_path / "intruder")
    intruder.ensure_all(clients=["hospital-a"])

    # Execute / Assert
    assert not verifies(store.ca_file, intruder.client_files("hospital-a").cert_file)


def test_running_again_keeps_the_ca_and_every_good_certificate(store: CertificateStore) -> None:
    # Prepare
    store.ensure_all(hosts=["broker.example.org"], clients=["hospital-a"])
    files = [
        store.ca_file,
        store.ca_key_file,
        store.broker_files().cert_file,
        store.client_files("hospital-a").key_file,
    ]
    before = [path.read_bytes() for path in files]

    # Execute: a hospital is added later; the broker's host is not repeated
    outcomes = store.ensure_all(clients=["hospital-b"])

    # Assert: only hospital-b is new, nothing else changed, and the broker keeps its extra host name
    assert [outcome.name for outcome in outcomes if outcome.issued] == ["hospital-b"]
    assert [path.read_bytes() for path in files] == before
    assert "DNS:broker.example.org" in alt_names(store.broker_files().cert_file)


def test_renewing_the_ca_reissues_every_certificate_under_the_new_ca(store: CertificateStore, tmp_path: Path) -> None:
    # Prepare
    store.ensure_all(clients=["hospital-a"])
    old_ca = tmp_path / "old-ca.pem"
    shutil.copy(store.ca_file, old_ca)

    # Execute
    outcomes = store.ensure_all(renew_ca=True)

    # Assert: hospital-a was found on disk and reissued; nothing verifies against the old CA any more
    assert all(outcome.issued for outcome in outcomes)
    assert {outcome.name for outcome in outcomes} == {"ca", "broker", "hospital-a"}
    for files in (store.broker_files(), store.client_files("hospital-a")):
        assert verifies(store.ca_file, files.cert_file)
        assert not verifies(old_ca, files.cert_file)


def test_a_new_broker_host_reissues_the_broker_certificate_with_the_old_names_kept(store: CertificateStore) -> None:
    # Prepare
    store.ensure_all(hosts=["mq1.example.org"])

    # Execute
    outcome = store.ensure_broker(["mq2.example.org"])

    # Assert
    assert outcome.issued
    names = alt_names(store.broker_files().cert_file)
    assert "DNS:mq1.example.org" in names and "DNS:mq2.example.org" in names


def test_a_certificate_close_to_expiry_is_reissued(tmp_path: Path) -> None:
    # Prepare: certificates valid for fewer days than the renewal margin
    store = CertificateStore(tmp_path / "certs", CertificateSettings(leaf_days=10, renew_before_days=30))
    store.ensure_all(clients=["hospital-a"])
    first = store.client_files("hospital-a").cert_file.read_bytes()

    # Execute
    outcome = store.ensure_client("hospital-a")

    # Assert
    assert outcome.issued
    assert store.client_files("hospital-a").cert_file.read_bytes() != first


def test_a_key_that_does_not_match_its_certificate_is_replaced(store: CertificateStore) -> None:
    # Prepare: hospital-a's key is swapped for hospital-b's (as after a botched copy)
    store.ensure_all(clients=["hospital-a", "hospital-b"])
    shutil.copy(store.client_files("hospital-b").key_file, store.client_files("hospital-a").key_file)

    # Execute
    outcome = store.ensure_client("hospital-a")

    # Assert
    assert outcome.issued
    files = store.client_files("hospital-a")
    assert public_key_of_certificate(files.cert_file) == public_key_of_key(files.key_file)


@pytest.mark.parametrize("name", ["../evil", "a/b", "CN=x,O=y", ""])
def test_a_name_that_could_escape_the_directory_or_the_subject_is_refused(store: CertificateStore, name: str) -> None:
    # Execute / Assert
    with pytest.raises(CertificateError, match="invalid certificate name"):
        store.ensure_client(name)


def test_an_invalid_broker_host_is_refused(store: CertificateStore) -> None:
    # Execute / Assert
    with pytest.raises(CertificateError, match="invalid host name"):
        store.ensure_all(hosts=["broker example.org"])


def test_fedmq_broker_certs_issues_then_keeps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    state_dir = tmp_path / "state"
    command = ["--state-dir", str(state_dir), "broker", "certs", "--site", "hospital-a", "--host", "mq.example.org"]

    # Execute
    first_exit = main(command)
    first = capsys.readouterr().out
    second_exit = main(["--state-dir", str(state_dir), "broker", "certs"])
    second = capsys.readouterr().out

    # Assert: CA, broker, admin, coordinator and hospital-a issued once; the second run (no --site) keeps them all
    assert (first_exit, second_exit) == (0, 0)
    for name in ("ca", "broker", "fedmq-admin", "fedmq-coordinator", "hospital-a"):
        assert f"issued  {name} " in first
        assert f"kept    {name} " in second
    assert "DNS:mq.example.org" in alt_names(state_dir / "certs" / "broker.pem")


def test_fedmq_broker_certs_refuses_an_invalid_site_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Execute
    exit_code = main(["--state-dir", str(tmp_path), "broker", "certs", "--site", "Hospital_A"])

    # Assert
    assert exit_code == 1
    assert "invalid site id 'Hospital_A'" in capsys.readouterr().err
    assert not (tmp_path / "certs").exists()


def test_an_amqps_url_without_a_user_logs_in_with_the_client_certificate(store: CertificateStore) -> None:
    # Prepare
    files = store.ensure_all(clients=["hospital-a"])[-1].files

    # Execute
    certificate_login = ConnectionSettings(
        "amqps://127.0.0.1:5681/fedmq", str(files.ca_file), str(files.cert_file), str(files.key_file)
    ).parameters()
    password_login = ConnectionSettings(
        "amqps://hospital-a:secret@127.0.0.1:5681/fedmq", str(files.ca_file), str(files.cert_file), str(files.key_file)
    ).parameters()

    # Assert: EXTERNAL (the broker takes the user from the CN) only when the URL names no user
    assert isinstance(certificate_login.credentials, pika.credentials.ExternalCredentials)
    assert certificate_login.ssl_options is not None
    assert isinstance(password_login.credentials, pika.credentials.PlainCredentials)


def test_coordinator_config_reads_certificate_paths_relative_to_its_file(tmp_path: Path) -> None:
    # Execute
    config = config_from_dict(
        {"broker": {"url": "amqps://127.0.0.1:5681/fedmq", "ca_file": "certs/ca.pem", "cert_file": "/abs/c.pem"}},
        base_dir=tmp_path,
    )

    # Assert
    assert config.broker.ca_file == str(tmp_path / "certs" / "ca.pem")
    assert config.broker.cert_file == "/abs/c.pem"
    assert config.broker.key_file is None


def test_a_tls_node_serves_amqps_only_and_keeps_the_management_api_on_loopback(tmp_path: Path) -> None:
    # Prepare: a node meant for hospitals on the network
    node = LocalNode(tmp_path / "state", tls=True, amqps_port=5671, bind="0.0.0.0", public_host="mq.example.org")

    # Execute: the files `fedmq broker up --tls` writes before it starts RabbitMQ
    node.write_files()
    settings = (tmp_path / "state" / "broker" / "rabbitmq.conf").read_text().splitlines()
    advanced = (tmp_path / "state" / "broker" / "advanced.config").read_text()
    access = load_access(tmp_path / "state")

    # Assert: no plain listener, client certificates required and checked against the CRL, login by CN,
    # management on loopback only
    assert "listeners.tcp = none" in settings and "listeners.ssl.1 = 0.0.0.0:5671" in settings
    for option in ("{verify, verify_peer}", "{fail_if_no_peer_cert, true}", "{crl_check, peer}"):
        assert option in advanced
    crl_dir = node.certificates.crl_dir
    assert f'{{crl_cache, {{ssl_crl_hash_dir, {{internal, [{{dir, "{crl_dir}"}}]}}}}}}' in advanced
    assert [path.suffix for path in crl_dir.iterdir()] == [".r0"]
    assert "auth_mechanisms.1 = EXTERNAL" in settings and "ssl_cert_login_from = common_name" in settings
    assert "management.tcp.ip = 127.0.0.1" in settings
    assert access.management_url.startswith("http://127.0.0.1:")
    # ... and RabbitMQ's Prometheus endpoint (no login, every site's queues per object) on loopback too
    assert "prometheus.tcp.ip = 127.0.0.1" in settings
    assert access.prometheus_url.startswith("http://127.0.0.1:")
    assert access.admin_url() == "amqps://mq.example.org:5671/fedmq"
    assert access.tls is not None and subject(access.tls.cert_file) == "CN=fedmq-admin"
    assert "DNS:mq.example.org" in alt_names(node.certificates.broker_files().cert_file)


# ------------------------------------------------------------------------------------------------ revocation


def test_the_crl_file_is_named_by_openssls_hash_of_the_ca(tmp_path: Path) -> None:
    store = CertificateStore(tmp_path / "certs")
    store.ensure_all(clients=["cleveland"])
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl command to compare with")

    expected = subprocess.run(
        [openssl, "crl", "-hash", "-noout", "-in", str(store.crl_file)], capture_output=True, text=True, check=True
    ).stdout.strip()

    assert [path.name for path in store.crl_dir.iterdir()] == [f"{expected}.r0"]
    assert name_hash(certificate(store.ca_file).subject) == expected


def test_a_replaced_or_removed_client_certificate_is_on_the_crl_and_a_new_one_is_issued(tmp_path: Path) -> None:
    # Prepare
    store = CertificateStore(tmp_path / "certs")
    store.ensure_all(clients=["cleveland", "hungary"])
    files = store.client_files("cleveland")
    first = certificate(files.cert_file)
    hungary = certificate(store.client_files("hungary").cert_file)

    # Execute: a rotation, then a removal and an issue under the same name
    store.ensure_client("cleveland", reissue=True)
    second = certificate(files.cert_file)
    assert store.revoke_client("cleveland")
    assert not files.cert_file.exists() and not files.key_file.exists()
    third = certificate(store.ensure_client("cleveland").files.cert_file)

    # Assert: both old serials revoked in a CRL the CA signed; the new one and hungary's are not
    crl = x509.load_pem_x509_crl(store.crl_file.read_bytes())
    assert crl.is_signature_valid(certificate(store.ca_file).public_key())  # type: ignore[arg-type]
    revoked = {entry.serial_number for entry in crl}
    assert {first.serial_number, second.serial_number} <= revoked
    assert third.serial_number not in revoked and hungary.serial_number not in revoked
    assert len({first.serial_number, second.serial_number, third.serial_number}) == 3


def test_a_renewed_ca_starts_an_empty_crl_in_its_own_hash_file(tmp_path: Path) -> None:
    store = CertificateStore(tmp_path / "certs")
    store.ensure_all(clients=["cleveland"])
    store.ensure_client("cleveland", reissue=True)
    assert store.revoked_serials()

    store.ensure_all(renew_ca=True)

    assert store.revoked_serials() == {}
    assert [path.name for path in store.crl_dir.iterdir()] == [f"{name_hash(certificate(store.ca_file).subject)}.r0"]


def test_a_certificate_reissued_because_it_expires_soon_is_revoked_too(tmp_path: Path) -> None:
    # Prepare: certificates valid 20 days, renewed when 30 days or fewer are left
    store = CertificateStore(tmp_path / "certs", CertificateSettings(leaf_days=20))
    store.ensure_all(clients=["cleveland"])
    first = certificate(store.client_files("cleveland").cert_file)

    # Execute
    store.ensure_all()

    # Assert
    assert certificate(store.client_files("cleveland").cert_file).serial_number != first.serial_number
    assert first.serial_number in store.revoked_serials()
