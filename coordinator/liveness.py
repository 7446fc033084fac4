"""Which sites are up: a site heard from (heartbeat, update or evaluation) within the timeout is up.

Async strategies never wait for anyone, so a down site only changes what operators see and which sites a
synchronous round waits for.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class SiteStatus:
    site_id: str
    last_seen: float | None = None
    up: bool = False
    state: str = "unknown"


@dataclass
class Liveness:
    timeout_seconds: float
    sites: dict[str, SiteStatus] = field(default_factory=dict)

    def register(self, site_ids: Iterable[str]) -> None:
        for site_id in site_ids:
            self.sites.setdefault(site_id, SiteStatus(site_id))

    def heard_from(self, site_id: str, at: float, state: str | None = None) -> bool:
        """Record contact; True when this brings a down site back up."""
        status = self.sites.setdefault(site_id, SiteStatus(site_id))
        came_back = not status.up
        status.last_seen = max(at, status.last_seen or at)
        status.up = True
        if state is not None:
            status.state = state
        return came_back

    def sweep(self, now: float) -> list[str]:
        """Mark silent sites down; return the ids that just went down."""
        went_down = []
        for status in self.sites.values():
            if status.up and status.last_seen is not None and now - status.last_seen > self.timeout_seconds:
                status.up = False
                went_down.append(status.site_id)
        return went_down

    def up_sites(self) -> list[str]:
        return sorted(site_id for site_id, status in self.sites.items() if status.up)
