"""The coordinator as a real process against a real RabbitMQ, driven by scripted sites.

Scripted sites are plain pika publishers using the credentials provisioning wrote, so what is tested is what a
hospital (or an attacker holding a hospital's login) can actually make the coordinator do.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from broker.topology import Queue, site_update_queue
from tests.integration.conftest import BrokerEnv
from tests.integration.coordinator_process import (
    CoordinatorProcess,
    ScriptedSite,
    free_port,
    samples_with,
    wait_for,
    write_coordinator_config,
)

pytestmark = pytest.mark.integration


def start_coordinator(broker_env: BrokerEnv, tmp_path: Path, sites: list[str], extra: str) -> CoordinatorProcess:
    state_dir = tmp_path / "coordinator"
    port = free_port()
    config = write_coordinator_config(
        tmp_path / "coordinator.toml",
        url=broker_env.coordinator_url,
        sites=sites,
        state_dir=state_dir,
        metrics_port=port,
        extra=extra,
    )
    coordinator = CoordinatorProcess(config, state_dir, port, tmp_path / "coordinator.log")
    coordinator.start()
    coordinator.wait_ready()
    return coordinator


def rejected(coordinator: CoordinatorProcess) -> dict[tuple[str, str], float]:
    return {
        (labels["site"], labels["reason"]): value
        for labels, value in samples_with(coordinator.metrics(), "fedmq_updates_rejected_total")
    }


def test_every_rejection_reason_is_named_counted_audited_and_dead_lettered(
    broker_env: BrokerEnv, tmp_path: Path
) -> None:
    # Prepare: two known hospitals and one provisioned site the coordinator does not know.
    urls = {site: broker_env.add_site(site).url for site in ("hospital-a", "hospital-b", "hospital-c")}
    coordinator = start_coordinator(
        broker_env,
        tmp_path,
        ["hospital-a", "hospital-b"],
        extra="""[strategy]
