"""CheckpointStore: what is on disk after a save, and what a new process reads back after a crash."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch

from coordinator.checkpoint import MANIFEST, TENSOR_DIR, CheckpointError, CheckpointStore, write_file_durably


def tensor_files(directory: Path) -> dict[str, int]:
    """Tensor file name -> modification time in ns."""
    return {path.name: path.stat().st_mtime_ns for path in sorted((directory / TENSOR_DIR).glob("*.bin"))}


def assert_same_state(actual: Any, expected: Any) -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor)
        assert actual.dtype == expected.dtype
        assert actual.shape == expected.shape
        assert torch.equal(actual, expected)
    elif isinstance(expected, dict):
        assert isinstance(actual, dict)
        assert list(actual) == list(expected)
        for key, value in expected.items():
            assert_same_state(actual[key], value)
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, list)
        assert len(actual) == len(expected)
        for actual_item, expected_item in zip(actual, expected, strict=True):
            assert_same_state(actual_item, expected_item)
    else:
        assert actual == expected


def nested_state() -> dict[str, Any]:
    return {
        "version": 7,
        "params": {
            "conv.weight": torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) / 7,
            "conv.bias": torch.tensor([1.5, -2.25], dtype=torch.float64),
            "bn.num_batches_tracked": torch.tensor(12, dtype=torch.int64),
        },
        "history": {"6": {"w": torch.tensor([0.1, 0.2], dtype=torch.bfloat16)}},
        "mixed": [
            torch.tensor([1, -2, 3], dtype=torch.int8),
            torch.tensor([250, 3], dtype=torch.uint8),
            torch.tensor([True, False, True]),
            torch.tensor([0.5], dtype=torch.float16),
            torch.tensor([-7], dtype=torch.int32),
            torch.empty(0, 3),
        ],
        "duplicates": {"recent_ids": ["u1", "u2"], "last_seq": {"a": 3}},
        "started_at": 1.5,
        "label": "run",
        "nothing": None,
    }


def test_a_nested_state_round_trips_through_a_new_store(tmp_path: Path) -> None:
    # Prepare
    state = nested_state()
    CheckpointStore(tmp_path).save(state)

    # Execute
    loaded = CheckpointStore(tmp_path).load()

    # Assert
    assert_same_state(loaded, state)


def test_load_without_a_checkpoint_is_none(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)

    assert store.load() is None
    assert not store.exists


def test_the_same_tensor_twice_in_a_state_is_stored_once(tmp_path: Path) -> None:
    # Prepare: FedAsync's history holds the current params object itself
    params = {"w": torch.ones(3)}
    store = CheckpointStore(tmp_path)

    # Execute
    store.save({"params": params, "history": {"0": params}})

    # Assert
    assert len(tensor_files(tmp_path)) == 1
    loaded = CheckpointStore(tmp_path).load()
    assert loaded is not None
    assert torch.equal(loaded["history"]["0"]["w"], torch.ones(3))


def test_an_unchanged_tensor_is_not_written_again_and_a_replaced_one_is_removed(tmp_path: Path) -> None:
    # Prepare: one save writes all its new tensors into one file
    kept, replaced = torch.ones(4), torch.zeros(4)
    store = CheckpointStore(tmp_path)
    store.save({"model": {"kept": kept, "replaced": replaced}})
    first = tensor_files(tmp_path)
    assert len(first) == 1

    # Execute: the federation logic never edits in place, it makes a new tensor
    newer = replaced + 1
    store.save({"model": {"kept": kept, "replaced": newer}})
    second = tensor_files(tmp_path)
    store.save({"model": {"kept": kept + 1, "replaced": newer}})
    third = tensor_files(tmp_path)

    # Assert: only the new tensor was written (the first file is untouched, one file more); once no entry points
    # into the first file any more, it is gone
    assert set(first) < set(second) and len(second) == 2
    assert all(second[name] == mtime for name, mtime in first.items())
    assert not set(first) & set(third) and len(third) == 2
    loaded = CheckpointStore(tmp_path).load()
    assert loaded is not None
    assert torch.equal(loaded["model"]["replaced"], torch.ones(4))
    assert torch.equal(loaded["model"]["kept"], torch.full((4,), 2.0))


def test_a_tensor_edited_in_place_after_a_save_is_written_again(tmp_path: Path) -> None:
    # Prepare: a tensor saved once, then changed in place (an optimiser step, ``add_``), also through a view
    weight = torch.zeros(4)
    store = CheckpointStore(tmp_path)
    store.save({"params": {"w": weight}})

    # Execute
    weight.add_(1)
    store.save({"params": {"w": weight}})
    after_add = CheckpointStore(tmp_path).load()
    weight[:2].mul_(3)
    store.save({"params": {"w": weight}})
    after_view_edit = CheckpointStore(tmp_path).load()

    # Assert: a new process reads the edited values, not the first save's
    assert after_add is not None and after_view_edit is not None
    assert torch.equal(after_add["params"]["w"], torch.ones(4))
    assert torch.equal(after_view_edit["params"]["w"], torch.tensor([3.0, 3.0, 1.0, 1.0]))


def test_a_loaded_tensor_edited_in_place_is_written_again(tmp_path: Path) -> None:
    # Prepare: a resumed process holds the tensors it loaded
    CheckpointStore(tmp_path).save({"params": {"w": torch.zeros(3)}})
    store = CheckpointStore(tmp_path)
    loaded = store.load()
    assert loaded is not None

    # Execute
    loaded["params"]["w"].add_(2)
    store.save(loaded)

    # Assert
    reloaded = CheckpointStore(tmp_path).load()
    assert reloaded is not None
    assert torch.equal(reloaded["params"]["w"], torch.full((3,), 2.0))


def test_torch_still_counts_in_place_edits_as_the_checkpoint_relies_on() -> None:
    """The checkpoint skips a tensor it wrote before only while ``tensor._version`` (a torch internal) is unchanged.
    If this fails, torch moved that counter: every save then rewrites everything (correct but slow) until
    ``coordinator.checkpoint._edit_count`` reads the new one."""
    # Prepare
    tensor = torch.zeros(4)
    view = tensor[1:3]
    before = tensor._version

    # Execute
    tensor.add_(1)
    after_add = tensor._version
    view.mul_(2)

    # Assert: an int, bumped by every in-place edit of the memory, whether through the tensor or a view of it
    assert isinstance(before, int), "torch.Tensor._version is gone: see coordinator/checkpoint.py"
    assert after_add > before
    assert tensor._version > after_add and view._version == tensor._version


def test_one_save_writes_one_file_however_many_tensors_changed(tmp_path: Path) -> None:
    # Prepare: a model with many tensors, as a ResNet's state has
    state = {"params": {f"layer{index}": torch.full((index + 1,), float(index)) for index in range(60)}}

    # Execute
    CheckpointStore(tmp_path).save(state)
    loaded = CheckpointStore(tmp_path).load()

    # Assert
    assert len(tensor_files(tmp_path)) == 1
    assert loaded is not None
    assert all(torch.equal(loaded["params"][name], tensor) for name, tensor in state["params"].items())


def test_a_restarted_store_does_not_rewrite_what_it_loaded(tmp_path: Path) -> None:
    # Prepare
    CheckpointStore(tmp_path).save(nested_state())
    before = tensor_files(tmp_path)
    store = CheckpointStore(tmp_path)
    loaded = store.load()
    assert loaded is not None

    # Execute: the resumed process checkpoints its state plus one new tensor
    loaded["params"]["new"] = torch.ones(2)
    store.save(loaded)

    # Assert: one file more, all others untouched
    after = tensor_files(tmp_path)
    assert set(before) < set(after)
    assert len(after) == len(before) + 1
    assert all(after[name] == mtime for name, mtime in before.items())


def test_tensor_files_no_checkpoint_mentions_are_removed(tmp_path: Path) -> None:
    # Prepare
    store = CheckpointStore(tmp_path)
    store.save({"buffer": [torch.ones(2), torch.ones(3)]})

    # Execute
    store.save({"buffer": []})

    # Assert
    assert tensor_files(tmp_path) == {}


def test_tensor_files_left_by_a_crash_mid_save_are_removed_on_the_next_load(tmp_path: Path) -> None:
    # Prepare: a save that wrote its tensor file but died before the manifest rename
    CheckpointStore(tmp_path).save({"w": torch.ones(2)})
    committed = tensor_files(tmp_path)
    orphan = tmp_path / TENSOR_DIR / "000000000099.bin"
    orphan.write_bytes(b"\x00" * 5)

    # Execute
    store = CheckpointStore(tmp_path)
    loaded = store.load()
    store.save({"w": torch.zeros(2)})

    # Assert
    assert loaded is not None
    assert torch.equal(loaded["w"], torch.ones(2))
    assert not orphan.exists()
    assert len(tensor_files(tmp_path)) == 1
    assert set(tensor_files(tmp_path)).isdisjoint(committed)


def test_a_torn_temp_manifest_does_not_break_load_or_the_next_save(tmp_path: Path) -> None:
    # Prepare: a crash in the middle of writing the next manifest
    store = CheckpointStore(tmp_path)
    store.save({"version": 3, "w": torch.ones(2)})
    torn = tmp_path / f".{MANIFEST}.tmp"
    torn.write_bytes(msgpack.packb({"version": 4, "w": {"__tensor__": "0000"}})[:9])

    # Execute
    restarted = CheckpointStore(tmp_path)
    loaded = restarted.load()

    # Assert
    assert loaded is not None
    assert loaded["version"] == 3
    assert torch.equal(loaded["w"], torch.ones(2))
    restarted.save({"version": 4, "w": loaded["w"]})
    reloaded = CheckpointStore(tmp_path).load()
    assert reloaded is not None
    assert reloaded["version"] == 4
    assert not torn.exists()


def test_an_unreadable_manifest_is_a_checkpoint_error(tmp_path: Path) -> None:
    # Prepare
    CheckpointStore(tmp_path).save({"w": torch.ones(2)})
    (tmp_path / MANIFEST).write_bytes(b"\xc1\xc1")

    # Execute / Assert
    with pytest.raises(CheckpointError, match="unreadable"):
        CheckpointStore(tmp_path).load()


def test_a_truncated_tensor_file_is_a_checkpoint_error_naming_it(tmp_path: Path) -> None:
    # Prepare
    CheckpointStore(tmp_path).save({"w": torch.ones(4)})
    [name] = tensor_files(tmp_path)
    (tmp_path / TENSOR_DIR / name).write_bytes(b"\x00" * 3)

    # Execute / Assert
    with pytest.raises(CheckpointError, match=name):
        CheckpointStore(tmp_path).load()


def test_write_file_durably_replaces_the_file_and_leaves_no_temp_file(tmp_path: Path) -> None:
    # Prepare
    target = tmp_path / "run_summary.json"
    target.write_text("old")

    # Execute
    write_file_durably(target, b"new")

    # Assert
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["run_summary.json"]
