"""Real ``python -m fedmq`` processes for end-to-end tests: configs for a test's vhost, logs, and a clean exit.

``FedmqProcesses`` starts the coordinator and site agents exactly as a deployment does (one process each, its
own config file, output in its own log file) and guarantees that none outlives the test: ``stop_all`` sends
SIGTERM, then SIGKILL to whatever is still running.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomli_w

from fedmq.demo import ProcessGroup

REPO_ROOT = Path(__file__).resolve().parents[2]
STOP_GRACE_SECONDS = 15.0


def append_site_tables(
    config_path: Path,
    *,
    slowdown: float = 1.0,
    heartbeat_seconds: float = 1.0,
    reconnect_max_wait_seconds: float = 2.0,
    seed: int = 0,
) -> Path:
    """Add what a hospital adds to the file ``add-site`` wrote: the heart-disease task and agent settings.

    The site id must be one of the four Fed-Heart-Disease hospitals (cleveland, hungary, switzerland,
    long-beach): the task reads that hospital's packaged data.
    """
    tables = {
        "task": {"name": "heart-disease"},
        "agent": {
            "seed": seed,
            "slowdown": slowdown,
            "heartbeat_seconds": heartbeat_seconds,
            "reconnect_max_wait_seconds": reconnect_max_wait_seconds,
        },
    }
    with config_path.open("a") as handle:
        handle.write("\n" + tomli_w.dumps(tables))
    return config_path


def coordinator_tables(
    *,
    strategy: str = "fedbuff",
    strategy_params: dict[str, Any] | None = None,
    max_versions: int = 6,
    local_steps: int = 20,
    final_eval_timeout_seconds: float = 20.0,
) -> str:
    """The ``extra`` TOML for ``coordinator_process.write_coordinator_config``: a short heart-disease run."""
    params = "\n".join(f"{key} = {json.dumps(value)}" for key, value in (strategy_params or {}).items())
    return f"""
[strategy]
name = "{strategy}"
max_staleness = 20
{params}

[training]
local_steps = {local_steps}
learning_rate = 0.05
batch_size = 4

[liveness]
site_timeout_seconds = 20

[stopping]
max_versions = {max_versions}
final_eval_timeout_seconds = {final_eval_timeout_seconds}
"""


class FedmqProcesses:
    """Named ``python -m fedmq`` processes, each logging to ``<log_dir>/<name>.log``."""

    def __init__(self, state_dir: Path, log_dir: Path) -> None:
        self.state_dir = state_dir
        self.log_dir = log_dir
        self.group = ProcessGroup(log_dir)
        self.started_at: dict[str, float] = {}

    @property
    def processes(self) -> dict[str, subprocess.Popen[bytes]]:
        return self.group.processes

    def start(self, name: str, *arguments: str) -> subprocess.Popen[bytes]:
        python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        process = self.group.start(
            name,
            [sys.executable, "-m", "fedmq", "--state-dir", str(self.state_dir), *arguments],
            append=True,
            env={**os.environ, "PYTHONPATH": python_path},
            cwd=REPO_ROOT,
        )
        self.started_at[name] = time.time()
        return process

    def start_site(self, config_path: Path) -> subprocess.Popen[bytes]:
        return self.start(config_path.stem, "site", "run", "--config", str(config_path))

    def start_coordinator(self, config_path: Path) -> subprocess.Popen[bytes]:
        return self.start("coordinator", "coordinator", "run", "--config", str(config_path))

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def log(self, name: str) -> str:
        path = self.log_path(name)
        return path.read_text() if path.exists() else ""

    def logs(self) -> str:
        """Every process's log, for assertion messages."""
        return "\n".join(f"===== {name}\n{self.log(name)[-4000:]}" for name in self.processes)

    def wait_for_log(self, name: str, text: str, timeout: float = 60.0) -> None:
        wait_until(lambda: text in self.log(name), timeout, f"{name} never logged {text!r}", self)

    def wait_exit(self, name: str, timeout: float = 90.0) -> int:
        try:
            return self.processes[name].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} still runs after {timeout:.0f} s\n{self.logs()}") from None

    def running(self) -> list[str]:
        return [name for name, process in self.processes.items() if process.poll() is None]

    def stop_all(self) -> None:
        self.group.stop_all(STOP_GRACE_SECONDS)


def wait_until(condition: Callable[[], bool], timeout: float, message: str, processes: FedmqProcesses) -> None:
    """Poll ``condition``; on time-out fail with ``message`` and every process's log."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{message}\n{processes.logs()}")
        time.sleep(0.2)


def read_audit(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def accepted_updates(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [record for record in records if record.get("kind") == "update" and record.get("outcome") == "accepted"]


def times_accepted(records: list[dict[str, Any]]) -> Counter[str]:
    """update_id -> how many times the coordinator accepted it (exactly once is the promise)."""
    return Counter(str(record["update_id"]) for record in accepted_updates(records))
