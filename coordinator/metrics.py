"""The coordinator's Prometheus metrics, all prefixed ``fedmq_``, in a registry the caller owns.

| metric | type | labels | meaning |
|---|---|---|---|
| fedmq_model_version | gauge | | current global model version |
| fedmq_updates_received_total | counter | site | updates taken off the queue |
| fedmq_updates_applied_total | counter | site | updates accepted (applied or buffered) |
| fedmq_updates_rejected_total | counter | site, reason | updates refused, by reason (see below) |
| fedmq_updates_redelivered_total | counter | site | a copy of an applied update (redelivered or resent): acked only |
| fedmq_update_delivery_count_max | gauge | | highest x-delivery-count the broker set on an update (0: none returned) |
| fedmq_update_staleness | histogram | site | staleness (versions) of accepted updates |
| fedmq_update_anomaly_score | gauge | site | cosine of the site's latest update to recent ones (< 0: against) |
| fedmq_updates_clipped_total | counter | site | accepted updates scaled down to the adaptive norm bound |
| fedmq_max_staleness | gauge | | the configured staleness bound |
| fedmq_aggregation_seconds | histogram | | time to validate and apply one update |
| fedmq_checkpoint_seconds | histogram | | time to write one durable checkpoint |
| fedmq_checkpoint_bytes | gauge | | size on disk of the last checkpoint (manifest + tensor files) |
| fedmq_commit_bytes | gauge | | disk space the last commit needed (new checkpoint files + audit records) |
| fedmq_commits_deferred_total | counter | | commits not started for lack of disk space (their updates stay unacked) |
| fedmq_state_dir_free_bytes | gauge | | free space of the state dir's filesystem, read at scrape time |
| fedmq_state_dir_reserve_bytes | gauge | | the free space a commit must leave (``[storage] reserve_mb``) |
| fedmq_buffer_fill | gauge | | updates held (FedBuff buffer or sync round) |
| fedmq_buffer_capacity | gauge | | updates needed for the next version (K) |
| fedmq_update_size_bytes | histogram | site | size of update messages |
| fedmq_site_last_seen_timestamp_seconds | gauge | site | unix time a site was last heard from |
| fedmq_site_up | gauge | site | 1 while heard from within the timeout, else 0 |
| fedmq_sites_registered | gauge | | sites the coordinator knows |
| fedmq_eval_metric | gauge | site, metric | latest evaluation a site reported |
| fedmq_eval_global | gauge | metric, aggregate | mean over hospitals / example-weighted (pooled) |
| fedmq_last_version_timestamp_seconds | gauge | | unix time of the last new version |
| fedmq_seconds_since_last_version | gauge | | computed at scrape time |
| fedmq_status_errors_total | counter | site | status messages dropped after an internal error (see the log) |
| fedmq_status_rejected_total | counter | site, kind, reason | heartbeats (kind status) and evaluations (eval) refused |
| fedmq_coordinator_info | gauge | strategy, task, version | always 1 |

Rejection reasons: unknown-site, identity-mismatch, bad-signature, oversized, malformed, wrong-shape, non-finite,
norm-too-large, stale, duplicate, too-many-examples, unknown-version (checked by the coordinator); site-share,
wrong-round, already-in-round, no-examples, anomalous (refused by the strategy); out-of-range, unknown-version,
too-many-examples (evaluation reports, which can also be unknown-site, identity-mismatch, oversized, malformed,
non-finite); internal-error (an unexpected exception while handling the update: a bug in the coordinator, the
update is dead-lettered and the log holds the traceback).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

STALENESS_BUCKETS = (0, 1, 2, 3, 4, 5, 8, 10, 15, 20, 30, 50)
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = tuple(float(4**power) for power in range(5, 15))  # 1 KiB .. 256 MiB


class CoordinatorMetrics:
    def __init__(self, registry: CollectorRegistry, clock: Callable[[], float] = time.time) -> None:
        self.registry = registry
        self.model_version = Gauge("fedmq_model_version", "Current global model version", registry=registry)
        self.updates_received = Counter(
            "fedmq_updates_received", "Updates taken off the queue", ["site"], registry=registry
        )
        self.updates_applied = Counter(
            "fedmq_updates_applied", "Updates accepted (applied or buffered)", ["site"], registry=registry
        )
        self.updates_rejected = Counter(
            "fedmq_updates_rejected", "Updates refused, by reason", ["site", "reason"], registry=registry
        )
        self.status_rejected = Counter(
            "fedmq_status_rejected",
            "Heartbeats and evaluation reports refused, by kind and reason",
            ["site", "kind", "reason"],
            registry=registry,
        )
        self.status_errors = Counter(
            "fedmq_status_errors",
            "Status messages dropped after an internal error while handling them",
            ["site"],
            registry=registry,
        )
        self.updates_redelivered = Counter(
            "fedmq_updates_redelivered",
            "Copies of applied updates (redelivered by the broker or resent by a site): acked, not applied again",
            ["site"],
            registry=registry,
        )
        self.staleness = Histogram(
            "fedmq_update_staleness",
            "Staleness of accepted updates in versions",
            ["site"],
            buckets=STALENESS_BUCKETS,
            registry=registry,
        )
        self.anomaly_score = Gauge(
            "fedmq_update_anomaly_score",
            "Cosine similarity of the site's latest accepted update to a running mean of recent update directions",
            ["site"],
            registry=registry,
        )
        self.updates_clipped = Counter(
            "fedmq_updates_clipped",
            "Accepted updates scaled down to the adaptive norm bound",
            ["site"],
            registry=registry,
        )
        self.max_staleness = Gauge("fedmq_max_staleness", "Configured staleness bound", registry=registry)
        self.aggregation_seconds = Histogram(
            "fedmq_aggregation_seconds",
            "Time to validate and apply one update",
            buckets=SECONDS_BUCKETS,
            registry=registry,
        )
        self.checkpoint_seconds = Histogram(
            "fedmq_checkpoint_seconds",
            "Time to write one durable checkpoint",
            buckets=SECONDS_BUCKETS,
            registry=registry,
        )
        self.checkpoint_bytes = Gauge(
            "fedmq_checkpoint_bytes", "Size on disk of the last checkpoint", registry=registry
        )
        self.commit_bytes = Gauge(
            "fedmq_commit_bytes", "Disk space the last commit needed (checkpoint files + audit)", registry=registry
        )
        self.commits_deferred = Counter(
            "fedmq_commits_deferred",
            "Commits not started for lack of disk space in the state dir (their updates stay unacked)",
            registry=registry,
        )
        self.state_dir_free_bytes = Gauge(
            "fedmq_state_dir_free_bytes", "Free space of the state dir's filesystem", registry=registry
        )
        self.state_dir_reserve_bytes = Gauge(
            "fedmq_state_dir_reserve_bytes", "Free space a commit must leave in the state dir", registry=registry
        )
        self.update_delivery_count_max = Gauge(
            "fedmq_update_delivery_count_max",
            "Highest x-delivery-count header seen on an update: how often the broker returned one to the queue",
            registry=registry,
        )
        self.buffer_fill = Gauge("fedmq_buffer_fill", "Updates held for the next version", registry=registry)
        self.buffer_capacity = Gauge("fedmq_buffer_capacity", "Updates needed for the next version", registry=registry)
        self.update_size = Histogram(
            "fedmq_update_size_bytes",
            "Size of update messages",
            ["site"],
            buckets=SIZE_BUCKETS,
            registry=registry,
        )
        self.site_last_seen = Gauge(
            "fedmq_site_last_seen_timestamp_seconds",
            "Unix time a site was last heard from",
            ["site"],
            registry=registry,
        )
        self.site_up = Gauge(
            "fedmq_site_up", "1 while a site is heard from within the timeout", ["site"], registry=registry
        )
        self.sites_registered = Gauge("fedmq_sites_registered", "Sites the coordinator knows", registry=registry)
        self.eval_metric = Gauge(
            "fedmq_eval_metric", "Latest evaluation reported by a site", ["site", "metric"], registry=registry
        )
        self.eval_global = Gauge(
            "fedmq_eval_global",
            "Evaluation over hospitals: mean or example-weighted (pooled)",
            ["metric", "aggregate"],
            registry=registry,
        )
        self.last_version_timestamp = Gauge(
            "fedmq_last_version_timestamp_seconds", "Unix time of the last new version", registry=registry
        )
        self.seconds_since_last_version = Gauge(
            "fedmq_seconds_since_last_version", "Seconds since the last new version", registry=registry
        )
        self.seconds_since_last_version.set_function(lambda: max(0.0, clock() - self._last_version_time))
        self.info = Gauge(
            "fedmq_coordinator_info",
            "Coordinator build and run facts",
            ["strategy", "task", "version"],
            registry=registry,
        )
        self._last_version_time = clock()
        self._highest_delivery_count = 0

    def new_version(self, version: int, at: float) -> None:
        self.model_version.set(version)
        self.last_version_timestamp.set(at)
        self._last_version_time = at

    def watch_state_dir(self, free_bytes: Callable[[], float], reserve_bytes: int) -> None:
        """Read the state dir's free space at each scrape."""
        self.state_dir_free_bytes.set_function(free_bytes)
        self.state_dir_reserve_bytes.set(reserve_bytes)

    def saw_delivery_count(self, count: int) -> None:
        if count > self._highest_delivery_count:
            self._highest_delivery_count = count
            self.update_delivery_count_max.set(count)

    def serve(self, host: str, port: int) -> None:
        """Expose /metrics over HTTP on a daemon thread."""
        start_http_server(port, addr=host, registry=self.registry)
