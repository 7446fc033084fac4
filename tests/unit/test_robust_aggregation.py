"""Robust aggregation, bounded claims and the anomaly score, each against a hand computation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from coordinator.aggregation import Contribution, FedAsync, FedBuff, ServerOptimizer, StalenessFunction
from coordinator.aggregation.build import build_strategy
from coordinator.aggregation.robust import AdaptiveClip, AnomalyTracker, UpdateScreen
from coordinator.aggregation.robust_math import (
    agreeing_mean,
    coordinate_median,
    cosine_similarity,
    trimmed_count,
    trimmed_mean,
)
from coordinator.config import CoordinatorConfig, ValidationSettings, config_from_dict
from coordinator.errors import AggregationError, ConfigError
from tests.unit.test_coordinator_service import delta, fedbuff, start_federation


def w(*values: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values, dtype=torch.float32)}


def contribution(site: str, values: tuple[float, ...], *, staleness: int = 0, num_examples: int = 1) -> Contribution:
    return Contribution(
        site_id=site,
        update_id=f"{site}-{values}",
        base_version=0,
        staleness=staleness,
        num_examples=num_examples,
        delta=w(*values),
    )


# ------------------------------------------------------------------------------------------ pure functions


def test_coordinate_median_of_an_odd_and_an_even_count() -> None:
    odd = coordinate_median([w(1, 5, -2), w(3, 0, 4), w(2, 10, 1)])
    even = coordinate_median([w(1), w(10), w(3), w(2)])

    assert odd["w"].tolist() == [2, 5, 1]
    assert even["w"].tolist() == [2.5]  # (2 + 3) / 2, not torch's lower median 2


def test_trimmed_mean_drops_floor_fraction_times_k_at_each_end() -> None:
    five = trimmed_mean([w(1), w(2), w(3), w(4), w(100)], 0.2)  # drop 1 and 100: (2 + 3 + 4) / 3
    three = trimmed_mean([w(1), w(2), w(30)], 0.2)  # floor(0.6) = 0 dropped: the plain mean, 11

    assert five["w"].tolist() == [3.0]
    assert three["w"].tolist() == [11.0]
    assert [trimmed_count(10, 0.2), trimmed_count(3, 0.4), trimmed_count(2, 0.4), trimmed_count(4, 0.49)] == [
        2,
        1,
        0,
        1,
    ]


def test_agreeing_mean_leaves_out_a_delta_against_the_median_and_keeps_the_others_weights() -> None:
    # median per coordinate: x of (1, 2, -10) is 1, y of (1, 0, -10) is 0 -> (1, 0); cosines 0.71, 1, -0.71
    mean, kept = agreeing_mean([w(1, 1), w(2, 0), w(-10, -10)], [1.0, 3.0, 100.0], 0.0)

    assert kept == [0, 1]
    assert mean["w"].tolist() == pytest.approx([7 / 4, 1 / 4])  # (1 * (1, 1) + 3 * (2, 0)) / 4


def test_fedbuff_min_agreement_filters_the_example_weighted_mean() -> None:
    strategy = FedBuff(buffer_size=3, staleness=StalenessFunction("constant"), example_weighted=True, min_agreement=0.0)
    params = w(0, 0)

    strategy.add(params, 0, contribution("a", (1, 1), num_examples=1), params)
    strategy.add(params, 0, contribution("b", (2, 0), num_examples=3), params)
    result = strategy.add(params, 0, contribution("c", (-10, -10), num_examples=100), params)

    assert result is not None and result["w"].tolist() == pytest.approx([7 / 4, 1 / 4])
    with pytest.raises(AggregationError, match="min_agreement"):
        FedBuff(aggregator="median", min_agreement=0.0)


def test_cosine_similarity_of_two_deltas() -> None:
    assert cosine_similarity(w(1, 0), w(-2, 0)) == pytest.approx(-1.0)
    assert cosine_similarity(w(1, 1), w(1, 0)) == pytest.approx(1 / math.sqrt(2))
    assert cosine_similarity(w(0, 0), w(1, 0)) is None


def test_adaptive_clip_warms_up_then_follows_the_median_of_recent_clipped_norms() -> None:
    clip = AdaptiveClip(multiplier=2.0, window=3, min_norms=2, warmup_bound=10.0)
    decisions = []
    for norm in (20.0, 1.0, 3.0, 4.0, 12.0):
        decision = clip.decide(norm)
        decisions.append((decision.bound, decision.factor))
        clip.record(decision)

    # 20 against the warm-up bound 10 (recorded as 10); 1 still in the warm-up; then 2 * median(10, 1) = 11;
    # 2 * median(10, 1, 3) = 6; the window drops 10: 2 * median(1, 3, 4) = 6 clips 12 by half, recorded as 6.
    assert decisions == [(10.0, 0.5), (10.0, 1.0), (11.0, 1.0), (6.0, 1.0), (6.0, 0.5)]
    assert list(clip.norms) == [3.0, 4.0, 6.0]


def test_anomaly_score_compares_with_a_decaying_mean_of_unit_directions() -> None:
    tracker = AnomalyTracker(decay=0.5)
    first = tracker.score(w(1, 0))
    tracker.record(w(1, 0), 1.0)
    flipped = tracker.score(w(-2, 0))
    tracker.record(w(0, 3), 3.0)  # reference: 0.5 * (1, 0) + 0.5 * (0, 1)

    assert first is None
    assert flipped == pytest.approx(-1.0)
    assert tracker.reference["w"].tolist() == [0.5, 0.5]
    assert tracker.score(w(1, 0)) == pytest.approx(1 / math.sqrt(2))


# ------------------------------------------------------------------------------------------------- FedBuff


def test_fedbuff_median_steps_with_the_coordinate_wise_median_of_the_buffer() -> None:
    strategy = FedBuff(buffer_size=3, staleness=StalenessFunction("constant"), aggregator="median")
    params = w(0, 0)

    first = strategy.add(params, 0, contribution("a", (1, 0)), params)
    second = strategy.add(params, 0, contribution("b", (3, 3)), params)
    result = strategy.add(params, 0, contribution("c", (100, -100)), params)

    assert first is None and second is None
    assert result is not None and result["w"].tolist() == [3, 0]  # sgd at rate 1: x + median
    assert strategy.buffered() == 0


def test_fedbuff_trimmed_mean_weights_each_delta_by_staleness_not_by_examples() -> None:
    strategy = FedBuff(
        buffer_size=5, staleness=StalenessFunction("polynomial", a=0.5), aggregator="trimmed-mean", trim_fraction=0.2
    )
    params = w(0)
    values = [(1.0, 0), (2.0, 0), (4.0, 3), (100.0, 0), (-50.0, 0)]  # (delta, staleness); s(3) = 1/2
    result = None
    for index, (value, staleness) in enumerate(values):
        result = strategy.add(
            params, 3, contribution(f"s{index}", (value,), staleness=staleness, num_examples=10**index), params
        )

    # weighted: 1, 2, 2, 100, -50 -> drop -50 and 100 -> (1 + 2 + 2) / 3
    assert result is not None and result["w"].tolist() == pytest.approx([5 / 3])


def test_fedbuff_robust_aggregators_refuse_example_weighting_and_bad_fractions() -> None:
    with pytest.raises(AggregationError, match="unweighted"):
        FedBuff(aggregator="median", example_weighted=True)
    with pytest.raises(AggregationError, match="trim_fraction"):
        FedBuff(aggregator="trimmed-mean", trim_fraction=0.5)
    with pytest.raises(AggregationError, match="aggregator"):
        FedBuff(aggregator="mode")


@pytest.mark.parametrize(
    ("buffer_size", "share", "places"),
    [(2, 0.67, 1), (3, 0.67, 2), (10, 0.67, 6), (3, 0.34, 1), (3, 0.01, 1), (10, 1.0, 10), (100, 0.29, 29)],
)
def test_site_share_gives_floor_share_times_k_places_and_at_least_one(
    buffer_size: int, share: float, places: int
) -> None:
    strategy = FedBuff(buffer_size=buffer_size, max_site_share=share)
    params = w(0)
    for index in range(places):
        assert strategy.check(contribution("a", (float(index),)), 0) is None
        strategy.add(params, 0, contribution("a", (float(index),)), params)

    assert strategy.max_updates_per_site == places
    if places < buffer_size:  # else the buffer flushed: a fresh one has room again
        refused = strategy.check(contribution("a", (9.0,)), 0)
        assert refused is not None and refused.value == "site-share"


@pytest.mark.parametrize(
    "options",
    [{"aggregator": "median"}, {"aggregator": "mean", "min_agreement": 0.0, "example_weighted": True}],
)
def test_fedbuff_robust_buffers_resume_mid_buffer_from_their_checkpoint(options: dict[str, object]) -> None:
    def fresh() -> FedBuff:
        screen = UpdateScreen(clip=AdaptiveClip(multiplier=2.0, window=4, min_norms=1), anomaly=AnomalyTracker())
        return FedBuff(buffer_size=3, screen=screen, **options)  # type: ignore[arg-type]

    params = w(0, 0)
    uninterrupted, interrupted = fresh(), fresh()
    for strategy in (uninterrupted, interrupted):
        strategy.take(params, 0, contribution("a", (1, 1), num_examples=2), params)
        strategy.take(params, 0, contribution("b", (2, 0), num_examples=5), params)
    resumed = fresh()
    resumed.load_state_dict(interrupted.state_dict())

    expected = uninterrupted.take(params, 0, contribution("c", (30, 40)), params)
    got = resumed.take(params, 0, contribution("c", (30, 40)), params)

    assert got.new_params is not None and expected.new_params is not None
    assert torch.equal(got.new_params["w"], expected.new_params["w"])
    assert got.screening == expected.screening
    assert got.screening.clip_factor < 1.0  # 50 against 2 * median(sqrt 2, 2)


# ---------------------------------------------------------------------------------------- Strategy.take


def test_take_clips_to_the_adaptive_bound_and_scores_the_update() -> None:
    screen = UpdateScreen(clip=AdaptiveClip(multiplier=1.0, window=1, min_norms=1), anomaly=AnomalyTracker())
    strategy = FedAsync(alpha=1.0, staleness=StalenessFunction("constant"), screen=screen)
    params = w(0, 0)

    first = strategy.take(params, 0, contribution("a", (3, 4)), params)  # warm-up: no bound yet
    assert first.new_params is not None
    second = strategy.take(first.new_params, 1, contribution("b", (0, -10)), first.new_params)

    assert first.new_params["w"].tolist() == [3, 4] and first.screening.clip_factor == 1.0
    assert second.screening.clip_bound == pytest.approx(5.0) and second.screening.clip_factor == pytest.approx(0.5)
    assert second.new_params is not None and second.new_params["w"].tolist() == pytest.approx([3, -1])
    assert second.screening.anomaly_score == pytest.approx(-0.8)  # cos((0, -1), (3, 4) / 5)


def test_the_anomaly_gate_refuses_an_update_against_the_reference_and_still_learns_its_direction() -> None:
    screen = UpdateScreen(anomaly=AnomalyTracker(decay=0.2), min_anomaly_score=0.0, gate_after=1)
    strategy = FedAsync(alpha=1.0, staleness=StalenessFunction("constant"), screen=screen)
    params = w(0, 0)

    assert strategy.admit(contribution("a", (1, 0)), 0) is None
    strategy.take(params, 0, contribution("a", (1, 0)), params)
    refused = strategy.admit(contribution("b", (-1, 0)), 1)
    sideways = strategy.admit(contribution("c", (0, 1)), 1)  # cosine 0 to (0.6, 0): not below the gate

    assert refused is not None and refused.value == "anomalous"
    assert screen.anomaly is not None and screen.anomaly.reference["w"].tolist() == pytest.approx([0.6, 0.0])
    assert sideways is None


def test_take_without_a_screen_is_add_exactly() -> None:
    plain = FedAsync(alpha=0.5)
    params = w(1, 1)

    taken = plain.take(params, 0, contribution("a", (100, 0)), params)

    assert taken.new_params is not None and taken.new_params["w"].tolist() == [51, 1]
    assert taken.screening.anomaly_score is None and taken.screening.clip_factor == 1.0


# ------------------------------------------------------------------------------------------------- config


def test_robust_options_are_on_by_default_and_built_into_every_strategy() -> None:
    for name in ("fedbuff", "fedasync", "fedavg-sync"):
        strategy = build_strategy(CoordinatorConfig(strategy={"name": name}).strategy, ["a"])
        assert strategy.screen is not None and strategy.screen.clip is not None
        assert strategy.screen.anomaly is not None
    off = CoordinatorConfig(strategy={"name": "fedbuff", "robust": {"clip": False, "anomaly_score": False}})
    assert build_strategy(off.strategy, ["a"]).screen is None


def test_robust_keys_are_typed_range_checked_and_unknown_ones_refused() -> None:
    bad_tables = [
        ({"name": "fedbuff", "robust": {"clip_multiplier": 0.5}}, "clip_multiplier"),
        ({"name": "fedbuff", "robust": {"clip_window": 2, "clip_min_norms": 3}}, "clip_min_norms"),
        ({"name": "fedbuff", "robust": {"clipping": True}}, "clipping"),
        ({"name": "fedbuff", "aggregator": "median", "example_weighted": True}, "unweighted"),
        ({"name": "fedbuff", "aggregator": "mode"}, "aggregator"),
        ({"name": "fedbuff", "trim_fraction": 0.5}, "trim_fraction"),
    ]
    for table, word in bad_tables:
        with pytest.raises(ConfigError, match=word):
            config_from_dict({"strategy": table})


# -------------------------------------------------------------------------------------- num_examples cap


def test_a_num_examples_claim_above_the_cap_is_clipped_and_audited(tmp_path: Path) -> None:
    strategy = fedbuff(2, example_weighted=True, server_optimizer=ServerOptimizer("sgd"))
    federation = start_federation(
        tmp_path,
        strategy,
        validation=ValidationSettings(max_update_norm=100.0, max_num_examples=1000, site_max_num_examples={"a": 10}),
    )

    federation.send_good("a", delta((1.0, 1.0), 1.0), num_examples=10**12)  # clipped to a's cap, 10
    federation.send_good("b", delta((0.0, 0.0), 0.0), num_examples=30)

    # example-weighted: (10 * 1 + 30 * 0) / 40 = 0.25 added to w = [1, 2], b = [0.5]
    params = federation.coordinator.state.params
    assert params["w"].tolist() == pytest.approx([1.25, 2.25]) and params["b"].tolist() == pytest.approx([0.75])
    accepted = [record for record in federation.audit() if record.get("outcome") == "accepted"]
    assert "num_examples 1000000000000 clipped to the cap 10" in accepted[0]["detail"]


def test_a_num_examples_claim_above_the_cap_can_be_rejected_with_its_own_reason(tmp_path: Path) -> None:
    federation = start_federation(
        tmp_path,
        fedbuff(2),
        validation=ValidationSettings(max_update_norm=100.0, max_num_examples=1000, num_examples_above_cap="reject"),
    )

    federation.send_good("a", num_examples=1001)

    assert federation.rejections() == {("a", "too-many-examples"): 1.0}


def test_the_anomaly_score_of_each_site_is_exported(tmp_path: Path) -> None:
    federation = start_federation(tmp_path, fedbuff(4, screen=UpdateScreen(anomaly=AnomalyTracker())))

    federation.send_good("a", delta((1.0, 0.0), 0.0))
    federation.send_good("b", delta((-1.0, 0.0), 0.0))

    assert federation.sample("fedmq_update_anomaly_score", site="a") is None  # nothing to compare with yet
    assert federation.sample("fedmq_update_anomaly_score", site="b") == pytest.approx(-1.0)
