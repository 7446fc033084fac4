"""The site's side of the end-to-end signatures (``schemas.signing``): it signs each update with the hospital's own
key, and checks that every global model and control message was signed by the coordinator's key. A broker (or
its administrator) can then neither push a model to the hospital nor forge the hospital's updates.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from schemas import Message, ModelUpdate
from schemas.signing import sign, signature_problem


@dataclass(frozen=True)
class SiteSigning:
    """``private_key`` signs updates (None: they go unsigned); ``coordinator_key`` checks models and controls.
    With ``required`` an unsigned model or control is refused; a wrongly signed one always is."""

    private_key: Ed25519PrivateKey | None
    coordinator_key: Ed25519PublicKey | None
    required: bool = True

    def sign_update(self, update: ModelUpdate, compression: str = "none") -> ModelUpdate:
        """Signed over the tensors as the coordinator will decode them from ``compression``."""
        return sign(update, self.private_key, compression) if self.private_key is not None else update

    def refusal(self, message: Message) -> str | None:
        """Why ``message`` (a global model or a control message) must not be used, or None."""
        if not getattr(message, "signature", b"") and not self.required:
            return None
        return signature_problem(message, self.coordinator_key)
