"""The poisoning attackers of the site agent (a test and demo facility) and how the demo configures them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import tomllib
import torch

from coordinator.config import config_from_dict
from fedmq.demo import DemoOptions, coordinator_toml, parse_attack, site_tables
from schemas import ModelUpdate, TrainingMetrics
from site_agent.attacks import Attack
from site_agent.config import SiteConfigError, site_config_from_dict


def honest_update() -> ModelUpdate:
    return ModelUpdate(
        update_id=ModelUpdate.new_id(),
        site_id="cleveland",
        seq=7,
        base_version=3,
        num_examples=199,
        delta={"w": torch.tensor([3.0, 4.0]), "count": torch.tensor([2])},
        metrics=TrainingMetrics(loss=0.5, steps=100, seconds=0.1),
    )


def never(_: None = None) -> int:
    raise AssertionError("only a flood takes new seqs")


def test_sign_flip_and_scale_multiply_the_floating_point_delta() -> None:
    update = honest_update()

    (flipped,) = Attack.parse("sign-flip:10").apply(update, never, torch.Generator())
    (scaled,) = Attack.parse("scale").apply(update, never, torch.Generator())

    assert flipped.delta["w"].tolist() == [-30.0, -40.0] and flipped.delta["count"].tolist() == [2]
    assert scaled.delta["w"].tolist() == [30.0, 40.0]
    assert (flipped.update_id, flipped.seq, flipped.num_examples) == (update.update_id, 7, 199)


def test_noise_has_the_honest_norm_and_inflation_claims_more_examples() -> None:
    update = honest_update()

    (noise,) = Attack.parse("noise").apply(update, never, torch.Generator().manual_seed(0))
    (inflated,) = Attack.parse("inflate-examples:1e12").apply(update, never, torch.Generator())

    assert math.isclose(float(noise.delta["w"].norm()), 5.0, rel_tol=1e-5)
    assert not torch.equal(noise.delta["w"], update.delta["w"])
    assert inflated.num_examples == 10**12 and torch.equal(inflated.delta["w"], update.delta["w"])


def test_a_flood_sends_valid_new_updates_with_their_own_ids_and_seqs() -> None:
    seqs = iter(range(8, 100))

    flood = Attack.parse("flood:4").apply(honest_update(), lambda: next(seqs), torch.Generator())

    assert [update.seq for update in flood] == [7, 8, 9, 10]
    assert len({update.update_id for update in flood}) == 4
    assert all(ModelUpdate.decode(update.encode()).seq == update.seq for update in flood)


@pytest.mark.parametrize("text", ["mimic", "sign-flip:x", "scale:-1", "noise:inf", "flood:0"])
def test_a_bad_attack_is_refused_with_a_sentence(text: str) -> None:
    with pytest.raises(ValueError, match="attack"):
        Attack.parse(text)


def test_the_site_config_checks_its_attack_key(tmp_path: Path) -> None:
    base = {"site_id": "cleveland", "broker": {"url": "amqp://cleveland@127.0.0.1:5682/fedmq"}}

    good = site_config_from_dict({**base, "agent": {"attack": "sign-flip:10"}}, base_dir=tmp_path)

    assert good.agent.attack == "sign-flip:10"
    with pytest.raises(SiteConfigError, match="attack"):
        site_config_from_dict({**base, "agent": {"attack": "mimic"}}, base_dir=tmp_path)


def test_demo_attack_goes_to_the_attackers_site_table_and_no_robust_turns_the_defences_off(
    tmp_path: Path,
) -> None:
    attack = parse_attack(["cleveland=sign-flip:10"])
    on = DemoOptions(state_dir=tmp_path, attack=attack)
    off = DemoOptions(state_dir=tmp_path, attack=attack, robust=False)

    attacker = tomllib.loads(site_tables(on, "cleveland"))
    honest = tomllib.loads(site_tables(on, "hungary"))
    config_on = config_from_dict(tomllib.loads(coordinator_toml(on, "amqp://c@127.0.0.1:5682/fedmq", 9464)))
    config_off = config_from_dict(tomllib.loads(coordinator_toml(off, "amqp://c@127.0.0.1:5682/fedmq", 9464)))

    assert attacker["agent"]["attack"] == "sign-flip:10" and "attack" not in honest["agent"]
    assert config_on.strategy.robust.clip and not config_off.strategy.robust.clip
    assert config_off.validation.max_num_examples == 2**63 - 1
    with pytest.raises(ValueError, match="SITE=KIND"):
        parse_attack(["nowhere=sign-flip"])
