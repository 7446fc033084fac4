"""The five messages of the federation, each a frozen dataclass with ``encode()`` and ``decode()``.

On the wire a message is one msgpack map: ``{"type": ..., "schema_version": ..., <fields>}``. Decoding checks
the byte size before unpacking, then the type and version, then that the field set is exactly the expected one
and every field has the expected type; tensors are checked by ``schemas.tensors``. Anything else raises a
``SchemaError`` naming the field.
"""

from __future__ import annotations

import math
import secrets
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any, ClassVar, TypeVar

import msgpack

from schemas.errors import FieldError, MalformedMessage, MessageTooLarge, SchemaError, UnknownSchemaVersion
from schemas.tensors import Params, decode_tensors, encode_tensors

# The wire's one schema version; a decoder accepts exactly its own. A change to any message's field set is a new
# version: 1 the first release; 2 GlobalModel.incarnation (a restored coordinator's models supersede older ones);
# 3 Ed25519 signatures on ModelUpdate, GlobalModel and Control, Heartbeat.refused_messages.
SCHEMA_VERSION = 3
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_TENSORS = 4096
MAX_STRING_LENGTH = 4096
MAX_METRICS = 256
SIGNATURE_BYTES = 64  # Ed25519 (schemas.signing); an empty signature means unsigned


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds checked before (bytes) and while (counts) decoding untrusted input."""

    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_tensors: int = DEFAULT_MAX_TENSORS


class SiteState(str, Enum):
    IDLE = "idle"
    TRAINING = "training"
    EVALUATING = "evaluating"
    PAUSED = "paused"


class ControlCommand(str, Enum):
    STOP = "stop"
    PAUSE = "pause"
    RESUME = "resume"


# The optimisers a site's trainer builds (tasks.base.Task.train); anything else would fail at every hospital.
TRAINING_OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class TrainingConfig:
    """How every site trains on a global model; it travels inside the model so all sites agree.

    It refuses, when made, any value a site's trainer would fail on (``FieldError`` naming the field): a bad
    ``[training]`` table stops the coordinator at start instead of failing at every hospital on every version.
    """

    local_steps: int = field(default=100, metadata={"description": "Local optimiser steps per update (>= 1)."})
    learning_rate: float = field(default=0.01, metadata={"description": "Local learning rate (finite, > 0)."})
    batch_size: int = field(default=4, metadata={"description": "Local mini-batch size (>= 1)."})
    optimizer: str = field(default="sgd", metadata={"description": "Local optimiser: sgd or adam."})
    proximal_mu: float | None = field(
        default=None, metadata={"description": "FedProx proximal weight mu (>= 0; unset: plain local training)."}
    )
    local_epochs: int | None = field(
        default=None, metadata={"description": "Train whole epochs instead of local_steps (>= 1; unset: steps)."}
    )
    # Async strategies want a site to keep training when no newer model has arrived; a synchronous round
    # takes one update per site and version, so there a site waits for the next version instead.
    train_on_same_version: bool = field(
        default=True, metadata={"description": "Set by the coordinator from its strategy, never by a file."}
    )

    def __post_init__(self) -> None:
        if self.optimizer not in TRAINING_OPTIMIZERS:
            raise FieldError(f"expected one of {list(TRAINING_OPTIMIZERS)}, got {self.optimizer!r}", "optimizer")
        _require_positive_number(self.learning_rate, "learning_rate")
        object.__setattr__(self, "learning_rate", float(self.learning_rate))
        _require_int(self.batch_size, "batch_size", minimum=1)
        # local_steps counts only without local_epochs (then it must make at least one step)
        _require_int(self.local_steps, "local_steps", minimum=1 if self.local_epochs is None else 0)
        if self.local_epochs is not None:
            _require_int(self.local_epochs, "local_epochs", minimum=1)
        if self.proximal_mu is not None:
            mu: object = self.proximal_mu
            if not isinstance(mu, (int, float)) or isinstance(mu, bool) or not (math.isfinite(mu) and mu >= 0):
                raise FieldError(f"must be a non-negative number, got {self.proximal_mu!r}", "proximal_mu")
            object.__setattr__(self, "proximal_mu", float(self.proximal_mu))
        if not isinstance(self.train_on_same_version, bool):
            raise FieldError(f"expected true or false, got {self.train_on_same_version!r}", "train_on_same_version")


def _require_int(value: object, name: str, *, minimum: int) -> None:
    if type(value) is not int or value < minimum:
        raise FieldError(f"must be an integer >= {minimum}, got {value!r}", name)


def _require_positive_number(value: object, name: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (math.isfinite(value) and value > 0):
        raise FieldError(f"must be a finite number > 0, got {value!r}", name)


@dataclass(frozen=True)
class ModelFingerprint:
    """Task name + architecture hash: a site refuses a model its task cannot load."""

    task: str
    architecture: str


@dataclass(frozen=True)
class TrainingMetrics:
    loss: float
    steps: int
    seconds: float


# ---------------------------------------------------------------------------------------------- field checks

Check = Callable[[object, str], Any]


def _string(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise FieldError(f"expected a string, got {type(value).__name__}", name)
    if len(value) > MAX_STRING_LENGTH:
        raise FieldError(f"string longer than {MAX_STRING_LENGTH} characters", name)
    return value


def _non_empty_string(value: object, name: str) -> str:
    text = _string(value, name)
    if not text:
        raise FieldError("must not be empty", name)
    return text


def _count(value: object, name: str) -> int:
    if type(value) is not int or value < 0:
        raise FieldError(f"expected a non-negative int, got {value!r}", name)
    return value


def _boolean(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise FieldError(f"expected true or false, got {type(value).__name__}", name)
    return value


def _number(value: object, name: str) -> float:
    if type(value) not in (int, float):
        raise FieldError(f"expected a number, got {type(value).__name__}", name)
    return float(value)  # type: ignore[arg-type]


def _finite_number(value: object, name: str) -> float:
    number = _number(value, name)
    if not math.isfinite(number):
        raise FieldError(f"expected a finite number, got {number}", name)
    return number


def _signature(value: object, name: str) -> bytes:
    if not isinstance(value, bytes):
        raise FieldError(f"expected bytes, got {type(value).__name__}", name)
    if len(value) not in (0, SIGNATURE_BYTES):
        raise FieldError(f"expected {SIGNATURE_BYTES} bytes (or none: unsigned), got {len(value)}", name)
    return value


def _optional(check: Check) -> Check:
    def checked(value: object, name: str) -> Any:
        return None if value is None else check(value, name)

    return checked


def _uuid(value: object, name: str) -> str:
    text = _string(value, name)
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise FieldError(f"expected a UUID, got {text!r}", name) from None


def _enum(enum_type: type[Enum]) -> Check:
    def checked(value: object, name: str) -> Enum:
        try:
            return enum_type(value)
        except (ValueError, TypeError):
            allowed = [member.value for member in enum_type]
            raise FieldError(f"expected one of {allowed}, got {value!r}", name) from None

    return checked


def _metrics(value: object, name: str) -> dict[str, float]:
    if not isinstance(value, dict):
        raise FieldError(f"expected a map of name -> number, got {type(value).__name__}", name)
    if len(value) > MAX_METRICS:
        raise FieldError(f"more than {MAX_METRICS} metrics", name)
    return {_non_empty_string(key, f"{name} key"): _number(item, f"{name}[{key!r}]") for key, item in value.items()}


def _struct(struct_type: type, checks: Mapping[str, Check]) -> Check:
    def checked(value: object, name: str) -> Any:
        values = _check_fields(value, checks, name)
        try:
            return struct_type(**values)
        except FieldError as exc:  # the struct's own checks (TrainingConfig), named by their path in the message
            raise FieldError(exc.reason, f"{name}.{exc.field}" if exc.field else name) from None

    return checked


def _check_fields(value: object, checks: Mapping[str, Check], where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise FieldError(f"expected a map, got {type(value).__name__}", where)
    missing = [key for key in checks if key not in value]
    if missing:
        raise FieldError(f"missing field(s) {missing}", where)
    extra = [str(key) for key in value if key not in checks]
    if extra:
        raise FieldError(f"unexpected field(s) {extra}", where)
    return {key: check(value[key], f"{where}.{key}" if where else key) for key, check in checks.items()}


_TRAINING_CONFIG = _struct(
    TrainingConfig,
    {
        "local_steps": _count,
        "learning_rate": _finite_number,
        "batch_size": _count,
        "optimizer": _non_empty_string,
        "proximal_mu": _optional(_finite_number),
        "local_epochs": _optional(_count),
        "train_on_same_version": _boolean,
    },
)
_FINGERPRINT = _struct(ModelFingerprint, {"task": _non_empty_string, "architecture": _non_empty_string})
_TRAINING_METRICS = _struct(TrainingMetrics, {"loss": _number, "steps": _count, "seconds": _finite_number})


def _plain(value: object) -> Any:
    """Turn nested dataclasses and enums into msgpack-ready values."""
    if isinstance(value, Enum):
        return value.value
    if hasattr(value, "__dataclass_fields__"):
        return {item.name: _plain(getattr(value, item.name)) for item in fields(value)}  # type: ignore[arg-type]
    return value


def _pack_into(value: Any, chunks: list[bytes | memoryview]) -> None:
    """msgpack, written so that tensor bytes (memoryviews) are copied once, by the final join, instead of once
    into the packer's buffer and again into the result. Maps and raw bytes get their msgpack headers here;
    everything else is packed by msgpack itself."""
    if isinstance(value, dict):
        size = len(value)
        if size < 16:
            chunks.append(bytes((0x80 | size,)))
        elif size < 2**16:
            chunks.append(b"\xde" + size.to_bytes(2, "big"))
        else:
            chunks.append(b"\xdf" + size.to_bytes(4, "big"))
        for key, item in value.items():
            chunks.append(msgpack.packb(key, use_bin_type=True))
            _pack_into(item, chunks)
    elif isinstance(value, memoryview):
        size = value.nbytes
        if size < 2**8:
            chunks.append(b"\xc4" + size.to_bytes(1, "big"))
        elif size < 2**16:
            chunks.append(b"\xc5" + size.to_bytes(2, "big"))
        else:
            chunks.append(b"\xc6" + size.to_bytes(4, "big"))
        chunks.append(value.cast("B"))
    else:
        chunks.append(msgpack.packb(value, use_bin_type=True))


# --------------------------------------------------------------------------------------------------- messages

MessageT = TypeVar("MessageT", bound="Message")


class Message:
    """Shared encode/decode; subclasses list their field checks and which fields hold tensors."""

    TYPE: ClassVar[str]
    CHECKS: ClassVar[dict[str, Check]]
    TENSOR_FIELDS: ClassVar[tuple[str, ...]] = ()
    schema_version: int

    def encode(self, compression: str = "none") -> bytes:
        body: dict[str, Any] = {"type": self.TYPE, "schema_version": self.schema_version}
        for item in fields(self):  # type: ignore[arg-type]
            if item.name == "schema_version":
                continue
            value = getattr(self, item.name)
            body[item.name] = encode_tensors(value, compression) if item.name in self.TENSOR_FIELDS else _plain(value)
        chunks: list[bytes | memoryview] = []
        _pack_into(body, chunks)
        return b"".join(chunks)  # the one copy of the tensor bytes

    @classmethod
    def decode(cls: type[MessageT], data: bytes, limits: DecodeLimits = DecodeLimits()) -> MessageT:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise MalformedMessage(f"expected bytes, got {type(data).__name__}")
        if len(data) > limits.max_message_bytes:
            raise MessageTooLarge(f"{len(data)} bytes exceed the limit of {limits.max_message_bytes}")
        try:
            body = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
        except Exception as exc:  # msgpack raises many types for bad input; all mean the same to us
            raise MalformedMessage(f"not a msgpack message ({type(exc).__name__}: {exc})") from None
        if not isinstance(body, dict):
            raise MalformedMessage(f"expected a msgpack map, got {type(body).__name__}")
        message_type = body.pop("type", None)
        if message_type != cls.TYPE:
            raise UnknownSchemaVersion(f"expected message type {cls.TYPE!r}, got {message_type!r}", "type")
        version = body.pop("schema_version", None)
        if type(version) is not int or version != SCHEMA_VERSION:  # True == 1.0 == 1 in Python
            raise UnknownSchemaVersion(
                f"schema version {version!r} is not supported (this build speaks {SCHEMA_VERSION})",
                "schema_version",
            )
        tensor_checks: dict[str, Check] = {
            name: (lambda value, where: decode_tensors(value, where, limits.max_tensors)) for name in cls.TENSOR_FIELDS
        }
        values = _check_fields(body, {**cls.CHECKS, **tensor_checks}, "")
        try:
            return cls(**values)
        except SchemaError:
            raise
        except (TypeError, ValueError) as exc:  # __post_init__ cross-field checks
            raise FieldError(str(exc)) from None


def now() -> float:
    return time.time()


INCARNATION_TIEBREAK = 1000  # the sub-microsecond digits of an incarnation are random, not time


@dataclass(frozen=True, eq=False)
class GlobalModel(Message):
    """One version of the global model and the training config every site must use with it.

    ``incarnation`` names the coordinator process that published it (``new_incarnation``, drawn at each start).
    A site orders models by ``(incarnation, version)``: a model from a newer incarnation supersedes whatever the
    site holds even when its version is lower, which is what makes a coordinator restored from an older backup
    something the sites follow instead of a coordinator whose models they ignore.
    """

    TYPE: ClassVar[str] = "global-model"
    TENSOR_FIELDS: ClassVar[tuple[str, ...]] = ("tensors",)

    version: int
    tensors: Params
    training: TrainingConfig
    fingerprint: ModelFingerprint
    incarnation: int
    created_at: float = field(default_factory=now)
    schema_version: int = SCHEMA_VERSION
    # The coordinator's Ed25519 signature over every other field and the tensors' digest (schemas.signing)
    signature: bytes = b""

    @staticmethod
    def new_incarnation(clock_ns: Callable[[], int] = time.time_ns) -> int:
        """A coordinator's incarnation: its start time in nanoseconds since the epoch, the last three digits
        replaced by a random number (a tie-break between two starts in the same microsecond).

        Why the wall clock and not a counter kept in the checkpoint: a backup is a copy of the state dir, so a
        counter restored with it goes backwards. Backed up at 5, the old process bumped it to 6 after the backup;
        the restored one bumps 5 to 6 again, and the sites, which hold the old 6 at a higher version, would ignore
        the restored coordinator. Nothing in the state dir can order a restored process after the one it replaces;
        the time it starts can, because it starts after the process it replaces started. The ordering holds as
        long as the coordinator host's clock, at the restored start, is not behind the replaced start's; a clock
        set back by more than the time between the two starts (a restore onto a host whose clock is hours wrong)
        makes the sites ignore the restored models, which they log once per ignored incarnation.

        It fits msgpack's unsigned 64-bit integers until the year 2554."""
        started_ns = clock_ns()
        return started_ns - started_ns % INCARNATION_TIEBREAK + secrets.randbelow(INCARNATION_TIEBREAK)

    @property
    def identity(self) -> tuple[int, int]:
        """What orders models at a site: newer incarnation first, then higher version."""
        return (self.incarnation, self.version)


