"""Liveness, federated evaluation and the stopping rules, seen through metrics, files and the control queues."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from broker.topology import Exchange, Kind, routing_key, site_control_queue
from coordinator.config import LivenessSettings, StoppingSettings
from coordinator.evaluation import EvaluationBook, aggregate_reports
from coordinator.model_files import write_safetensors
from schemas import Control, ControlCommand, EvalReport, Heartbeat, SiteState
from schemas.tensors import DTYPES
from tests.unit.test_coordinator_service import SITES, FakeClock, Federation, fedbuff, start_federation


def send_status(federation: Federation, site: str, kind: Kind, body: bytes, *, user_id: str | None = None) -> None:
    sender = user_id or site
    federation.broker.connect(sender).publish(Exchange.STATUS.value, routing_key(site, kind), body, user_id=sender)
    federation.transport.poll(0)
    federation.coordinator.commit()


def heartbeat(federation: Federation, site: str, *, user_id: str | None = None) -> None:
    body = Heartbeat(site_id=site, state=SiteState.TRAINING, agent_version="0.1.0").encode()
    send_status(federation, site, Kind.HEARTBEAT, body, user_id=user_id)


def evaluate(federation: Federation, site: str, version: int, num_examples: int, **metrics: float) -> None:
    report = EvalReport(site_id=site, model_version=version, num_examples=num_examples, metrics=metrics)
    send_status(federation, site, Kind.EVAL, report.encode())


def controls(federation: Federation, site: str) -> list[Control]:
    return [Control.decode(message.body) for message in federation.broker.queues[site_control_queue(site)].messages]


def report(site: str, num_examples: int, **metrics: float) -> EvalReport:
    return EvalReport(site_id=site, model_version=0, num_examples=num_examples, metrics=metrics)


# ------------------------------------------------------------------------------------------------- liveness


def test_a_site_is_up_while_heard_from_and_down_after_the_timeout(tmp_path: Path) -> None:
    # Prepare
    federation = start_federation(tmp_path, fedbuff(), liveness=LivenessSettings(site_timeout_seconds=30))
    assert federation.sample("fedmq_site_up", site="a") == 0

    # Execute / Assert: a heartbeat brings a up
    heartbeat(federation, "a")
    assert federation.sample("fedmq_site_up", site="a") == 1
    assert federation.sample("fedmq_site_last_seen_timestamp_seconds", site="a") == federation.clock.now
    assert federation.sample("fedmq_site_up", site="b") == 0

    # ... silence of exactly the timeout is still up
    federation.clock.advance(30)
    federation.coordinator.tick()
    assert federation.sample("fedmq_site_up", site="a") == 1

    # ... longer is down
    federation.clock.advance(0.5)
    federation.coordinator.tick()
    assert federation.sample("fedmq_site_up", site="a") == 0

    # ... and the next heartbeat brings it back
    heartbeat(federation, "a")
    assert federation.sample("fedmq_site_up", site="a") == 1


def test_an_accepted_update_counts_as_being_heard_from(tmp_path: Path) -> None:
    federation = start_federation(tmp_path, fedbuff(buffer_size=2))

    federation.send_good("b")

    assert federation.sample("fedmq_site_up", site="b") == 1
    assert federation.sample("fedmq_site_last_seen_timestamp_seconds", site="b") == federation.clock.now


@pytest.mark.parametrize("sender", ["b", "a"], ids=["another site's login", "claims another site_id"])
def test_a_heartbeat_about_another_site_is_ignored(tmp_path: Path, sender: str) -> None:
    # Prepare
    federation = start_federation(tmp_path, fedbuff())
    body = Heartbeat(site_id="b" if sender == "a" else "a", state=SiteState.IDLE, agent_version="x").encode()

    # Execute: sent on a's routing key
    send_status(federation, "a", Kind.HEARTBEAT, body, user_id=sender)

    # Assert
    assert federation.sample("fedmq_site_up", site="a") == 0
    assert federation.sample("fedmq_site_up", site="b") == 0
    assert federation.transport.unacked == {}


# ----------------------------------------------------------------------------------------------- evaluation


def test_mean_treats_hospitals_equally_and_pooled_weights_by_examples() -> None:
    # Execute: a has 10 test cases at 0.9, b 30 at 0.5; only a reports auc
    evaluation = aggregate_reports(0, {"a": report("a", 10, accuracy=0.9, auc=0.8), "b": report("b", 30, accuracy=0.5)})

    # Assert: mean (0.9 + 0.5) / 2, pooled (9 + 15) / 40
    assert evaluation.mean["accuracy"] == pytest.approx(0.7)
    assert evaluation.pooled["accuracy"] == pytest.approx(0.6)
    assert evaluation.mean["auc"] == evaluation.pooled["auc"] == pytest.approx(0.8)
    assert evaluation.sites == ("a", "b")
    assert evaluation.num_examples == 40


def test_pooled_falls_back_to_the_mean_when_no_site_counts_examples() -> None:
    evaluation = aggregate_reports(0, {"a": report("a", 0, loss=1.0), "b": report("b", 0, loss=3.0)})

    assert evaluation.pooled["loss"] == evaluation.mean["loss"] == pytest.approx(2.0)


def test_evaluations_reach_the_metrics_and_the_history_file(tmp_path: Path) -> None:
    # Prepare
    federation = start_federation(tmp_path, fedbuff())

    # Execute
    evaluate(federation, "a", 0, 10, accuracy=0.9, loss=0.3)
    evaluate(federation, "b", 0, 30, accuracy=0.5, loss=0.7)

    # Assert: metrics
    assert federation.sample("fedmq_eval_metric", site="a", metric="accuracy") == pytest.approx(0.9)
    assert federation.sample("fedmq_eval_global", metric="accuracy", aggregate="mean") == pytest.approx(0.7)
    assert federation.sample("fedmq_eval_global", metric="accuracy", aggregate="pooled") == pytest.approx(0.6)
    assert federation.sample("fedmq_eval_global", metric="loss", aggregate="mean") == pytest.approx(0.5)
    assert federation.sample("fedmq_eval_global", metric="loss", aggregate="pooled") == pytest.approx(0.6)
    assert federation.sample("fedmq_site_up", site="b") == 1
    # ... and one history row per report, the second with both hospitals in
    rows = [json.loads(line) for line in (tmp_path / "evaluations.jsonl").read_text().splitlines()]
    assert [(row["version"], row["site"], row["num_examples"]) for row in rows] == [(0, "a", 10), (0, "b", 30)]
    assert rows[0]["sites_reported"] == ["a"]
    assert rows[0]["pooled"]["accuracy"] == pytest.approx(0.9)
    assert rows[1]["sites_reported"] == ["a", "b"]
    assert rows[1]["mean"]["accuracy"] == pytest.approx(0.7)
    assert rows[1]["pooled"]["accuracy"] == pytest.approx(0.6)
    assert rows[1]["metrics"] == {"accuracy": 0.5, "loss": 0.7}


def test_the_dashboard_view_uses_each_sites_latest_report() -> None:
    # Prepare
    book = EvaluationBook(history_path=None)
    book.add(EvalReport(site_id="a", model_version=1, num_examples=10, metrics={"accuracy": 0.5}), 0.0)
    book.add(EvalReport(site_id="b", model_version=2, num_examples=10, metrics={"accuracy": 0.7}), 0.0)

    # Execute: a late report about an older version does not replace a's newer one
    book.add(EvalReport(site_id="a", model_version=0, num_examples=10, metrics={"accuracy": 0.1}), 0.0)
    latest = book.latest()

    # Assert
    assert latest is not None
    assert latest.version == 2
    assert latest.mean["accuracy"] == pytest.approx(0.6)
    version_zero = book.for_version(0)
    assert version_zero is not None and version_zero.sites == ("a",)


# ------------------------------------------------------------------------------------------------- stopping


def read_safetensors(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Parsed by hand from the format: 8-byte little-endian header length, JSON header, raw data."""
    raw = path.read_bytes()
    header_length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_length])
    data = raw[8 + header_length :]
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        assert entry["dtype"] == "F32"
        start, end = entry["data_offsets"]
        tensors[name] = torch.frombuffer(bytearray(data[start:end]), dtype=torch.float32).reshape(entry["shape"])
    return header, tensors


