"""The audit trail: a hash chain a reviewer can check with ``fedmq audit verify``, and that survives a crash."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from coordinator.audit import AuditLog, read_records, record_hash, verify_chain
from fedmq.cli import main


def append(audit: AuditLog, fields: dict[str, Any]) -> dict[str, Any]:
    """Seal and append one record, as the group commit does for a batch of one."""
    record = audit.seal(fields)
    audit.append_sealed(record)
    return record


def write_log(path: Path, count: int = 5) -> None:
    audit = AuditLog(path)
    for number in range(1, count + 1):
        append(audit, {"kind": "update", "site": "a", "update_id": f"u{number}", "outcome": "accepted", "norm": 0.5})
    audit.close()


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


def test_an_untouched_log_verifies(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "audit.jsonl"
    write_log(path)

    # Execute
    report = verify_chain(path)

    # Assert
    assert report.ok
    assert report.records == 5
    assert report.first_broken is None
    assert [record["seq_no"] for record in read_records(path)] == [1, 2, 3, 4, 5]


def test_a_reopened_log_continues_the_chain(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "audit.jsonl"
    write_log(path, 3)

    # Execute
    audit = AuditLog(path)
    record = append(audit, {"kind": "update", "outcome": "rejected", "reason": "stale"})
    audit.close()

    # Assert
    assert record["seq_no"] == 4
    assert verify_chain(path).ok
    assert verify_chain(path).records == 4


def edit_a_field(log: list[str]) -> list[str]:
    record = json.loads(log[2])
    record["outcome"] = "rejected"
    return [*log[:2], json.dumps(record, sort_keys=True) + "\n", *log[3:]]


def delete_a_line(log: list[str]) -> list[str]:
    return [*log[:1], *log[2:]]


def reorder_two_lines(log: list[str]) -> list[str]:
    return [*log[:2], log[3], log[2], *log[4:]]


def rehash_an_edited_record(log: list[str]) -> list[str]:
    """A forger who recomputes the edited record's own hash still breaks the next record's prev_hash."""
    record = json.loads(log[1])
    record["outcome"] = "rejected"
    record["hash"] = record_hash(record)
    return [log[0], json.dumps(record, sort_keys=True) + "\n", *log[2:]]


@pytest.mark.parametrize(
    ("tamper", "first_broken", "problem"),
    [
        (edit_a_field, 3, "hash does not match"),
        (delete_a_line, 2, "prev_hash"),
        (reorder_two_lines, 3, "prev_hash"),
        (rehash_an_edited_record, 3, "prev_hash"),
    ],
    ids=["edit", "delete", "reorder", "edit-and-rehash"],
)
def test_tampering_is_reported_at_the_first_broken_record(
    tmp_path: Path, tamper: Callable[[list[str]], list[str]], first_broken: int, problem: str
) -> None:
    # Prepare
    path = tmp_path / "audit.jsonl"
    write_log(path)
    path.write_text("".join(tamper(lines(path))), encoding="utf-8")

    # Execute
    report = verify_chain(path)

    # Assert
    assert not report.ok
    assert report.first_broken == first_broken
    assert report.records == first_broken - 1
    assert problem in report.problem


def test_a_line_that_is_not_json_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 3)
    path.write_text("".join([*lines(path)[:2], "{not json\n"]), encoding="utf-8")

    report = verify_chain(path)

    assert (report.ok, report.first_broken) == (False, 3)
    assert "not JSON" in report.problem


def test_a_torn_last_line_is_dropped_on_open_and_the_chain_goes_on(tmp_path: Path) -> None:
    # Prepare: a crash in the middle of writing the fourth record
    path = tmp_path / "audit.jsonl"
    write_log(path, 3)
    with path.open("a", encoding="utf-8") as handle:
        handle.write('{"kind": "update", "seq_no": 4, "outc')
    assert not verify_chain(path).ok

    # Execute
    audit = AuditLog(path)
    append(audit, {"kind": "update", "update_id": "u4", "outcome": "accepted"})
    audit.close()

    # Assert
    report = verify_chain(path)
    assert report.ok
    assert report.records == 4
    assert [record["update_id"] for record in read_records(path)] == ["u1", "u2", "u3", "u4"]


def test_a_record_sealed_against_an_old_head_is_refused(tmp_path: Path) -> None:
    # Prepare
    audit = AuditLog(tmp_path / "audit.jsonl")
    sealed = audit.seal({"kind": "update"})
    append(audit, {"kind": "update"})

    # Execute / Assert
    with pytest.raises(ValueError, match="another chain head"):
        audit.append_sealed(sealed)
    audit.close()
    assert verify_chain(tmp_path / "audit.jsonl").records == 1


def test_audit_verify_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    intact = tmp_path / "intact.jsonl"
    write_log(intact)
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_text("".join(reorder_two_lines(lines(intact))), encoding="utf-8")
    state_dir = ["--state-dir", str(tmp_path / "state")]

    # Execute / Assert: intact
    assert main([*state_dir, "audit", "verify", str(intact)]) == 0
    assert "OK: 5 records" in capsys.readouterr().out

    # ... tampered: the first broken record is named
    assert main([*state_dir, "audit", "verify", str(tampered)]) == 1
    assert "BROKEN at record 3" in capsys.readouterr().out

    # ... missing file
    assert main([*state_dir, "audit", "verify", str(tmp_path / "missing.jsonl")]) == 1
    assert "does not exist" in capsys.readouterr().err