GlobalModel.CHECKS = {
    "version": _count,
    "incarnation": _count,
    "training": _TRAINING_CONFIG,
    "fingerprint": _FINGERPRINT,
    "created_at": _finite_number,
    "signature": _signature,
}


@dataclass(frozen=True, eq=False)
class ModelUpdate(Message):
    """A site's local model minus the base version it trained from."""

    TYPE: ClassVar[str] = "model-update"
    TENSOR_FIELDS: ClassVar[tuple[str, ...]] = ("delta",)

    update_id: str
    site_id: str
    seq: int
    base_version: int
    num_examples: int
    delta: Params
    metrics: TrainingMetrics
    created_at: float = field(default_factory=now)
    schema_version: int = SCHEMA_VERSION
    # The site's Ed25519 signature over every other field and the delta's digest (schemas.signing)
    signature: bytes = b""

    @staticmethod
    def new_id() -> str:
        return str(uuid.uuid4())


ModelUpdate.CHECKS = {
    "update_id": _uuid,
    "site_id": _non_empty_string,
    "seq": _count,
    "base_version": _count,
    "num_examples": _count,
    "metrics": _TRAINING_METRICS,
    "created_at": _finite_number,
    "signature": _signature,
}


@dataclass(frozen=True)
class Heartbeat(Message):
    TYPE: ClassVar[str] = "heartbeat"

    site_id: str
    state: SiteState
    agent_version: str
    timestamp: float = field(default_factory=now)
    schema_version: int = SCHEMA_VERSION
    # Global models and control messages this agent refused since it started because their coordinator
    # signature was missing or wrong: a site under a forging broker says so in every heartbeat.
    refused_messages: int = 0


