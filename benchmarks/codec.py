"""``fedmq bench codec``: what the wire format costs compared with copying the same bytes once.

An update shaped like a ResNet-18's layers is encoded and decoded ``repeat`` times per compression; the
medians are printed as ratios to the median time of ``bytes(memoryview(raw))`` over the raw tensor bytes,
measured interleaved in the same run, so the figures compare across machines. Sizes are printed as encoded
bytes / raw float32 tensor bytes (goal without compression: <= 1.01).
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from schemas import Params

# torch and schemas are imported inside the functions that use them: ``fedmq`` builds every subcommand's
# parser at start-up, and importing torch there would slow down every command.

HELP = "encode + decode time and size of a float32 model update, as ratios to a plain copy"
DEFAULT_PARAMS = 11_000_000
DEFAULT_REPEAT = 7
SIZE_RATIO_GOAL = 1.01
ResultT = TypeVar("ResultT")


@dataclass(frozen=True)
class CodecBenchConfig:
    params: int = DEFAULT_PARAMS
    repeat: int = DEFAULT_REPEAT
    seed: int = 0


@dataclass(frozen=True)
class CodecRow:
    """Medians for one compression; ``copy_seconds`` is the shared plain-copy baseline."""

    compression: str
    encode_seconds: float
    decode_seconds: float
    copy_seconds: float
    encoded_bytes: int
    raw_bytes: int

    @property
    def size_ratio(self) -> float:
        return self.encoded_bytes / self.raw_bytes

    @property
    def encode_ratio(self) -> float:
        return self.encode_seconds / self.copy_seconds

    @property
    def decode_ratio(self) -> float:
        return self.decode_seconds / self.copy_seconds

    @property
    def round_trip_ratio(self) -> float:
        return (self.encode_seconds + self.decode_seconds) / self.copy_seconds


@dataclass(frozen=True)
class CodecReport:
    config: CodecBenchConfig
    tensor_count: int
    rows: list[CodecRow]


def resnet18_layer_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """The weight shapes of a ResNet-18 (convolutions, batch norms, classifier), 11.7M parameters."""
    shapes: list[tuple[str, tuple[int, ...]]] = [("conv1.weight", (64, 3, 7, 7))]
    shapes += [("bn1.weight", (64,)), ("bn1.bias", (64,))]
    in_channels = 64
    for stage, channels in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            prefix = f"layer{stage}.{block}"
            block_in = in_channels if block == 0 else channels
            shapes.append((f"{prefix}.conv1.weight", (channels, block_in, 3, 3)))
            shapes += [(f"{prefix}.bn1.weight", (channels,)), (f"{prefix}.bn1.bias", (channels,))]
            shapes.append((f"{prefix}.conv2.weight", (channels, channels, 3, 3)))
            shapes += [(f"{prefix}.bn2.weight", (channels,)), (f"{prefix}.bn2.bias", (channels,))]
            if block == 0 and block_in != channels:
                shapes.append((f"{prefix}.downsample.0.weight", (channels, block_in, 1, 1)))
                shapes += [(f"{prefix}.downsample.1.weight", (channels,)), (f"{prefix}.downsample.1.bias", (channels,))]
        in_channels = channels
    shapes += [("fc.weight", (1000, 512)), ("fc.bias", (1000,))]
    return shapes


def synthetic_delta(params: int, seed: int = 0) -> Params:
    """ResNet-18 layers in order until ``params`` is reached; the last one is cut short (flattened)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    delta: Params = {}
    remaining = params
    for name, shape in resnet18_layer_shapes():
        if remaining <= 0:
            break
        chosen: tuple[int, ...] = shape if math.prod(shape) <= remaining else (remaining,)
        delta[name] = torch.randn(chosen, generator=generator) * 0.01
        remaining -= math.prod(chosen)
    if remaining > 0:
        delta["extra.weight"] = torch.randn(remaining, generator=generator) * 0.01
    return delta


