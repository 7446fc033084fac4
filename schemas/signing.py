"""End-to-end signatures (Ed25519): a hospital signs its updates, the coordinator its models and controls.

The broker carries every byte and an administrator of it can publish anything with any ``user_id``, so the broker
login proves nothing to a party that does not trust the broker. A signature does: the coordinator checks each
update against the public key the hospital registered (``fedmq broker add-site --public-key``), and each site
checks each model and control message against the coordinator's public key written into its config file.

What is signed, exactly (defined here once, for both sides)::

    payload = b"fedmq-signature-v1\\n" + msgpack([
        TYPE,                                   # "model-update", "global-model" or "control"
        [[name, value], ...],                   # every field except ``signature`` and the tensor fields,
                                                # sorted by name; nested dataclasses as sorted [name, value]
                                                # lists, enums as their values, float fields as floats
        [[tensor field, sha256 digest], ...],   # e.g. [["delta", <32 bytes>]]
    ])

    digest = sha256 over the tensors sorted by name, each as
        u32 len(name) | name (UTF-8) | u32 len(dtype) | dtype name | u32 ndim | u64 size per dimension
        | u64 len(bytes) | the raw little-endian bytes

The digest is over the tensors as the *receiver decodes them*: a site that sends a lossy encoding (float16,
int8) signs the decoded form of what it sends, so the coordinator checks exactly what it aggregates. New fields
(e.g. a model's incarnation) are signed without any change here, since every field but the signature is.

Key files and key text (generation, base64 and PEM, files 0600 from the first byte) are ``broker.keys``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from collections.abc import Mapping
from enum import Enum
from typing import Any, TypeVar

import msgpack
import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from schemas.messages import Control, GlobalModel, Message, ModelUpdate
from schemas.tensors import DTYPE_NAMES, decode_tensor, encode_tensor, raw_view

DOMAIN = b"fedmq-signature-v1\n"
SIGNED_TYPES: tuple[type[Message], ...] = (ModelUpdate, GlobalModel, Control)

SignedT = TypeVar("SignedT", ModelUpdate, GlobalModel, Control)


# ---------------------------------------------------------------------------------------------- canonical bytes


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """sha256 over names, dtypes, shapes and raw bytes, in name order (see the module docstring)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        dtype = DTYPE_NAMES.get(tensor.dtype, str(tensor.dtype)).encode()
        encoded_name = name.encode()
        digest.update(struct.pack("<I", len(encoded_name)) + encoded_name)
        digest.update(struct.pack("<I", len(dtype)) + dtype)
        digest.update(struct.pack("<I", tensor.dim()) + b"".join(struct.pack("<Q", size) for size in tensor.shape))
        data = raw_view(tensor) if tensor.numel() else memoryview(b"")
        digest.update(struct.pack("<Q", data.nbytes))
        digest.update(data)
    return digest.digest()


def as_received(tensors: Mapping[str, torch.Tensor], compression: str) -> dict[str, torch.Tensor]:
    """The tensors as the receiver will decode them after ``encode(compression)``."""
    if compression == "none":
        return dict(tensors)
    return {
        name: decode_tensor(_bytes_data(encode_tensor(tensor, compression)), name) for name, tensor in tensors.items()
    }


def _bytes_data(encoded: dict[str, Any]) -> dict[str, Any]:
    return {**encoded, "data": bytes(encoded["data"])}


def _canonical(value: Any, annotation: object = None) -> Any:
    """A value as the decoder will hand it back: enums by value, dataclasses as sorted [name, value] lists, and
    a number in a float field as a float (the decoder turns an int there into a float)."""
    if isinstance(value, Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [
            [item.name, _canonical(getattr(value, item.name), item.type)]
            for item in sorted(dataclasses.fields(value), key=lambda item: item.name)
        ]
    if isinstance(value, dict):
        return [[key, _canonical(item)] for key, item in sorted(value.items())]
    if isinstance(annotation, str) and annotation.startswith("float") and type(value) is int:
        return float(value)
    return value


def signed_payload(message: Message, compression: str = "none") -> bytes:
    """The exact bytes a signature covers (the module docstring), for one of ``SIGNED_TYPES``."""
    if not isinstance(message, SIGNED_TYPES):
        raise TypeError(f"{type(message).__name__} messages are not signed")
    plain = []
    digests = []
    message_fields = dataclasses.fields(message)  # type: ignore[arg-type]
    for item in sorted(message_fields, key=lambda item: item.name):
        value = getattr(message, item.name)
        if item.name == "signature":
            continue
        if item.name in message.TENSOR_FIELDS:
            digests.append([item.name, tensors_digest(as_received(value, compression))])
        else:
            plain.append([item.name, _canonical(value, item.type)])
    return DOMAIN + msgpack.packb([message.TYPE, plain, digests], use_bin_type=True)


# ---------------------------------------------------------------------------------------------- sign and verify


def sign(message: SignedT, private_key: Ed25519PrivateKey, compression: str = "none") -> SignedT:
    """A copy of ``message`` carrying its signature; ``compression`` is the encoding it will be sent with."""
    signature = private_key.sign(signed_payload(message, compression))
    return dataclasses.replace(message, signature=signature)


def signature_problem(message: Message, public_key: Ed25519PublicKey | None) -> str | None:
    """Why ``message``'s signature does not hold (missing, no key to check it with, wrong), or None when it does."""
    signature: bytes = getattr(message, "signature", b"")
    if not signature:
        return f"the {message.TYPE} is not signed"
    if public_key is None:
        return "no public key is registered to check its signature"
    try:
        public_key.verify(signature, signed_payload(message))
    except InvalidSignature:
        return f"the {message.TYPE}'s signature does not match its contents and the registered key"
    return None
