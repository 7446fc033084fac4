"""Whole federations of real processes over a real RabbitMQ: ``fedmq coordinator run`` and ``fedmq site run``.

Each hospital is its own process with the config file provisioning wrote for it (plus its [task] and [agent]
tables); the coordinator runs until its stopping rule, tells the sites to stop, and every process must exit by
itself. The audit log and the metrics endpoint are read as an operator would read them.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from tests.integration.conftest import BrokerEnv
from tests.integration.coordinator_process import free_port, samples_with, write_coordinator_config
from tests.integration.federation_helpers import (
    FedmqProcesses,
    accepted_updates,
    append_site_tables,
    coordinator_tables,
    read_audit,
    times_accepted,
    wait_until,
)

HOSPITALS = ("cleveland", "hungary", "switzerland", "long-beach")
WAITING = "connected; waiting for the global model"


def write_coordinator(broker_env: BrokerEnv, tmp_path: Path, sites: list[str], extra: str) -> tuple[Path, Path, int]:
    """coordinator.toml for this test's vhost; returns (config, state dir, metrics port)."""
    state_dir = tmp_path / "coordinator"
    metrics_port = free_port()
    config = write_coordinator_config(
        tmp_path / "coordinator.toml",
        url=broker_env.coordinator_url,
        sites=sites,
        state_dir=state_dir,
        metrics_port=metrics_port,
        extra=extra,
        keys_dir=broker_env.keys_dir,
    )
    return config, state_dir, metrics_port


def scrape_applied(metrics_port: int) -> dict[str, float]:
    """fedmq_updates_applied_total by site, read from the coordinator's endpoint ({} while it is not up)."""
    from tests.integration.coordinator_process import CoordinatorProcess

    reader = CoordinatorProcess(Path(), Path(), metrics_port, Path())
    try:
        samples = reader.metrics()
    except OSError:
        return {}
    return {labels["site"]: value for labels, value in samples_with(samples, "fedmq_updates_applied_total")}


def test_every_hospital_contributes_accepted_updates_to_a_short_federation(
    broker_env: BrokerEnv, tmp_path: Path, processes: FedmqProcesses
) -> None:
    # Prepare: four hospitals, connected and waiting, so that all of them see model v0 at once
    for hospital in HOSPITALS:
        processes.start_site(append_site_tables(broker_env.add_site(hospital).config_path))
    for hospital in HOSPITALS:
        processes.wait_for_log(hospital, WAITING)
    config, state_dir, metrics_port = write_coordinator(
        broker_env,
        tmp_path,
        list(HOSPITALS),
        coordinator_tables(
            strategy="fedbuff",
            strategy_params={"buffer_size": 3, "max_site_share": 0.67},
            max_versions=8,
            local_steps=50,
        ),
    )

    # Execute
    processes.start_coordinator(config)
    applied: dict[str, float] = {}

    def every_hospital_applied() -> bool:
        applied.update(scrape_applied(metrics_port))
        return all(applied.get(hospital, 0) >= 1 for hospital in HOSPITALS)

    wait_until(every_hospital_applied, 90, "not every hospital had an update applied", processes)
    exit_codes = {name: processes.wait_exit(name) for name in ("coordinator", *HOSPITALS)}

    # Assert: the metrics endpoint showed each hospital's applied updates ...
    assert all(applied[hospital] >= 1 for hospital in HOSPITALS)
    # ... every process finished by itself (the sites because the coordinator told them to stop) ...
    assert exit_codes == dict.fromkeys(exit_codes, 0), processes.logs()
    assert all("stopped by the coordinator" in processes.log(hospital) for hospital in HOSPITALS)
    # ... the audit log shows accepted updates from every hospital, each accepted once ...
    records = read_audit(state_dir / "audit.jsonl")
    assert {record["site"] for record in accepted_updates(records)} == set(HOSPITALS)
    assert all(record["user_id"] == record["site"] for record in accepted_updates(records))
    assert set(times_accepted(records).values()) == {1}
    # ... and the run ended at 8 versions with a final evaluation by every hospital
    summary = json.loads((state_dir / "run_summary.json").read_text())
    assert summary["versions"] == 8
    assert set(summary["final_evaluation"]["per_site"]) == set(HOSPITALS)


def test_site_agent_started_before_the_coordinator_waits_and_then_joins(
    broker_env: BrokerEnv, tmp_path: Path, processes: FedmqProcesses
) -> None:
    # Prepare: the hospital's agent is up first, with nobody to talk to
    site_config = append_site_tables(broker_env.add_site("hungary").config_path)
    processes.start_site(site_config)
    processes.wait_for_log("hungary", WAITING)
    time.sleep(2.0)
    waited_alone = processes.processes["hungary"].poll() is None
    config, state_dir, _ = write_coordinator(
        broker_env, tmp_path, ["hungary"], coordinator_tables(strategy="fedasync", max_versions=3)
    )

    # Execute
    coordinator_started = time.time()
    processes.start_coordinator(config)
    exit_codes = (processes.wait_exit("coordinator"), processes.wait_exit("hungary"))

    # Assert: the agent kept waiting, then trained on the coordinator's models until told to stop
    assert waited_alone
    assert exit_codes == (0, 0), processes.logs()
    accepted = accepted_updates(read_audit(state_dir / "audit.jsonl"))
    assert [record["base_version"] for record in accepted][:3] == [0, 1, 2]
    assert all(record["site"] == "hungary" and record["time"] > coordinator_started for record in accepted)
    site_log = processes.log("hungary")
    assert site_log.index(WAITING) < site_log.index("model v0 received") < site_log.index("stopped by the coordinator")


def test_site_whose_connection_is_cut_reconnects_and_its_update_is_applied_exactly_once(
    broker_env: BrokerEnv, tmp_path: Path, processes: FedmqProcesses
) -> None:
    # Prepare: a slow hospital (each update takes a second or two), so the cut lands while it trains
    site_config = append_site_tables(broker_env.add_site("cleveland").config_path, slowdown=40.0)
    config, state_dir, _ = write_coordinator(
        broker_env, tmp_path, ["cleveland"], coordinator_tables(strategy="fedasync", max_versions=4, local_steps=50)
    )
    processes.start_coordinator(config)
    processes.start_site(site_config)
    processes.wait_for_log("cleveland", "evaluation of v1 sent")  # logged after the training on v1 started

    # Execute: the broker drops the agent's connection mid-training
    broker_env.close_connections("cleveland")
    exit_codes = (processes.wait_exit("coordinator"), processes.wait_exit("cleveland"))

    # Assert: the agent noticed, reconnected and carried on ...
    assert exit_codes == (0, 0), processes.logs()
    site_log = processes.log("cleveland")
    lost_at = site_log.index("connection to the broker lost")
    assert site_log.count("connected to amqp://cleveland") >= 2
    assert site_log.index("connected to amqp://cleveland", lost_at) > lost_at
    # ... the update it was training when the connection dropped was sent after the reconnect ...
    sent_before_cut = [int(seq) for seq in re.findall(r"update seq (\d+) on v\d+ sent", site_log[:lost_at])]
    in_training_at_cut = max(sent_before_cut) + 1
    assert f"update seq {in_training_at_cut} on" in site_log[lost_at:]
    # ... and the coordinator applied it, like every other update, exactly once, and lost none
    records = read_audit(state_dir / "audit.jsonl")
    accepted = accepted_updates(records)
    assert set(times_accepted(records).values()) == {1}
    seqs = sorted(int(record["seq"]) for record in accepted)
    assert seqs == list(range(1, len(seqs) + 1))
    assert in_training_at_cut in seqs
