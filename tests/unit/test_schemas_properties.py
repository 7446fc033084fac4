"""Property tests of the tensor codec: any supported tensor comes back bit for bit (NaN payloads included)."""

from __future__ import annotations

import math

import msgpack
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import ModelUpdate, TrainingMetrics
from schemas.tensors import DTYPES, decode_tensor, encode_tensor

CODEC_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FLOAT_DTYPES = sorted(name for name, dtype in DTYPES.items() if dtype.is_floating_point)
SHAPES = st.lists(st.integers(min_value=0, max_value=5), min_size=0, max_size=4).map(tuple)


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@st.composite
def raw_tensors(draw: st.DrawFn) -> torch.Tensor:
    """Any bit pattern of any supported dtype: floats hit NaN (signalling too), inf, subnormals and -0."""
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    shape = draw(SHAPES)
    numel = math.prod(shape)
    if dtype == torch.bool:
        return torch.tensor(draw(st.lists(st.booleans(), min_size=numel, max_size=numel)), dtype=torch.bool).reshape(
            shape
        )
    data = draw(st.binary(min_size=numel * element_size(dtype), max_size=numel * element_size(dtype)))
    return (
        torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape).clone()
        if numel
        else torch.empty(shape, dtype=dtype)
    )


@st.composite
def float_value_tensors(draw: st.DrawFn) -> torch.Tensor:
    """Floating-point tensors built from values, so NaN and +/-inf turn up often rather than by chance."""
    dtype = DTYPES[draw(st.sampled_from(FLOAT_DTYPES))]
    shape = draw(SHAPES)
    numel = math.prod(shape)
    values = draw(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=numel, max_size=numel))
    return torch.tensor(values, dtype=torch.float32).to(dtype).reshape(shape)


@st.composite
def maybe_non_contiguous(draw: st.DrawFn, tensors: st.SearchStrategy[torch.Tensor]) -> torch.Tensor:
    """The same values, sometimes seen through a transposed or flipped view."""
    tensor = draw(tensors)
    if tensor.dim() >= 2 and draw(st.booleans()):
        return tensor.transpose(0, tensor.dim() - 1)
    if tensor.dim() >= 1 and draw(st.booleans()):
        return tensor.flip(0)
    return tensor


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def round_trip(tensor: torch.Tensor, compression: str = "none") -> torch.Tensor:
    packed = msgpack.packb(encode_tensor(tensor, compression), use_bin_type=True)
    return decode_tensor(msgpack.unpackb(packed, raw=False), "t")


def assert_bit_exact(expected: torch.Tensor, actual: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    assert torch.equal(bits(actual), bits(expected))


@CODEC_SETTINGS
@given(maybe_non_contiguous(raw_tensors()))
def test_any_bit_pattern_round_trips_exactly(tensor: torch.Tensor) -> None:
    decoded = round_trip(tensor)

    assert_bit_exact(tensor, decoded)


@CODEC_SETTINGS
@given(maybe_non_contiguous(float_value_tensors()))
def test_floats_with_nan_and_inf_round_trip_exactly(tensor: torch.Tensor) -> None:
    decoded = round_trip(tensor)

    assert_bit_exact(tensor, decoded)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=20), raw_tensors(), max_size=4))
def test_a_whole_update_round_trips_its_tensors_in_order(delta: dict[str, torch.Tensor]) -> None:
    update = ModelUpdate(
        update_id=ModelUpdate.new_id(),
        site_id="hospital-a",
        seq=1,
        base_version=0,
        num_examples=1,
        delta=delta,
        metrics=TrainingMetrics(loss=0.0, steps=1, seconds=0.0),
    )

    decoded = ModelUpdate.decode(update.encode()).delta

    assert list(decoded) == list(delta)
    for name, tensor in delta.items():
        assert_bit_exact(tensor, decoded[name])


@CODEC_SETTINGS
@given(float_value_tensors())
def test_float16_compression_equals_a_float16_cast(tensor: torch.Tensor) -> None:
    decoded = round_trip(tensor, "float16")

    assert_bit_exact(tensor.to(torch.float16), decoded)


@CODEC_SETTINGS
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), max_size=50))
def test_int8_compression_errs_by_at_most_half_a_step(values: list[float]) -> None:
    tensor = torch.tensor(values, dtype=torch.float32)
    encoded = encode_tensor(tensor, "int8")

    decoded = round_trip(tensor, "int8")

    assert decoded.dtype == torch.float32
    assert decoded.shape == tensor.shape
    scale = torch.tensor(encoded["scale"], dtype=torch.float32).item()  # applied in float32
    if tensor.numel():
        error = (decoded - tensor).abs().max().item()
        # half a step, plus float32 rounding of value / scale and q * scale (a few ulps of 127 * scale)
        assert error <= scale * (0.5 + 1e-4) + torch.finfo(torch.float32).tiny
