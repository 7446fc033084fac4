"""When a run stops: a pure rule over what the coordinator knows, with no clock, broker or I/O of its own.

A run stops at ``max_versions``, after ``max_seconds`` (counted from the run's first start, kept in the checkpoint,
so a restart does not grant a fresh budget), or once ``target_metric`` over the latest evaluation of the current
version reaches ``target_value`` and every site that is up has reported it. Then it waits for the final
evaluations of that version, at most ``final_eval_timeout_seconds``.
"""

from __future__ import annotations

from collections.abc import Collection

from coordinator.config import StoppingSettings
from coordinator.evaluation import GlobalEvaluation


def stop_reason(
    rule: StoppingSettings,
    *,
    version: int,
    elapsed_seconds: float,
    evaluation: GlobalEvaluation | None,
    up_sites: Collection[str],
) -> str | None:
    """Why the run should stop now, or None to carry on; ``evaluation`` is the current version's."""
    if rule.max_versions and version >= rule.max_versions:
        return f"reached {version} versions"
    if rule.max_seconds and elapsed_seconds >= rule.max_seconds:
        return f"wall-clock budget of {rule.max_seconds:.0f} s spent"
    if rule.target_metric and evaluation is not None and set(evaluation.sites) >= set(up_sites):
        values = evaluation.pooled if rule.target_aggregate == "pooled" else evaluation.mean
        value = values.get(rule.target_metric)
        if value is not None and value >= rule.target_value:
            return f"{rule.target_aggregate} {rule.target_metric} {value:.3f} >= {rule.target_value}"
    return None


def final_evaluations_done(
    rule: StoppingSettings,
    *,
    final: GlobalEvaluation | None,
    up_sites: Collection[str],
    waited_seconds: float,
) -> bool:
    """Every site that is up has evaluated the final version, or the wait for them timed out."""
    reported = set(final.sites) if final else set()
    return reported >= set(up_sites) or waited_seconds > rule.final_eval_timeout_seconds
