"""Fuzzing every decoder: random, truncated, mutated and structurally wrong input may only raise SchemaError.

The seed is fixed, so a failure reproduces; the failing input's bytes are printed in hex.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest
import torch

from schemas import MESSAGE_TYPES, DecodeLimits, Message, SchemaError
from schemas.tensors import DTYPES
from tests.unit.test_schemas import sample_messages

SEED = 20_240_917
INPUTS_PER_KIND = {
    "random-bytes": 4_000,
    "truncated": 5_000,
    "mutated": 10_000,
    "random-structure": 5_000,
    "junk-fields": 30_000,
}
MINIMUM_INPUTS = 10_000
ITEM_SIZES = {name: torch.empty((), dtype=dtype).element_size() for name, dtype in DTYPES.items()} | {"qint8": 1}
TENSOR_FIELDS = {name for message_type in MESSAGE_TYPES for name in message_type.TENSOR_FIELDS}
SMALL_LIMITS = DecodeLimits(max_message_bytes=256, max_tensors=2)
FIELD_NAMES = sorted(
    {"type", "schema_version", "dtype", "shape", "data", "scale"}
    | {name for message_type in MESSAGE_TYPES for name in message_type.CHECKS}
    | TENSOR_FIELDS
)
WORDS = [
    *FIELD_NAMES,
    *(message_type.TYPE for message_type in MESSAGE_TYPES),
    *("float32", "float16", "bfloat16", "float64", "int64", "int8", "uint8", "bool", "qint8", "complex64"),
    *("idle", "training", "paused", "stop", "pause", "resume", "8c6d2f0e-4b1a-4c3e-9f7d-2a5b6c7d8e9f"),
    "",
    "\x00",
    "é",
    "\ud7ff",
]
INTERESTING_INTS = [0, 1, -1, 2, 127, 128, 255, 256, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1, -(2**63)]
INTERESTING_FLOATS = [0.0, -0.0, 1.0, 0.5, float("nan"), float("inf"), float("-inf"), 1e308, 5e-324]


def valid_encodings() -> list[bytes]:
    """Every sample message, and the tensor-carrying ones also in each compression."""
    encodings = []
    for message in sample_messages():
        for compression in ("none", "float16", "int8") if message.TENSOR_FIELDS else ("none",):
            encodings.append(message.encode(compression))
    return encodings


def random_bytes(rng: random.Random, max_length: int = 64) -> bytes:
    return rng.randbytes(rng.randint(0, max_length))


def random_scalar(rng: random.Random) -> object:
    kind = rng.randrange(8)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        if rng.random() < 0.5:
            return rng.randint(-9, 99)
        number = rng.choice(INTERESTING_INTS)
        return -number if number <= 2**63 and rng.random() < 0.3 else number  # msgpack's int range
    if kind == 3:
        return rng.choice(INTERESTING_FLOATS) if rng.random() < 0.5 else rng.uniform(-1e6, 1e6)
    if kind == 4:
        return rng.choice(WORDS)
    if kind == 5:
        return "".join(chr(rng.randint(32, 0x2FF)) for _ in range(rng.randint(0, 12)))
    if kind == 6:
        return random_bytes(rng, 32)
    if rng.random() < 0.8:
        return msgpack.ExtType(rng.randint(0, 127), random_bytes(rng, 16))
    return msgpack.Timestamp(rng.randint(0, 2**34 - 1), rng.randint(0, 999_999_999))  # the one built-in ext


def random_object(rng: random.Random, depth: int = 0) -> object:
    """Nested maps and lists of anything msgpack can carry, keys often being real field names."""
    if depth >= 3 or rng.random() < 0.5:
        return random_scalar(rng)
    if rng.random() < 0.5:
        return [random_object(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {random_key(rng): random_object(rng, depth + 1) for _ in range(rng.randint(0, 5))}


def random_key(rng: random.Random) -> str | bytes | int:
    roll = rng.random()
    if roll < 0.8:
        return rng.choice(WORDS)
    if roll < 0.95:
        return rng.choice(WORDS).encode()
    return rng.randint(-3, 3)  # msgpack allows it; the decoder must refuse it


def random_tensor_map(rng: random.Random) -> dict[str, object]:
    """Mostly plausible tensor maps (often with the byte length matching the shape), one or two parts wrong."""
    dtype_name = rng.choice([*ITEM_SIZES, *ITEM_SIZES, "complex64", "", 7])
    shape_sizes = [0, 1, 2, 3, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
    shape = [rng.choice(shape_sizes) for _ in range(rng.randint(0, 9))]
    expected_length = math.prod(shape) * ITEM_SIZES.get(dtype_name, 1)  # type: ignore[call-overload]
    data_length = expected_length if expected_length <= 64 and rng.random() < 0.7 else rng.randint(0, 64)
    tensor: dict[str, object] = {"dtype": dtype_name, "shape": shape, "data": rng.randbytes(data_length)}
    if dtype_name == "qint8" or rng.random() < 0.2:
        tensor["scale"] = rng.choice([1.0, 0.5, 1e-45, 3e38]) if rng.random() < 0.7 else random_scalar(rng)
    if rng.random() < 0.2:
        tensor[rng.choice(["dtype", "shape", "data", "scale"])] = random_object(rng)
    if rng.random() < 0.1:
        tensor[random_key(rng)] = random_object(rng)  # type: ignore[index]
    if rng.random() < 0.1:
        del tensor[rng.choice(list(tensor))]
    return tensor


def packed(value: object) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


def truncated(rng: random.Random, encodings: list[bytes]) -> bytes:
    encoding = rng.choice(encodings)
    return encoding[: rng.randrange(len(encoding))]


def mutated(rng: random.Random, encodings: list[bytes]) -> bytes:
    data = bytearray(rng.choice(encodings))
    for _ in range(rng.randint(1, 6)):
        position = rng.randrange(len(data) + 1)
        operation = rng.randrange(5)
        if operation == 0 and position < len(data):
            data[position] = rng.randrange(256)  # replace a byte
        elif operation == 1 and position < len(data):
            data[position] ^= 1 << rng.randrange(8)  # flip a bit
        elif operation == 2:
            data[position:position] = random_bytes(rng, 8)  # insert
        elif operation == 3:
            del data[position : position + rng.randint(1, 16)]  # delete
        else:
            start = rng.randrange(len(data) + 1)
            data[position:position] = data[start : start + rng.randint(1, 32)]  # duplicate a slice
    return bytes(data)


def junk_fields(rng: random.Random, encodings: list[bytes]) -> bytes:
    """The right type and schema version, with fields replaced, dropped, added or nested wrongly."""
    body: dict[Any, Any] = msgpack.unpackb(rng.choice(encodings), raw=False)
    for _ in range(rng.randint(1, 3)):
        key = rng.choice([name for name in body if name not in ("type", "schema_version")])
        operation = rng.randrange(6)
        if operation == 0:
            body[key] = random_object(rng)
        elif operation == 1:
            del body[key]
        elif operation == 2:
            body[random_key(rng)] = random_object(rng)
        elif key in TENSOR_FIELDS and isinstance(body[key], dict):
            names = [*body[key], rng.choice(WORDS)]
            body[key][rng.choice(names)] = random_tensor_map(rng)
        elif isinstance(body[key], dict) and body[key]:
            body[key][rng.choice(list(body[key]))] = random_object(rng)
        else:
            body[key] = random_scalar(rng)
    if rng.random() < 0.1:
        body["schema_version"] = random_scalar(rng)
    return packed(body)


def fuzz_inputs(rng: random.Random) -> Iterator[tuple[str, bytes]]:
    encodings = valid_encodings()
    makers: dict[str, Callable[[], bytes]] = {
        "random-bytes": lambda: random_bytes(rng, 300),
        "truncated": lambda: truncated(rng, encodings),
        "mutated": lambda: mutated(rng, encodings),
        "random-structure": lambda: packed(random_object(rng)),
        "junk-fields": lambda: junk_fields(rng, encodings),
    }
    yield from (("valid", encoding) for encoding in encodings)
    for kind, count in INPUTS_PER_KIND.items():
        for _ in range(count):
            yield kind, makers[kind]()


@pytest.mark.timeout(120)
def test_every_decoder_raises_only_schema_errors_on_fuzzed_input(record_property: Callable[..., None]) -> None:
    # Prepare
    rng = random.Random(SEED)
    outcomes: Counter[str] = Counter()
    inputs_by_kind: Counter[str] = Counter()
    failures: list[str] = []
    started = time.perf_counter()

    # Execute: every input goes to every decoder, one in ten under tight limits
    for kind, data in fuzz_inputs(rng):
        inputs_by_kind[kind] += 1
        limits = SMALL_LIMITS if rng.random() < 0.1 else DecodeLimits()
        for message_type in MESSAGE_TYPES:
            try:
                decoded: Message = message_type.decode(data, limits)
            except SchemaError as exc:
                outcomes[type(exc).__name__] += 1
            except Exception as exc:  # the point: anything undocumented is a failure
                failures.append(f"{message_type.__name__} on {kind} input {data.hex()}: {exc!r}")
            else:
                assert isinstance(decoded, message_type)
                outcomes["accepted"] += 1
    elapsed = time.perf_counter() - started
    total_inputs = sum(inputs_by_kind.values())
    print(f"fuzzed {total_inputs} inputs x {len(MESSAGE_TYPES)} decoders in {elapsed:.1f} s: {dict(outcomes)}")
    record_property("fuzz_inputs", total_inputs)
    record_property("fuzz_outcomes", dict(outcomes))

    # Assert: nothing undocumented, enough inputs, and every layer of the decoder was reached
    assert not failures, f"{len(failures)} undocumented exceptions, first ones:\n" + "\n".join(failures[:5])
    assert total_inputs >= MINIMUM_INPUTS
    for outcome in (
        "accepted",
        "MessageTooLarge",
        "MalformedMessage",
        "UnknownSchemaVersion",
        "FieldError",
        "TensorError",
    ):
        assert outcomes[outcome] > 0, f"the fuzzer never produced {outcome}"
