"""Federated evaluation: sites evaluate each global version on their own test split and report back.

For each metric the coordinator derives two numbers over hospitals: the plain mean (every hospital counts the
same) and the example-weighted (pooled) value, which for accuracy equals the accuracy on all test sets pooled.
Every report is appended to a JSONL history a person can plot. Reports reach the book only once
``coordinator.status.check_eval_report`` found them plausible (finite, in range, of a version that exists), so a
report for a future version cannot push the real versions out of it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from coordinator.storage import make_directory, storage_writes
from schemas import EvalReport


@dataclass(frozen=True)
class GlobalEvaluation:
    version: int
    sites: tuple[str, ...]
    mean: dict[str, float]
    pooled: dict[str, float]
    num_examples: int


def aggregate_reports(version: int, reports: Mapping[str, EvalReport]) -> GlobalEvaluation:
    """Mean over hospitals and example-weighted mean, per metric, over the reports given."""
    names = sorted({name for report in reports.values() for name in report.metrics})
    mean: dict[str, float] = {}
    pooled: dict[str, float] = {}
    total_examples = sum(report.num_examples for report in reports.values())
    for name in names:
        having = [report for report in reports.values() if name in report.metrics]
        mean[name] = sum(report.metrics[name] for report in having) / len(having)
        weight = sum(report.num_examples for report in having)
        pooled[name] = (
            sum(report.metrics[name] * report.num_examples for report in having) / weight if weight else mean[name]
        )
    return GlobalEvaluation(version, tuple(sorted(reports)), mean, pooled, total_examples)


class EvaluationBook:
    """Reports kept per model version (the most recent versions only) plus each site's latest report."""

    def __init__(self, history_path: Path | None, keep_versions: int = 50) -> None:
        self.history_path = history_path
        self.keep_versions = keep_versions
        self.by_version: dict[int, dict[str, EvalReport]] = {}
        self.latest_by_site: dict[str, EvalReport] = {}
        if history_path is not None:
            with storage_writes(str(history_path.parent)):
                make_directory(history_path.parent)

    def add(self, report: EvalReport, received_at: float) -> GlobalEvaluation:
        per_version = self.by_version.setdefault(report.model_version, {})
        per_version[report.site_id] = report
        for old in sorted(self.by_version)[: -self.keep_versions]:
            del self.by_version[old]
        current = self.latest_by_site.get(report.site_id)
        if current is None or current.model_version <= report.model_version:
            self.latest_by_site[report.site_id] = report
        evaluation = aggregate_reports(report.model_version, per_version)
        if self.history_path is not None:
            row = {
                "time": received_at,
                "version": report.model_version,
                "site": report.site_id,
                "num_examples": report.num_examples,
                "metrics": report.metrics,
                "sites_reported": list(evaluation.sites),
                "mean": evaluation.mean,
                "pooled": evaluation.pooled,
            }
            with storage_writes(str(self.history_path)), self.history_path.open("a", encoding="utf-8") as handle:
                # strict JSON: a NaN or inf never reaches the file (coordinator.status refuses such reports first)
                handle.write(json.dumps(row, allow_nan=False) + "\n")
        return evaluation

    def for_version(self, version: int) -> GlobalEvaluation | None:
        reports = self.by_version.get(version)
        return aggregate_reports(version, reports) if reports else None

    def latest(self) -> GlobalEvaluation | None:
        """Each site's most recent report, whatever version it evaluated (what a dashboard shows now)."""
        if not self.latest_by_site:
            return None
        newest = max(report.model_version for report in self.latest_by_site.values())
        return aggregate_reports(newest, self.latest_by_site)
