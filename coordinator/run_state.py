"""The run's own state: the global model, its version, and the past versions updates may still be based on."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from coordinator.aggregation import Params


@dataclass
class RunState:
    """Everything the checkpoint holds besides the strategy's own state and the duplicate filter."""

    version: int
    params: Params
    history: dict[int, Params] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    accepted_total: int = 0

    def record_history(self, *, keep: bool, max_staleness: int) -> None:
        """Keep the current version while an update may still be based on it (only a strategy that mixes
        ``base + delta`` needs them), and drop the versions the staleness bound no longer allows."""
        if not keep:
            return
        self.history[self.version] = self.params
        oldest_allowed = self.version - max_staleness
        for version in [version for version in self.history if version < oldest_allowed]:
            del self.history[version]

    def advance(self, new_params: Params, *, keep_history: bool, max_staleness: int) -> int:
        """Make ``new_params`` the next version; returns its number."""
        self.params = new_params
        self.version += 1
        self.record_history(keep=keep_history, max_staleness=max_staleness)
        return self.version
