"""End-to-end signatures: the canonical bytes, sign/verify through the wire, the coordinator's bad-signature
rejection and the site's refusal of an unsigned or forged model, the key files and the key registry."""

from __future__ import annotations

import dataclasses
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from broker.keys import (
    KeyFileError,
    SiteKeyRegistry,
    generate_private_key,
    parse_public_key,
    public_key_path,
    public_key_text,
    read_private_key,
    read_public_key,
    write_key_pair,
    write_public_key,
)
from broker.topology import site_control_queue
from coordinator.reasons import Reason
from coordinator.signatures import Signer, UpdateSignatures
from schemas import Control, ControlCommand, FieldError, GlobalModel, ModelFingerprint, ModelUpdate, TrainingConfig
from schemas.signing import sign, signature_problem, signed_payload, tensors_digest
from site_agent.signatures import SiteSigning
from tests.unit.test_coordinator_service import SITES, fedbuff, make_update, start_federation
from tests.unit.test_site_agent import make_harness

UPDATE_ID = "0c7c2a4e-2a51-4d0c-9f7e-3d1fb1d0a111"


def sample_update(**changes: Any) -> ModelUpdate:
    fields: dict[str, Any] = {
        "update_id": UPDATE_ID,
        "site_id": "a",
        "seq": 3,
        "base_version": 2,
        "num_examples": 40,
        "delta": {"w": torch.tensor([0.25, -0.5]), "b": torch.tensor([0.125])},
        "metrics": make_update("a", seq=1, base_version=0).metrics,
        "created_at": 1_700_000_000.5,
    }
    fields.update(changes)
    return ModelUpdate(**fields)


def sample_model(**changes: Any) -> GlobalModel:
    fields: dict[str, Any] = {
        "version": 4,
        "tensors": {"w": torch.tensor([1.0, 2.0])},
        "training": TrainingConfig(local_steps=5),
        "fingerprint": ModelFingerprint(task="tiny", architecture="test"),
        "incarnation": 1_700_000_000_000_000_123,
        "created_at": 1_700_000_001.0,
    }
    fields.update(changes)
    return GlobalModel(**fields)


# ------------------------------------------------------------------------------------------------ canonical bytes


def test_the_tensor_digest_covers_names_dtypes_shapes_and_bytes_but_not_order() -> None:
    base = {"w": torch.tensor([[1.0, 2.0]]), "b": torch.tensor([0.5])}
    variants = {
        "renamed": {"w2": base["w"], "b": base["b"]},
        "other dtype": {"w": base["w"].double(), "b": base["b"]},
        "other shape": {"w": base["w"].reshape(2, 1), "b": base["b"]},
        "other value": {"w": torch.tensor([[1.0, 2.000001]]), "b": base["b"]},
        "tensor dropped": {"w": base["w"]},
    }

    digests = {name: tensors_digest(tensors) for name, tensors in variants.items()}

    assert tensors_digest({"b": base["b"], "w": base["w"]}) == tensors_digest(base)
    assert len({tensors_digest(base), *digests.values()}) == len(variants) + 1


def test_an_int_where_a_float_is_declared_signs_as_the_decoder_sees_it() -> None:
    # Prepare: created_at as an int; the decoder hands it back as a float
    update = sample_update(created_at=1_700_000_000)

    # Execute
    decoded = ModelUpdate.decode(update.encode())

    # Assert
    assert signed_payload(update) == signed_payload(decoded)


def test_the_payload_leaves_out_only_the_signature() -> None:
    update = sample_update()

    assert signed_payload(update) == signed_payload(dataclasses.replace(update, signature=b"x" * 64))
    for change in ({"seq": 4}, {"num_examples": 41}, {"base_version": 1}, {"site_id": "b"}, {"created_at": 1.0}):
        assert signed_payload(sample_update(**change)) != signed_payload(update), change


# ------------------------------------------------------------------------------------------------ sign and verify


