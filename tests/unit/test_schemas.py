"""The wire format: every message survives a round trip, and every documented rejection names its field."""

from __future__ import annotations

import gc
import math
import tracemalloc
from collections.abc import Callable
from dataclasses import fields, replace
from typing import Any

import msgpack
import numpy as np
import pytest
import torch

from schemas import (
    SCHEMA_VERSION,
    Control,
    ControlCommand,
    DecodeLimits,
    EvalReport,
    FieldError,
    GlobalModel,
    Heartbeat,
    MalformedMessage,
    Message,
    MessageTooLarge,
    ModelFingerprint,
    ModelUpdate,
    Params,
    SchemaError,
    SiteState,
    TensorError,
    TrainingConfig,
    TrainingMetrics,
    UnknownSchemaVersion,
    decode,
    encode,
    first_non_finite,
    raw_size,
)

SUPPORTED_DTYPES = (
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
)
UPDATE_ID = "8c6d2f0e-4b1a-4c3e-9f7d-2a5b6c7d8e9f"


# ------------------------------------------------------------------------------------------------ helpers


def sample_tensors(seed: int = 0) -> Params:
    """A few layers of a small CNN, in a fixed order (order is part of the contract)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "conv1.weight": torch.randn(8, 3, 3, 3, generator=generator),
        "conv1.bias": torch.randn(8, generator=generator),
        "bn1.num_batches_tracked": torch.tensor(17, dtype=torch.int64),
        "fc.weight": torch.randn(2, 8, generator=generator),
        "fc.bias": torch.zeros(2),
    }


def sample_messages() -> list[Message]:
    """One fully populated instance of each of the five messages (optional fields set where they exist)."""
    return [
        GlobalModel(
            version=3,
            tensors=sample_tensors(1),
            training=TrainingConfig(
                local_steps=50,
                learning_rate=0.05,
                batch_size=16,
                optimizer="adam",
                proximal_mu=0.01,
                local_epochs=2,
            ),
            fingerprint=ModelFingerprint(task="heart-disease", architecture="sha256:abc123"),
            incarnation=1_764_601_200_123_456_789,
            created_at=1_700_000_000.25,
        ),
        ModelUpdate(
            update_id=UPDATE_ID,
            site_id="hospital-a",
            seq=12,
            base_version=3,
            num_examples=199,
            delta=sample_tensors(2),
            metrics=TrainingMetrics(loss=0.6931, steps=50, seconds=1.5),
            created_at=1_700_000_001.5,
        ),
        Heartbeat(site_id="hospital-a", state=SiteState.TRAINING, agent_version="0.1.0", timestamp=1_700_000_002.0),
        EvalReport(
            site_id="hospital-b",
            model_version=3,
            num_examples=40,
            metrics={"accuracy": 0.75, "auc": 0.81, "loss": 0.52},
            created_at=1_700_000_003.0,
        ),
        Control(command=ControlCommand.PAUSE, reason="maintenance window", issued_at=1_700_000_004.0),
    ]


def message_id(message: Message) -> str:
    return message.TYPE


def assert_tensors_identical(expected: Params, actual: Params) -> None:
    """Same names in the same order, same dtypes and shapes, same bits (NaN payloads included)."""
    assert list(actual) == list(expected)
    for name, tensor in expected.items():
        decoded = actual[name]
        assert decoded.dtype == tensor.dtype, name
        assert decoded.shape == tensor.shape, name
        assert torch.equal(bit_pattern(decoded), bit_pattern(tensor)), name


def bit_pattern(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def assert_messages_equal(expected: Message, actual: Message) -> None:
    assert type(actual) is type(expected)
    for item in fields(expected):  # type: ignore[arg-type]
        want, got = getattr(expected, item.name), getattr(actual, item.name)
        if item.name in expected.TENSOR_FIELDS:
            assert_tensors_identical(want, got)
        else:
            assert got == want, item.name
            assert type(got) is type(want), item.name


def repack(encoded: bytes, mutate: Callable[[dict[str, Any]], object]) -> bytes:
    """Decode the raw msgpack body, let ``mutate`` edit it in place, encode it again."""
    body = msgpack.unpackb(encoded, raw=False)
    mutate(body)
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


def update_with(delta: Params) -> ModelUpdate:
    return ModelUpdate(
        update_id=UPDATE_ID,
        site_id="hospital-a",
        seq=1,
        base_version=0,
        num_examples=10,
        delta=delta,
        metrics=TrainingMetrics(loss=0.5, steps=1, seconds=0.1),
    )


def rejection(
    message_type: type[Message], data: bytes, limits: DecodeLimits = DecodeLimits()
) -> pytest.ExceptionInfo[SchemaError]:
    with pytest.raises(SchemaError) as caught:
        message_type.decode(data, limits)
    return caught


# ------------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("message", sample_messages(), ids=message_id)
def test_every_message_round_trips_with_all_fields_equal(message: Message) -> None:
    # Prepare
    encoded = message.encode()

    # Execute
    decoded = type(message).decode(encoded)

    # Assert
    assert isinstance(encoded, bytes)
    assert_messages_equal(message, decoded)
    assert decoded.schema_version == SCHEMA_VERSION == 3


@pytest.mark.parametrize("message", sample_messages(), ids=message_id)
def test_module_level_encode_and_decode_match_the_methods(message: Message) -> None:
    encoded = encode(message)

    decoded = decode(encoded, type(message))

    assert encoded == message.encode()
    assert_messages_equal(message, decoded)


def test_enums_and_optional_fields_come_back_typed() -> None:
    heartbeat = Heartbeat(site_id="hospital-a", state=SiteState.PAUSED, agent_version="0.1.0")
    model = GlobalModel(
        version=0,
        tensors={},
        training=TrainingConfig(),  # proximal_mu and local_epochs are None
        fingerprint=ModelFingerprint(task="t", architecture="a"),
        incarnation=0,
    )

    decoded_heartbeat = Heartbeat.decode(heartbeat.encode())
    decoded_model = GlobalModel.decode(model.encode())

    assert decoded_heartbeat.state is SiteState.PAUSED
    assert decoded_model.training == TrainingConfig()
    assert decoded_model.training.proximal_mu is None
    assert decoded_model.tensors == {}


def test_an_incarnation_is_the_start_time_in_ns_with_random_sub_microsecond_digits() -> None:
    # Prepare
    started_ns = 1_764_601_200_123_456_789
    restored_ns = started_ns + 1_000  # one microsecond later

    # Execute
    incarnations = {GlobalModel.new_incarnation(lambda: started_ns) for _ in range(200)}
    later = GlobalModel.new_incarnation(lambda: restored_ns)

    # Assert: the same microsecond, a random tie-break; a later start always orders after
    assert all(1_764_601_200_123_456_000 <= value <= 1_764_601_200_123_456_999 for value in incarnations)
    assert len(incarnations) > 1
    assert later > max(incarnations)


def test_a_model_of_a_later_incarnation_orders_after_any_version_of_an_earlier_one() -> None:
    # Prepare
    def model(incarnation: int, version: int) -> GlobalModel:
        fingerprint = ModelFingerprint(task="t", architecture="a")
        return GlobalModel(
            version=version, tensors={}, training=TrainingConfig(), fingerprint=fingerprint, incarnation=incarnation
        )

    before_restore, restored = model(incarnation=100, version=9), model(incarnation=200, version=3)

    # Execute
    decoded = GlobalModel.decode(restored.encode())

    # Assert
    assert restored.identity > before_restore.identity
    assert model(200, 4).identity > restored.identity
    assert decoded.identity == (200, 3)


def test_the_largest_incarnation_until_2554_round_trips() -> None:
    # Prepare: nanoseconds since 1970 fit msgpack's unsigned 64-bit integers until 2554
    model = replace(sample_messages()[0], incarnation=2**64 - 1)  # type: ignore[arg-type]

    # Execute
    decoded = GlobalModel.decode(model.encode())

    # Assert
    assert decoded.incarnation == 2**64 - 1


@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES, ids=str)
def test_every_supported_dtype_round_trips_bit_exact(dtype: torch.dtype) -> None:
    # Prepare: extreme values where the dtype has them, NaN and inf for floats
    if dtype == torch.bool:
        tensor = torch.tensor([[True, False, True], [False, False, True]])
    elif dtype.is_floating_point:
        info = torch.finfo(dtype)
        tensor = torch.tensor([[0.0, -0.0, 1.5, info.max], [info.min, info.tiny, math.inf, -math.inf]], dtype=dtype)
        tensor = torch.cat([tensor.reshape(-1), torch.tensor([math.nan], dtype=dtype)]).reshape(3, 3)
    else:
        info_int = torch.iinfo(dtype)
        tensor = torch.tensor([[info_int.min, 0, 1], [info_int.max, 7, 2]], dtype=dtype)
    update = update_with({"layer.weight": tensor})

    # Execute
    decoded = ModelUpdate.decode(update.encode())

    # Assert
    assert_tensors_identical(update.delta, decoded.delta)


@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (1, 1, 1, 1)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool], ids=str)
def test_zero_dimensional_and_empty_tensors_round_trip(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    tensor = torch.ones(shape, dtype=dtype)

    decoded = ModelUpdate.decode(update_with({"t": tensor}).encode())

    assert_tensors_identical({"t": tensor}, decoded.delta)


@pytest.mark.parametrize(
    "make_view",
    [
        lambda base: base.t(),
        lambda base: base[:, ::2],
        lambda base: base.permute(1, 0)[1:],
        lambda base: base[0].expand(4, 6),  # stride 0 along a dimension
    ],
    ids=["transposed", "strided", "permuted-slice", "expanded"],
)
def test_non_contiguous_tensors_round_trip_as_their_values(
    make_view: Callable[[torch.Tensor], torch.Tensor],
) -> None:
    view = make_view(torch.arange(24, dtype=torch.float32).reshape(4, 6))
    assert not view.is_contiguous()

    decoded = ModelUpdate.decode(update_with({"view": view}).encode()).delta["view"]

    assert decoded.shape == view.shape
    assert torch.equal(decoded, view)
    assert decoded.is_contiguous()


def test_tensors_requiring_grad_are_sent_as_their_values() -> None:
    parameter = torch.nn.Parameter(torch.randn(3, 2))

    decoded = ModelUpdate.decode(update_with({"p": parameter}).encode()).delta["p"]

    assert torch.equal(decoded, parameter.detach())
    assert not decoded.requires_grad


def test_decoding_makes_one_copy_the_tensor_lives_in_the_bytes_msgpack_returned(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: record the body msgpack hands to the decoder, so we know where its bytes objects live
    unpacked_bodies: list[dict[str, Any]] = []
    real_unpackb = msgpack.unpackb

    def recording_unpackb(*args: Any, **kwargs: Any) -> Any:
        body = real_unpackb(*args, **kwargs)
        unpacked_bodies.append(body)
        return body

    delta = {"big.weight": torch.randn(256, 1024), "big.bias": torch.randn(1024)}
    encoded = update_with(delta).encode()
    monkeypatch.setattr(msgpack, "unpackb", recording_unpackb)

    # Execute
    decoded = ModelUpdate.decode(encoded)

    # Assert: each decoded tensor's memory is exactly the buffer of the bytes object msgpack created (its one
    # copy out of the message), not a second copy made by the decoder, and not the message buffer itself
    (body,) = unpacked_bodies
    message_start = np.frombuffer(encoded, dtype=np.uint8).ctypes.data
    for name, tensor in decoded.delta.items():
        data = body["delta"][name]["data"]
        assert isinstance(data, bytes)
        data_start = np.frombuffer(data, dtype=np.uint8).ctypes.data
        assert tensor.data_ptr() == data_start, name
        assert tensor.untyped_storage().nbytes() == len(data) == tensor.numel() * tensor.element_size()
        assert not message_start <= tensor.data_ptr() < message_start + len(encoded)


def test_decoded_tensors_keep_their_memory_alive_after_the_message_is_dropped() -> None:
    # Prepare
    delta = {"w": torch.randn(64, 64)}
    encoded = update_with(delta).encode()

    # Execute: drop the message and the unpacked body, then churn the allocator over the freed memory
    decoded = ModelUpdate.decode(encoded)
    del encoded
    gc.collect()
    churn = [bytes([index % 251]) * 16_384 for index in range(64)]

    # Assert: the tensor holds a reference to its bytes object, so its values are intact
    assert torch.equal(decoded.delta["w"], delta["w"])
    assert len(churn) == 64


# ------------------------------------------------------------------------------------------------ size limits


def test_message_above_the_byte_limit_is_refused_before_unpacking() -> None:
    # Prepare: not even msgpack, so only a check made before unpacking can produce MessageTooLarge
    garbage = b"\xc1" * 101
    limits = DecodeLimits(max_message_bytes=100)

    # Execute
    caught = rejection(ModelUpdate, garbage, limits)

    # Assert
    assert caught.type is MessageTooLarge
    assert "101 bytes" in str(caught.value)
    assert "limit of 100" in str(caught.value)


def test_the_byte_limit_is_inclusive() -> None:
    encoded = sample_messages()[1].encode()

    accepted = ModelUpdate.decode(encoded, DecodeLimits(max_message_bytes=len(encoded)))
    caught = rejection(ModelUpdate, encoded, DecodeLimits(max_message_bytes=len(encoded) - 1))

    assert accepted.site_id == "hospital-a"
    assert caught.type is MessageTooLarge


@pytest.mark.parametrize(
    "declared",
    [
        b"\xc6\xff\xff\xff\xff",  # bin32 of 4 GiB
        b"\xdb\xff\xff\xff\xff",  # str32 of 4 GiB
        b"\xdd\xff\xff\xff\xff",  # array32 of 4 G elements
        b"\xdf\xff\xff\xff\xff",  # map32 of 4 G entries
    ],
    ids=["bin32", "str32", "array32", "map32"],
)
def test_a_huge_declared_but_absent_payload_is_refused_without_allocating_it(declared: bytes) -> None:
    # Prepare: a well-formed update prefix whose delta data claims 4 GiB that never follow
    body_prefix = msgpack.packb({"type": "model-update", "schema_version": SCHEMA_VERSION}, use_bin_type=True)
    small_message = body_prefix[:1].replace(b"\x82", b"\x83") + body_prefix[1:] + b"\xa5delta" + declared
    tracemalloc.start()

    # Execute
    try:
        caught = rejection(ModelUpdate, small_message)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # Assert: refused as malformed, and Python memory never grew towards the declared size
    assert caught.type is MalformedMessage
    assert peak_bytes < 1_000_000


def test_too_many_tensors_are_refused_naming_the_field() -> None:
    encoded = update_with({"a": torch.zeros(1), "b": torch.zeros(1), "c": torch.zeros(1)}).encode()

    caught = rejection(ModelUpdate, encoded, DecodeLimits(max_tensors=2))

    assert caught.type is TensorError
    assert caught.value.field == "delta"
    assert str(caught.value).startswith("delta:")
    assert "limit of 2" in str(caught.value)


# ------------------------------------------------------------------------------------------------ envelope


@pytest.mark.parametrize(
    "bad_bytes, fragment",
    [
        (b"", "not a msgpack message"),
        (b"\xc1", "not a msgpack message"),  # the one byte msgpack never uses
        (b"\x81\xa4type", "not a msgpack message"),  # truncated
        (msgpack.packb({"type": "control"}) + b"\x00", "not a msgpack message"),  # trailing bytes
        (msgpack.packb([1, 2, 3]), "expected a msgpack map"),
        (msgpack.packb("control"), "expected a msgpack map"),
        (msgpack.packb({1: 2}), "not a msgpack message"),  # non-string map keys
    ],
    ids=["empty", "reserved-byte", "truncated", "trailing", "array", "string", "int-keys"],
)
def test_bytes_that_are_not_one_msgpack_map_are_malformed(bad_bytes: bytes, fragment: str) -> None:
    caught = rejection(Control, bad_bytes)

    assert caught.type is MalformedMessage
    assert fragment in str(caught.value)


def test_non_bytes_input_is_malformed() -> None:
    with pytest.raises(MalformedMessage, match="expected bytes, got str"):
        Control.decode("control")  # type: ignore[arg-type]


@pytest.mark.parametrize("version", [0, 1, 2, 4, 999, "3", 3.0, True, None], ids=repr)
def test_unknown_schema_version_is_refused_naming_the_field(version: object) -> None:
    encoded = repack(sample_messages()[2].encode(), lambda body: body.update(schema_version=version))

    caught = rejection(Heartbeat, encoded)

    assert caught.type is UnknownSchemaVersion
    assert caught.value.field == "schema_version"
    assert str(caught.value).startswith("schema_version:")
    assert repr(version) in str(caught.value)


def test_missing_schema_version_is_refused() -> None:
    encoded = repack(sample_messages()[4].encode(), lambda body: body.pop("schema_version"))

    caught = rejection(Control, encoded)

    assert caught.type is UnknownSchemaVersion
    assert caught.value.field == "schema_version"


@pytest.mark.parametrize("message", sample_messages(), ids=message_id)
def test_a_message_decoded_as_another_type_is_refused_naming_both_types(message: Message) -> None:
    for other_type in {type(other) for other in sample_messages()} - {type(message)}:
        caught = rejection(other_type, message.encode())

        assert caught.type is UnknownSchemaVersion
        assert caught.value.field == "type"
        assert repr(other_type.TYPE) in str(caught.value)
        assert repr(message.TYPE) in str(caught.value)


# ------------------------------------------------------------------------------------------------ fields


def top_level_fields(message: Message) -> list[str]:
    return [item.name for item in fields(message) if item.name != "schema_version"]  # type: ignore[arg-type]


MESSAGE_FIELDS = [
    pytest.param(message, name, id=f"{message.TYPE}.{name}")
    for message in sample_messages()
    for name in top_level_fields(message)
]


@pytest.mark.parametrize("message, field_name", MESSAGE_FIELDS)
def test_a_missing_field_is_refused_naming_it(message: Message, field_name: str) -> None:
    encoded = repack(message.encode(), lambda body: body.pop(field_name))

    caught = rejection(type(message), encoded)

    assert caught.type is FieldError
    assert f"missing field(s) [{field_name!r}]" in str(caught.value)


@pytest.mark.parametrize("message", sample_messages(), ids=message_id)
def test_an_extra_field_is_refused_naming_it(message: Message) -> None:
    encoded = repack(message.encode(), lambda body: body.update(priority="high"))

    caught = rejection(type(message), encoded)

    assert caught.type is FieldError
    assert "unexpected field(s) ['priority']" in str(caught.value)


@pytest.mark.parametrize("message, field_name", MESSAGE_FIELDS)
def test_a_field_of_the_wrong_type_is_refused_naming_it(message: Message, field_name: str) -> None:
    # Prepare: a string where anything else is expected, a number where a string is expected
    def swap_type(body: dict[str, Any]) -> None:
        body[field_name] = 12345 if isinstance(body[field_name], str) else "wrong type"

    encoded = repack(message.encode(), swap_type)

    # Execute
    caught = rejection(type(message), encoded)

    # Assert
    expected_type = TensorError if field_name in message.TENSOR_FIELDS else FieldError
    assert caught.type is expected_type
    assert caught.value.field == field_name
    assert str(caught.value).startswith(f"{field_name}:")


@pytest.mark.parametrize(
    "message_index, path, bad_value, field_name",
    [
        (1, ("seq",), True, "seq"),  # bool is not an int on the wire
        (1, ("seq",), -1, "seq"),
        (1, ("num_examples",), 1.5, "num_examples"),
        (1, ("created_at",), math.nan, "created_at"),
        (1, ("created_at",), math.inf, "created_at"),
        (1, ("site_id",), "", "site_id"),
        (1, ("site_id",), "x" * 5000, "site_id"),
        (1, ("metrics", "steps"), "50", "metrics.steps"),
        (1, ("metrics", "seconds"), None, "metrics.seconds"),
        (0, ("training", "learning_rate"), "fast", "training.learning_rate"),
        (0, ("training", "proximal_mu"), "none", "training.proximal_mu"),
        (0, ("training", "local_epochs"), -2, "training.local_epochs"),
        (0, ("fingerprint", "task"), b"heart", "fingerprint.task"),
        (0, ("incarnation",), -1, "incarnation"),
        (0, ("incarnation",), True, "incarnation"),
        (0, ("incarnation",), 1.5e18, "incarnation"),
        (0, ("fingerprint",), {"task": "t"}, "fingerprint"),
        (3, ("metrics", "accuracy"), "high", "metrics['accuracy']"),
        (3, ("metrics",), {"": 1.0}, "metrics key"),
        (3, ("metrics",), [0.5], "metrics"),
        (2, ("timestamp",), [1.0], "timestamp"),
        (4, ("reason",), None, "reason"),
    ],
    ids=lambda value: repr(value)[:30],
)
def test_a_bad_nested_or_out_of_range_value_is_refused_naming_its_path(
    message_index: int, path: tuple[str, ...], bad_value: object, field_name: str
) -> None:
    message = sample_messages()[message_index]

    def set_value(body: dict[str, Any]) -> None:
        target = body
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = bad_value

    caught = rejection(type(message), repack(message.encode(), set_value))

    assert caught.type is FieldError
    assert caught.value.field == field_name
    assert str(caught.value).startswith(f"{field_name}:")


@pytest.mark.parametrize(
    "message_index, field_name, bad_value",
    [(2, "state", "sleeping"), (2, "state", 1), (4, "command", "reboot"), (4, "command", None)],
)
def test_a_bad_enum_value_is_refused_naming_the_field_and_the_allowed_values(
    message_index: int, field_name: str, bad_value: object
) -> None:
    message = sample_messages()[message_index]
    encoded = repack(message.encode(), lambda body: body.update({field_name: bad_value}))

    caught = rejection(type(message), encoded)

    assert caught.type is FieldError
    assert caught.value.field == field_name
    assert repr(bad_value) in str(caught.value)
    allowed = "idle" if field_name == "state" else "resume"
    assert allowed in str(caught.value)


@pytest.mark.parametrize(
    "update_id", ["not-a-uuid", "", "1234", UPDATE_ID + "0", UPDATE_ID.replace("8", "g", 1)], ids=repr
)
def test_a_non_uuid_update_id_is_refused_naming_the_field(update_id: str) -> None:
    encoded = repack(sample_messages()[1].encode(), lambda body: body.update(update_id=update_id))

    caught = rejection(ModelUpdate, encoded)

    assert caught.type is FieldError
    assert caught.value.field == "update_id"
    assert "expected a UUID" in str(caught.value)


def test_a_new_update_id_is_a_uuid_that_decodes() -> None:
    fresh = ModelUpdate.new_id()
    encoded = repack(update_with({}).encode(), lambda body: body.update(update_id=fresh))

    decoded = ModelUpdate.decode(encoded)

    assert decoded.update_id == fresh
    assert fresh != ModelUpdate.new_id()


# ------------------------------------------------------------------------------------------------ tensors


def encoded_update_with_tensor(tensor_map: dict[str, Any]) -> bytes:
    """A valid update whose single delta tensor is replaced by a hand-written tensor map."""
    encoded = update_with({"fc.weight": torch.zeros(1)}).encode()
    return repack(encoded, lambda body: body.update(delta={"fc.weight": tensor_map}))


@pytest.mark.parametrize(
    "tensor_map, field_suffix, fragment",
    [
        ({"dtype": "float32", "shape": [3], "data": b"\x00" * 8}, "data", "needs 12 bytes, got 8"),
        ({"dtype": "float32", "shape": [2, 2], "data": b"\x00" * 20}, "data", "needs 16 bytes, got 20"),
        ({"dtype": "int64", "shape": [], "data": b""}, "data", "needs 8 bytes, got 0"),
        ({"dtype": "complex64", "shape": [1], "data": b"\x00" * 8}, "dtype", "unsupported dtype 'complex64'"),
        ({"dtype": "float8", "shape": [1], "data": b"\x00"}, "dtype", "unsupported dtype"),
        ({"dtype": 5, "shape": [1], "data": b"\x00"}, "dtype", "unsupported dtype 5"),
        ({"dtype": "float32", "shape": [-1], "data": b""}, "shape", "non-negative ints"),
        ({"dtype": "float32", "shape": [1.0], "data": b"\x00" * 4}, "shape", "non-negative ints"),
        ({"dtype": "float32", "shape": [True], "data": b"\x00" * 4}, "shape", "non-negative ints"),
        ({"dtype": "float32", "shape": [1] * 9, "data": b"\x00" * 4}, "shape", "at most 8"),
        ({"dtype": "float32", "shape": "4", "data": b"\x00" * 4}, "shape", "non-negative ints"),
        ({"dtype": "float32", "shape": [0, 2**64 - 1], "data": b""}, "shape", "out of range"),
        ({"dtype": "float32", "shape": [0, 2**62, 2**62], "data": b""}, "shape", "out of range"),
        ({"dtype": "float32", "shape": [1], "data": "abcd"}, "data", "data must be bytes, got str"),
        ({"dtype": "bool", "shape": [2], "data": b"\x01\x02"}, "data", "bytes 0 or 1"),
        ({"dtype": "qint8", "shape": [1], "data": b"\x01"}, "scale", "a scale goes with dtype qint8"),
        ({"dtype": "float32", "shape": [1], "data": b"\x00" * 4, "scale": 1.0}, "scale", "only with it"),
        ({"dtype": "qint8", "shape": [1], "data": b"\x01", "scale": 0.0}, "scale", "positive finite"),
        ({"dtype": "qint8", "shape": [1], "data": b"\x01", "scale": math.nan}, "scale", "positive finite"),
        ({"dtype": "qint8", "shape": [1], "data": b"\x01", "scale": 1}, "scale", "positive finite"),
    ],
    ids=lambda value: repr(value)[:40],
)
def test_a_bad_tensor_is_refused_naming_the_tensor_and_its_part(
    tensor_map: dict[str, Any], field_suffix: str, fragment: str
) -> None:
    caught = rejection(ModelUpdate, encoded_update_with_tensor(tensor_map))

    assert caught.type is TensorError
    assert caught.value.field == f"delta['fc.weight'].{field_suffix}"
    assert str(caught.value).startswith(f"delta['fc.weight'].{field_suffix}:")
    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    "tensor_map",
    [
        {"dtype": "float32", "shape": [1]},
        {"dtype": "float32", "shape": [1], "data": b"\x00" * 4, "device": "cuda"},
        [1.0, 2.0],
    ],
    ids=["missing-data", "extra-key", "not-a-map"],
)
def test_a_tensor_that_is_not_the_documented_map_is_refused_naming_the_tensor(tensor_map: object) -> None:
    encoded = repack(
        update_with({"fc.weight": torch.zeros(1)}).encode(),
        lambda body: body.update(delta={"fc.weight": tensor_map}),
    )

    caught = rejection(ModelUpdate, encoded)

    assert caught.type is TensorError
    assert caught.value.field == "delta['fc.weight']"


@pytest.mark.parametrize("name", ["", b"fc.weight"], ids=repr)
def test_tensor_names_must_be_non_empty_strings(name: object) -> None:
    tensor_map = {"dtype": "float32", "shape": [1], "data": b"\x00" * 4}
    encoded = repack(
        update_with({"fc.weight": torch.zeros(1)}).encode(),
        lambda body: body.update(delta={name: tensor_map}),
    )

    caught = rejection(ModelUpdate, encoded)

    assert caught.type is TensorError
    assert caught.value.field == "delta"


def test_encoding_an_unsupported_dtype_raises_a_tensor_error() -> None:
    with pytest.raises(TensorError, match=r"unsupported dtype torch\.complex64"):
        update_with({"z": torch.zeros(2, dtype=torch.complex64)}).encode()


# ------------------------------------------------------------------------------------------------ non-finite


@pytest.mark.parametrize("bad_value", [math.nan, math.inf, -math.inf], ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_first_non_finite_names_the_first_tensor_holding_nan_or_inf(bad_value: float, dtype: torch.dtype) -> None:
    poisoned = torch.zeros(4, dtype=dtype)
    poisoned[2] = bad_value
    tensors = {"ok": torch.ones(3), "counter": torch.tensor(5), "bad": poisoned, "also.bad": poisoned.clone()}

    found = first_non_finite(ModelUpdate.decode(update_with(tensors).encode()).delta)

    assert found == "bad"


def test_first_non_finite_is_none_for_finite_and_integer_tensors() -> None:
    tensors = {"w": torch.randn(5), "steps": torch.tensor([2**62]), "mask": torch.tensor([True]), "e": torch.ones(0)}

    assert first_non_finite(tensors) is None


# ------------------------------------------------------------------------------------------------ compression


def large_delta() -> Params:
    generator = torch.Generator().manual_seed(7)
    return {
        "conv.weight": torch.randn(64, 64, 3, 3, generator=generator),
        "fc.weight": torch.randn(512, 1000, generator=generator) * 0.01,
        "fc.bias": torch.randn(1000, generator=generator),
    }


def test_float16_compression_halves_the_size_within_float16_precision() -> None:
    delta = large_delta()
    update = update_with(delta)

    plain = update.encode()
    compressed = update.encode("float16")
    decoded = ModelUpdate.decode(compressed).delta

    assert len(plain) / raw_size(delta) <= 1.01
    assert len(compressed) / raw_size(delta) == pytest.approx(0.5, abs=0.01)
    for name, tensor in delta.items():
        assert decoded[name].dtype == torch.float16
        assert torch.equal(decoded[name], tensor.to(torch.float16))
        assert torch.allclose(decoded[name].float(), tensor, rtol=2**-11, atol=2**-24)


def test_int8_compression_quarters_the_size_with_error_at_most_half_a_step() -> None:
    delta = large_delta()
    update = update_with(delta)

    compressed = update.encode("int8")
    wire_scales = {name: item["scale"] for name, item in msgpack.unpackb(compressed)["delta"].items()}
    decoded = ModelUpdate.decode(compressed).delta

    assert len(compressed) / raw_size(delta) == pytest.approx(0.25, abs=0.01)
    for name, tensor in delta.items():
        scale = wire_scales[name]
        assert scale == pytest.approx(float(tensor.abs().max()) / 127, rel=1e-6)
        assert decoded[name].dtype == torch.float32
        error = (decoded[name] - tensor).abs().max().item()
        assert error <= scale * (0.5 + 1e-4)  # half a step, plus float32 rounding


def test_compression_leaves_integer_tensors_exact() -> None:
    delta = {"counter": torch.tensor([1, 2, 3]), "mask": torch.tensor([True, False])}

    for compression in ("float16", "int8"):
        decoded = ModelUpdate.decode(update_with(delta).encode(compression)).delta
        assert_tensors_identical(delta, decoded)


def test_int8_compression_keeps_non_finite_values_visible() -> None:
    # A diverged site must not have its NaN quantised into an ordinary number.
    poisoned = torch.tensor([1.0, math.nan, -2.0])
    delta = {"fine": torch.tensor([0.5, -0.5]), "poisoned": poisoned}

    decoded = ModelUpdate.decode(update_with(delta).encode("int8")).delta

    assert first_non_finite(decoded) == "poisoned"
    assert torch.equal(bit_pattern(decoded["poisoned"]), bit_pattern(poisoned))


def test_int8_compression_of_all_zero_and_tiny_tensors() -> None:
    delta = {"zeros": torch.zeros(3), "tiny": torch.tensor([1e-45, -3e-40, 0.0])}

    decoded = ModelUpdate.decode(update_with(delta).encode("int8")).delta

    assert torch.equal(decoded["zeros"], delta["zeros"])
    assert first_non_finite(decoded) is None
    assert (decoded["tiny"] - delta["tiny"]).abs().max().item() <= torch.finfo(torch.float32).tiny


def test_an_unknown_compression_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown compression 'zstd'"):
        update_with({"counter": torch.tensor([1])}).encode("zstd")