def assert_run_stopped(federation: Federation, reason_fragment: str) -> dict[str, Any]:
    """Control stop in every site's queue, a final model equal to the coordinator's, and the run summary."""
    assert federation.coordinator.finished
    for site in SITES:
        [control] = controls(federation, site)
        assert control.command is ControlCommand.STOP
        assert reason_fragment in control.reason
    header, tensors = read_safetensors(federation.state_dir / "final_model.safetensors")
    assert header["__metadata__"]["version"] == str(federation.coordinator.state.version)
    assert tensors.keys() == federation.coordinator.state.params.keys()
    for name, tensor in tensors.items():
        assert torch.equal(tensor, federation.coordinator.state.params[name])
    summary: dict[str, Any] = json.loads((federation.state_dir / "run_summary.json").read_text())
    assert reason_fragment in summary["stop_reason"]
    assert summary["versions"] == federation.coordinator.state.version
    return summary


def test_max_versions_stops_once_the_up_sites_evaluated_the_final_model(tmp_path: Path) -> None:
    # Prepare: K = 1, stop at version 1
    federation = start_federation(tmp_path, fedbuff(), stopping=StoppingSettings(max_versions=1))
    federation.send_good("a")
    federation.coordinator.tick()
    assert not federation.coordinator.finished
    assert controls(federation, "a") == []

    # Execute: a (the only site up) evaluates version 1
    evaluate(federation, "a", 1, 20, accuracy=0.75)
    federation.coordinator.tick()

    # Assert
    summary = assert_run_stopped(federation, "reached 1 versions")
    assert summary["updates_accepted"] == 1
    assert summary["final_evaluation"]["pooled"] == {"accuracy": 0.75}
    assert summary["final_evaluation"]["per_site"] == {"a": {"accuracy": 0.75}}
    assert summary["sites"]["a"]["up"] is True
    assert summary["config"]["stopping"]["max_versions"] == 1