@pytest.mark.parametrize("compression", ["none", "float16", "int8"])
def test_a_signed_update_verifies_after_the_wire_with_any_compression(compression: str) -> None:
    # Prepare
    key = generate_private_key()
    update = sample_update(delta={"w": torch.randn(50), "b": torch.randn(3)})

    # Execute: signed over what the coordinator will decode, then sent
    decoded = ModelUpdate.decode(sign(update, key, compression).encode(compression))

    # Assert
    assert len(decoded.signature) == 64
    assert signature_problem(decoded, key.public_key()) is None


@pytest.mark.parametrize(
    "message",
    [sample_model(), Control(command=ControlCommand.STOP, reason="done", issued_at=1_700_000_002.0)],
    ids=["global-model", "control"],
)
def test_a_signed_model_and_control_round_trip_and_verify(message: GlobalModel | Control) -> None:
    key = generate_private_key()

    decoded = type(message).decode(sign(message, key).encode())

    assert signature_problem(decoded, key.public_key()) is None
    assert signature_problem(decoded, generate_private_key().public_key()) is not None


@pytest.mark.parametrize(
    "tamper",
    [
        lambda update: dataclasses.replace(update, num_examples=10**9),
        lambda update: dataclasses.replace(update, seq=update.seq + 1),
        lambda update: dataclasses.replace(update, base_version=0),
        lambda update: dataclasses.replace(update, delta={**update.delta, "b": torch.tensor([9.0])}),
    ],
    ids=["num_examples", "seq", "base_version", "delta"],
)
def test_a_tampered_signed_update_does_not_verify(tamper: Any) -> None:
    key = generate_private_key()
    signed = sign(sample_update(), key)

    assert signature_problem(tamper(signed), key.public_key()) is not None


def test_unsigned_and_unregistered_are_named() -> None:
    key = generate_private_key()
    unsigned = sample_update()

    assert signature_problem(unsigned, key.public_key()) == "the model-update is not signed"
    assert "no public key" in str(signature_problem(sign(unsigned, key), None))


def test_a_signature_of_the_wrong_length_is_refused_when_decoding() -> None:
    body = dataclasses.replace(sample_update(), signature=b"short").encode()

    with pytest.raises(FieldError, match="signature"):
        ModelUpdate.decode(body)


# ------------------------------------------------------------------------------------------------ coordinator


def signed_federation(tmp_path: Path, *, required: bool = True) -> tuple[Any, dict[str, Any]]:
    """A coordinator checking updates against keys registered for sites a, b and c."""
    keys = {site: generate_private_key() for site in SITES}
    for site, key in keys.items():
        write_public_key(tmp_path / "keys" / f"{site}.pub", key.public_key())
    federation = start_federation(tmp_path, fedbuff())
    registry = SiteKeyRegistry(tmp_path / "keys")
    federation.coordinator.updates.rules = dataclasses.replace(
        federation.coordinator.updates.rules, signatures=UpdateSignatures(registry.public_key, required=required)
    )
    return federation, keys


def test_a_forged_update_is_rejected_bad_signature_counted_audited_dead_lettered(tmp_path: Path) -> None:
    # Prepare: the forger has a's broker login but not a's key
    federation, keys = signed_federation(tmp_path)
    forger_key = generate_private_key()
    params_before = {name: tensor.clone() for name, tensor in federation.coordinator.state.params.items()}

    # Execute: a forged one, an unsigned one, and one honestly signed by c
    federation.send(sign(make_update("a", seq=1, base_version=0), forger_key))
    federation.send(make_update("b", seq=1, base_version=0))
    federation.send(sign(make_update("c", seq=1, base_version=0), keys["c"]))

    # Assert
    assert federation.rejections() == {("a", "bad-signature"): 1.0, ("b", "bad-signature"): 1.0}
    rejected = [record for record in federation.audit() if record.get("reason") == Reason.BAD_SIGNATURE.value]
    assert {record["site"] for record in rejected} == {"a", "b"}
    dead = federation.dead_letters()
    assert len(dead) == 2 and {letter.routing_key for letter in dead} == {"site.a.update", "site.b.update"}
    assert federation.coordinator.state.version == 1  # only c's update made the version
    assert not torch.equal(federation.coordinator.state.params["w"], params_before["w"])


