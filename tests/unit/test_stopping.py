"""The stopping rule as a pure function: no broker, no clock, no coordinator."""

from __future__ import annotations

import pytest

from coordinator.config import StoppingSettings
from coordinator.evaluation import GlobalEvaluation
from coordinator.stopping import final_evaluations_done, stop_reason


def evaluation(*sites: str, pooled: float = 0.6, mean: float = 0.7, version: int = 3) -> GlobalEvaluation:
    return GlobalEvaluation(version, tuple(sites), {"accuracy": mean}, {"accuracy": pooled}, 40)


def reason(rule: StoppingSettings, **facts: object) -> str | None:
    known: dict[str, object] = {"version": 3, "elapsed_seconds": 10.0, "evaluation": None, "up_sites": ()}
    known.update(facts)
    return stop_reason(rule, **known)  # type: ignore[arg-type]


def test_no_rule_never_stops() -> None:
    assert reason(StoppingSettings(), version=10**6, elapsed_seconds=10**9, evaluation=evaluation("a")) is None


def test_max_versions_stops_at_the_version_not_before() -> None:
    rule = StoppingSettings(max_versions=3)

    assert reason(rule, version=2) is None
    assert reason(rule, version=3) == "reached 3 versions"


def test_the_wall_clock_budget_stops_once_spent() -> None:
    rule = StoppingSettings(max_seconds=100)

    assert reason(rule, elapsed_seconds=99.9) is None
    assert reason(rule, elapsed_seconds=100.0) == "wall-clock budget of 100 s spent"


@pytest.mark.parametrize(
    ("target", "aggregate", "stops"),
    [(0.6, "pooled", True), (0.61, "pooled", False), (0.7, "mean", True), (0.71, "mean", False)],
)
def test_a_target_metric_stops_once_reached_by_the_chosen_aggregate(target: float, aggregate: str, stops: bool) -> None:
    rule = StoppingSettings(target_metric="accuracy", target_value=target, target_aggregate=aggregate)

    result = reason(rule, evaluation=evaluation("a", "b"), up_sites=("a", "b"))

    assert (result == f"{aggregate} accuracy {0.6 if aggregate == 'pooled' else 0.7:.3f} >= {target}") is stops
    assert (result is None) is not stops


def test_a_target_metric_waits_for_every_up_site() -> None:
    rule = StoppingSettings(target_metric="accuracy", target_value=0.5)

    waiting = reason(rule, evaluation=evaluation("a"), up_sites=("a", "b"))
    without_evaluation = reason(rule, evaluation=None, up_sites=())
    other_metric = reason(StoppingSettings(target_metric="auc", target_value=0.5), evaluation=evaluation("a"))

    assert waiting is None and without_evaluation is None and other_metric is None


def test_the_final_wait_ends_when_the_up_sites_reported_or_the_timeout_passed() -> None:
    rule = StoppingSettings(final_eval_timeout_seconds=30)

    assert final_evaluations_done(rule, final=evaluation("a", "b"), up_sites=("a", "b"), waited_seconds=0.0)
    assert not final_evaluations_done(rule, final=evaluation("a"), up_sites=("a", "b"), waited_seconds=30.0)
    assert final_evaluations_done(rule, final=None, up_sites=("a",), waited_seconds=30.1)
    assert final_evaluations_done(rule, final=None, up_sites=(), waited_seconds=0.0)
