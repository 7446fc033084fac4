"""``fedmq bench faults``: the fault campaign of tests/faults as a benchmark, and its table in docs/BENCHMARKS.md.

The same cases as the suite's ``tests/integration/test_fault_campaign.py`` (real RabbitMQ node, real coordinator
processes killed for real, real tmpfs mounts for the storage faults), run ``--repeat`` times in the long version by
default (30 s cuts, 20 s memory alarm, 40 s storage faults, the systemd unit's 10 s restart delay, 30 random kills).
Each run adds one row per case (attempted / confirmed / applied / lost / applied twice, as rabbitmq/jepsen reports
acknowledged and lost writes); the last line totals lost and applied-twice over every row.
"""

from __future__ import annotations

import argparse
import logging
import time

from benchmarks.harness import add_common_arguments, command_line, describe_machine, publish_report
from tests.faults.__main__ import CASE_NAMES, run_campaign
from tests.faults.cases import CampaignSettings
from tests.faults.figures import CampaignFigures, markdown_table

HELP = "the fault campaign (coordinator kills, crash loop, broker kill, memory alarm, cut link, full/read-only disk)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "cases", nargs="*", metavar="CASE", help=f"cases to run (default: all): {', '.join(CASE_NAMES)}"
    )
    parser.add_argument("--short", action="store_true", help="the suite's short version of each fault")
    parser.add_argument("--repeat", type=int, default=1, help="run the whole campaign this many times (default 1)")
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    unknown = [name for name in args.cases if name not in CASE_NAMES]
    if unknown:
        raise SystemExit(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASE_NAMES)}")
    logging.getLogger("pika").setLevel(logging.CRITICAL)  # the faults make pika log every reset it sees
    settings = CampaignSettings.short() if args.short else CampaignSettings.full()
    selected = args.cases or list(CASE_NAMES)
    started = time.monotonic()
    rows: list[CampaignFigures] = []
    for attempt in range(1, args.repeat + 1):
        print(f"campaign run {attempt}/{args.repeat}: {', '.join(selected)}", flush=True)
        rows.extend(run_campaign(selected, settings))
    report = format_report(rows, args, minutes=(time.monotonic() - started) / 60)
    publish_report(args, "faults", report)
    return 0 if all(row.lost == 0 and row.applied_twice == 0 and row.chain_ok for row in rows) else 1


def format_report(rows: list[CampaignFigures], args: argparse.Namespace, *, minutes: float) -> str:
    lost = sum(row.lost for row in rows)
    twice = sum(row.applied_twice for row in rows)
    confirmed = sum(row.confirmed for row in rows)
    return "\n".join(
        [
            "## Fault campaign",
            "",
            f"`{command_line()}` ({'short' if args.short else 'long'} faults, {args.repeat} run(s), "
            f"{minutes:.0f} min; {describe_machine()}).",
            "",
            markdown_table(rows),
            "",
            f"Over {len(rows)} case runs: {confirmed} confirmed updates, **{lost} lost, {twice} applied twice**.",
        ]
    )