@contextmanager
def _garbage_collector_paused() -> Iterator[None]:
    """As ``timeit`` does: a collection landing inside one sample would dominate it."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _timed(action: Callable[[], ResultT]) -> tuple[float, ResultT]:
    with _garbage_collector_paused():
        started = time.perf_counter()
        result = action()
        elapsed = time.perf_counter() - started
    return elapsed, result


def measure_codec(config: CodecBenchConfig) -> CodecReport:
    """One row per compression, every sample interleaved with a plain-copy sample."""
    from schemas import COMPRESSIONS, ModelUpdate, TrainingMetrics, raw_size

    delta = synthetic_delta(config.params, config.seed)
    raw = b"".join(tensor.numpy().tobytes() for tensor in delta.values())
    update = ModelUpdate(
        update_id=ModelUpdate.new_id(),
        site_id="bench-site",
        seq=1,
        base_version=0,
        num_examples=1000,
        delta=delta,
        metrics=TrainingMetrics(loss=0.5, steps=100, seconds=10.0),
    )
    copy_samples: list[float] = []
    samples: dict[str, tuple[list[float], list[float], int]] = {}
    for compression in COMPRESSIONS:
        ModelUpdate.decode(update.encode(compression))  # warm-up: first-touch page faults, lazy imports
        encode_samples: list[float] = []
        decode_samples: list[float] = []
        encoded_bytes = 0
        for _ in range(config.repeat):
            copy_samples.append(_timed(lambda: bytes(memoryview(raw)))[0])
            encode_seconds, encoded = _timed(partial(update.encode, compression))
            decode_seconds, _ = _timed(partial(ModelUpdate.decode, encoded))
            encode_samples.append(encode_seconds)
            decode_samples.append(decode_seconds)
            encoded_bytes = len(encoded)
            del encoded
        samples[compression] = (encode_samples, decode_samples, encoded_bytes)
    copy_seconds = statistics.median(copy_samples)
    rows = [
        CodecRow(
            compression=compression,
            encode_seconds=statistics.median(encode_samples),
            decode_seconds=statistics.median(decode_samples),
            copy_seconds=copy_seconds,
            encoded_bytes=encoded_bytes,
            raw_bytes=raw_size(delta),
        )
        for compression, (encode_samples, decode_samples, encoded_bytes) in samples.items()
    ]
    return CodecReport(config=config, tensor_count=len(delta), rows=rows)


def format_report(report: CodecReport) -> str:
    """A small aligned table, then the size goal's verdict."""
    rows, config = report.rows, report.config
    raw_bytes = rows[0].raw_bytes
    lines = [
        f"codec benchmark: ModelUpdate of {config.params:,} float32 parameters in {report.tensor_count} tensors "
        f"({raw_bytes / 1e6:.2f} MB raw), median of {config.repeat}",
        f"plain copy of the raw bytes: {rows[0].copy_seconds * 1e3:.2f} ms",
        "",
        f"{'compression':<12}{'encoded MB':>11}{'encoded/raw':>13}{'encode ms':>11}{'decode ms':>11}"
        f"{'encode/copy':>13}{'decode/copy':>13}{'(enc+dec)/copy':>16}",
    ]
    for row in rows:
        lines.append(
            f"{row.compression:<12}{row.encoded_bytes / 1e6:>11.2f}{row.size_ratio:>13.4f}"
            f"{row.encode_seconds * 1e3:>11.2f}{row.decode_seconds * 1e3:>11.2f}"
            f"{row.encode_ratio:>13.2f}{row.decode_ratio:>13.2f}{row.round_trip_ratio:>16.2f}"
        )
    plain = next(row for row in rows if row.compression == "none")
    verdict = "met" if plain.size_ratio <= SIZE_RATIO_GOAL else "NOT met"
    lines += ["", f"goal encoded/raw <= {SIZE_RATIO_GOAL} without compression: {verdict} ({plain.size_ratio:.4f})"]
    return "\n".join(lines)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--params",
        type=_positive_int,
        default=DEFAULT_PARAMS,
        help=f"float32 parameters in the update (default: {DEFAULT_PARAMS:,}, a ResNet-18's worth)",
    )
    parser.add_argument(
        "--repeat",
        type=_positive_int,
        default=DEFAULT_REPEAT,
        help=f"samples per measurement; medians are reported (default: {DEFAULT_REPEAT})",
    )


def run(args: argparse.Namespace) -> int:
    config = CodecBenchConfig(params=args.params, repeat=args.repeat)
    print(format_report(measure_codec(config)))
    return 0
