"""The campaign's figures, from what the sites were told and what the coordinator's audit log says.

Pure: no broker, no torch, no pytest, so it is unit-tested on a hand-made audit log (tests/unit/
test_campaign_figures.py) and used as-is by a benchmark that prints the table.

Definitions (per update_id, over all sites):

attempted      ids a site tried to publish (each id once, however often it was resent)
confirmed      ids the broker confirmed (basic.ack to a publish with confirms on)
applied        distinct ids with an ``accepted`` audit record
rejected       confirmed ids never applied but rejected with a reason (``rejected`` record); a scripted site sends
               only valid updates, so any of these is a wrong rejection (issue 12: ``duplicate`` after an
               out-of-order redelivery)
lost           confirmed ids never applied and never rejected with a reason: the broker said "safe" and the run
               does not have them (dead-lettered by the delivery limit, or only ``already-applied`` records)
applied_twice  ids with more than one ``accepted`` record
unconfirmed_at_kill  attempted ids the broker never confirmed and the run never applied: a real site agent
               SIGKILLed while it trained or awaited the confirm (its data is still there; it trains again), one
               stopped (SIGTERM, or the run's stop command) with a drawn seq it never sent, or a scripted site's
               update given up on after its resend deadline
undone_by_restore  confirmed ids the coordinator applied (or rejected) after the backup it was later restored from:
               the restore took them back, so they are counted here, not as lost (``undone=``)
kept_by_restore  applied ids the backup already held (``kept=``): applied before the backup, kept by the restore
queued_after_end  confirmed ids still in the sites' update queues when the figures are taken: sent after the run
               reached its stopping rule, durable in the broker for a next run (``queued=``), not lost
seq_reused     (site, seq) pairs the audit log holds under more than one update id: a site that reused a seq
               (a restarted agent whose counter went back) and would see its new update refused as ``duplicate``

Ids are ``update_id`` by default; a real site agent logs only its ``seq``, so its case identifies updates by
``"<site>:<seq>"`` (``identify_by="seq"``) on both sides.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

ACCEPTED = "accepted"
REJECTED = "rejected"
ALREADY_APPLIED = "already-applied"


@dataclass(frozen=True)
class CampaignFigures:
    """What a user would check after a fault: did every update the broker confirmed make it in, exactly once."""

    case: str
    attempted: int
    confirmed: int
    applied: int
    lost: int
    applied_twice: int
    rejected: int = 0
    already_applied: int = 0  # redeliveries acked as already applied (harmless, counted for the table)
    unconfirmed_applied: int = 0  # applied although the site never saw the confirm (a cut connection: fine)
    checkpoint_accepted: int | None = None  # the run's own count (checkpoint ``accepted_total``)
    dead_lettered: int = 0  # messages in the dead-letter queue at the end
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)  # reject reason or x-first-death-reason
    publish_failures: int = 0  # publishes the sites had to resend (the fault reached them)
    longest_publish_seconds: float = 0.0  # longest wait of a site for one confirm, resends included
    coordinator_kills: int = 0  # SIGKILLs the harness sent
    coordinator_exits: int = 0  # deaths it did not cause (a failed write makes the coordinator exit 1)
    chain_ok: bool = True  # ``fedmq audit verify`` on audit.jsonl
    duration_seconds: float = 0.0
    rejected_reasons: dict[str, int] = field(default_factory=dict)
    unconfirmed_at_kill: int = 0
    undone_by_restore: int = 0
    kept_by_restore: int = 0
    queued_after_end: int = 0
    seq_reused: int = 0
    agent_kills: int = 0  # SIGKILLs the case sent to a real site agent
    lost_ids: tuple[str, ...] = ()  # the first few, for the failure message

    def as_row(self) -> dict[str, Any]:
        row = asdict(self)
        row.pop("lost_ids")
        return row

    def summary(self) -> str:
        return (
            f"{self.case}: attempted {self.attempted} / confirmed {self.confirmed} / applied {self.applied} / "
            f"lost {self.lost} / applied twice {self.applied_twice} / rejected {self.rejected} "
            f"{self.rejected_reasons or ''} / already-applied {self.already_applied} / "
            f"dead-lettered {self.dead_lettered} {self.dead_letter_reasons or ''} / "
            f"unconfirmed at kill {self.unconfirmed_at_kill} / kept by restore {self.kept_by_restore} / "
            f"undone by restore {self.undone_by_restore} / "
            f"queued after the end {self.queued_after_end} / "
            f"seq reused {self.seq_reused} / agent kills {self.agent_kills} / "
            f"checkpoint {self.checkpoint_accepted} / "
            f"kills {self.coordinator_kills} / exits {self.coordinator_exits} / "
            f"site resends {self.publish_failures}, longest confirm wait {self.longest_publish_seconds:.1f} s / "
            f"chain {'ok' if self.chain_ok else 'BROKEN'} / {self.duration_seconds:.1f} s"
        )


def compute_figures(
    case: str,
    *,
    attempted: Mapping[str, Iterable[str]],
    confirmed: Mapping[str, Iterable[str]],
    audit_records: Iterable[Mapping[str, Any]],
    checkpoint_accepted: int | None = None,
    dead_lettered: Mapping[str, int] | None = None,
    publish_failures: int = 0,
    longest_publish_seconds: float = 0.0,
    coordinator_kills: int = 0,
    coordinator_exits: int = 0,
    chain_ok: bool = True,
    duration_seconds: float = 0.0,
    undone: Iterable[str] = (),
    kept: Iterable[str] = (),
    queued: Iterable[str] = (),
    agent_kills: int = 0,
    identify_by: str = "update_id",
) -> CampaignFigures:
    """``attempted``/``confirmed``: site id -> update ids; ``audit_records``: the coordinator's audit.jsonl;
    ``dead_lettered``: reason -> messages in the dead-letter queue; ``undone``/``kept``: ids a restore took back / kept;
    ``queued``: ids still in the update queues (see the module docstring); ``identify_by``: ``"update_id"``, or
    ``"seq"`` when ids are ``"<site>:<seq>"``."""
    if identify_by not in ("update_id", "seq"):
        raise ValueError(f"identify_by must be 'update_id' or 'seq', not {identify_by!r}")
    audit_records = list(audit_records)
    attempted_ids = {update_id for ids in attempted.values() for update_id in ids}
    confirmed_ids = {update_id for ids in confirmed.values() for update_id in ids}
    accepted: Counter[str] = Counter()
    rejected_reason: dict[str, str] = {}
    already_applied = 0
    ids_of_seq: dict[tuple[Any, Any], set[Any]] = {}
    for record in audit_records:
        if record.get("kind", "update") != "update":
            continue
        if record.get("seq") is not None and record.get("update_id") is not None:
            ids_of_seq.setdefault((record.get("site"), record["seq"]), set()).add(record["update_id"])
        update_id, outcome = record.get("update_id"), record.get("outcome")
        if identify_by == "seq":
            update_id = None if record.get("seq") is None else f"{record.get('site')}:{record['seq']}"
        if update_id is None:
            continue
        if outcome == ACCEPTED:
            accepted[update_id] += 1
        elif outcome == REJECTED:
            rejected_reason.setdefault(update_id, str(record.get("reason") or "unknown"))
        elif outcome == ALREADY_APPLIED:
            already_applied += 1
    undone_ids = set(undone) - accepted.keys() - rejected_reason.keys()
    queued_ids = set(queued) - accepted.keys() - rejected_reason.keys() - undone_ids
    missing = sorted(confirmed_ids - accepted.keys())
    rejected = [update_id for update_id in missing if update_id in rejected_reason]
    lost = [
        update_id
        for update_id in missing
        if update_id not in rejected_reason and update_id not in undone_ids and update_id not in queued_ids
    ]
    return CampaignFigures(
        case=case,
        attempted=len(attempted_ids | confirmed_ids),
        confirmed=len(confirmed_ids),
        applied=len(accepted),
        lost=len(lost),
        applied_twice=sum(1 for count in accepted.values() if count > 1),
        rejected=len(rejected),
        already_applied=already_applied,
        unconfirmed_applied=len(accepted.keys() - confirmed_ids),
        checkpoint_accepted=checkpoint_accepted,
        dead_lettered=sum((dead_lettered or {}).values()),
        dead_letter_reasons=dict(dead_lettered or {}),
        publish_failures=publish_failures,
        longest_publish_seconds=longest_publish_seconds,
        coordinator_kills=coordinator_kills,
        coordinator_exits=coordinator_exits,
        chain_ok=chain_ok,
        duration_seconds=duration_seconds,
        rejected_reasons=dict(Counter(rejected_reason[update_id] for update_id in rejected)),
        unconfirmed_at_kill=len(attempted_ids - confirmed_ids - accepted.keys()),
        undone_by_restore=len(undone_ids & confirmed_ids),
        kept_by_restore=len(set(kept) & accepted.keys()),
        queued_after_end=len(queued_ids & confirmed_ids),
        seq_reused=sum(1 for ids in ids_of_seq.values() if len(ids) > 1),
        agent_kills=agent_kills,
        lost_ids=tuple(lost[:10]),
    )


def markdown_table(rows: Iterable[CampaignFigures]) -> str:
    """The jepsen-style table (attempted / confirmed / applied / lost / applied twice) for docs/BENCHMARKS.md."""
    lines = [
        "| case | attempted | confirmed | applied | lost | applied twice | rejected | dead-lettered "
        "| unconfirmed at kill | undone by restore | chain | s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.case} | {row.attempted} | {row.confirmed} | {row.applied} | {row.lost} | {row.applied_twice} "
            f"| {row.rejected} | {row.dead_lettered} | {row.unconfirmed_at_kill} | {row.undone_by_restore} "
            f"| {'ok' if row.chain_ok else 'broken'} "
            f"| {row.duration_seconds:.0f} |"
        )
    return "\n".join(lines)