def test_a_silent_site_delays_the_stop_only_until_the_final_evaluation_timeout(tmp_path: Path) -> None:
    # Prepare
    stopping = StoppingSettings(max_versions=1, final_eval_timeout_seconds=30)
    federation = start_federation(tmp_path, fedbuff(), stopping=stopping)
    federation.send_good("a")
    federation.coordinator.tick()

    # Execute / Assert
    federation.clock.advance(30)
    federation.coordinator.tick()
    assert not federation.coordinator.finished
    federation.clock.advance(1)
    federation.coordinator.tick()
    summary = assert_run_stopped(federation, "reached 1 versions")
    assert summary["final_evaluation"] is None


def test_the_wall_clock_budget_stops_the_run(tmp_path: Path) -> None:
    # Prepare
    federation = start_federation(tmp_path, fedbuff(), stopping=StoppingSettings(max_seconds=100))

    # Execute / Assert
    federation.clock.advance(99)
    federation.coordinator.tick()
    federation.coordinator.tick()
    assert not federation.coordinator.finished
    federation.clock.advance(1)
    federation.coordinator.tick()
    federation.coordinator.tick()
    assert_run_stopped(federation, "wall-clock budget of 100 s")


@pytest.mark.parametrize(
    ("target", "aggregate", "stops"),
    [(0.6, "pooled", True), (0.61, "pooled", False), (0.7, "mean", True), (0.71, "mean", False)],
)
def test_a_target_metric_stops_the_run_once_every_up_site_reported(
    tmp_path: Path, target: float, aggregate: str, stops: bool
) -> None:
    # Prepare: a and b are up
    stopping = StoppingSettings(target_metric="accuracy", target_value=target, target_aggregate=aggregate)
    federation = start_federation(tmp_path, fedbuff(), stopping=stopping)
    heartbeat(federation, "a")
    heartbeat(federation, "b")

    # Execute: a alone would be enough (0.9), but b has not reported yet
    evaluate(federation, "a", 0, 10, accuracy=0.9)
    federation.coordinator.tick()
    federation.coordinator.tick()
    assert not federation.coordinator.finished
    evaluate(federation, "b", 0, 30, accuracy=0.5)  # pooled 0.6, mean 0.7
    federation.coordinator.tick()
    federation.coordinator.tick()

    # Assert
    if stops:
        summary = assert_run_stopped(federation, f"{aggregate} accuracy")
        assert summary["final_evaluation"]["mean"]["accuracy"] == pytest.approx(0.7)
        assert summary["final_evaluation"]["pooled"]["accuracy"] == pytest.approx(0.6)
        assert summary["final_evaluation"]["num_examples"] == {"a": 10, "b": 30}
    else:
        assert not federation.coordinator.finished
        assert controls(federation, "a") == []
        assert not (tmp_path / "run_summary.json").exists()


