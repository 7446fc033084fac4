"""The fault campaign's figures (tests/faults/figures.py) from a hand-made audit log."""

from __future__ import annotations

from typing import Any

import pytest

from tests.faults.figures import CampaignFigures, compute_figures, markdown_table


def record(update_id: str | None, outcome: str, reason: str = "", kind: str = "update") -> dict[str, Any]:
    return {"kind": kind, "update_id": update_id, "outcome": outcome, "reason": reason}


def test_every_confirmed_update_accepted_once_is_a_clean_run() -> None:
    # Prepare
    confirmed = {"hospital-a": ["a1", "a2"], "hospital-b": ["b1"]}
    audit = [
        record("a1", "accepted"),
        record("b1", "accepted"),
        record("a2", "accepted"),
        record("a1", "already-applied"),
    ]

    # Execute
    figures = compute_figures(
        "clean", attempted=confirmed, confirmed=confirmed, audit_records=audit, checkpoint_accepted=3
    )

    # Assert
    assert (figures.attempted, figures.confirmed, figures.applied) == (3, 3, 3)
    assert (figures.lost, figures.applied_twice, figures.rejected) == (0, 0, 0)
    assert figures.already_applied == 1
    assert figures.checkpoint_accepted == 3


def test_confirmed_but_only_already_applied_is_lost_and_a_wrong_rejection_is_not() -> None:
    # Prepare: a2 only ever "already-applied" (issue 12: the failed checkpoint), a3 rejected as a duplicate,
    # a4 attempted but never confirmed (its site's connection was cut) and never seen.
    attempted = {"hospital-a": ["a1", "a2", "a3", "a4"]}
    confirmed = {"hospital-a": ["a1", "a2", "a3"]}
    audit = [
        record("a1", "accepted"),
        record("a2", "already-applied"),
        record("a3", "rejected", reason="duplicate"),
        record(None, "rejected", reason="malformed"),
    ]

    # Execute
    figures = compute_figures(
        "faulty",
        attempted=attempted,
        confirmed=confirmed,
        audit_records=audit,
        dead_lettered={"delivery_limit": 2, "duplicate": 1},
    )

    # Assert
    assert (figures.attempted, figures.confirmed, figures.applied) == (4, 3, 1)
    assert figures.lost == 1 and figures.lost_ids == ("a2",)
    assert figures.rejected == 1 and figures.rejected_reasons == {"duplicate": 1}
    assert figures.dead_lettered == 3 and figures.dead_letter_reasons["delivery_limit"] == 2


def test_an_update_accepted_twice_is_counted_and_an_unconfirmed_one_applied_is_not_lost() -> None:
    # Prepare: b1 accepted in two records; b2's confirm never reached the site but the broker had it.
    attempted = {"hospital-b": ["b1", "b2"]}
    confirmed = {"hospital-b": ["b1"]}
    audit = [
        record("b1", "accepted"),
        record("b2", "accepted"),
        record("b1", "accepted"),
        record(None, "accepted", kind="evaluation"),
    ]

    # Execute
    figures = compute_figures("twice", attempted=attempted, confirmed=confirmed, audit_records=audit)

    # Assert
    assert figures.applied == 2 and figures.applied_twice == 1
    assert figures.unconfirmed_applied == 1 and figures.lost == 0


def test_the_table_has_one_row_per_case() -> None:
    rows = [CampaignFigures("a", 10, 10, 10, 0, 0), CampaignFigures("b", 5, 4, 3, 1, 0, chain_ok=False)]

    table = markdown_table(rows).splitlines()

    assert len(table) == 4
    assert table[3].startswith("| b | 5 | 4 | 3 | 1 | 0 |") and "broken" in table[3]


def seq_record(site: str, seq: int, update_id: str, outcome: str, reason: str = "") -> dict[str, Any]:
    return {"kind": "update", "site": site, "seq": seq, "update_id": update_id, "outcome": outcome, "reason": reason}


def test_a_killed_agents_unconfirmed_update_is_counted_apart_and_a_reused_seq_is_caught() -> None:
    # Prepare: a real agent's ids are "<site>:<seq>". Seq 3 was drawn but never confirmed (killed while training),
    # seq 4 was applied though the agent died before its confirm, seq 2 came twice under two update ids (a reused seq)
    attempted = {"cleveland": ["cleveland:1", "cleveland:2", "cleveland:3", "cleveland:4"]}
    confirmed = {"cleveland": ["cleveland:1", "cleveland:2"]}
    audit = [
        seq_record("cleveland", 1, "u1", "accepted"),
        seq_record("cleveland", 2, "u2", "accepted"),
        seq_record("cleveland", 2, "u2-again", "rejected", reason="duplicate"),
        seq_record("cleveland", 4, "u4", "accepted"),
    ]

    # Execute
    figures = compute_figures(
        "agent", attempted=attempted, confirmed=confirmed, audit_records=audit, identify_by="seq", agent_kills=2
    )

    # Assert
    assert (figures.attempted, figures.confirmed, figures.applied) == (4, 2, 3)
    assert (figures.lost, figures.applied_twice, figures.rejected) == (0, 0, 0)
    assert (figures.unconfirmed_at_kill, figures.unconfirmed_applied) == (1, 1)
    assert figures.seq_reused == 1
    assert figures.agent_kills == 2


def test_a_restore_undoes_updates_without_losing_them_and_queued_ones_are_not_lost() -> None:
    # Prepare: a1 was in the backup (kept), a2 applied after the backup (undone by the restore, absent from the
    # restored audit log), a3 rejected after the restore, a4 still queued after the run ended, a5 simply missing
    confirmed = {"hospital-a": ["a1", "a2", "a3", "a4", "a5"]}
    audit = [record("a1", "accepted"), record("a3", "rejected", reason="malformed")]

    # Execute
    figures = compute_figures(
        "restore",
        attempted=confirmed,
        confirmed=confirmed,
        audit_records=audit,
        undone=["a2"],
        kept=["a1"],
        queued=["a4"],
    )

    # Assert
    assert (figures.kept_by_restore, figures.undone_by_restore, figures.queued_after_end) == (1, 1, 1)
    assert figures.rejected == 1 and figures.rejected_reasons == {"malformed": 1}
    assert figures.lost == 1 and figures.lost_ids == ("a5",)


def test_identify_by_takes_only_update_id_or_seq() -> None:
    with pytest.raises(ValueError, match="identify_by"):
        compute_figures("x", attempted={}, confirmed={}, audit_records=[], identify_by="hash")
