"""Aggregation formulas against hand computations on two-element tensors.

Each expected value is written out with the paper's formula in the test, so a reader can check it by hand.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.aggregation import (
    AggregationError,
    Contribution,
    FedAsync,
    FedBuff,
    Params,
    ServerOptimizer,
    StalenessFunction,
    Strategy,
    SyncFedAvg,
    add_scaled,
    interpolate,
    staleness_function,
)
from coordinator.validation import update_norm


def params(*values: float, dtype: torch.dtype = torch.float32) -> Params:
    return {"w": torch.tensor(values, dtype=dtype)}


def values_of(model: Params | None) -> list[float]:
    assert model is not None, "expected a new version"
    return [float(value) for value in model["w"]]


def contribution(
    delta: Params,
    *,
    site_id: str = "site-a",
    update_id: str = "u1",
    base_version: int = 0,
    staleness: int = 0,
    num_examples: int = 10,
) -> Contribution:
    return Contribution(
        site_id=site_id,
        update_id=update_id,
        base_version=base_version,
        staleness=staleness,
        num_examples=num_examples,
        delta=delta,
    )


def checkpoint_safe(value: Any) -> bool:
    """The service writes strategy state with msgpack and raw tensors: no other types may appear."""
    if isinstance(value, dict):
        return all(isinstance(key, str) and checkpoint_safe(item) for key, item in value.items())
    if isinstance(value, list):
        return all(checkpoint_safe(item) for item in value)
    return isinstance(value, (torch.Tensor, int, float, str))


# ----------------------------------------------------------------------------------------------------
# Staleness functions
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("staleness", [0, 1, 4, 5, 1000])
def test_constant_staleness_is_one(staleness: int) -> None:
    assert staleness_function("constant")(staleness) == 1.0


@pytest.mark.parametrize(
    ("staleness", "expected"),
    [(0, 1.0), (1, 1 / math.sqrt(2)), (4, 1 / math.sqrt(5)), (5, 1 / math.sqrt(6)), (1000, 1 / math.sqrt(1001))],
)
def test_polynomial_staleness_is_tau_plus_one_to_the_minus_a(staleness: int, expected: float) -> None:
    function = staleness_function("polynomial", a=0.5)

    assert function(staleness) == pytest.approx(expected, rel=1e-12)


def test_polynomial_staleness_with_a_one_is_reciprocal() -> None:
    assert staleness_function("polynomial", a=1.0)(3) == pytest.approx(1 / 4)


@pytest.mark.parametrize(
    ("staleness", "expected"),
    [(0, 1.0), (1, 1.0), (4, 1.0), (5, 1 / (10 * (5 - 4) + 1)), (1000, 1 / (10 * (1000 - 4) + 1))],
)
def test_hinge_staleness_is_flat_up_to_b_then_decays(staleness: int, expected: float) -> None:
    function = staleness_function("hinge", a=10, b=4)

    assert function(staleness) == pytest.approx(expected, rel=1e-12)


def test_staleness_defaults_are_the_papers() -> None:
    assert staleness_function("polynomial") == StalenessFunction("polynomial", a=0.5)
    assert staleness_function("hinge") == StalenessFunction("hinge", a=10.0, b=4.0)
    assert str(staleness_function("hinge")) == "hinge(a=10, b=4)"


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("cubic", {}, "unknown staleness function 'cubic'"),
        ("constant", {"a": 1.0}, "'constant' takes no parameter 'a'"),
        ("polynomial", {"b": 2.0}, "'polynomial' takes no parameter 'b'"),
        ("hinge", {"a": -1.0}, "parameter a must be >= 0"),
        ("hinge", {"c": 1.0}, "takes no parameters \\['c'\\]"),
    ],
)
def test_bad_staleness_configuration_is_refused_by_name(name: str, options: dict[str, float], message: str) -> None:
    with pytest.raises(AggregationError, match=message):
        staleness_function(name, **options)


def test_negative_staleness_is_refused() -> None:
    with pytest.raises(AggregationError, match="staleness must be >= 0"):
        staleness_function("polynomial")(-1)


# ----------------------------------------------------------------------------------------------------
# Pure helpers
# ----------------------------------------------------------------------------------------------------


def test_add_scaled_keeps_dtype_and_leaves_inputs_untouched() -> None:
    base = params(1.0, 2.0, dtype=torch.float64)
    direction = params(0.5, -1.0)
    base_before, direction_before = base["w"].clone(), direction["w"].clone()

    result = add_scaled(base, direction, 2.0)

    assert values_of(result) == [2.0, 0.0]
    assert result["w"].dtype == torch.float64
    assert torch.equal(base["w"], base_before) and torch.equal(direction["w"], direction_before)
    assert result["w"].data_ptr() != base["w"].data_ptr()


def test_add_scaled_reads_read_only_wire_buffers() -> None:
    raw = bytes(torch.tensor([1.0, 2.0]).numpy().tobytes())
    with warnings.catch_warnings():  # torch warns (once per process) that the bytes are not writable
        warnings.simplefilter("ignore", UserWarning)
        read_only = {"w": torch.frombuffer(raw, dtype=torch.float32)}

    result = add_scaled(params(1.0, 1.0), read_only, 1.0)

    assert values_of(result) == [2.0, 3.0]


def test_integer_buffers_are_rounded_and_keep_their_dtype() -> None:
    counters = {"num_batches_tracked": torch.tensor(10, dtype=torch.int64)}

    result = add_scaled(counters, {"num_batches_tracked": torch.tensor(5.0)}, 0.5)

    assert result["num_batches_tracked"].dtype == torch.int64
    assert int(result["num_batches_tracked"]) == 12  # 10 + 2.5 rounds to even


def test_update_norm_spans_all_tensors() -> None:
    assert update_norm({"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([12.0])}) == pytest.approx(13.0)


# ----------------------------------------------------------------------------------------------------
# FedAsync
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("function", "staleness", "alpha_t"),
    [
        (staleness_function("constant"), 3, 0.5 * 1.0),
        (staleness_function("polynomial", a=0.5), 3, 0.5 * (3 + 1) ** -0.5),
        (staleness_function("hinge", a=10, b=4), 3, 0.5 * 1.0),
        (staleness_function("hinge", a=10, b=4), 6, 0.5 / (10 * (6 - 4) + 1)),
    ],
)
def test_fedasync_mixes_the_local_model_with_alpha_times_staleness(
    function: StalenessFunction, staleness: int, alpha_t: float
) -> None:
    strategy = FedAsync(alpha=0.5, staleness=function)
    global_params, base_params, delta = params(1.0, 2.0), params(0.0, 0.0), params(4.0, -2.0)
    version = 10

    new_params = strategy.add(
        global_params,
        version,
        contribution(delta, base_version=version - staleness, staleness=staleness),
        base_params,
    )

    # x_new = base + delta = [4, -2];  x_t = (1 - alpha_t) x_{t-1} + alpha_t x_new
    expected = [(1 - alpha_t) * 1.0 + alpha_t * 4.0, (1 - alpha_t) * 2.0 + alpha_t * -2.0]
    assert values_of(new_params) == pytest.approx(expected, rel=1e-6)
    assert strategy.buffered() == 0
    assert values_of(global_params) == [1.0, 2.0]


def test_fedasync_keeps_float64_and_integer_parameters_in_their_dtypes() -> None:
    strategy = FedAsync(alpha=1.0, staleness=staleness_function("constant"))
    global_params = {"w": torch.tensor([1.0], dtype=torch.float64), "n": torch.tensor(4, dtype=torch.int64)}
    delta = {"w": torch.tensor([0.25]), "n": torch.tensor(2.0)}

    new_params = strategy.add(global_params, 0, contribution(delta), global_params)

    assert new_params is not None
    assert new_params["w"].dtype == torch.float64 and float(new_params["w"][0]) == 1.25
    assert new_params["n"].dtype == torch.int64 and int(new_params["n"]) == 6


def test_fedasync_refuses_a_delta_that_does_not_fit_the_model() -> None:
    strategy = FedAsync()

    with pytest.raises(AggregationError, match=r"direction\['w'\] has shape \(3,\)"):
        strategy.add(params(1.0, 2.0), 0, contribution(params(1.0, 2.0, 3.0)), params(1.0, 2.0))


@settings(max_examples=60, deadline=None)
@given(
    alpha=st.floats(min_value=0.01, max_value=1.0),
    staleness=st.integers(min_value=0, max_value=50),
    kind=st.sampled_from(["constant", "polynomial", "hinge"]),
    current=st.lists(st.floats(-1e3, 1e3), min_size=3, max_size=3),
    local=st.lists(st.floats(-1e3, 1e3), min_size=3, max_size=3),
)
def test_fedasync_stays_between_the_global_and_the_local_model(
    alpha: float, staleness: int, kind: str, current: list[float], local: list[float]
) -> None:
    strategy = FedAsync(alpha=alpha, staleness=staleness_function(kind))
    global_params = {"w": torch.tensor(current)}
    base_params = {"w": torch.zeros(3)}

    new_params = strategy.add(
        global_params, staleness, contribution({"w": torch.tensor(local)}, staleness=staleness), base_params
    )

    assert new_params is not None
    low = torch.minimum(torch.tensor(current), torch.tensor(local))
    high = torch.maximum(torch.tensor(current), torch.tensor(local))
    assert bool(torch.all(new_params["w"] >= low)) and bool(torch.all(new_params["w"] <= high))


# ----------------------------------------------------------------------------------------------------
# FedBuff
# ----------------------------------------------------------------------------------------------------


def test_fedbuff_buffers_until_k_then_applies_the_staleness_weighted_mean() -> None:
    strategy = FedBuff(buffer_size=2)  # default s(tau) = 1 / sqrt(1 + tau), server SGD with eta_g = 1
    global_params = params(1.0, 1.0)

    first = strategy.add(global_params, 5, contribution(params(2.0, 0.0), update_id="u1", staleness=0), global_params)
    buffered_ids = strategy.buffered_update_ids()
    second = strategy.add(
        global_params,
        5,
        contribution(params(0.0, 4.0), site_id="site-b", update_id="u2", staleness=3),
        global_params,
    )

    assert first is None and buffered_ids == ["u1"]
    # g = (1/sqrt(1) * [2, 0] + 1/sqrt(4) * [0, 4]) / 2 = [1, 1];  x = [1, 1] + 1.0 * g
    assert values_of(second) == pytest.approx([2.0, 2.0])
    assert strategy.buffered() == 0


def test_fedbuff_sgd_uses_the_server_learning_rate() -> None:
    strategy = FedBuff(buffer_size=1, server_optimizer=ServerOptimizer("sgd", learning_rate=0.5))

    new_params = strategy.add(params(1.0, 1.0), 0, contribution(params(2.0, -4.0)), params(1.0, 1.0))

    assert values_of(new_params) == pytest.approx([1.0 + 0.5 * 2.0, 1.0 + 0.5 * -4.0])


GRADIENT_STEP_1 = (1.0, -2.0)
GRADIENT_STEP_2 = (3.0, 0.0)


def run_two_steps(optimizer: ServerOptimizer) -> tuple[list[float], list[float]]:
    """K = 1 and staleness 0, so each pseudo-gradient is exactly the delta sent."""
    strategy = FedBuff(buffer_size=1, server_optimizer=optimizer)
    start = params(0.0, 0.0)
    after_first = strategy.add(start, 0, contribution(params(*GRADIENT_STEP_1), update_id="u1"), start)
    assert after_first is not None
    after_second = strategy.add(after_first, 1, contribution(params(*GRADIENT_STEP_2), update_id="u2"), after_first)
    return values_of(after_first), values_of(after_second)


def test_server_momentum_carries_the_first_step_into_the_second() -> None:
    after_first, after_second = run_two_steps(ServerOptimizer("momentum", learning_rate=1.0, momentum=0.9))

    # m1 = g1 = [1, -2];  x1 = [1, -2];  m2 = 0.9 m1 + g2 = [3.9, -1.8];  x2 = x1 + m2 = [4.9, -3.8]
    assert after_first == pytest.approx([1.0, -2.0])
    assert after_second == pytest.approx([4.9, -3.8])


@pytest.mark.parametrize("kind", ["adam", "yogi", "adagrad"])
def test_fedopt_adaptive_steps_match_reddi_algorithm_2(kind: str) -> None:
    eta, beta1, beta2, tau = 0.1, 0.9, 0.99, 1e-3

    def next_second_moment(v: float, g: float) -> float:
        if kind == "adam":
            return beta2 * v + (1 - beta2) * g * g
        if kind == "yogi":
            return v - (1 - beta2) * g * g * math.copysign(1.0, v - g * g) if v != g * g else v
        return v + g * g

    expected_first, expected_second = [], []
    for g1, g2 in zip(GRADIENT_STEP_1, GRADIENT_STEP_2, strict=True):
        m1 = (1 - beta1) * g1
        v1 = next_second_moment(tau**2, g1)
        x1 = 0.0 + eta * m1 / (math.sqrt(v1) + tau)
        m2 = beta1 * m1 + (1 - beta1) * g2
        v2 = next_second_moment(v1, g2)
        expected_first.append(x1)
        expected_second.append(x1 + eta * m2 / (math.sqrt(v2) + tau))

    after_first, after_second = run_two_steps(
        ServerOptimizer(kind, learning_rate=eta, beta1=beta1, beta2=beta2, tau=tau)
    )

    assert after_first == pytest.approx(expected_first, rel=1e-5)
    assert after_second == pytest.approx(expected_second, rel=1e-5)


def test_adam_first_step_by_hand() -> None:
    """One element written out fully: g = 1, m = 0.1, v = 0.99e-6 + 0.01, x = 0.1 * m / (sqrt(v) + 1e-3)."""
    after_first, _ = run_two_steps(ServerOptimizer("adam", learning_rate=0.1))

    assert after_first[0] == pytest.approx(0.1 * 0.1 / (math.sqrt(0.99e-6 + 0.01) + 1e-3), rel=1e-6)


def test_fedbuff_refuses_a_misshapen_delta_and_keeps_its_buffer() -> None:
    strategy = FedBuff(buffer_size=2)
    global_params = params(0.0, 0.0)
    strategy.add(global_params, 0, contribution(params(2.0, 2.0), update_id="good-1"), global_params)

    with pytest.raises(AggregationError, match="missing \\['w'\\], unexpected \\['v'\\]"):
        strategy.add(global_params, 0, contribution({"v": torch.zeros(2)}, update_id="bad"), global_params)
    buffered_after_refusal = strategy.buffered_update_ids()
    new_params = strategy.add(global_params, 0, contribution(params(4.0, 0.0), update_id="good-2"), global_params)

    assert buffered_after_refusal == ["good-1"]
    assert values_of(new_params) == pytest.approx([3.0, 1.0])  # ([2, 2] + [4, 0]) / 2


def test_site_share_cap_refuses_a_site_over_its_places_in_the_buffer() -> None:
    # ceil(0.28 * 25) = 7 places per site, although 0.28 * 25 is 7.000000000000001 in floats
    strategy = FedBuff(buffer_size=25, max_site_share=0.28)
    global_params = params(0.0, 0.0)
    for index in range(7):
        update = contribution(params(1.0, 1.0), update_id=f"a{index}")
        assert strategy.check(update, 0) is None
        strategy.add(global_params, 0, update, global_params)

    eighth = contribution(params(1.0, 1.0), update_id="a7")
    other_site = contribution(params(1.0, 1.0), site_id="site-b", update_id="b0")

    assert strategy.check(eighth, 0) == "site-share"
    assert strategy.check(other_site, 0) is None
    with pytest.raises(AggregationError, match="site-share"):
        strategy.add(global_params, 0, eighth, global_params)
    assert strategy.buffered_update_ids() == [f"a{index}" for index in range(7)]


def test_site_share_cap_resets_when_the_buffer_is_applied() -> None:
    strategy = FedBuff(buffer_size=2, max_site_share=0.5)  # one place per site
    global_params = params(0.0, 0.0)
    strategy.add(global_params, 0, contribution(params(1.0, 1.0), update_id="a0"), global_params)
    strategy.add(global_params, 0, contribution(params(1.0, 1.0), site_id="site-b", update_id="b0"), global_params)

    reason = strategy.check(contribution(params(1.0, 1.0), update_id="a1"), 1)

    assert reason is None


def test_example_weighted_fedbuff_weights_each_delta_by_its_examples_and_staleness() -> None:
    strategy = FedBuff(buffer_size=2, example_weighted=True)  # s(tau) = 1 / sqrt(1 + tau), server SGD, eta_g = 1
    global_params = params(1.0, 1.0)

    first = strategy.add(
        global_params, 5, contribution(params(2.0, 0.0), update_id="u1", staleness=0, num_examples=30), global_params
    )
    second = strategy.add(
        global_params,
        5,
        contribution(params(0.0, 4.0), site_id="site-b", update_id="u2", staleness=3, num_examples=10),
        global_params,
    )

    assert first is None
    # g = (30 * 1/sqrt(1) * [2, 0] + 10 * 1/sqrt(4) * [0, 4]) / (30 + 10) = [60, 20] / 40 = [1.5, 0.5]
    assert values_of(second) == pytest.approx([2.5, 1.5])


def test_example_weighted_fedbuff_with_equal_counts_is_the_published_rule() -> None:
    global_params = params(1.0, 1.0)
    updates = [
        contribution(params(2.0, 0.0), update_id="u1", staleness=0, num_examples=7),
        contribution(params(0.0, 4.0), site_id="site-b", update_id="u2", staleness=3, num_examples=7),
    ]

    published_params, _ = feed(FedBuff(buffer_size=2), global_params, 5, updates)
    weighted_params, _ = feed(FedBuff(buffer_size=2, example_weighted=True), global_params, 5, updates)

    # both: ([2, 0] + 1/2 * [0, 4]) / 2 = [1, 1];  x = [2, 2]
    assert values_of(published_params) == pytest.approx([2.0, 2.0])
    assert values_of(weighted_params) == pytest.approx([2.0, 2.0])


def test_example_weighted_fedbuff_refuses_an_update_with_no_examples() -> None:
    empty = contribution(params(1.0, 1.0), num_examples=0)

    weighted_reason = FedBuff(buffer_size=2, example_weighted=True).check(empty, 0)
    published_reason = FedBuff(buffer_size=2).check(empty, 0)

    assert weighted_reason == "no-examples"
    assert published_reason is None


# ----------------------------------------------------------------------------------------------------
# Synchronous FedAvg
# ----------------------------------------------------------------------------------------------------


def test_sync_fedavg_is_the_example_weighted_mean_of_the_local_models() -> None:
    strategy = SyncFedAvg(sites=["a", "b", "c"])
    global_params = params(1.0, 1.0)
    local_models = {"a": (params(3.0, 1.0), 1), "b": (params(1.0, 5.0), 3), "c": (params(1.0, 1.0), 4)}
    results = []

    for site, (local, examples) in local_models.items():
        delta = {"w": local["w"] - global_params["w"]}
        update = contribution(delta, site_id=site, update_id=site, base_version=7, num_examples=examples)
        results.append(strategy.add(global_params, 7, update, global_params))

    # (1 * [3, 1] + 3 * [1, 5] + 4 * [1, 1]) / 8 = [10 / 8, 20 / 8]
    assert results[:2] == [None, None]
    assert values_of(results[2]) == pytest.approx([1.25, 2.5])


def test_sync_round_rules_refuse_wrong_round_repeats_and_strangers() -> None:
    strategy = SyncFedAvg(sites=["a", "b"])
    global_params = params(0.0, 0.0)
    strategy.add(global_params, 3, contribution(params(1.0, 1.0), site_id="a", base_version=3), global_params)

    assert strategy.check(contribution(params(1.0, 1.0), site_id="b", base_version=2), 3) == "wrong-round"
    assert strategy.check(contribution(params(1.0, 1.0), site_id="a", base_version=3), 3) == "already-in-round"
    assert strategy.check(contribution(params(1.0, 1.0), site_id="z", base_version=3), 3) == "unknown-site"
    assert (
        strategy.check(contribution(params(1.0, 1.0), site_id="b", base_version=3, num_examples=0), 3) == "no-examples"
    )
    assert strategy.check(contribution(params(1.0, 1.0), site_id="b", base_version=3), 3) is None


def test_sync_round_timeout_aggregates_what_the_round_has() -> None:
    strategy = SyncFedAvg(sites=["a", "b"], round_timeout_seconds=10.0)
    global_params = params(1.0, 1.0)
    assert strategy.flush(global_params, 0, now=100.0) is None  # the round's clock starts
    update = contribution(params(2.0, -1.0), site_id="a", update_id="a0", num_examples=5)
    assert strategy.add(global_params, 0, update, global_params) is None

    before_timeout = strategy.flush(global_params, 0, now=109.0)
    after_timeout = strategy.flush(global_params, 0, now=110.0)

    assert before_timeout is None
    assert values_of(after_timeout) == pytest.approx([3.0, 0.0])  # only site a: x + 5 * delta / 5
    assert strategy.buffered() == 0
    assert strategy.check(contribution(params(1.0, 1.0), site_id="a", base_version=1), 1) is None


def test_sync_round_timeout_waits_for_min_updates() -> None:
    strategy = SyncFedAvg(sites=["a", "b", "c"], round_timeout_seconds=10.0, min_updates=2)
    global_params = params(1.0, 1.0)
    strategy.flush(global_params, 0, now=0.0)
    strategy.add(global_params, 0, contribution(params(2.0, 2.0), site_id="a", update_id="a0"), global_params)

    with_one = strategy.flush(global_params, 0, now=50.0)
    strategy.add(global_params, 0, contribution(params(4.0, 4.0), site_id="b", update_id="b0"), global_params)
    with_two = strategy.flush(global_params, 0, now=51.0)

    assert with_one is None
    assert values_of(with_two) == pytest.approx([1.0 + 3.0, 1.0 + 3.0])  # (10 * 2 + 10 * 4) / 20


def test_sync_round_completes_when_a_missing_site_is_deregistered() -> None:
    strategy = SyncFedAvg(sites=["a", "b"], round_timeout_seconds=None)
    global_params = params(0.0, 0.0)
    strategy.add(global_params, 0, contribution(params(1.0, 1.0), site_id="a"), global_params)

    strategy.set_sites(["a"])
    new_params = strategy.flush(global_params, 0, now=1e9)

    assert values_of(new_params) == pytest.approx([1.0, 1.0])


# ----------------------------------------------------------------------------------------------------
# Checkpoint round trip
# ----------------------------------------------------------------------------------------------------


def feed(strategy: Strategy, model: Params, version: int, updates: list[Contribution]) -> tuple[Params, int]:
    for update in updates:
        result = strategy.add(model, version, update, model)
        if result is not None:
            model, version = result, version + 1
    return model, version


def fedbuff_updates(first_id: int, count: int) -> list[Contribution]:
    return [
        contribution(
            params(0.1 * index, -0.3 * index + 1.0),
            site_id=f"site-{index % 3}",
            update_id=f"u{index}",
            staleness=index % 4,
        )
        for index in range(first_id, first_id + count)
    ]


@pytest.mark.parametrize("kind", ["momentum", "adam", "yogi"])
def test_fedbuff_restored_mid_buffer_makes_the_same_next_model(kind: str) -> None:
    def fresh() -> FedBuff:
        return FedBuff(buffer_size=3, server_optimizer=ServerOptimizer(kind, learning_rate=0.1))

    uninterrupted = fresh()
    model, version = feed(uninterrupted, params(0.5, 0.5), 0, fedbuff_updates(0, 4))  # one step + 1 buffered
    state = uninterrupted.state_dict()
    restored = fresh()
    restored.load_state_dict(state)
    restored_ids = restored.buffered_update_ids()

    expected, _ = feed(uninterrupted, model, version, fedbuff_updates(4, 5))
    actual, _ = feed(restored, model, version, fedbuff_updates(4, 5))

    assert checkpoint_safe(state)
    assert restored_ids == ["u3"]
    assert torch.equal(actual["w"], expected["w"])


def test_example_weighted_fedbuff_restored_mid_buffer_makes_the_same_next_model() -> None:
    def fresh() -> FedBuff:
        return FedBuff(buffer_size=3, example_weighted=True, server_optimizer=ServerOptimizer("adam"))

    def updates(first_id: int, count: int) -> list[Contribution]:
        return [
            replace(update, num_examples=5 + 20 * (index % 3))
            for index, update in enumerate(fedbuff_updates(first_id, count))
        ]

    uninterrupted = fresh()
    model, version = feed(uninterrupted, params(0.5, 0.5), 0, updates(0, 5))  # one step + 2 buffered
    state = uninterrupted.state_dict()
    restored = fresh()
    restored.load_state_dict(state)

    expected, _ = feed(uninterrupted, model, version, updates(5, 4))
    actual, _ = feed(restored, model, version, updates(5, 4))

    assert checkpoint_safe(state)
    assert restored.buffered_update_ids() == uninterrupted.buffered_update_ids()
    assert torch.equal(actual["w"], expected["w"])


def test_a_fedbuff_checkpoint_with_the_other_example_weighting_is_refused() -> None:
    published_state = FedBuff().state_dict()
    weighted_state = FedBuff(example_weighted=True).state_dict()
    from_before_the_option = {
        key: value for key, value in published_state.items() if key not in ("example_weighted", "buffered_examples")
    }

    with pytest.raises(AggregationError, match="example_weighted=False, the config says True"):
        FedBuff(example_weighted=True).load_state_dict(published_state)
    with pytest.raises(AggregationError, match="example_weighted=True, the config says False"):
        FedBuff().load_state_dict(weighted_state)
    FedBuff().load_state_dict(from_before_the_option)  # an older checkpoint is the published, unweighted rule


def test_sync_restored_mid_round_makes_the_same_next_model() -> None:
    def fresh() -> SyncFedAvg:
        return SyncFedAvg(sites=["a", "b"], server_optimizer=ServerOptimizer("adam"))

    uninterrupted = fresh()
    model = params(0.0, 0.0)
    model, _ = feed(
        uninterrupted,
        model,
        0,
        [
            contribution(params(1.0, 2.0), site_id="a", update_id="a0", num_examples=3),
            contribution(params(3.0, 0.0), site_id="b", update_id="b0", num_examples=1),
            contribution(params(-1.0, 1.0), site_id="a", update_id="a1", base_version=1, num_examples=2),
        ],
    )
    state = uninterrupted.state_dict()
    restored = fresh()
    restored.load_state_dict(state)
    last = contribution(params(0.5, 0.5), site_id="b", update_id="b1", base_version=1, num_examples=2)

    expected = uninterrupted.add(model, 1, last, model)
    actual = restored.add(model, 1, last, model)

    assert checkpoint_safe(state)
    assert restored.check(contribution(params(0.0, 0.0), site_id="a", base_version=1), 1) is None  # reset
    assert expected is not None and actual is not None
    assert torch.equal(actual["w"], expected["w"])


def test_a_checkpoint_from_another_strategy_or_optimiser_is_refused() -> None:
    fedbuff_state = FedBuff(server_optimizer=ServerOptimizer("adam")).state_dict()

    with pytest.raises(AggregationError, match="written by strategy 'fedbuff'"):
        FedAsync().load_state_dict(fedbuff_state)
    with pytest.raises(AggregationError, match="server optimiser 'adam'"):
        FedBuff(server_optimizer=ServerOptimizer("sgd")).load_state_dict(fedbuff_state)
    assert checkpoint_safe(FedAsync().state_dict())


def test_interpolate_is_exact_where_the_models_agree() -> None:
    same = params(0.1, -7.3)

    assert torch.equal(interpolate(same, same, 0.37)["w"], same["w"])


# ----------------------------------------------------------------------------------------------------
# What the service asks of a strategy
# ----------------------------------------------------------------------------------------------------


def test_each_strategy_says_what_the_service_needs_to_know() -> None:
    fedasync, buffered, sync = FedAsync(), FedBuff(buffer_size=4), SyncFedAvg()
    sync.set_sites(["a", "b", "c"])
    buffered.set_sites(["a", "b", "c"])  # a strategy that does not wait for sites ignores them

    assert [fedasync.keeps_base_history, buffered.keeps_base_history, sync.keeps_base_history] == [True, False, False]
    assert [fedasync.trains_on_same_version, buffered.trains_on_same_version, sync.trains_on_same_version] == [
        True,
        True,
        False,
    ]
    assert [fedasync.capacity, buffered.capacity, sync.capacity, SyncFedAvg().capacity] == [1, 4, 3, 1]


class FailingStep(ServerOptimizer):
    def step(self, params: Any, pseudo_gradient: Any) -> Params:
        raise RuntimeError("simulated failure")


@pytest.mark.parametrize("example_weighted", [False, True])
def test_an_add_that_fails_leaves_the_fedbuff_buffer_as_it_was(example_weighted: bool) -> None:
    # Prepare: one update buffered, K = 2
    strategy = FedBuff(buffer_size=2, server_optimizer=FailingStep("sgd"), example_weighted=example_weighted)
    global_params = params(1.0, 1.0)
    strategy.add(global_params, 0, contribution(params(1.0, 2.0), update_id="u1"), global_params)
    before = strategy.state_dict()

    # Execute: the second update fills the buffer; the step fails
    with pytest.raises(RuntimeError, match="simulated failure"):
        strategy.add(global_params, 0, contribution(params(5.0, 5.0), site_id="site-b", update_id="u2"), global_params)

    # Assert
    after = strategy.state_dict()
    assert after["update_ids"] == before["update_ids"] == ["u1"]
    assert after["buffered_examples"] == before["buffered_examples"]
    assert values_of(after["weighted_delta_sum"]) == values_of(before["weighted_delta_sum"])