def test_a_rotated_key_is_used_from_the_next_update_on(tmp_path: Path) -> None:
    federation, keys = signed_federation(tmp_path)
    new_key = generate_private_key()
    time.sleep(0.01)  # a new mtime for the registry to notice
    write_public_key(tmp_path / "keys" / "a.pub", new_key.public_key())

    federation.send(sign(make_update("a", seq=1, base_version=0), keys["a"]))
    federation.send(sign(make_update("a", seq=2, base_version=0), new_key))

    assert federation.rejections() == {("a", "bad-signature"): 1.0}
    assert federation.coordinator.state.version == 1


def test_without_required_an_unsigned_update_passes_but_a_wrong_signature_does_not(tmp_path: Path) -> None:
    federation, _ = signed_federation(tmp_path, required=False)

    federation.send(make_update("a", seq=1, base_version=0))
    federation.send(sign(make_update("b", seq=1, base_version=1), generate_private_key()))

    assert federation.rejections() == {("b", "bad-signature"): 1.0}
    assert federation.coordinator.state.version == 1


def test_the_coordinator_signs_every_model_and_control_it_publishes(tmp_path: Path) -> None:
    # Prepare
    key = generate_private_key()
    federation = start_federation(tmp_path, fedbuff())
    federation.coordinator.signer = Signer(key)

    # Execute
    federation.coordinator.publish_model()
    federation.coordinator.publish_control(ControlCommand.STOP, "done")

    # Assert
    model = federation.inbox("a")
    assert signature_problem(model, key.public_key()) is None
    control = Control.decode(federation.broker.queues[site_control_queue("a")].messages[-1].body)
    assert signature_problem(control, key.public_key()) is None


# ------------------------------------------------------------------------------------------------ site agent


def test_the_site_refuses_an_unsigned_or_forged_model_keeps_its_own_and_says_so(tmp_path: Path) -> None:
    # Prepare: a site that trusts the coordinator's key only
    harness = make_harness(tmp_path)
    coordinator_key, site_key = generate_private_key(), generate_private_key()
    harness.agent.signing = SiteSigning(site_key, coordinator_key.public_key())
    try:
        harness.publish_model(sign(harness.model(0), coordinator_key))
        harness.pump(lambda: harness.agent.latest is not None)

        # Execute: a newer model, unsigned; another signed by someone else; a forged STOP (the inbox keeps only
        # the newest model, so each is delivered before the next)
        harness.publish_model(harness.model(5))
        harness.pump_turns(2)
        harness.publish_model(sign(harness.model(6), generate_private_key()))
        harness.pump_turns(2)
        harness.publish_control(ControlCommand.STOP)
        harness.pump_turns(2)
        harness.clock.advance(10)
        harness.pump(lambda: any(beat.refused_messages == 3 for beat in harness.heartbeats()))

        # Assert: it kept v0, did not stop, said so in its heartbeat, and its updates are signed by its key
        assert harness.agent.latest is not None and harness.agent.latest.version == 0
        assert not harness.agent.stopped
        harness.pump(lambda: len(harness.updates()) >= 1)
        assert all(signature_problem(update, site_key.public_key()) is None for update in harness.updates())
    finally:
        harness.agent.close()


def test_a_site_not_requiring_signatures_still_refuses_a_wrong_one(tmp_path: Path) -> None:
    harness = make_harness(tmp_path)
    coordinator_key = generate_private_key()
    harness.agent.signing = SiteSigning(None, coordinator_key.public_key(), required=False)
    try:
        harness.publish_model(sign(harness.model(1), generate_private_key()))
        harness.pump_turns(2)
        harness.publish_model(harness.model(0))
        harness.pump(lambda: harness.agent.latest is not None)

        assert harness.agent.latest is not None and harness.agent.latest.version == 0
        assert harness.agent.refused_messages == 1
    finally:
        harness.agent.close()


