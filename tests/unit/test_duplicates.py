"""The duplicate filter: which updates were applied, exactly, whatever order they come in (no broker, no disk)."""

from __future__ import annotations

from dataclasses import replace

import torch

from coordinator.validation import DuplicateFilter
from schemas import ModelUpdate, TrainingMetrics


def update(seq: int, site: str = "a", update_id: str | None = None) -> ModelUpdate:
    return ModelUpdate(
        update_id=update_id or ModelUpdate.new_id(),
        site_id=site,
        seq=seq,
        base_version=0,
        num_examples=1,
        delta={"w": torch.zeros(1)},
        metrics=TrainingMetrics(loss=0.0, steps=1, seconds=0.0),
    )


def test_an_older_seq_never_applied_is_not_a_duplicate_after_newer_ones() -> None:
    # Prepare
    duplicates = DuplicateFilter()
    older, newer = update(3), [update(seq) for seq in (4, 5, 6)]

    # Execute
    for applied in newer:
        duplicates.remember(applied)

    # Assert: 3 may still be applied; copies of 4-6 are copies; a new id on seq 5 is a replay
    assert duplicates.is_duplicate(older) is None
    assert all(duplicates.applied_copy(applied) for applied in newer)
    forged = update(5)
    assert not duplicates.applied_copy(forged) and "seq 5 was applied before" in str(duplicates.is_duplicate(forged))
    same_id_other_seq = replace(newer[0], seq=9)
    assert not duplicates.applied_copy(same_id_other_seq) and duplicates.is_duplicate(same_id_other_seq)


def test_the_floor_climbs_over_applied_and_refused_seqs_and_keeps_nothing_for_an_orderly_site() -> None:
    # Prepare
    duplicates = DuplicateFilter()

    # Execute: seqs 1-10 in order, 7 refused
    for seq in range(1, 11):
        if seq == 7:
            duplicates.settle_refused(update(seq))
        else:
            duplicates.remember(update(seq))

    # Assert
    state = duplicates.state_dict()["sites"]
    assert state == {"a": {"floor": 10, "applied_seqs": [], "applied_ids": [], "refused": []}}  # type: ignore[comparison-overlap]
    assert "at or below the site's settled seq 10" in str(duplicates.is_duplicate(update(7)))


def test_a_gap_holds_the_floor_until_open_seqs_are_settled_above_it() -> None:
    # Prepare: seq 2 never arrives
    duplicates = DuplicateFilter(open_seqs=3)
    duplicates.remember(update(1))

    # Execute
    for seq in (3, 4, 5):
        duplicates.remember(update(seq))
    held = duplicates.is_duplicate(update(2))
    duplicates.remember(update(6))

    # Assert: 2 could still be applied while 3 seqs were open above it; with a 4th, the floor passed it
    assert held is None
    assert duplicates.is_duplicate(update(2)) is not None
    assert duplicates.state_dict()["sites"]["a"]["floor"] == 6  # type: ignore[index]


def test_the_state_survives_a_round_trip_and_an_older_checkpoint_form_is_read() -> None:
    # Prepare
    duplicates = DuplicateFilter()
    applied = [update(seq) for seq in (1, 3)]
    for each in applied:
        duplicates.remember(each)

    # Execute
    restored = DuplicateFilter()
    restored.load_state_dict(duplicates.state_dict())
    older = DuplicateFilter()
    older.load_state_dict({"recent_ids": [applied[1].update_id], "last_seq": {"a": 3}})

    # Assert
    assert all(restored.applied_copy(each) for each in applied) and restored.is_duplicate(update(2)) is None
    assert older.applied_copy(applied[1]) and older.is_duplicate(update(2)) is not None
