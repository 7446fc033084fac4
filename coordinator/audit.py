"""The audit trail: one JSON line per received update, each chained to the previous by its hash.

For HIPAA/GDPR reviews: what each site sent (sha256 of the exact bytes), whether it was accepted, and why not.
Each record holds ``prev_hash`` (the previous record's ``hash``) and its own ``hash`` = sha256 of the record's
canonical JSON without ``hash``; editing, removing or reordering any record breaks the chain from there on,
which ``verify_chain`` reports.

A record is of bounded size whatever a site sends: it holds the body's digest and length, never its contents, and
every string in it (a rejection's detail may quote what failed to decode) is cut to ``MAX_FIELD_CHARS`` with a
marker saying how much was cut (``bounded``). Log lines about a message use ``bounded`` too.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.errors import AuditError
from coordinator.storage import fsync_directory, make_directory, storage_writes

GENESIS_HASH = "0" * 64
MAX_FIELD_CHARS = 500
CUT_MARKER = "... [{} more characters cut]"


def bounded(text: str, limit: int = MAX_FIELD_CHARS) -> str:
    """``text``, or its first ``limit`` characters and a marker saying how many more there were."""
    return text if len(text) <= limit else text[:limit] + CUT_MARKER.format(len(text) - limit)


def _bounded_fields(fields: dict[str, Any]) -> dict[str, Any]:
    return {key: bounded(value) if isinstance(value, str) else value for key, value in fields.items()}


def _canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def record_hash(record: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical({key: value for key, value in record.items() if key != "hash"})).hexdigest()


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


class AuditLog:
    """Append-only; each append is flushed and fsynced before the update it describes is acknowledged. A failed
    write is a ``StorageError`` (``coordinator.storage``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with storage_writes(str(path)):
            make_directory(path.parent)
            self._repair_torn_tail()
            created = not path.exists()
            self._handle = path.open("a", encoding="utf-8")
            if created:  # the new file's name is durable only once its directory is
                fsync_directory(path.parent)
        self.count, self.last_hash = self._scan()
        self._digester = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedmq-audit-digest")

    def digest(self, body: bytes) -> Future[str]:
        """``body_digest`` on a worker thread: hashlib lets go of the GIL, so hashing a large update overlaps
        its decoding, validation and aggregation instead of adding to them."""
        return self._digester.submit(body_digest, body)

    def _repair_torn_tail(self) -> None:
        """A crash mid-write can leave a last line without its newline; it was never acknowledged, drop it."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with self.path.open("r+b") as handle:
                handle.truncate(data.rfind(b"\n") + 1)
                os.fsync(handle.fileno())

    def _scan(self) -> tuple[int, str]:
        count, last = 0, GENESIS_HASH
        for record in read_records(self.path):
            count, last = count + 1, str(record.get("hash", last))
        return count, last

    def seal(self, fields: dict[str, Any], after: dict[str, Any] | None = None) -> dict[str, Any]:
        """The record that would be appended next (chained, hashed), without writing it; ``after`` chains it to a
        sealed record not yet appended (a batch being committed)."""
        seq_no, previous = (after["seq_no"], after["hash"]) if after is not None else (self.count, self.last_hash)
        record = {"seq_no": seq_no + 1, **_bounded_fields(fields), "prev_hash": previous}
        record["hash"] = record_hash(record)
        return record

    def append_sealed(self, record: dict[str, Any]) -> None:
        self.append_sealed_batch([record])

    def append_sealed_batch(self, records: list[dict[str, Any]]) -> None:
        """Append sealed records in order with one fsync; all or none must continue the chain."""
        head = self.last_hash
        for record in records:
            if record.get("prev_hash") != head:
                raise AuditError("record was sealed against another chain head")
            head = record["hash"]
        if not records:
            return
        with storage_writes(str(self.path)):
            self._handle.write(encode_records(records))
            self._handle.flush()
            os.fsync(self._handle.fileno())
        self.count += len(records)
        self.last_hash = head

    def close(self) -> None:
        self._digester.shutdown(wait=True)
        self._handle.close()


def encode_records(records: list[dict[str, Any]]) -> str:
    """The lines ``append_sealed_batch`` writes for ``records`` (also how the commit sizes them)."""
    return "".join(json.dumps(record, sort_keys=True) + "\n" for record in records)


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    if not path.exists():
        return
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


@dataclass(frozen=True)
class ChainReport:
    ok: bool
    records: int
    first_broken: int | None = None  # 1-based line number
    problem: str = ""


def verify_chain(path: Path) -> ChainReport:
    previous = GENESIS_HASH
    count = 0
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                return ChainReport(False, count, line_number, f"not JSON ({exc.msg})")
            if not isinstance(record, dict):
                return ChainReport(False, count, line_number, "not a JSON object")
            if record.get("prev_hash") != previous:
                return ChainReport(False, count, line_number, "prev_hash does not match the previous record")
            if record.get("hash") != record_hash(record):
                return ChainReport(False, count, line_number, "hash does not match the record's content")
            previous = record["hash"]
            count += 1
    return ChainReport(True, count)
