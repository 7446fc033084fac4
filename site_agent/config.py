"""A hospital's site config: the file ``fedmq broker add-site`` wrote, plus what the hospital adds. One pydantic
model, every option with a default and a description, validated when it is built; relative paths are relative to
the file.

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
    slowdown = 1.0              # >= 1; > 1 makes this site proportionally slower (simulating a slow hospital)
    heartbeat_seconds = 5
    compression = "none"        # none | float16 | int8 (lossy, for slow links)
    # attack = "sign-flip:10"   # test and demo only: a poisoning attacker (site_agent/attacks.py)
    state_dir = ""              # where the agent keeps its update counter; default: next to this file

    [signing]                   # written by add-site; the key file is made here by `fedmq site keygen cleveland`
    # models and control messages must carry the signature of this key:
    coordinator_public_key = "qq51fqzpB7y37lndhFMCOLjdBlTXgFJyfJLmOAt8wmg="
    key_file = "cleveland.signing.key"     # this site's private key (default: <site_id>.signing.key here)
    required = true             # refuse unsigned models/controls and send only signed updates
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from broker.keys import KeyFileError, parse_public_key
from schemas.config_files import BrokerTable, ConfigTable, config_dir, describe, read_toml


class SiteConfigError(ValueError):
    """A site config that cannot be used; the message (one line) names the file and the key."""


class SiteBrokerSettings(BrokerTable):
    """``[broker]``: where the agent connects (outbound only)."""

    url: str = Field(pattern=r"^amqps?://", description="AMQP URL with this site's credentials (amqps:// for TLS).")


class AgentSettings(ConfigTable):
    """``[agent]``: how this site's agent runs."""

    seed: int = Field(0, ge=0, description="Seed of local training (batches, dropout).")
    slowdown: float = Field(1.0, ge=1, description="> 1 makes this site proportionally slower (a slow hospital).")
    heartbeat_seconds: float = Field(5.0, gt=0, description="Seconds between heartbeats to the coordinator.")
    compression: Literal["none", "float16", "int8"] = Field(
        "none", description="How updates are sent: none, or float16 / int8 (lossy, for slow links)."
    )
    state_dir: str = Field(
        "",
        validate_default=True,  # empty means the file's folder, which only validation knows
        description="Where the agent keeps its update counter (empty: next to this file; relative: to it).",
    )
    reconnect_max_wait_seconds: float = Field(
        30.0,
        gt=0,
        description="Longest wait between reconnection attempts, and between retries of a message the broker refused.",
    )
    threads: int = Field(1, ge=1, description="torch CPU threads for local training.")
    attack: str = Field(
        "",
        description="TEST AND DEMO ONLY: make this agent a poisoning attacker, KIND[:SCALE] with KIND one of "
        "sign-flip, scale, noise, inflate-examples, flood (site_agent.attacks); empty: honest.",
    )

    @field_validator("attack")
    @classmethod
    def _known_attack(cls, value: str) -> str:
        if value:
            from site_agent.attacks import Attack

            Attack.parse(value)
        return value

    @field_validator("state_dir")
    @classmethod
    def _relative_to_the_file(cls, value: str, info: ValidationInfo) -> str:
        base_dir = config_dir(info)
        if base_dir is None:
            return value
        state_dir = Path(value).expanduser() if value else base_dir
        return str(state_dir if state_dir.is_absolute() else base_dir / state_dir)


class SiteSigningSettings(ConfigTable):
    """``[signing]``: this site's key for its updates, and the coordinator's key its models must be signed with."""

    required: bool = Field(
        True,
        description="Refuse a model or control message that is not signed by coordinator_public_key, and refuse "
        "to start without a signing key. false only while migrating to signed deployments.",
    )
    coordinator_public_key: str = Field(
        "", description="The coordinator's Ed25519 public key (base64 of 32 bytes, or PEM), written by add-site."
    )
    key_file: str = Field(
        "",
        description="This site's Ed25519 private key, made at the hospital by `fedmq site keygen` (default: "
        "<site_id>.signing.key next to this file; relative: to it).",
    )

    @field_validator("coordinator_public_key")
    @classmethod
    def _a_public_key(cls, value: str) -> str:
        if value:
            try:
                parse_public_key(value, "an Ed25519 public key")
            except KeyFileError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("key_file")
    @classmethod
    def _relative_to_the_file(cls, value: str, info: ValidationInfo) -> str:
        base_dir = config_dir(info)
        if not value or base_dir is None:
            return value
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else base_dir / path)


class SiteConfig(ConfigTable):
    """A site's TOML file. ``[task]`` is checked by the task it names (its options are the task's own)."""

    site_id: str = Field(min_length=1, description="This site's id, as provisioned on the broker.")
    broker: SiteBrokerSettings = Field(description="[broker]")
    task: dict[str, Any] = Field(
        default_factory=lambda: {"name": "heart-disease"},
        description="[task]: name picks the task, the other keys are its options (data_dir relative to this file).",
    )
    agent: AgentSettings = Field(AgentSettings(), description="[agent]")
    signing: SiteSigningSettings = Field(SiteSigningSettings(), description="[signing]")

    @model_validator(mode="before")
    @classmethod
    def _agent_table_even_if_absent(cls, values: Any) -> Any:
        """Validate a missing ``[agent]`` too, so its state dir defaults to the file's folder; the same for
        ``[signing] key_file``, which defaults to ``<site_id>.signing.key`` there."""
        if isinstance(values, Mapping) and "agent" not in values:
            values = {**values, "agent": {}}
        if isinstance(values, Mapping) and isinstance(values.get("site_id"), str) and values["site_id"]:
            signing = values.get("signing", {})
            if isinstance(signing, Mapping) and not signing.get("key_file"):
                values = {**values, "signing": {**signing, "key_file": f"{values['site_id']}.signing.key"}}
        return values

    @field_validator("task")
    @classmethod
    def _task_name_and_data_dir(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        name = value.get("name", "heart-disease")
        if not isinstance(name, str) or not name:
            raise ValueError("name: must be a task name (a non-empty string)")
        base_dir = config_dir(info)
        if "data_dir" in value and base_dir is not None:
            if not isinstance(value["data_dir"], str):
                raise ValueError("data_dir: must be a path (a string)")
            value = {**value, "data_dir": str((base_dir / value["data_dir"]).resolve())}
        return value

    @property
    def task_name(self) -> str:
        return str(self.task.get("name", "heart-disease"))

    @property
    def broker_url(self) -> str:
        return self.broker.url

    @property
    def ca_file(self) -> str | None:
        return self.broker.ca_file

    @property
    def cert_file(self) -> str | None:
        return self.broker.cert_file

    @property
    def key_file(self) -> str | None:
        return self.broker.key_file

    @property
    def state_dir(self) -> Path:
        return Path(self.agent.state_dir or ".")


def site_config_from_dict(raw: Mapping[str, Any], *, base_dir: Path, source: str = "site config") -> SiteConfig:
    """Validate a parsed site file; relative paths in it are taken relative to ``base_dir``."""
    try:
        return SiteConfig.model_validate(raw, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise SiteConfigError(describe(exc, SiteConfig, source)) from None


def load_site_config(path: Path) -> SiteConfig:
    """Read and validate a site's TOML file once."""
    raw = read_toml(path, SiteConfigError)
    return site_config_from_dict(raw, base_dir=path.parent.resolve(), source=str(path))
