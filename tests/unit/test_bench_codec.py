"""``fedmq bench codec`` runs end to end and prints its ratios (a smoke test: no timing is asserted)."""

from __future__ import annotations

import pytest

from benchmarks.codec import resnet18_layer_shapes, synthetic_delta
from fedmq.cli import main
from schemas import raw_size


def test_a_tiny_codec_run_prints_size_and_time_ratios_for_every_compression(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Execute
    exit_code = main(["bench", "codec", "--params", "20000", "--repeat", "2"])

    # Assert
    output = capsys.readouterr().out
    assert exit_code == 0
    assert "ModelUpdate of 20,000 float32 parameters" in output
    assert "encoded/raw" in output
    assert "(enc+dec)/copy" in output
    rows = {line.split()[0]: line.split()[1:] for line in output.splitlines() if line[:1].isalpha()}
    size_ratios = {compression: float(rows[compression][1]) for compression in ("none", "float16", "int8")}
    assert size_ratios["none"] > size_ratios["float16"] > size_ratios["int8"] > 0
    assert all(float(value) > 0 for value in rows["none"])
    assert "without compression: met" in output


def test_bench_alone_lists_the_benchmarks(capsys: pytest.CaptureFixture[str]) -> None:
    exit_code = main(["bench"])

    assert exit_code == 2
    assert "codec" in capsys.readouterr().out


@pytest.mark.parametrize("bad_value", ["0", "-3", "many"])
def test_params_and_repeat_must_be_positive_integers(bad_value: str, capsys: pytest.CaptureFixture[str]) -> None:
    for option in ("--params", "--repeat"):
        with pytest.raises(SystemExit) as exited:
            main(["bench", "codec", option, bad_value])

        assert exited.value.code == 2
        assert option in capsys.readouterr().err


@pytest.mark.parametrize("params", [1, 9408, 10_000, 11_000_000, 12_000_000])
def test_the_synthetic_update_has_exactly_the_requested_float32_parameters(params: int) -> None:
    delta = synthetic_delta(params)

    assert sum(tensor.numel() for tensor in delta.values()) == params
    assert raw_size(delta) == 4 * params
    assert next(iter(delta)) == "conv1.weight"


def test_the_layer_template_is_a_resnet18() -> None:
    total = sum(_numel(shape) for _, shape in resnet18_layer_shapes())

    assert total == 11_689_512  # torchvision's resnet18().parameters()


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
