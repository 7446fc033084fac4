"""A training config no site could train with is refused where it is made: in code, on the wire, at start."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch

from fedmq.cli import main
from schemas import FieldError, GlobalModel, ModelFingerprint, SchemaError, TrainingConfig

REFUSED: list[tuple[dict[str, Any], str]] = [
    ({"optimizer": "adamw"}, "optimizer"),
    ({"optimizer": "rmsprop"}, "optimizer"),
    ({"optimizer": ""}, "optimizer"),
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"learning_rate": -1.0}, "learning_rate"),
    ({"learning_rate": math.nan}, "learning_rate"),
    ({"learning_rate": math.inf}, "learning_rate"),
    ({"learning_rate": "0.1"}, "learning_rate"),
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": -4}, "batch_size"),
    ({"batch_size": 2.5}, "batch_size"),
    ({"batch_size": True}, "batch_size"),
    ({"local_steps": 0}, "local_steps"),
    ({"local_steps": -1}, "local_steps"),
    ({"local_steps": -1, "local_epochs": 2}, "local_steps"),
    ({"local_epochs": 0}, "local_epochs"),
    ({"local_epochs": -3}, "local_epochs"),
    ({"proximal_mu": -1.0}, "proximal_mu"),
    ({"proximal_mu": math.nan}, "proximal_mu"),
    ({"train_on_same_version": 1}, "train_on_same_version"),
]


@pytest.mark.parametrize(("changes", "field"), REFUSED, ids=lambda value: repr(value)[:40])
def test_a_value_no_site_could_train_with_is_refused_naming_the_field(changes: dict[str, Any], field: str) -> None:
    # Execute
    with pytest.raises(FieldError) as caught:
        TrainingConfig(**changes)

    # Assert
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")


def test_values_a_site_trains_with_are_kept() -> None:
    # Execute
    by_epochs = TrainingConfig(local_steps=0, local_epochs=2, optimizer="adam", proximal_mu=0, learning_rate=1)

    # Assert: local_steps does not count with local_epochs; numbers are floats as on the wire
    assert (by_epochs.local_steps, by_epochs.local_epochs, by_epochs.optimizer) == (0, 2, "adam")
    assert by_epochs.learning_rate == 1.0 and isinstance(by_epochs.learning_rate, float)
    assert by_epochs.proximal_mu == 0.0 and isinstance(by_epochs.proximal_mu, float)


@pytest.mark.parametrize(("changes", "field"), REFUSED, ids=lambda value: repr(value)[:40])
def test_a_global_model_carrying_a_refused_value_does_not_decode(changes: dict[str, Any], field: str) -> None:
    # Prepare: a valid global model whose training table is edited on the wire
    model = GlobalModel(
        version=1,
        tensors={"weight": torch.zeros(2)},
        training=TrainingConfig(),
        fingerprint=ModelFingerprint(task="heart-disease", architecture="sha256:abc"),
        incarnation=1,
    )
    body = msgpack.unpackb(model.encode(), raw=False)
    body["training"].update(changes)
    encoded = msgpack.packb(body, use_bin_type=True)

    # Execute
    with pytest.raises(SchemaError) as caught:
        GlobalModel.decode(encoded)

    # Assert: a FieldError naming the field by its path in the message
    assert isinstance(caught.value, FieldError)
    assert caught.value.field == f"training.{field}"


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ('optimizer = "adamw"', "optimizer"),
        ("batch_size = 0", "batch_size"),
        ("learning_rate = -1", "learning_rate"),
        ("learning_rate = nan", "learning_rate"),
        ("local_steps = 0", "local_steps"),
    ],
)
def test_the_coordinator_stops_before_connecting_on_a_bad_training_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], table: str, key: str
) -> None:
    # Prepare: a broker URL nothing listens on; reaching it would hang in reconnects, not exit
    config = tmp_path / "coordinator.toml"
    config.write_text(
        f'task = "heart-disease"\nsites = ["hospital-a"]\n[broker]\nurl = "amqp://u:p@127.0.0.1:1/fedmq"\n'
        f"[training]\n{table}\n"
    )

    # Execute
    exit_code = main(["--state-dir", str(tmp_path), "coordinator", "run", "--config", str(config)])

    # Assert: exit 1 with one line naming the file and the key, no traceback, nothing written to the state dir
    err = capsys.readouterr().err
    assert exit_code == 1
    assert err.count("\n") == 1, err
    assert str(config) in err and f"training.{key} = " in err
    assert "Traceback" not in err
    assert not (tmp_path / "coordinator").exists()
