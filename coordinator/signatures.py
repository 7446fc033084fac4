"""The coordinator's side of the end-to-end signatures (``schemas.signing``): it checks every update against the
public key its hospital registered, and signs every global model and control message with its own key.

``required = false`` (``[signing]`` of coordinator.toml) is a migration mode: an unsigned update is let through,
but a signed one must still verify, and a site with a registered key cannot be impersonated by a bad signature.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from broker.keys import public_key_text
from schemas import ModelUpdate
from schemas.signing import SignedT, sign, signature_problem

PublicKeyLookup = Callable[[str], Ed25519PublicKey | None]


@dataclass(frozen=True)
class UpdateSignatures:
    """``validation.SignatureCheck``: why an update's signature does not hold, or None."""

    public_key: PublicKeyLookup  # e.g. broker.keys.SiteKeyRegistry.public_key: re-read when rotated
    required: bool = True

    def __call__(self, update: ModelUpdate) -> str | None:
        if not update.signature and not self.required:
            return None
        problem = signature_problem(update, self.public_key(update.site_id))
        return f"site {update.site_id!r}: {problem}" if problem else None


@dataclass(frozen=True)
class Signer:
    """Signs what the coordinator publishes."""

    private_key: Ed25519PrivateKey

    def __call__(self, message: SignedT) -> SignedT:
        return sign(message, self.private_key)

    @property
    def public_key_text(self) -> str:
        return public_key_text(self.private_key)