Heartbeat.CHECKS = {
    "site_id": _non_empty_string,
    "state": _enum(SiteState),
    "agent_version": _string,
    "timestamp": _finite_number,
    "refused_messages": _count,
}


@dataclass(frozen=True)
class EvalReport(Message):
    """A site's evaluation of one global version on its own test split."""

    TYPE: ClassVar[str] = "eval-report"

    site_id: str
    model_version: int
    num_examples: int
    metrics: dict[str, float]
    created_at: float = field(default_factory=now)
    schema_version: int = SCHEMA_VERSION


EvalReport.CHECKS = {
    "site_id": _non_empty_string,
    "model_version": _count,
    "num_examples": _count,
    "metrics": _metrics,
    "created_at": _finite_number,
}


@dataclass(frozen=True)
class Control(Message):
    TYPE: ClassVar[str] = "control"

    command: ControlCommand
    reason: str
    issued_at: float = field(default_factory=now)
    schema_version: int = SCHEMA_VERSION
    # The coordinator's Ed25519 signature over every other field (schemas.signing)
    signature: bytes = b""


Control.CHECKS = {
    "command": _enum(ControlCommand),
    "reason": _string,
    "issued_at": _finite_number,
    "signature": _signature,
}

MESSAGE_TYPES: tuple[type[Message], ...] = (GlobalModel, ModelUpdate, Heartbeat, EvalReport, Control)


def encode(message: Message, compression: str = "none") -> bytes:
    return message.encode(compression)


def decode(data: bytes, expected: type[MessageT], limits: DecodeLimits = DecodeLimits()) -> MessageT:
    return expected.decode(data, limits)
