"""The federation's private certificate authority, made with the ``cryptography`` package's x509 API.

With TLS the broker logs every client in as the common name (CN) of its certificate (RabbitMQ's EXTERNAL
mechanism), so a certificate *is* a broker identity: a hospital's has CN = its site id, the coordinator's
CN = ``fedmq-coordinator``, and the administrator's CN = ``fedmq-admin``. Everything lives under
``<state dir>/certs/`` (directories 0700, private keys 0600 from their first byte, certificates 0644)::

    certs/
      ca.pem   ca.key           the private CA (P-256, 10 years); ca.key never leaves this machine
      broker.pem   broker.key   the broker's server certificate; SAN: localhost, 127.0.0.1 and the --host names
      clients/NAME.pem  .key    one client certificate per identity, CN = NAME
      crl.pem                   the certificate revocation list, signed by the CA (what was revoked, and when)
      crl/HASH.r0               the same CRL where the broker's TLS layer looks for it (Erlang's
                                ssl_crl_hash_dir: HASH is OpenSSL's subject-name hash of the CA, `openssl crl -hash`)

Every ``ensure_*`` keeps what is still good, so running ``fedmq broker certs`` again changes nothing. A
certificate is (re)issued only when it or its key is missing, the two do not match, it no longer verifies against
the current CA (after ``renew_ca``), it expires within ``renew_before_days``, or (the broker's) it lacks a host
name asked for. Files are written under a temporary name and renamed into place.

Revocation: a client certificate replaced (``ensure_client(reissue=True)``, e.g. ``add-site --rotate-password``)
or taken away (``revoke_client``, by ``remove-site``) is added to the CRL, which the broker checks on every TLS
handshake (``crl_check = peer`` in the node's advanced.config, ``broker.node``), so the old certificate and key can
no longer connect even after a site of the same name is added again with a new certificate. The CRL is rewritten
(fresh thisUpdate, nextUpdate ``CRL_DAYS`` on) by every ``fedmq broker up``, ``certs`` and revocation.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import ipaddress
import os
import re
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.errors import BrokerError

CERTS_DIRNAME = "certs"
CLIENTS_DIRNAME = "clients"
BROKER_NAME = "broker"  # the files' stem
BROKER_COMMON_NAME = "fedmq-broker"
DEFAULT_BROKER_HOSTS = ("localhost", "127.0.0.1")
# A CN becomes a file name and a RabbitMQ user name: keep it to a safe alphabet (site ids are stricter still).
COMMON_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
HOST_NAME_PATTERN = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9*]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
CRL_FILE_NAME = "crl.pem"
CRL_DIRNAME = "crl"
# A CRL past its nextUpdate makes the broker refuse every client: it is renewed at each broker start and command,
# and lasts long enough that a broker running untouched for years does not lock everyone out.
CRL_DAYS = 3650
BACKDATE = datetime.timedelta(minutes=5)  # a peer whose clock is a little behind still accepts a fresh certificate

GeneralName = x509.DNSName | x509.IPAddress


class CertificateError(BrokerError):
    """A certificate cannot be made or checked (a bad name, no CA yet, an unreadable file); says which and why."""


@dataclass(frozen=True)
class TlsFiles:
    """What one TLS party needs: the CA it trusts the other side by, and its own certificate and key."""

    ca_file: Path
    cert_file: Path
    key_file: Path


@dataclass(frozen=True)
class CertificateSettings:
    ca_days: int = 3650
    leaf_days: int = 825  # the longest validity clients such as browsers still accept; renewal is one command
    renew_before_days: int = 30


@dataclass(frozen=True)
class CertificateOutcome:
    """One certificate after an ``ensure_*``: where it is and whether it was just (re)issued."""

    name: str
    files: TlsFiles
    issued: bool


def certs_dir(state_dir: Path) -> Path:
    return state_dir / CERTS_DIRNAME


def validate_common_name(common_name: str) -> str:
    if not COMMON_NAME_PATTERN.match(common_name):
        raise CertificateError(f"invalid certificate name {common_name!r}: use 1-64 letters, digits, '.', '_' and '-'")
    return common_name


def subject_alt_name(host: str) -> GeneralName:
    """An IP address entry for an address, a DNS entry for a host name; anything else is refused."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    if not HOST_NAME_PATTERN.match(host):
        raise CertificateError(f"invalid host name {host!r} for the broker certificate")
    return x509.DNSName(host.lower())


