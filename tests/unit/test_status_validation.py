"""Evaluation reports and heartbeats are checked like updates: refused ones are counted, audited and dead-lettered,
and never reach the evaluation metrics, the book or evaluations.jsonl."""

from __future__ import annotations

import json
import math
from pathlib import Path

import msgpack
import pytest

from broker.topology import REJECT_REASON_HEADER, Kind
from coordinator.config import ValidationSettings
from coordinator.reasons import Reason
from coordinator.status import check_eval_report
from schemas import EvalReport
from tests.unit.test_coordinator_service import fedbuff, start_federation
from tests.unit.test_evaluation_liveness import evaluate, send_status


def eval_report(**overrides: object) -> EvalReport:
    fields: dict[str, object] = {
        "site_id": "a",
        "model_version": 0,
        "num_examples": 10,
        "metrics": {"accuracy": 0.8, "loss": 0.4},
    }
    fields.update(overrides)
    return EvalReport(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"metrics": {"accuracy": 1e9}}, Reason.OUT_OF_RANGE),
        ({"metrics": {"accuracy": -0.1}}, Reason.OUT_OF_RANGE),
        ({"metrics": {"loss": -1.0}}, Reason.OUT_OF_RANGE),
        ({"metrics": {"accuracy": math.nan}}, Reason.NON_FINITE),
        ({"metrics": {"loss": math.inf}}, Reason.NON_FINITE),
        ({"metrics": {"dice": -math.inf}}, Reason.NON_FINITE),
        ({"model_version": 4}, Reason.UNKNOWN_VERSION),
        ({"model_version": 10**15}, Reason.UNKNOWN_VERSION),
        ({"num_examples": 2**64 - 1}, Reason.TOO_MANY_EXAMPLES),
        ({"num_examples": 1_001}, Reason.TOO_MANY_EXAMPLES),
    ],
)
def test_implausible_reports_are_refused_with_their_reason(overrides: dict[str, object], reason: Reason) -> None:
    refusal = check_eval_report(eval_report(**overrides), current_version=3, max_num_examples=1_000)
    assert refusal is not None and refusal.reason == reason


@pytest.mark.parametrize(
    "overrides",
    [{}, {"model_version": 3}, {"metrics": {"accuracy": 0.0, "loss": 0.0, "dice": -2.5}}, {"num_examples": 1_000}],
)
def test_plausible_reports_pass(overrides: dict[str, object]) -> None:
    assert check_eval_report(eval_report(**overrides), current_version=3, max_num_examples=1_000) is None


@pytest.mark.parametrize(
    ("metrics", "version", "reason"),
    [
        ({"accuracy": 1e9, "loss": 0.1}, 0, "out-of-range"),
        ({"accuracy": math.nan, "loss": 0.1}, 0, "non-finite"),
        ({"accuracy": 0.9, "loss": 0.1}, 10**15, "unknown-version"),
    ],
    ids=["accuracy 1e9", "NaN", "future version"],
)
def test_a_refused_report_is_counted_audited_dead_lettered_and_changes_no_evaluation(
    tmp_path: Path, metrics: dict[str, float], version: int, reason: str
) -> None:
    # Prepare: a real evaluation of v0 is on the books
    federation = start_federation(tmp_path, fedbuff())
    evaluate(federation, "b", 0, 30, accuracy=0.6, loss=0.5)
    before = federation.sample("fedmq_eval_global", metric="accuracy", aggregate="pooled")

    # Execute
    evaluate(federation, "a", version, 10, **metrics)

    # Assert
    assert federation.sample("fedmq_status_rejected_total", site="a", kind="eval", reason=reason) == 1
    assert federation.sample("fedmq_eval_global", metric="accuracy", aggregate="pooled") == before == 0.6
    assert federation.sample("fedmq_eval_metric", site="a", metric="accuracy") is None
    (record,) = [record for record in federation.audit() if record["kind"] == "eval"]
    assert (record["site"], record["outcome"], record["reason"]) == ("a", "rejected", reason)
    assert len(record["sha256"]) == 64
    (dead,) = federation.dead_letters()
    assert dead.headers[REJECT_REASON_HEADER] == reason
    rows = [json.loads(line) for line in (tmp_path / "evaluations.jsonl").read_text().splitlines()]
    assert [row["site"] for row in rows] == ["b"]
    assert federation.coordinator.evaluations.for_version(0) is not None
    assert federation.transport.unacked == {}


def test_reports_for_future_versions_do_not_push_real_ones_out_of_the_book(tmp_path: Path) -> None:
    # Prepare
    federation = start_federation(tmp_path, fedbuff())
    evaluate(federation, "b", 0, 30, accuracy=0.6, loss=0.5)

    # Execute: a floods reports of versions that do not exist
    for version in range(1, 120):
        evaluate(federation, "a", version, 10, accuracy=0.9, loss=0.1)

    # Assert
    assert set(federation.coordinator.evaluations.by_version) == {0}
    assert federation.sample("fedmq_status_rejected_total", site="a", kind="eval", reason="unknown-version") == 119


def test_num_examples_above_the_configured_cap_is_refused(tmp_path: Path) -> None:
    federation = start_federation(
        tmp_path, fedbuff(), validation=ValidationSettings(max_update_norm=100.0, max_num_examples=100)
    )

    evaluate(federation, "a", 0, 2**64 - 1, accuracy=1.0, loss=0.0)

    assert federation.sample("fedmq_status_rejected_total", site="a", kind="eval", reason="too-many-examples") == 1
    assert federation.sample("fedmq_eval_global", metric="accuracy", aggregate="pooled") is None


def test_a_malformed_heartbeat_is_counted_audited_and_dead_lettered(tmp_path: Path) -> None:
    federation = start_federation(tmp_path, fedbuff())

    send_status(federation, "a", Kind.HEARTBEAT, b"\xc1 not msgpack")

    assert federation.sample("fedmq_status_rejected_total", site="a", kind="status", reason="malformed") == 1
    (record,) = federation.audit()
    assert (record["kind"], record["reason"]) == ("status", "malformed")
    assert [dead.headers[REJECT_REASON_HEADER] for dead in federation.dead_letters()] == ["malformed"]
    assert federation.sample("fedmq_site_up", site="a") == 0


def test_a_msgpack_bomb_leaves_an_audit_record_and_a_dead_letter_header_of_bounded_size(tmp_path: Path) -> None:
    # Prepare: an "update" of one million keys (about 12 MB once quoted in an error message)
    federation = start_federation(tmp_path, fedbuff(), validation=ValidationSettings(max_update_norm=100.0))
    bomb = msgpack.packb({f"key-{number}": number for number in range(1_000_000)})

    # Execute
    federation.publish("a", bomb)

    # Assert: rejected, and what was written about it is small: the digest, never the contents
    audit_bytes = (tmp_path / "audit.jsonl").stat().st_size
    (record,) = federation.audit()
    assert record["outcome"] == "rejected"
    assert record["bytes"] == len(bomb)
    assert audit_bytes < 4_000
    (dead,) = federation.dead_letters()
    assert len(str(dead.headers)) < 2_000
