"""Status messages (heartbeats and evaluations): which sites are up and what they measured.

A status message is checked like an update (a registered site, sending as itself, a message that decodes); one
that is not is logged and dropped, never an exception. Status is acked at once: nothing of it needs the group
commit (the evaluation history is a convenience for plots, not the audit trail). An unexpected exception while
handling one message drops that message and is counted; it never takes the service down.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from broker.topology import Kind
from broker.transport import Delivery
from coordinator.errors import STORAGE_ERRORS
from coordinator.evaluation import EvaluationBook
from coordinator.liveness import Liveness
from coordinator.metrics import CoordinatorMetrics
from coordinator.validation import site_from_routing_key
from schemas import DecodeLimits, EvalReport, Heartbeat, SchemaError

log = logging.getLogger(__name__)


class StatusHandler:
    """Keeps ``liveness`` and ``evaluations`` (and their metrics) up to date from the status queue."""

    def __init__(
        self,
        *,
        known_sites: frozenset[str],
        liveness: Liveness,
        evaluations: EvaluationBook,
        metrics: CoordinatorMetrics,
        limits: DecodeLimits,
        clock: Callable[[], float],
    ) -> None:
        self.known_sites = known_sites
        self.liveness = liveness
        self.evaluations = evaluations
        self.metrics = metrics
        self.limits = limits
        self.clock = clock
        self.liveness.register(known_sites)
        for site in known_sites:
            self.metrics.site_up.labels(site=site).set(0)

    def handle(self, delivery: Delivery) -> bool:
        """Take one heartbeat or evaluation; True when it was an evaluation (the stopping rule may now hold).

        Behind the handler's guard: an unexpected exception drops this one message (logged with its traceback,
        counted in ``fedmq_status_errors_total``; the service acks it) and the service keeps serving. A failed
        write (``STORAGE_ERRORS``) is not caught."""
        try:
            return self._handle(delivery)
        except STORAGE_ERRORS:
            raise
        except Exception:
            site = site_from_routing_key(delivery.routing_key)
            label = site if site in self.known_sites else "unknown"
            log.exception(
                "internal error while handling a status message from %s (%s): dropped", label, delivery.routing_key
            )
            self.metrics.status_errors.labels(site=label).inc()
            return False

    def _handle(self, delivery: Delivery) -> bool:
        site = site_from_routing_key(delivery.routing_key)
        if site not in self.known_sites or delivery.user_id != site:
            log.warning("ignored status message from %r (user %r)", site, delivery.user_id)
            return False
        now = self.clock()
        kind = delivery.routing_key.rsplit(".", 1)[-1]
        evaluated = False
        try:
            if kind == Kind.HEARTBEAT.value:
                heartbeat = Heartbeat.decode(delivery.body, self.limits)
                if heartbeat.site_id != site:
                    raise SchemaError("site_id differs from the sender", "site_id")
                came_back = self.liveness.heard_from(site, now, heartbeat.state.value)
                if came_back:
                    log.info("site %s is up (%s)", site, heartbeat.state.value)
            elif kind == Kind.EVAL.value:
                report = EvalReport.decode(delivery.body, self.limits)
                if report.site_id != site:
                    raise SchemaError("site_id differs from the sender", "site_id")
                self.liveness.heard_from(site, now)
                self._record_evaluation(report, now)
                evaluated = True
        except SchemaError as exc:
            log.warning("ignored malformed %s from %s: %s", kind, site, exc)
            return False
        self._show_site(site)
        return evaluated

    def heard_from(self, site: str, now: float) -> None:
        """An accepted update counts as contact too."""
        self.liveness.heard_from(site, now)
        self._show_site(site)

    def sweep(self, now: float) -> None:
        """Mark the sites silent for longer than the timeout as down."""
        for site in self.liveness.sweep(now):
            log.warning("site %s is down: silent for more than %.0f s", site, self.liveness.timeout_seconds)
            self._show_site(site)

    def _show_site(self, site: str) -> None:
        status = self.liveness.sites[site]
        self.metrics.site_up.labels(site=site).set(1 if status.up else 0)
        if status.last_seen is not None:
            self.metrics.site_last_seen.labels(site=site).set(status.last_seen)

    def _record_evaluation(self, report: EvalReport, now: float) -> None:
        self.evaluations.add(report, now)
        for name, value in report.metrics.items():
            self.metrics.eval_metric.labels(site=report.site_id, metric=name).set(value)
        latest = self.evaluations.latest()
        if latest is not None:
            for name in latest.mean:
                self.metrics.eval_global.labels(metric=name, aggregate="mean").set(latest.mean[name])
                self.metrics.eval_global.labels(metric=name, aggregate="pooled").set(latest.pooled[name])
        log.info(
            "site %s evaluated model v%d: %s",
            report.site_id,
            report.model_version,
            ", ".join(f"{name} {value:.3f}" for name, value in sorted(report.metrics.items())),
        )
