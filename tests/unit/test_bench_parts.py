"""The benchmarks' broker-free parts: the markdown writer, the stamped update bodies, the time-to-accuracy
bookkeeping, the generated image file, and the in-process coordinator split (a smoke run: no timing asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.harness import replace_section
from benchmarks.heart import Scores
from benchmarks.straggler import RunResult, ScoredModel, summarise
from benchmarks.synthetic import FIRST_SEQ, UpdateTemplate, model_tensors
from benchmarks.wire import IMAGE_CLASSES, IMAGE_SITES, write_medmnist_like
from broker.transport import Delivery
from coordinator.validation import DuplicateFilter, ValidUpdate, validate_update
from fedmq.cli import main
from schemas import DecodeLimits, ModelUpdate
from tasks.image_cnn import ImageCnnTask


def test_a_rerun_replaces_only_its_own_section_of_the_benchmarks_file(tmp_path: Path) -> None:
    # Prepare
    doc = tmp_path / "docs" / "BENCHMARKS.md"
    replace_section(doc, "alpha", "## Alpha\nfirst run")
    replace_section(doc, "beta", "## Beta\nonly run")

    # Execute
    replace_section(doc, "alpha", "## Alpha\nsecond run")

    # Assert
    text = doc.read_text()
    assert text.startswith("# fedmq benchmarks")
    assert "second run" in text and "first run" not in text
    assert "only run" in text
    assert text.index("## Alpha") < text.index("## Beta")


def test_stamped_update_bodies_are_distinct_valid_updates_in_seq_order() -> None:
    params = model_tensors(5000)
    template = UpdateTemplate("site-1", {name: tensor.shape for name, tensor in params.items()})

    bodies = [template.body(index) for index in range(3)]

    decoded = [ModelUpdate.decode(body) for _, body in bodies]
    assert [update.update_id for update in decoded] == [update_id for update_id, _ in bodies]
    assert len({update.update_id for update in decoded}) == 3
    assert [update.seq for update in decoded] == [FIRST_SEQ, FIRST_SEQ + 1, FIRST_SEQ + 2]
    duplicates = DuplicateFilter()
    for index, (_, body) in enumerate(bodies):
        checked = validate_update(
            Delivery(body=body, routing_key="site.site-1.update", delivery_tag=index, user_id="site-1"),
            known_sites=("site-1",),
            model=params,
            version=0,
            max_staleness=10,
            max_norm=1e6,
            duplicates=duplicates,
            limits=DecodeLimits(),
        )
        assert isinstance(checked, ValidUpdate)
        duplicates.remember(checked.update)


def _run(system: str, seed: int, pooled_over_time: list[tuple[float, float]], budget: float = 10.0) -> RunResult:
    result = RunResult(system, seed, budget, launched_at=90.0, first_model_at=100.0, sites_ready_at=99.0)
    result.models = [
        ScoredModel(100.0 + seconds, version, Scores(pooled, pooled - 0.05, {}))
        for version, (seconds, pooled) in enumerate(pooled_over_time)
    ]
    return result


def test_time_to_target_and_final_accuracy_count_only_models_within_the_budget() -> None:
    result = _run("fedbuff", 0, [(0.0, 0.5), (2.0, 0.74), (3.5, 0.76), (9.0, 0.73), (12.0, 0.80)])

    assert result.time_to(0.75, "pooled") == pytest.approx(3.5)
    assert result.time_to(0.70, "mean") == pytest.approx(3.5)
    assert result.time_to(0.79, "pooled") is None  # reached only after the budget
    final = result.final()
    assert final is not None and final.pooled == pytest.approx(0.73)
    assert result.startup_seconds == pytest.approx(10.0)


def test_a_seed_that_never_reaches_the_target_counts_as_the_budget_in_the_median() -> None:
    results = [
        _run("fedavg-sync", 0, [(0.0, 0.5), (4.0, 0.76)]),
        _run("fedavg-sync", 1, [(0.0, 0.5), (6.0, 0.70)]),
        _run("fedavg-sync", 2, [(0.0, 0.5), (8.0, 0.71)]),
    ]

    summary = summarise(results, "fedavg-sync")

    assert summary.runs == 3
    assert summary.reached_pooled == 1
    assert summary.time_to_pooled == pytest.approx(10.0)


def test_the_generated_image_file_loads_as_a_medmnist_task_for_every_site(tmp_path: Path) -> None:
    npz = write_medmnist_like(tmp_path / "images.npz", train=200, test=80)
    task = ImageCnnTask(num_classes=IMAGE_CLASSES)
    options = {"npz": str(npz), "sites": list(IMAGE_SITES)}

    shares = [task.load_data(site, options) for site in IMAGE_SITES]

    assert sum(share.num_train for share in shares) == 200
    assert sum(share.num_test for share in shares) == 80
    assert shares[0].train_features.shape[1:] == (1, 28, 28)
    assert set(shares[0].train_labels.tolist()) <= set(range(IMAGE_CLASSES))


def test_the_in_process_split_prints_every_phase_as_a_ratio_to_an_add(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exit_code = main(
        [
            "--state-dir",
            str(tmp_path),
            "bench",
            "throughput",
            "--sizes",
            "20000",
            "--split-cycles",
            "1",
            "--skip-broker",
            "--no-doc",
        ]
    )

    output = capsys.readouterr().out
    assert exit_code == 0
    rows = [line for line in output.splitlines() if line.startswith("| 20,000 |")]
    assert rows, output
    assert all(row.count(" ms = ") == 7 for row in rows)  # five phases, the total and the packed checkpoint
    # one row per torch thread count, each naming its costliest phase
    bottlenecks = [row.strip("|").split("|")[-2].strip() for row in rows]
    assert set(bottlenecks) <= {"decode", "validate", "aggregate", "checkpoint", "other"}, rows


def test_poisoning_reads_rejections_and_anomaly_scores_from_the_audit_log_and_finds_the_worst_drop(
    tmp_path: Path,
) -> None:
    import json

    from benchmarks.poisoning import PoisonRun, audit_figures, drop, worst_drop

    audit = tmp_path / "audit.jsonl"
    records = [
        {
            "kind": "update",
            "site": "a",
            "outcome": "accepted",
            "detail": "norm clipped to 1 (x0.5); anomaly score -0.800",
        },
        {"kind": "update", "site": "a", "outcome": "accepted", "detail": "anomaly score -0.600"},
        {"kind": "update", "site": "b", "outcome": "rejected", "reason": "stale", "detail": ""},
        {"kind": "eval", "site": "b"},
    ]
    audit.write_text("".join(json.dumps(record) + "\n" for record in records))
    runs = [
        PoisonRun("clean", "on", 0, pooled=0.78),
        PoisonRun("clean", "on", 1, pooled=0.80),
        PoisonRun("sign-flip:1", "on", 0, pooled=0.70),
        PoisonRun("sign-flip:1", "on", 1, pooled=0.78),
        PoisonRun("scale:10", "on", 0, pooled=0.77),
    ]

    rejected, anomaly = audit_figures(audit)

    assert rejected == {"b:stale": 1}
    assert anomaly == pytest.approx({"a": -0.7})
    assert drop(runs, "sign-flip:1", "on") == pytest.approx(0.05)  # median of 0.08 and 0.02
    assert worst_drop(runs, ["sign-flip:1", "scale:10"]) == (pytest.approx(0.05), "sign-flip:1")