name = "fedbuff"
max_staleness = 2
buffer_size = 2
max_site_share = 0.5
[validation]
max_update_norm = 10.0
max_message_mb = 0.01
""",
    )
    a, b, c = (ScriptedSite(site, url) for site, url in urls.items())
    try:
        model_v0 = a.latest_model()
        first = a.update(model_v0)
        a.publish(first.encode())
        wait_for(
            lambda: any(r.get("outcome") == "accepted" for r in coordinator.audit_records()),
            30,
            "the first good update was never accepted",
        )
        # Execute: one bad update per reason, interleaved with good ones that move the model to v3.
        a.publish(a.update(model_v0).encode())  # second of a's in a buffer of 2 with a 50 % cap
        b.publish(b.update(model_v0).encode())  # fills the buffer: v1
        for version in (1, 2):  # two more buffers: v2, v3
            wait_for(lambda v=version: a.latest_model().version == v, 30, f"model v{version} never arrived")
            model = a.latest_model()
            a.publish(a.update(model).encode())
            b.publish(b.update(model).encode())
        wait_for(lambda: a.latest_model().version == 3, 30, "model v3 never arrived")
        current = a.latest_model()
        a.publish(first.encode())  # the same update again (a resend): acked as a copy, not refused
        a.publish(a.update(model_v0, seq=first.seq).encode())  # duplicate: a new update reusing an applied seq
        a.publish(a.update(model_v0).encode())  # stale: 3 > max_staleness 2
        a.publish(b"\x93not an update")  # malformed
        a.publish(bytes(20_000))  # oversized (limit 0.01 MB)
        a.publish(a.update(current).encode(), user_id=None)  # identity-mismatch: no user_id
        a.publish(a.update(current, site_id="hospital-b").encode())  # identity-mismatch: claims to be b
        wrong = {name: torch.zeros(3) for name in current.tensors}
        a.publish(a.update(current, delta=wrong).encode())  # wrong-shape
        nan = {name: torch.full_like(t, float("nan")) for name, t in current.tensors.items()}
        a.publish(a.update(current, delta=nan).encode())  # non-finite
        a.publish(a.update(current, scale=100.0).encode())  # norm-too-large
        c.publish(c.update(current).encode())  # a site this run does not list: waits in its own queue, unread
        expected = {
            ("hospital-a", "site-share"),
            ("hospital-a", "duplicate"),
            ("hospital-a", "stale"),
            ("hospital-a", "malformed"),
            ("hospital-a", "oversized"),
            ("hospital-a", "identity-mismatch"),
            ("hospital-a", "wrong-shape"),
            ("hospital-a", "non-finite"),
            ("hospital-a", "norm-too-large"),
        }
        wait_for(
            lambda: expected <= set(rejected(coordinator)),
            30,
            f"missing rejections: {expected - set(rejected(coordinator))}",
        )
        # A good update still goes through afterwards: the service kept running.
        b.publish(b.update(current).encode())
        wait_for(
            lambda: coordinator.metrics()["fedmq_updates_applied_total"][(("site", "hospital-b"),)] >= 4,
            30,
            "a good update after the rejections was not applied",
        )
        # ... and committed: a buffered update is audited once its batch is (at most about half a second later)
        wait_for(
            lambda: sum(1 for r in coordinator.audit_records() if r["outcome"] == "accepted") >= 7,
            30,
            "the last good update was never committed",
        )

        # Assert: counts, audit reasons, dead letters with the reason header, model untouched by rejections.
        counts = rejected(coordinator)
        assert counts[("hospital-a", "identity-mismatch")] == 2
        copies = samples_with(coordinator.metrics(), "fedmq_updates_redelivered_total")
        assert [(labels["site"], value) for labels, value in copies] == [("hospital-a", 1.0)]
        assert all(counts[key] >= 1 for key in expected)
        records = coordinator.audit_records()
        audited = Counter(r["reason"] for r in records if r["outcome"] == "rejected")
        assert audited["identity-mismatch"] == 2 and {reason for _, reason in expected} <= set(audited)
        # dead letters go out in the same commit, just after the batch's audit records
        wait_for(
            lambda: broker_env.message_count(Queue.DEAD_LETTERS.value) >= sum(audited.values()),
            30,
            "not every audited rejection was dead-lettered",
        )
        assert broker_env.message_count(Queue.DEAD_LETTERS.value) == sum(audited.values())
        assert coordinator.metrics()["fedmq_model_version"][()] == 3
        assert sum(1 for r in records if r["outcome"] == "accepted") == 7
        assert broker_env.message_count(site_update_queue("hospital-c")) == 1
    finally:
        for site in (a, b, c):
            site.close()
        coordinator.stop()
    verify = subprocess.run(
        [sys.executable, "-m", "fedmq", "audit", "verify", str(tmp_path / "coordinator" / "audit.jsonl")],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stdout


def test_sigkill_at_random_moments_loses_no_confirmed_update_and_applies_none_twice(
    broker_env: BrokerEnv, tmp_path: Path
) -> None:
    # Prepare: three scripted hospitals publishing with confirms while the coordinator is killed repeatedly.
    sites = ["hospital-a", "hospital-b", "hospital-c"]
    urls = {site: broker_env.add_site(site).url for site in sites}
    coordinator = start_coordinator(
        broker_env,
        tmp_path,
        sites,
        extra="""[strategy]
