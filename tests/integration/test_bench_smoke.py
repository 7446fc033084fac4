"""Tiny runs of the broker-backed benchmarks, to keep the scripts working. No timing is asserted: each test
checks that a benchmark runs end to end against a real RabbitMQ node and writes a readable section.

The benchmarks share one node under ``<state dir>/bench`` (``--keep-broker``); this module stops it at the end.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.errors import BrokerError
from broker.node import LocalNode
from fedmq.cli import main


@pytest.fixture(scope="module")
def bench_state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    state_dir = tmp_path_factory.mktemp("bench-state")
    yield state_dir
    with contextlib.suppress(BrokerError):
        LocalNode.from_state_dir(state_dir / "bench").stop()


def _bench(state_dir: Path, doc: Path, *arguments: str) -> int:
    return main(["--state-dir", str(state_dir), "bench", *arguments, "--doc", str(doc), "--keep-broker"])


def assert_plot_linked(doc: Path, name: str) -> None:
    """The benchmark drew its plot (a PNG) next to the markdown file and linked it from its section."""
    assert (doc.parent / name).read_bytes().startswith(b"\x89PNG")
    assert f"]({name})" in doc.read_text()


def test_throughput_compares_the_coordinator_with_a_bare_consumer(
    bench_state: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    doc = tmp_path / "BENCHMARKS.md"

    # Execute
    exit_code = _bench(
        bench_state,
        doc,
        "throughput",
        "--sizes",
        "20000",
        "--budget-mb",
        "0.1",
        "--sites",
        "2",
        "--split-cycles",
        "1",
        "--repeats",
        "1",
    )

    # Assert
    output = capsys.readouterr().out
    assert exit_code == 0
    assert "coordinator / raw" in output
    row = next(line for line in output.splitlines() if line.startswith("| 20,000 |") and "rejected" not in line)
    assert len(row.split("|")) > 10
    section = doc.read_text()
    assert "## Coordinator throughput" in section
    assert "bottleneck" in section
    assert_plot_linked(doc, "bench_throughput.png")


def test_scale_measures_one_coordinator_against_each_site_count(
    bench_state: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = tmp_path / "BENCHMARKS.md"

    exit_code = _bench(
        bench_state, doc, "scale", "--sites", "2,3", "--updates", "12", "--params", "5000", "--repeats", "1"
    )

    output = capsys.readouterr().out
    assert exit_code == 0
    rows = [line for line in output.splitlines() if line.startswith(("| 2 |", "| 3 |"))]
    assert len(rows) == 2
    assert all(" 12 " in row and "rejected" not in row for row in rows)
    assert "## Scale" in doc.read_text()
    assert_plot_linked(doc, "bench_scale.png")


def test_wire_counts_the_bytes_a_site_sends_per_update(
    bench_state: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = tmp_path / "BENCHMARKS.md"

    exit_code = _bench(bench_state, doc, "wire", "--tasks", "none", "--models", "heart-disease,image-cnn")

    output = capsys.readouterr().out
    assert exit_code == 0
    ratios = {}
    for line in output.splitlines():
        if line.startswith("| image-cnn |"):
            cells = [cell.strip() for cell in line.split("|")]
            ratios[cells[3]] = float(cells[7])  # compression -> wire / raw
    assert ratios["none"] > ratios["float16"] > ratios["int8"]
    assert ratios["none"] > 1.0  # the envelope and the AMQP framing are counted too
    assert "## Wire" in doc.read_text()
    assert_plot_linked(doc, "bench_wire.png")


def test_straggler_runs_a_real_federation_and_scores_its_models(
    bench_state: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = tmp_path / "BENCHMARKS.md"

    exit_code = _bench(bench_state, doc, "straggler", "--seeds", "0", "--budget", "4", "--systems", "fedbuff")

    output = capsys.readouterr().out
    assert exit_code == 0
    row = next(line for line in output.splitlines() if line.startswith("| fedmq FedBuff |"))
    final_pooled = float(row.split("|")[5])
    assert 0.0 < final_pooled <= 1.0
    assert "Runs that failed" not in output
    assert "## Straggler" in doc.read_text()
    assert_plot_linked(doc, "bench_straggler.png")


def test_poisoning_runs_an_attacker_through_the_real_broker_and_reports_the_worst_drop(
    bench_state: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = tmp_path / "BENCHMARKS.md"

    exit_code = _bench(bench_state, doc, "poisoning", "--quick")

    output = capsys.readouterr().out
    assert exit_code == 0
    row = next(line for line in output.splitlines() if line.startswith("| sign-flip:10 |"))
    assert 0.0 < float(row.split("|")[2]) <= 1.0
    assert output.strip().splitlines()[-1].startswith("worst-case accuracy drop with the defaults: ")
    assert "## Poisoning" in doc.read_text()
    assert_plot_linked(doc, "bench_poisoning.png")