# ------------------------------------------------------------------------------------------------ keys


def test_a_private_key_file_is_0600_and_its_public_key_sits_beside_it(tmp_path: Path) -> None:
    key = generate_private_key()
    key_file = tmp_path / "cleveland.signing.key"

    public_file = write_key_pair(key_file, key)

    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert public_file == public_key_path(key_file)
    assert public_key_text(read_private_key(key_file)) == public_key_text(key)
    assert public_key_text(read_public_key(public_file)) == public_key_text(key)
    with pytest.raises(KeyFileError, match="exists already"):
        write_key_pair(key_file, generate_private_key())


def test_public_key_text_parses_back_and_junk_is_named() -> None:
    key = generate_private_key()

    assert public_key_text(parse_public_key(public_key_text(key))) == public_key_text(key)
    with pytest.raises(KeyFileError, match="32 bytes"):
        parse_public_key("AAAA", "site.toml signing.coordinator_public_key")
    with pytest.raises(KeyFileError, match="not base64"):
        parse_public_key("not a key!")


def test_the_registry_notices_a_removed_key(tmp_path: Path) -> None:
    key = generate_private_key()
    write_public_key(tmp_path / "a.pub", key.public_key())
    registry = SiteKeyRegistry(tmp_path)
    assert registry.public_key("a") is not None

    (tmp_path / "a.pub").unlink()

    assert registry.public_key("a") is None


# ------------------------------------------------------------------------------------------------ config and CLI


def test_a_site_file_finds_its_key_beside_it_and_refuses_a_bad_coordinator_key(tmp_path: Path) -> None:
    from site_agent.config import SiteConfigError, site_config_from_dict

    coordinator_key = public_key_text(generate_private_key())
    raw = {
        "site_id": "cleveland",
        "broker": {"url": "amqp://x"},
        "signing": {"coordinator_public_key": coordinator_key},
    }

    config = site_config_from_dict(raw, base_dir=tmp_path)

    assert config.signing.key_file == str(tmp_path / "cleveland.signing.key")
    assert config.signing.required
    with pytest.raises(SiteConfigError, match=r"signing\.coordinator_public_key"):
        site_config_from_dict({**raw, "signing": {"coordinator_public_key": "AAAA"}}, base_dir=tmp_path)


def test_a_site_requiring_signatures_does_not_start_without_its_key(tmp_path: Path) -> None:
    from site_agent.config import site_config_from_dict
    from site_agent.runner import build_signing

    coordinator_key = public_key_text(generate_private_key())
    raw = {
        "site_id": "cleveland",
        "broker": {"url": "amqp://x"},
        "signing": {"coordinator_public_key": coordinator_key},
    }
    config = site_config_from_dict(raw, base_dir=tmp_path)

    with pytest.raises(ValueError, match="fedmq site keygen cleveland"):
        build_signing(config)
    write_key_pair(tmp_path / "cleveland.signing.key", generate_private_key())
    assert build_signing(config).private_key is not None


def test_the_coordinators_signing_paths_are_relative_to_its_file(tmp_path: Path) -> None:
    from coordinator.config import config_from_dict
    from coordinator.errors import ConfigError
    from coordinator.runner import signing_paths

    config = config_from_dict({"signing": {"keys_dir": "keys"}}, base_dir=tmp_path)

    assert signing_paths(config) == (tmp_path / "keys", tmp_path / "keys" / "coordinator.key")
    with pytest.raises(ConfigError, match=r"signing\.required"):
        config_from_dict({"signing": {"required": "yes"}})


def test_site_keygen_writes_a_private_key_0600_and_refuses_to_overwrite_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedmq.cli import main

    assert main(["site", "keygen", "cleveland", "--dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    key_file = tmp_path / "cleveland.signing.key"

    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert public_key_text(read_private_key(key_file)) in printed
    assert main(["site", "keygen", "cleveland", "--dir", str(tmp_path)]) == 1
    assert "exists already" in capsys.readouterr().err