name = "fedbuff"
max_staleness = 1000000
buffer_size = 3
[strategy.server_optimizer]
name = "adam"
[validation]
max_update_norm = 1000.0
""",
    )
    confirmed: dict[str, list[str]] = {site: [] for site in sites}
    errors: list[BaseException] = []
    per_site = 60

    def publish_all(site_id: str) -> None:
        try:
            site = ScriptedSite(site_id, urls[site_id])
            model = site.latest_model(timeout=60)
            for _ in range(per_site):
                update = site.update(model)
                site.publish_until_taken(update.encode())  # returns once the broker confirmed it
                confirmed[site_id].append(update.update_id)
                time.sleep(random.uniform(0.0, 0.3))
            site.close()
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    publishers = [threading.Thread(target=publish_all, args=(site,)) for site in sites]
    rng = random.Random(7)
    try:
        for thread in publishers:
            thread.start()
        # Execute: kill -9 at random moments, restart each time.
        for _ in range(5):
            time.sleep(rng.uniform(0.3, 1.5))
            coordinator.kill()
            coordinator.start()
            coordinator.wait_ready()
        for thread in publishers:
            thread.join(timeout=120)
        assert not errors, errors
        total = sum(len(ids) for ids in confirmed.values())
        assert total == per_site * len(sites)

        def accepted_ids() -> list[str]:
            return [r["update_id"] for r in coordinator.audit_records() if r["outcome"] == "accepted"]

        wait_for(lambda: len(set(accepted_ids())) >= total, 120, "not every confirmed update was applied")

        def drained() -> bool:
            return all(broker_env.message_count(site_update_queue(site)) == 0 for site in sites)

        wait_for(drained, 30, "queue not drained")
    finally:
        coordinator.stop()

    # Assert: exactly the confirmed ids were accepted, each once; the checkpoint agrees; the chain verifies.
    records = coordinator.audit_records()
    accepted = [r["update_id"] for r in records if r["outcome"] == "accepted"]
    assert sorted(accepted) == sorted(uid for ids in confirmed.values() for uid in ids)
    assert len(accepted) == len(set(accepted))
    # every site sent each update once, so a second copy can only be the broker's redelivery after a kill
    assert not [r for r in records if r["outcome"] == "rejected"]
    assert all(r["redelivered"] for r in records if r["outcome"] == "already-applied")
    audit_path = tmp_path / "coordinator" / "audit.jsonl"
    ok = subprocess.run(
        [sys.executable, "-m", "fedmq", "audit", "verify", str(audit_path)], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stdout
    lines = audit_path.read_text().splitlines()
    tampered_record = json.loads(lines[5])
    tampered_record["outcome"] = "rejected"
    lines[5] = json.dumps(tampered_record, sort_keys=True)
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_text("\n".join(lines) + "\n")
    broken = subprocess.run(
        [sys.executable, "-m", "fedmq", "audit", "verify", str(tampered)], capture_output=True, text=True
    )
    assert broken.returncode == 1 and "record 6" in broken.stdout


def test_coordinator_reconnects_after_its_connection_is_cut_and_carries_on(
    broker_env: BrokerEnv, tmp_path: Path
) -> None:
    # Prepare: a running coordinator with one update applied.
    url = broker_env.add_site("hospital-a").url
    coordinator = start_coordinator(
        broker_env,
        tmp_path,
        ["hospital-a"],
        extra='[strategy]\nname = "fedasync"\nmax_staleness = 50\n',
    )
    site = ScriptedSite("hospital-a", url)
    try:
        site.publish(site.update(site.latest_model()).encode())
        wait_for(lambda: coordinator.metrics()["fedmq_model_version"][()] == 1, 30, "first update not applied")

        # Execute: the broker drops the coordinator's connection, then the site sends its next update.
        broker_env.close_connections("fedmq-coordinator")
        site.publish(site.update(site.latest_model()).encode())

        # Assert: the same process reconnected and applied it; nothing was counted twice.
        wait_for(lambda: coordinator.metrics()["fedmq_model_version"][()] == 2, 60, "no progress after reconnect")
        assert coordinator.process is not None and coordinator.process.poll() is None
        assert "reconnecting" in (tmp_path / "coordinator.log").read_text()

        # the version's metric moves when the update is applied, its audit record once the commit is durable
        def accepted() -> list[str]:
            return [r["update_id"] for r in coordinator.audit_records() if r["outcome"] == "accepted"]

        wait_for(lambda: len(accepted()) >= 2, 30, "the second update was never committed")
        assert len(accepted()) == len(set(accepted())) == 2
    finally:
        site.close()
        coordinator.stop()
