"""One hospital cannot drown the others, nor lie in its evaluations, nor read secrets out of the results: a real
coordinator process against a real RabbitMQ, driven by scripted sites with their own provisioned logins."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pika.exceptions
import pytest

from broker import topology
from broker.topology import REJECT_REASON_HEADER, Kind, Queue, site_update_queue
from schemas import EvalReport
from tests.integration.conftest import BrokerEnv
from tests.integration.coordinator_process import CoordinatorProcess, ScriptedSite, samples_with, wait_for
from tests.integration.test_coordinator import start_coordinator

pytestmark = pytest.mark.integration

FLOOD = 300
EXPECTED_REASONS = ["non-finite", "out-of-range", "too-many-examples", "unknown-version"]
FEDBUFF = """[strategy]
name = "fedbuff"
buffer_size = 3
max_staleness = 20
[validation]
max_update_norm = 1000.0
"""


def audited(coordinator: CoordinatorProcess, site: str) -> list[dict[str, object]]:
    return [r for r in coordinator.audit_records() if r.get("kind") == "update" and r["site"] == site]


def test_a_flood_from_one_site_is_refused_at_the_broker_and_leaves_honest_updates_fresh(
    broker_env: BrokerEnv, tmp_path: Path
) -> None:
    # Prepare: three hospitals; FedBuff K = 3, staleness above 20 refused (the demo's settings)
    sites = ["hospital-a", "hospital-b", "hospital-c"]
    urls = {site: broker_env.add_site(site).url for site in sites}
    coordinator = start_coordinator(broker_env, tmp_path, sites, extra=FEDBUFF)
    flooder, *honest = (ScriptedSite(site, urls[site]) for site in sites)
    try:
        model = flooder.latest_model()

        # Execute: hospital-a publishes 300 valid updates as fast as the broker confirms them ...
        taken = nacked = 0
        started = time.monotonic()
        for _ in range(FLOOD):
            try:
                flooder.publish(flooder.update(model).encode())
                taken += 1
            except pika.exceptions.NackError:
                nacked += 1
        flood_seconds = time.monotonic() - started
        # ... and right after, the two honest hospitals each send two updates on the newest model they have
        honest_ids = []
        for _ in range(2):
            for site in honest:
                update = site.update(site.latest_model())
                site.publish_until_taken(update.encode())
                honest_ids.append(update.update_id)
        wait_for(
            lambda: {r["update_id"] for r in coordinator.audit_records()} >= set(honest_ids),
            60,
            "the honest updates were never handled",
        )
        wait_for(lambda: len(audited(coordinator, "hospital-a")) == taken, 60, "not every taken flood update handled")

        # Assert: every honest update applied (none stale); the excess refused to its sender, none lost in silence
        outcomes = {r["update_id"]: (r["outcome"], r["reason"]) for r in coordinator.audit_records()}
        honest_outcomes = [outcomes[update_id] for update_id in honest_ids]
        print(
            f"flood: {FLOOD} sent in {flood_seconds:.1f} s, {taken} taken, {nacked} nacked by the broker; "
            f"honest: {honest_outcomes}"
        )
        assert honest_outcomes == [("accepted", "")] * len(honest_ids)
        assert nacked > 0 and taken + nacked == FLOOD
        assert broker_env.message_count(site_update_queue("hospital-a")) == 0
        rejected = {
            (labels["site"], labels["reason"]): value
            for labels, value in samples_with(coordinator.metrics(), "fedmq_updates_rejected_total")
        }
        assert not [key for key in rejected if key[0] != "hospital-a"]
    finally:
        for site in (flooder, *honest):
            site.close()
        coordinator.stop()


def test_the_dead_letter_queue_and_the_site_queues_are_bounded_on_the_broker(broker_env: BrokerEnv) -> None:
    broker_env.add_site("hospital-a")

    queues = {queue.name: queue.arguments for queue in broker_env.management.list_queues(broker_env.vhost)}

    assert queues[Queue.DEAD_LETTERS.value]["x-max-length"] == topology.DEAD_LETTER_MAX_LENGTH
    assert queues[Queue.DEAD_LETTERS.value]["x-max-length-bytes"] == topology.DEAD_LETTER_MAX_BYTES
    assert queues[Queue.DEAD_LETTERS.value]["x-overflow"] == "drop-head"
    assert queues[site_update_queue("hospital-a")]["x-overflow"] == "reject-publish"
    assert queues[site_update_queue("hospital-a")]["x-max-length"] == topology.SITE_UPDATE_QUEUE_LENGTH


def test_implausible_evaluation_reports_are_refused_counted_audited_and_dead_lettered(
    broker_env: BrokerEnv, tmp_path: Path
) -> None:
    # Prepare: hospital-b's honest evaluation of v0 sets the global figures
    sites = ["hospital-a", "hospital-b"]
    urls = {site: broker_env.add_site(site).url for site in sites}
    coordinator = start_coordinator(broker_env, tmp_path, sites, extra=FEDBUFF)
    a, b = (ScriptedSite(site, urls[site]) for site in sites)

    def global_accuracy() -> float | None:
        return coordinator.metrics().get("fedmq_eval_global", {}).get((("aggregate", "pooled"), ("metric", "accuracy")))

    try:
        honest = EvalReport(site_id="hospital-b", model_version=0, num_examples=30, metrics={"accuracy": 0.7})
        b.publish_status(Kind.EVAL, honest.encode())
        wait_for(lambda: global_accuracy() == pytest.approx(0.7), 30, "the honest evaluation never counted")

        # Execute: hospital-a reports accuracy 1e9 over 2^64 - 1 examples, NaN, and a version that does not exist,
        # and accuracy 1e9 over 10
        bad = [
            ({"accuracy": 1e9}, 0, 2**64 - 1),
            ({"accuracy": 1e9}, 0, 10),
            ({"accuracy": math.nan}, 0, 10),
            ({"accuracy": 0.99}, 10**15, 10),
        ]
        for metrics, version, num_examples in bad:
            report = EvalReport(site_id="hospital-a", model_version=version, num_examples=num_examples, metrics=metrics)
            a.publish_status(Kind.EVAL, report.encode())

        def rejections() -> dict[str, float]:
            return {
                labels["reason"]: value
                for labels, value in samples_with(coordinator.metrics(), "fedmq_status_rejected_total")
                if labels["site"] == "hospital-a" and labels["kind"] == "eval"
            }

        wait_for(lambda: sum(rejections().values()) == 4, 30, f"not every report was refused: {rejections()}")
        wait_for(lambda: broker_env.message_count(Queue.DEAD_LETTERS.value) == 4, 30, "not every refusal dead-lettered")

        # Assert: counted by reason, audited, dead-lettered with the reason; the global figure unchanged
        assert rejections() == {"too-many-examples": 1, "out-of-range": 1, "non-finite": 1, "unknown-version": 1}
        records = [r for r in coordinator.audit_records() if r.get("kind") == "eval"]
        assert sorted(str(r["reason"]) for r in records) == EXPECTED_REASONS
        channel = broker_env.connect(broker_env.admin_url).channel()
        reasons = []
        for _ in range(4):
            method, properties, _body = channel.basic_get(Queue.DEAD_LETTERS.value, auto_ack=True)
            assert method is not None
            reasons.append(properties.headers[REJECT_REASON_HEADER])
        assert sorted(reasons) == EXPECTED_REASONS
        assert global_accuracy() == pytest.approx(0.7)
        rows = (tmp_path / "coordinator" / "evaluations.jsonl").read_text().splitlines()
        assert [json.loads(row)["site"] for row in rows] == ["hospital-b"]
    finally:
        a.close()
        b.close()
        coordinator.stop()


def test_the_run_summary_holds_no_broker_password(broker_env: BrokerEnv, tmp_path: Path) -> None:
    # Prepare: a run that stops on its own after two seconds
    broker_env.add_site("hospital-a")
    password = broker_env.coordinator_url.split("@", 1)[0].rsplit(":", 1)[1]
    assert len(password) > 8
    coordinator = start_coordinator(
        broker_env,
        tmp_path,
        ["hospital-a"],
        extra="[stopping]\nmax_seconds = 2\nfinal_eval_timeout_seconds = 0\n",
    )
    summary_path = tmp_path / "coordinator" / "run_summary.json"
    try:
        # Execute
        wait_for(summary_path.exists, 60, "the run never finished")
    finally:
        coordinator.stop()

    # Assert: no results file holds the password
    for path in (tmp_path / "coordinator").rglob("*"):
        if path.is_file():
            assert password.encode() not in path.read_bytes(), path
    assert "****@" in json.loads(summary_path.read_text())["config"]["broker"]["url"]
