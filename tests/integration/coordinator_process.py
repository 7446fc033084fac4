"""Run a real coordinator process against a test's vhost, and script sites that publish raw updates."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import torch
from prometheus_client.parser import text_string_to_metric_families

from broker.node import free_tcp_ports
from broker.topology import Exchange, Kind, routing_key, site_inbox
from schemas import GlobalModel, ModelUpdate, TrainingMetrics


def free_port() -> int:
    (port,) = free_tcp_ports(1)
    return port


def write_coordinator_config(
    path: Path,
    *,
    url: str,
    sites: list[str],
    state_dir: Path,
    metrics_port: int,
    extra: str = "",
    keys_dir: Path | None = None,
) -> Path:
    """With ``keys_dir`` (``BrokerEnv.keys_dir``) updates must be signed by the registered keys and models are
    signed with the key there; without it updates go unchecked (``[signing] required = false``), for tests of
    other things that publish raw, unsigned updates."""
    signing = (
        f"[signing]\nkeys_dir = {json.dumps(str(keys_dir))}\n"
        if keys_dir is not None
        else "[signing]\nrequired = false\n"
    )
    path.write_text(
        f"""task = "heart-disease"
sites = {json.dumps(sites)}
state_dir = {json.dumps(str(state_dir))}
[broker]
url = {json.dumps(url)}
[metrics]
port = {metrics_port}
{signing}
{extra}
"""
    )
    return path


@dataclass
class CoordinatorProcess:
    config_path: Path
    state_dir: Path
    metrics_port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    _logs: list[Any] = field(default_factory=list)

    def start(self) -> None:
        log = self.log_path.open("a")
        self._logs.append(log)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedmq",
                "--state-dir",
                str(self.state_dir),
                "coordinator",
                "run",
                "--config",
                str(self.config_path),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None and self.process.poll() is None, self.log_path.read_text()[-3000:]
            try:
                self.metrics()
                return
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        raise TimeoutError(f"coordinator metrics never came up:\n{self.log_path.read_text()[-3000:]}")

    def metrics(self) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as response:
            text = response.read().decode()
        samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
        return samples

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for log in self._logs:
            log.close()

    def audit_records(self) -> list[dict[str, Any]]:
        path = self.state_dir / "audit.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class ScriptedSite:
    """A plain pika publisher with a site's own credentials: sends whatever bytes a test wants."""

    def __init__(self, site_id: str, url: str) -> None:
        self.site_id = site_id
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()
        self.seq = 0

    def latest_model(self, timeout: float = 30.0) -> GlobalModel:
        """Peek the newest global model in this site's inbox (and put it back)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            method, _, body = self.channel.basic_get(site_inbox(self.site_id), auto_ack=False)
            if method is not None:
                self.channel.basic_nack(method.delivery_tag, requeue=True)
                return GlobalModel.decode(body)
            time.sleep(0.2)
        raise TimeoutError(f"no global model reached {self.site_id}'s inbox")

    def update(self, model: GlobalModel, *, scale: float = 0.01, **overrides: Any) -> ModelUpdate:
        self.seq += 1
        fields: dict[str, Any] = {
            "update_id": ModelUpdate.new_id(),
            "site_id": self.site_id,
            "seq": self.seq,
            "base_version": model.version,
            "num_examples": 10,
            "delta": {name: torch.full_like(tensor, scale) for name, tensor in model.tensors.items()},
            "metrics": TrainingMetrics(loss=0.5, steps=1, seconds=0.01),
        }
        fields.update(overrides)
        return ModelUpdate(**fields)

    def publish(self, body: bytes, *, user_id: str | None = "self", key_site: str | None = None) -> None:
        properties = pika.BasicProperties(
            delivery_mode=pika.DeliveryMode.Persistent, user_id=self.site_id if user_id == "self" else user_id
        )
        self.channel.basic_publish(
            Exchange.UPDATES.value,
            routing_key(key_site or self.site_id, Kind.UPDATE),
            body,
            properties,
            mandatory=True,
        )

    def publish_status(self, kind: Kind, body: bytes) -> None:
        """A heartbeat or an evaluation report, as this site, on its own routing key."""
        properties = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent, user_id=self.site_id)
        self.channel.basic_publish(
            Exchange.STATUS.value, routing_key(self.site_id, kind), body, properties, mandatory=True
        )

    def publish_until_taken(self, body: bytes, *, retry_seconds: float = 0.2, timeout: float = 120.0) -> int:
        """Publish as an agent does under flood control: a nack (the site's update queue is full) means try
        later. Returns how many times the broker refused it first."""
        deadline = time.monotonic() + timeout
        refused = 0
        while True:
            try:
                self.publish(body)
                return refused
            except pika.exceptions.NackError:
                refused += 1
                if time.monotonic() > deadline:
                    raise
                time.sleep(retry_seconds)

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()


def wait_for(condition: Any, timeout: float, message: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise TimeoutError(message)


def samples_with(
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str
) -> Iterator[tuple[dict[str, str], float]]:
    for labels, value in samples.get(name, {}).items():
        yield dict(labels), value
