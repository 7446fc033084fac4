"""Results are shared; they hold no credential."""

from __future__ import annotations

import json
from pathlib import Path

from coordinator.config import CoordinatorConfig
from tests.unit.test_coordinator_service import fedbuff, start_federation

PASSWORD = "s3cret-Pa55word"


def test_the_run_summary_holds_no_broker_password(tmp_path: Path) -> None:
    # Prepare: a coordinator whose broker URL carries its password
    federation = start_federation(
        tmp_path, fedbuff(), broker={"url": f"amqp://fedmq-coordinator:{PASSWORD}@mq.example.org:5682/fedmq"}
    )

    # Execute
    federation.coordinator.write_results()

    # Assert: the URL is there for diagnosis, the password is not, anywhere in any results file
    summary = json.loads((tmp_path / "run_summary.json").read_text())
    assert summary["config"]["broker"]["url"] == "amqp://fedmq-coordinator:****@mq.example.org:5682/fedmq"
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert PASSWORD.encode() not in path.read_bytes(), path
    assert isinstance(federation.coordinator.config, CoordinatorConfig)
