"""A hospital's site config: the file ``fedmq broker add-site`` wrote, plus what the hospital adds.

Example ``sites/cleveland.toml``::

    site_id = "cleveland"

    [broker]
    url = "amqp://cleveland:...@broker.example.org:5671/fedmq"   # or amqps:// with the three paths below
    # ca_file = "ca.pem"
    # cert_file = "cleveland.pem"
    # key_file = "cleveland.key"

    [task]                      # the task table is shared with the coordinator (same name, same shape keys)
    name = "heart-disease"
    # data_dir = "/data/heart"  # task-specific options

    [agent]
    seed = 0
    slowdown = 1.0              # > 1 makes this site proportionally slower (simulating a slow hospital)
    heartbeat_seconds = 5
    compression = "none"        # none | float16 | int8 (lossy, for slow links)
    state_dir = ""              # where the agent keeps its update counter; default: next to this file
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from schemas import COMPRESSIONS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class SiteConfigError(ValueError):
    """A site config that cannot be used; the message names the key."""


@dataclass(frozen=True)
class AgentSettings:
    seed: int = 0
    slowdown: float = 1.0
    heartbeat_seconds: float = 5.0
    compression: str = "none"
    state_dir: str = ""
    reconnect_max_wait_seconds: float = 30.0
    threads: int = 1  # torch CPU threads for local training


@dataclass(frozen=True)
class SiteConfig:
    site_id: str
    broker_url: str
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    task: dict[str, Any] = field(default_factory=lambda: {"name": "heart-disease"})
    agent: AgentSettings = field(default_factory=AgentSettings)
    state_dir: Path = Path(".")

    @property
    def task_name(self) -> str:
        return str(self.task.get("name", "heart-disease"))


def site_config_from_dict(raw: dict[str, Any], *, base_dir: Path) -> SiteConfig:
    broker = raw.get("broker")
    if not isinstance(broker, dict) or not isinstance(broker.get("url"), str):
        raise SiteConfigError("[broker] url is missing")
    site_id = raw.get("site_id")
    if not isinstance(site_id, str) or not site_id:
        raise SiteConfigError("site_id is missing")
    agent_table = dict(raw.get("agent", {}))
    known = {item.name for item in fields(AgentSettings)}
    unknown = sorted(set(agent_table) - known)
    if unknown:
        raise SiteConfigError(f"[agent] unknown key(s) {unknown}; known: {sorted(known)}")
    agent = AgentSettings(**agent_table)
    if agent.compression not in COMPRESSIONS:
        raise SiteConfigError(f"[agent] compression must be one of {COMPRESSIONS}, got {agent.compression!r}")
    if agent.slowdown < 1.0:
        raise SiteConfigError(f"[agent] slowdown must be >= 1, got {agent.slowdown}")

    def path_option(key: str) -> str | None:
        value = broker.get(key)
        return None if value is None else str((base_dir / str(value)).resolve())

    task = dict(raw.get("task", {"name": "heart-disease"}))
    if "data_dir" in task:
        task["data_dir"] = str((base_dir / str(task["data_dir"])).resolve())
    state_dir = Path(agent.state_dir).expanduser() if agent.state_dir else base_dir
    return SiteConfig(
        site_id=site_id,
        broker_url=broker["url"],
        ca_file=path_option("ca_file"),
        cert_file=path_option("cert_file"),
        key_file=path_option("key_file"),
        task=task,
        agent=agent,
        state_dir=state_dir if state_dir.is_absolute() else (base_dir / state_dir),
    )


def load_site_config(path: Path) -> SiteConfig:
    try:
        with path.open("rb") as handle:
            raw = tomllib.load(handle)
    except FileNotFoundError:
        raise SiteConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise SiteConfigError(f"{path} is not valid TOML: {exc}") from None
    try:
        return site_config_from_dict(raw, base_dir=path.parent.resolve())
    except TypeError as exc:
        raise SiteConfigError(f"{path}: {exc}") from None