def _name(common_name: str, *, organisation: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation)] if organisation else []
    return x509.Name([*attributes, x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _serial_number() -> int:
    return int.from_bytes(secrets.token_bytes(16), "big") >> 1  # positive and below 2**127, as RFC 5280 asks


def _public_bytes(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


class CertificateStore:
    """The CA and the certificates it issued, in one directory."""

    def __init__(self, directory: Path, settings: CertificateSettings | None = None) -> None:
        self.directory = directory
        self.settings = settings or CertificateSettings()
        self.ca_file = directory / "ca.pem"
        self.ca_key_file = directory / "ca.key"
        self.clients_dir = directory / CLIENTS_DIRNAME
        self.crl_file = directory / CRL_FILE_NAME
        self.crl_dir = directory / CRL_DIRNAME

    @classmethod
    def for_state_dir(cls, state_dir: Path, settings: CertificateSettings | None = None) -> CertificateStore:
        return cls(certs_dir(state_dir.resolve()), settings)

    # paths (nothing is created)

    def broker_files(self) -> TlsFiles:
        return TlsFiles(self.ca_file, self.directory / f"{BROKER_NAME}.pem", self.directory / f"{BROKER_NAME}.key")

    def client_files(self, common_name: str) -> TlsFiles:
        validate_common_name(common_name)
        return TlsFiles(self.ca_file, self.clients_dir / f"{common_name}.pem", self.clients_dir / f"{common_name}.key")

    def client_names(self) -> list[str]:
        """The CNs of every client certificate issued so far."""
        if not self.clients_dir.is_dir():
            return []
        return sorted(path.stem for path in self.clients_dir.glob("*.pem"))

    def has_ca(self) -> bool:
        return self.ca_file.exists() and self.ca_key_file.exists()

    # issuing

    def ensure_ca(self, *, renew: bool = False) -> CertificateOutcome:
        """The CA, created if missing (or replaced when ``renew``: every certificate it issued is then reissued)."""
        outcome = CertificateOutcome("ca", TlsFiles(self.ca_file, self.ca_file, self.ca_key_file), False)
        if self.has_ca() and not renew and self._ca_is_usable():
            return outcome
        self._prepare_directory(self.directory)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = _name(f"fedmq private CA {secrets.token_hex(4)}", organisation="fedmq")
        now = _now()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + datetime.timedelta(days=self.settings.ca_days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(digital_signature=False, key_cert_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        self._install(key, certificate, self.ca_key_file, self.ca_file)
        return CertificateOutcome(outcome.name, outcome.files, True)

    def ensure_broker(self, hosts: Iterable[str] = ()) -> CertificateOutcome:
        """The broker's server certificate, valid for localhost, 127.0.0.1, the names it has and ``hosts``."""
        files = self.broker_files()
        wanted = {subject_alt_name(host) for host in (*DEFAULT_BROKER_HOSTS, *hosts)}
        certificate = self._good_certificate(files)
        present = _subject_alt_names(certificate) if certificate is not None else set()
        if certificate is not None and wanted <= present:
            return CertificateOutcome(BROKER_NAME, files, False)
        self._issue(
            files,
            common_name=BROKER_COMMON_NAME,
            usage=ExtendedKeyUsageOID.SERVER_AUTH,
            alt_names=sorted(wanted | present, key=lambda name: (type(name).__name__, str(name.value))),
        )
        return CertificateOutcome(BROKER_NAME, files, True)

    def ensure_client(self, common_name: str, *, reissue: bool = False) -> CertificateOutcome:
        """A client certificate with CN = ``common_name``: the broker user it logs in as. A certificate it
        replaces is revoked (the CRL), so the old certificate and key stop working."""
        files = self.client_files(common_name)
        if not reissue and self._good_certificate(files) is not None:
            return CertificateOutcome(common_name, files, False)
        previous = _read_certificate(files.cert_file)  # also one about to expire, or whose key went missing
        self._prepare_directory(self.clients_dir)
        self._issue(files, common_name=common_name, usage=ExtendedKeyUsageOID.CLIENT_AUTH, alt_names=[])
        if previous is not None and self._issued_by_current_ca(previous):
            self.revoke([previous])
        return CertificateOutcome(common_name, files, True)

    def revoke_client(self, common_name: str) -> bool:
        """Revoke the client certificate of ``common_name`` and delete its files, so a later ``ensure_client``
        issues a new one; True when there was one signed by the current CA."""
        files = self.client_files(common_name)
        certificate = _read_certificate(files.cert_file)
        revoked = certificate is not None and self.has_ca() and self._issued_by_current_ca(certificate)
        if revoked:
            assert certificate is not None
            self.revoke([certificate])
        files.cert_file.unlink(missing_ok=True)
        files.key_file.unlink(missing_ok=True)
        return revoked

    # revocation

    def revoked_serials(self) -> dict[int, datetime.datetime]:
        """Serial number -> revocation time of what the current CA revoked (empty without a CRL)."""
        crl = self._current_crl()
        if crl is None:
            return {}
        return {entry.serial_number: entry.revocation_date_utc for entry in crl}

    def revoke(self, certificates: Iterable[x509.Certificate]) -> None:
        """Add ``certificates`` to the CRL and rewrite it where the broker reads it."""
        revoked = self.revoked_serials()
        for certificate in certificates:
            revoked.setdefault(certificate.serial_number, _now())
        self._write_crl(revoked)

    def ensure_crl(self) -> Path:
        """(Re)write the CRL with fresh dates and install it in the broker's hash dir; returns that dir."""
        self._write_crl(self.revoked_serials())
        return self.crl_dir

    def _current_crl(self) -> x509.CertificateRevocationList | None:
        try:
            crl = x509.load_pem_x509_crl(self.crl_file.read_bytes())
        except (OSError, ValueError):
            return None
        ca = _read_certificate(self.ca_file)
        if ca is None or crl.issuer != ca.subject or not crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
            return None  # a CRL of a CA since renewed: what it revoked no longer verifies anyway
        return crl

    def _write_crl(self, revoked: dict[int, datetime.datetime]) -> None:
        ca_certificate = _read_certificate(self.ca_file)
        ca_key = _read_private_key(self.ca_key_file)
        if ca_certificate is None or ca_key is None:
            raise CertificateError(f"no usable CA in {self.directory}: run `fedmq broker certs` first")
        previous = self._current_crl()
        number = 1
        if previous is not None:
            with contextlib.suppress(x509.ExtensionNotFound):
                number = previous.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca_certificate.subject)
            .last_update(now - BACKDATE)
            .next_update(now + datetime.timedelta(days=CRL_DAYS))
            .add_extension(x509.CRLNumber(number), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )
        for serial, when in sorted(revoked.items()):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
            )
        pem = builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
        self._prepare_directory(self.directory)
        for target in (self.crl_file, self.crl_dir / f"{name_hash(ca_certificate.subject)}.r0"):
            target.parent.mkdir(parents=True, exist_ok=True)
            with _temporary(target) as temporary:
                _write_new_file(temporary, pem, mode=0o644)
                os.replace(temporary, target)
        for stale in self.crl_dir.glob("*.r*"):  # the CRL of a CA since renewed
            if stale.name != f"{name_hash(ca_certificate.subject)}.r0":
                stale.unlink(missing_ok=True)

    def _issued_by_current_ca(self, certificate: x509.Certificate) -> bool:
        ca = _read_certificate(self.ca_file)
        if ca is None:
            return False
        try:
            certificate.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True

    def ensure_all(
        self, *, hosts: Iterable[str] = (), clients: Iterable[str] = (), renew_ca: bool = False
    ) -> list[CertificateOutcome]:
        """The CA, the broker's certificate, ``clients`` and every client certificate issued before."""
        validated = [validate_common_name(name) for name in clients]
        outcomes = [self.ensure_ca(renew=renew_ca), self.ensure_broker(hosts)]
        for name in sorted({*self.client_names(), *validated}):
            outcomes.append(self.ensure_client(name))
        self.ensure_crl()
        return outcomes

    # checks

    def _ca_is_usable(self) -> bool:
        pair = _read_pair(self.ca_file, self.ca_key_file)
        return pair is not None and self._valid_long_enough(pair[0])

    def _good_certificate(self, files: TlsFiles) -> x509.Certificate | None:
        """The certificate in ``files`` if it is signed by the current CA, matches its key and is not about to
        expire; None when it must be (re)issued."""
        if not self.has_ca():
            return None
        pair = _read_pair(files.cert_file, files.key_file)
        ca = _read_certificate(self.ca_file)
        if pair is None or ca is None:
            return None
        certificate = pair[0]
        try:
            certificate.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            return None
        return certificate if self._valid_long_enough(certificate) else None

    def _valid_long_enough(self, certificate: x509.Certificate) -> bool:
        margin = datetime.timedelta(days=self.settings.renew_before_days)
        return certificate.not_valid_before_utc <= _now() and _now() + margin < certificate.not_valid_after_utc

    # writing

    def _issue(
        self, files: TlsFiles, *, common_name: str, usage: x509.ObjectIdentifier, alt_names: list[GeneralName]
    ) -> None:
        if not self.has_ca():
            raise CertificateError(f"no CA in {self.directory}: run `fedmq broker certs` first")
        ca_certificate = _read_certificate(self.ca_file)
        ca_key = _read_private_key(self.ca_key_file)
        if ca_certificate is None or ca_key is None:
            raise CertificateError(f"the CA in {self.directory} is unreadable: run `fedmq broker certs --renew-ca`")
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(ca_certificate.subject)
            .public_key(key.public_key())
            .serial_number(_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + datetime.timedelta(days=self.settings.leaf_days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True, key_cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        if alt_names:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        self._install(key, builder.sign(ca_key, hashes.SHA256()), files.key_file, files.cert_file)

    def _install(
        self,
        key: ec.EllipticCurvePrivateKey,
        certificate: x509.Certificate,
        key_target: Path,
        certificate_target: Path,
    ) -> None:
        """Write both under temporary names and rename them into place (the key first: a crash in between leaves
        a pair that ``_good_certificate`` rejects)."""
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        with _temporary(key_target) as temporary:
            _write_new_file(temporary, key_pem, mode=0o600)
            os.replace(temporary, key_target)
        with _temporary(certificate_target) as temporary:
            _write_new_file(temporary, certificate.public_bytes(serialization.Encoding.PEM), mode=0o644)
            os.replace(temporary, certificate_target)

    @staticmethod
    def _prepare_directory(directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o700)


def name_hash(name: x509.Name) -> str:
    """OpenSSL's subject-name hash (``X509_NAME_hash``, what ``openssl x509 -hash`` and Erlang's
    ``public_key:short_name_hash`` print): SHA-1 of the name's canonical DER (each value a UTF8String, trimmed,
    inner whitespace collapsed, ASCII lower-cased; the RDN SETs without the outer SEQUENCE), first 4 bytes as a
    little-endian number in 8 hex digits."""
    encoded = b""
    for rdn in name.rdns:
        values = []
        for attribute in rdn:
            text = attribute.value if isinstance(attribute.value, str) else attribute.value.decode("utf-8")
            canonical = " ".join(text.split()).encode("utf-8").lower()  # bytes.lower(): ASCII letters only
            values.append(_der(0x30, _der_oid(attribute.oid.dotted_string) + _der(0x0C, canonical)))
        encoded += _der(0x31, b"".join(sorted(values)))
    return f"{int.from_bytes(hashlib.sha1(encoded).digest()[:4], 'little'):08x}"


def _der(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes((tag, size)) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(length))) + length + content


def _der_oid(dotted: str) -> bytes:
    arcs = [int(arc) for arc in dotted.split(".")]
    body = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body += bytes(reversed(chunk))
    return _der(0x06, bytes(body))


def _key_usage(*, digital_signature: bool, key_cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=key_cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _subject_alt_names(certificate: x509.Certificate) -> set[GeneralName]:
    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return set()
    return {name for name in extension.value if isinstance(name, (x509.DNSName, x509.IPAddress))}


def _read_certificate(path: Path) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None


def _read_private_key(path: Path) -> ec.EllipticCurvePrivateKey | None:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    return key if isinstance(key, ec.EllipticCurvePrivateKey) else None


def _read_pair(cert_file: Path, key_file: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """The certificate and its key, or None when either is missing or unreadable or they do not belong together."""
    certificate, key = _read_certificate(cert_file), _read_private_key(key_file)
    if certificate is None or key is None:
        return None
    public_key = certificate.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        return None
    if _public_bytes(public_key) != _public_bytes(key.public_key()):
        return None
    return certificate, key


@contextlib.contextmanager
def _temporary(target: Path) -> Iterator[Path]:
    """A scratch name next to ``target`` (one filesystem, so the rename is atomic), removed if left behind."""
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        yield temporary
    finally:
        temporary.unlink(missing_ok=True)


def _write_new_file(path: Path, data: bytes, *, mode: int) -> None:
    """Create ``path`` with ``mode`` from its first byte (no window in which a key is readable by others)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(path, mode)  # the umask may have taken bits away from a certificate's 0644