def test_the_final_model_file_holds_every_wire_dtype(tmp_path: Path) -> None:
    # Prepare: one tensor of each dtype a model may carry on the wire
    tensors = {name: torch.ones(2, dtype=dtype) for name, dtype in DTYPES.items()}

    # Execute
    write_safetensors(tmp_path / "final_model.safetensors", tensors, {"version": "3"})

    # Assert: the header lists them all, each with its own byte range
    raw = (tmp_path / "final_model.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert header.pop("__metadata__") == {"version": "3"}
    assert set(header) == set(DTYPES)
    sizes = {name: entry["data_offsets"][1] - entry["data_offsets"][0] for name, entry in header.items()}
    assert sizes == {name: 2 * torch.empty((), dtype=dtype).element_size() for name, dtype in DTYPES.items()}


def test_final_model_file_reads_back_bit_exact(tmp_path: Path) -> None:
    # Prepare: a model with every dtype the final model can hold, and an empty tensor.
    from coordinator.model_files import read_safetensors

    tensors = {
        "weight": torch.randn(3, 4),
        "half": torch.randn(5).to(torch.float16),
        "brain": torch.randn(2, 2).to(torch.bfloat16),
        "steps": torch.tensor(7, dtype=torch.int64),
        "mask": torch.tensor([True, False]),
        "empty": torch.zeros(0, 3),
    }
    path = tmp_path / "final_model.safetensors"

    # Execute
    write_safetensors(path, tensors, {"version": "12"})
    loaded, metadata = read_safetensors(path)

    # Assert
    assert metadata == {"version": "12"}
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape
        assert torch.equal(loaded[name], tensor)


def test_the_wall_clock_budget_counts_from_the_runs_first_start_across_a_restart(tmp_path: Path) -> None:
    # Prepare: 60 s into a run with a 100 s budget, an update is checkpointed, then the process dies
    stopping = StoppingSettings(max_seconds=100)
    first = start_federation(tmp_path, fedbuff(buffer_size=10), stopping=stopping)
    first.clock.advance(60)
    first.send_good("a")
    first.coordinator.audit.close()

    # Execute: a new process starts at the same moment of the wall clock and resumes
    second = start_federation(tmp_path, fedbuff(buffer_size=10), stopping=stopping, clock=FakeClock(first.clock()))
    assert second.coordinator.restore()
    second.clock.advance(39)
    second.coordinator.tick()
    still_running = not second.coordinator.finished
    second.clock.advance(1)
    second.coordinator.tick()
    second.coordinator.tick()

    # Assert: 40 s after the restart, not 100
    assert still_running
    assert_run_stopped(second, "wall-clock budget of 100 s")


def test_a_damaged_final_model_file_is_reported_as_a_model_file_error(tmp_path: Path) -> None:
    # Prepare: a file cut short in the middle of its header
    from coordinator.model_files import ModelFileError, read_safetensors

    path = tmp_path / "final_model.safetensors"
    write_safetensors(path, {"weight": torch.ones(3)}, {"version": "1"})
    path.write_bytes(path.read_bytes()[:20])

    # Execute / Assert
    with pytest.raises(ModelFileError, match="not a readable safetensors file"):
        read_safetensors(path)


def test_a_status_message_that_fails_is_dropped_counted_and_the_service_serves_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: handling a's heartbeat hits a bug
    federation = start_federation(tmp_path, fedbuff())
    real_heard_from = federation.coordinator.liveness.heard_from

    def buggy(site: str, at: float, state: str | None = None) -> bool:
        if site == "a":
            raise KeyError("simulated bug")
        return real_heard_from(site, at, state)

    monkeypatch.setattr(federation.coordinator.liveness, "heard_from", buggy)

    # Execute
    heartbeat(federation, "a")
    heartbeat(federation, "b")

    # Assert: a's message is counted and acked, b's is handled as usual
    assert federation.sample("fedmq_status_errors_total", site="a") == 1
    assert federation.sample("fedmq_site_up", site="b") == 1
    assert federation.transport.unacked == {}
