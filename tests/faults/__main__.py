"""``python -m tests.faults [--full] [CASE ...]``: the fault campaign outside pytest, and its table.

Starts a RabbitMQ node of its own (free ports, a temporary state dir), runs each case on a fresh vhost, prints one
line per case as it finishes and the markdown table at the end (``--table PATH`` also writes it there, for
docs/BENCHMARKS.md). This is what ``fedmq bench faults`` is meant to call. Needs root for the storage cases
(tmpfs mounts); they are reported as skipped otherwise.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tests.faults.cases import CASES_ON_SHARED_NODE, CASES_WITH_OWN_NODE, CampaignSettings, private_node
from tests.faults.figures import CampaignFigures, markdown_table
from tests.faults.tools import MountUnavailable

CASE_NAMES = (*CASES_ON_SHARED_NODE, *CASES_WITH_OWN_NODE)


def run_campaign(
    selected: Sequence[str], settings: CampaignSettings, workdir: Path | None = None
) -> list[CampaignFigures]:
    """Run the ``selected`` cases on a node of their own, one fresh vhost each; a storage case that cannot mount
    (not root) is reported and left out."""
    from tests.integration.conftest import open_broker_env

    rows: list[CampaignFigures] = []
    with tempfile.TemporaryDirectory(prefix="fedmq-faults-") as temporary:
        root = (workdir or Path(temporary)).resolve()
        with private_node(root / "node") as node:
            for name in selected:
                case_dir = root / name
                case_dir.mkdir(parents=True, exist_ok=True)
                try:
                    if name in CASES_WITH_OWN_NODE:
                        figures = CASES_WITH_OWN_NODE[name](case_dir, settings)
                    else:
                        with open_broker_env(node, case_dir / "env") as env:
                            figures = CASES_ON_SHARED_NODE[name](env, case_dir, settings)
                except MountUnavailable as exc:
                    print(f"{name}: skipped ({exc})", flush=True)
                    continue
                rows.append(figures)
                print(figures.summary(), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    names = list(CASE_NAMES)
    parser = argparse.ArgumentParser(prog="python -m tests.faults", description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", metavar="CASE", help=f"cases to run (default: all): {', '.join(names)}")
    parser.add_argument("--full", action="store_true", help="the long campaign (30 s cuts, 20 s alarm, ...)")
    parser.add_argument("--table", type=Path, help="also write the markdown table to this file")
    parser.add_argument("--workdir", type=Path, help="keep logs and state here (default: a temporary dir)")
    arguments = parser.parse_args(argv)
    unknown = [name for name in arguments.cases if name not in names]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pika").setLevel(logging.CRITICAL)  # the faults make pika log every reset it sees
    settings = CampaignSettings.full() if arguments.full else CampaignSettings.short()
    selected = arguments.cases or names
    rows = run_campaign(selected, settings, arguments.workdir)
    table = markdown_table(rows)
    print(table)
    if arguments.table:
        arguments.table.write_text(table + "\n")
    return 0 if all(row.lost == 0 and row.applied_twice == 0 and row.chain_ok for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
