"""The federation's private certificate authority, made with the ``openssl`` command (no extra Python package).

With TLS the broker logs every client in as the common name (CN) of its certificate (RabbitMQ's EXTERNAL
mechanism), so a certificate *is* a broker identity: a hospital's has CN = its site id, the coordinator's
CN = ``fedmq-coordinator``, and the administrator's CN = ``fedmq-admin``. Everything lives under
``<state dir>/certs/`` (directories 0700, private keys 0600, certificates 0644)::

    certs/
      ca.pem   ca.key           the private CA (P-256, 10 years); ca.key never leaves this machine
      broker.pem   broker.key   the broker's server certificate; SAN: localhost, 127.0.0.1 and the --host names
      clients/NAME.pem  .key    one client certificate per identity, CN = NAME

Every ``ensure_*`` keeps what is still good, so running ``fedmq broker certs`` again changes nothing. A
certificate is (re)issued only when it or its key is missing, the two do not match, it no longer verifies against
the current CA (after ``renew_ca``), it expires within ``renew_before_days``, or (the broker's) it lacks a host
name asked for. Files are written under a temporary name and renamed into place.

There is no revocation list: a hospital is cut off by deleting its broker user (``fedmq broker remove-site``),
and a leaked key is dealt with by renewing the CA.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

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
OPENSSL_TIMEOUT_SECONDS = 30.0
INSTALL_HINT = "install it with `sudo apt-get install openssl` (Debian/Ubuntu)"


class CertificateError(BrokerError):
    """A certificate cannot be made or checked (no openssl, a bad name, openssl failed); says which and why."""


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
    openssl: str = "openssl"


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


def subject_alt_name(host: str) -> str:
    """``IP:...`` for an address, ``DNS:...`` for a host name; anything else is refused."""
    try:
        return f"IP:{ipaddress.ip_address(host.strip('[]'))}"
    except ValueError:
        pass
    if not HOST_NAME_PATTERN.match(host):
        raise CertificateError(f"invalid host name {host!r} for the broker certificate")
    return f"DNS:{host.lower()}"


class CertificateStore:
    """The CA and the certificates it issued, in one directory."""

    def __init__(self, directory: Path, settings: CertificateSettings | None = None) -> None:
        self.directory = directory
        self.settings = settings or CertificateSettings()
        self.ca_file = directory / "ca.pem"
        self.ca_key_file = directory / "ca.key"
        self.clients_dir = directory / CLIENTS_DIRNAME

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
        with self._workspace() as work:
            key = self._new_key(work / "ca.key")
            config = work / "ca.cnf"
            config.write_text(
                "[req]\nprompt = no\ndistinguished_name = subject\nx509_extensions = ca\n"
                f"[subject]\nO = fedmq\nCN = fedmq private CA {secrets.token_hex(4)}\n"
                "[ca]\nbasicConstraints = critical, CA:TRUE, pathlen:0\n"
                "keyUsage = critical, keyCertSign, cRLSign\nsubjectKeyIdentifier = hash\n"
            )
            certificate = work / "ca.pem"
            self._openssl(
                "req", "-x509", "-new", "-config", str(config), "-key", str(key), "-sha256",
                "-days", str(self.settings.ca_days), "-out", str(certificate),
            )  # fmt: skip
            self._install(key, certificate, self.ca_key_file, self.ca_file)
        return CertificateOutcome(outcome.name, outcome.files, True)

    def ensure_broker(self, hosts: Iterable[str] = ()) -> CertificateOutcome:
        """The broker's server certificate, valid for localhost, 127.0.0.1, the names it has and ``hosts``."""
        files = self.broker_files()
        wanted = {subject_alt_name(host) for host in (*DEFAULT_BROKER_HOSTS, *hosts)}
        good = self._is_good(files)
        present = self._subject_alt_names(files.cert_file) if good else set()
        if good and wanted <= present:
            return CertificateOutcome(BROKER_NAME, files, False)
        self._issue(files, common_name=BROKER_COMMON_NAME, usage="serverAuth", alt_names=sorted(wanted | present))
        return CertificateOutcome(BROKER_NAME, files, True)

    def ensure_client(self, common_name: str, *, reissue: bool = False) -> CertificateOutcome:
        """A client certificate with CN = ``common_name``: the broker user it logs in as."""
        files = self.client_files(common_name)
        if not reissue and self._is_good(files):
            return CertificateOutcome(common_name, files, False)
        self._prepare_directory(self.clients_dir)
        self._issue(files, common_name=common_name, usage="clientAuth", alt_names=[])
        return CertificateOutcome(common_name, files, True)

    def ensure_all(
        self, *, hosts: Iterable[str] = (), clients: Iterable[str] = (), renew_ca: bool = False
    ) -> list[CertificateOutcome]:
        """The CA, the broker's certificate, ``clients`` and every client certificate issued before."""
        validated = [validate_common_name(name) for name in clients]
        outcomes = [self.ensure_ca(renew=renew_ca), self.ensure_broker(hosts)]
        for name in sorted({*self.client_names(), *validated}):
            outcomes.append(self.ensure_client(name))
        return outcomes

    # checks

    def _ca_is_usable(self) -> bool:
        return self._keys_match(self.ca_file, self.ca_key_file) and self._valid_for(
            self.ca_file, self.settings.renew_before_days
        )

    def _is_good(self, files: TlsFiles) -> bool:
        if not (files.cert_file.exists() and files.key_file.exists() and self.has_ca()):
            return False
        verified = self._run(["verify", "-CAfile", str(self.ca_file), str(files.cert_file)])
        return (
            verified.returncode == 0
            and self._valid_for(files.cert_file, self.settings.renew_before_days)
            and self._keys_match(files.cert_file, files.key_file)
        )

    def _valid_for(self, cert_file: Path, days: int) -> bool:
        result = self._run(["x509", "-in", str(cert_file), "-noout", "-checkend", str(days * 86400)])
        return result.returncode == 0

    def _keys_match(self, cert_file: Path, key_file: Path) -> bool:
        if not (cert_file.exists() and key_file.exists()):
            return False
        from_cert = self._run(["x509", "-in", str(cert_file), "-noout", "-pubkey"])
        from_key = self._run(["pkey", "-in", str(key_file), "-pubout"])
        return from_cert.returncode == 0 and from_key.returncode == 0 and from_cert.stdout == from_key.stdout

    def _subject_alt_names(self, cert_file: Path) -> set[str]:
        result = self._run(["x509", "-in", str(cert_file), "-noout", "-ext", "subjectAltName"])
        if result.returncode != 0:
            return set()
        names: set[str] = set()
        for line in result.stdout.splitlines()[1:]:  # the first line is the extension's title
            for entry in line.split(","):
                kind, _, value = entry.strip().partition(":")
                if value:
                    names.add(f"{'IP' if kind == 'IP Address' else kind}:{value}")
        return names

    # openssl

    def _issue(self, files: TlsFiles, *, common_name: str, usage: str, alt_names: list[str]) -> None:
        if not self.has_ca():
            raise CertificateError(f"no CA in {self.directory}: run `fedmq broker certs` first")
        with self._workspace() as work:
            key = self._new_key(work / "leaf.key")
            request_config = work / "request.cnf"
            request_config.write_text(
                f"[req]\nprompt = no\ndistinguished_name = subject\n[subject]\nCN = {common_name}\n"
            )
            request = work / "leaf.csr"
            self._openssl("req", "-new", "-config", str(request_config), "-key", str(key), "-out", str(request))
            extensions = [
                "basicConstraints = critical, CA:FALSE",
                "keyUsage = critical, digitalSignature",
                f"extendedKeyUsage = {usage}",
                "subjectKeyIdentifier = hash",
                "authorityKeyIdentifier = keyid, issuer",
            ]
            if alt_names:
                extensions.append(f"subjectAltName = {', '.join(alt_names)}")
            extension_file = work / "extensions.cnf"
            extension_file.write_text("[leaf]\n" + "\n".join(extensions) + "\n")
            certificate = work / "leaf.pem"
            self._openssl(
                "x509", "-req", "-in", str(request), "-CA", str(self.ca_file), "-CAkey", str(self.ca_key_file),
                "-set_serial", f"0x{secrets.token_hex(16)}", "-days", str(self.settings.leaf_days), "-sha256",
                "-extfile", str(extension_file), "-extensions", "leaf", "-out", str(certificate),
            )  # fmt: skip
            self._install(key, certificate, files.key_file, files.cert_file)

    def _new_key(self, path: Path) -> Path:
        self._openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path))
        return path

    def _install(self, key: Path, certificate: Path, key_target: Path, certificate_target: Path) -> None:
        """Rename both into place (the key first: a crash in between leaves a pair that ``_is_good`` rejects)."""
        key.chmod(0o600)
        certificate.chmod(0o644)
        os.replace(key, key_target)
        os.replace(certificate, certificate_target)

    @contextlib.contextmanager
    def _workspace(self) -> Iterator[Path]:
        """A private scratch directory next to the targets, so the final rename stays on one filesystem."""
        self._prepare_directory(self.directory)
        work = Path(tempfile.mkdtemp(prefix=".issuing-", dir=self.directory))
        try:
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)

    @staticmethod
    def _prepare_directory(directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o700)

    def _openssl(self, *arguments: str) -> None:
        result = self._run(list(arguments))
        if result.returncode != 0:
            raise CertificateError(f"`openssl {arguments[0]}` failed: {(result.stderr or result.stdout).strip()}")

    def _run(self, arguments: list[str]) -> subprocess.CompletedProcess[str]:
        executable = shutil.which(self.settings.openssl)
        if executable is None:
            raise CertificateError(f"the `{self.settings.openssl}` command is not installed: {INSTALL_HINT}")
        try:
            return subprocess.run(
                [executable, *arguments],
                capture_output=True,
                text=True,
                timeout=OPENSSL_TIMEOUT_SECONDS,
                check=False,
                umask=0o077,  # keys are private from their first byte
            )
        except subprocess.TimeoutExpired as exc:
            raise CertificateError(
                f"`openssl {arguments[0]}` took longer than {OPENSSL_TIMEOUT_SECONDS:.0f} s"
            ) from exc
