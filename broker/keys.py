"""The federation's signing keys on the operator's machine: the coordinator's key pair and the hospitals' public keys.

Layout, under the fedmq state dir (the one ``fedmq broker`` and ``fedmq coordinator run`` share)::

    keys/
      coordinator.key   the coordinator's Ed25519 private key (0600); made by `fedmq coordinator keygen`, by the
                        first `fedmq broker add-site` or by the coordinator's first start, whichever comes first
      coordinator.pub   its public key (PEM); add-site writes it into every site.toml (signing.coordinator_public_key)
      sites/NAME.pub    the public key hospital NAME registered (`add-site --public-key`, `rotate-site-key`);
                        deleted by `remove-site`

Keys travel as text: a public key is the base64 of its 32 raw bytes (one line, for a TOML string) or a PEM
SubjectPublicKeyInfo file; a private key is a PKCS#8 PEM file written 0600 from its first byte. This module
imports no torch, so ``fedmq --help`` stays light.

A hospital's private key never comes here: it is made at the hospital by ``fedmq site keygen`` and only its
public key is sent to the operator. The coordinator reads ``sites/`` through ``SiteKeyRegistry``, which notices
a rotated or removed key without a restart.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from broker import topology
from broker.errors import BrokerError, ProvisioningError

KEYS_DIRNAME = "keys"
SITE_KEYS_DIRNAME = "sites"
COORDINATOR_KEY_NAME = "coordinator.key"


class KeyFileError(BrokerError, ValueError):
    """A key file or key text that cannot be used; the message names the file and why."""


def generate_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_key_text(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """The base64 of the 32 raw bytes: one line, fit for a TOML string."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def parse_public_key(text: str, where: str = "public key") -> Ed25519PublicKey:
    """A public key from its base64 text or a PEM SubjectPublicKeyInfo; ``KeyFileError`` naming ``where``."""
    stripped = text.strip()
    if stripped.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(stripped.encode())
        except ValueError as exc:
            raise KeyFileError(f"{where}: not a PEM public key ({exc})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise KeyFileError(f"{where}: not an Ed25519 key (fedmq signs with Ed25519)")
        return key
    try:
        raw = base64.b64decode(stripped, validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(f"{where}: not base64 nor PEM") from None
    if len(raw) != 32:
        raise KeyFileError(f"{where}: an Ed25519 public key has 32 bytes, this one {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def read_public_key(path: Path) -> Ed25519PublicKey:
    try:
        text = path.read_text()
    except OSError as exc:
        raise KeyFileError(f"cannot read the public key {path}: {exc.strerror or exc}") from None
    return parse_public_key(text, str(path))


def public_key_pem(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def read_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read the private key {path}: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 key (fedmq signs with Ed25519)")
    return key


def write_key_pair(private_path: Path, key: Ed25519PrivateKey, *, overwrite: bool = False) -> Path:
    """The private key at ``private_path`` (0600 from its first byte) and its public key beside it (``.pub``,
    PEM, 0644); returns the public key's path. Refuses to replace an existing private key unless ``overwrite``."""
    if private_path.exists() and not overwrite:
        raise KeyFileError(f"{private_path} exists already; refusing to replace a private key")
    private_path.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _write_atomically(private_path, pem, 0o600)
    public_path = public_key_path(private_path)
    _write_atomically(public_path, public_key_pem(key).encode(), 0o644)
    return public_path


def write_public_key(path: Path, key: Ed25519PublicKey) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(path, public_key_pem(key).encode(), 0o644)


def public_key_path(private_path: Path) -> Path:
    return private_path.with_suffix(".pub")


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, mode)  # the umask may have taken bits from a public key's 0644
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def keys_dir(state_dir: Path) -> Path:
    return state_dir / KEYS_DIRNAME


def site_keys_dir(keys: Path) -> Path:
    return keys / SITE_KEYS_DIRNAME


def site_key_path(keys: Path, site_id: str) -> Path:
    return site_keys_dir(keys) / f"{topology.validate_site_id(site_id)}.pub"


def coordinator_key_path(keys: Path) -> Path:
    return keys / COORDINATOR_KEY_NAME


def ensure_coordinator_key(key_file: Path) -> Ed25519PrivateKey:
    """The coordinator's private key, made (with its ``.pub``) when there is none yet."""
    if key_file.exists():
        return read_private_key(key_file)
    key = generate_private_key()
    try:
        key_file.parent.mkdir(parents=True, exist_ok=True)
        key_file.parent.chmod(0o700)
        write_key_pair(key_file, key)
    except OSError as exc:
        raise KeyFileError(f"cannot write the coordinator's signing key {key_file}: {exc.strerror or exc}") from None
    return key


def coordinator_public_key(keys: Path) -> Ed25519PublicKey:
    """The coordinator's public key for a site's config: ``coordinator.pub``, made with its key pair if missing
    (a coordinator on another machine: copy its ``coordinator.pub`` here before the first add-site)."""
    public_file = public_key_path(coordinator_key_path(keys))
    if public_file.exists():
        return read_public_key(public_file)
    return ensure_coordinator_key(coordinator_key_path(keys)).public_key()


def register_site_key(keys: Path, site_id: str, public_key_file: Path) -> Path:
    """Copy (normalised to PEM) the public key a hospital sent into the registry; replaces a previous one."""
    try:
        key = read_public_key(public_key_file)
    except KeyFileError as exc:
        raise ProvisioningError(str(exc)) from None
    path = site_key_path(keys, site_id)
    write_public_key(path, key)
    return path


def remove_site_key(keys: Path, site_id: str) -> bool:
    """Forget a hospital's public key; True when there was one."""
    path = site_key_path(keys, site_id)
    existed = path.exists()
    path.unlink(missing_ok=True)
    return existed


@dataclass
class SiteKeyRegistry:
    """The hospitals' public keys, read from ``keys/sites``; a file changed or removed since the last look is
    read again (one ``stat`` per look), so ``rotate-site-key`` and ``remove-site`` take effect at once."""

    directory: Path
    _cache: dict[str, tuple[tuple[int, int, int], Ed25519PublicKey | None]] = field(default_factory=dict)

    def public_key(self, site_id: str) -> Ed25519PublicKey | None:
        """The site's registered key, or None when it has none (or the file is unreadable)."""
        path = self.directory / f"{site_id}.pub"
        try:
            status = os.stat(path)
        except (OSError, ValueError):
            self._cache.pop(site_id, None)
            return None
        stamp = (status.st_mtime_ns, status.st_size, status.st_ino)
        cached = self._cache.get(site_id)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            key: Ed25519PublicKey | None = read_public_key(path)
        except KeyFileError:
            key = None
        self._cache[site_id] = (stamp, key)
        return key
