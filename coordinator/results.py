"""What a finished run leaves behind: the final model (safetensors) and a JSON summary a person can read.

Results are shared (attached to a report, copied to a notebook), so they hold no credential: the summary's copy of
the config shows the broker URL without its password (``broker.urls.redact_url``). The TLS key's path may stay:
a path is not a secret, the key file itself is 0600.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from broker.urls import redact_url
from coordinator.checkpoint import write_file_durably
from coordinator.config import CoordinatorConfig, as_dict
from coordinator.evaluation import EvaluationBook
from coordinator.liveness import Liveness
from coordinator.model_files import write_safetensors
from coordinator.run_state import RunState

log = logging.getLogger(__name__)


def run_summary(
    config: CoordinatorConfig,
    *,
    strategy_name: str,
    state: RunState,
    stop_reason: str,
    evaluations: EvaluationBook,
    liveness: Liveness,
    now: float,
) -> dict[str, Any]:
    """The run's facts: versions, updates, time, why it stopped, the final evaluation, the sites, the config."""
    final = evaluations.for_version(state.version)
    return {
        "task": config.task,
        "strategy": strategy_name,
        "versions": state.version,
        "updates_accepted": state.accepted_total,
        "seconds": now - state.started_at,
        "stop_reason": stop_reason,
        "final_evaluation": None
        if final is None
        else {
            "version": final.version,
            "mean": final.mean,
            "pooled": final.pooled,
            "per_site": {site: report.metrics for site, report in evaluations.by_version[final.version].items()},
            "num_examples": {
                site: report.num_examples for site, report in evaluations.by_version[final.version].items()
            },
        },
        "sites": {
            site: {"up": status.up, "last_seen": status.last_seen, "state": status.state}
            for site, status in sorted(liveness.sites.items())
        },
        "config": redacted_config(config),
    }


def redacted_config(config: CoordinatorConfig) -> dict[str, Any]:
    """The config as JSON, with no password in it."""
    document = as_dict(config)
    broker = document.get("broker")
    if isinstance(broker, dict) and isinstance(broker.get("url"), str):
        broker["url"] = redact_url(broker["url"])
    return document


def write_results(directory: Path, state: RunState, task: str, summary: dict[str, Any]) -> None:
    """``final_model.safetensors`` and ``run_summary.json`` in ``directory``, each written durably."""
    write_safetensors(
        directory / "final_model.safetensors", state.params, {"version": str(state.version), "task": task}
    )
    write_file_durably(directory / "run_summary.json", json.dumps(summary, indent=2).encode())
    log.info("final model v%d and run summary written to %s", state.version, directory)
