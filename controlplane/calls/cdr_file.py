"""The node's own CDR file: every call's record, written by Asterisk (cdr_custom, see
asterisk-conf/cdr_custom.conf) when the call ends, kept on the node's disk until imported.

The file only grows; the importer remembers how far it read (in PostgreSQL, in the same
transaction as the CDRs it stored), so a control plane or AMI outage loses nothing and a
repeated import stores nothing twice.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID

# The columns of asterisk-conf/cdr_custom.conf, in order.
COLUMNS = ("uniqueid", "sequence", "call", "start", "answer", "end", "duration", "billsec",
           "disposition", "src", "dst", "reason", "sip_code", "tenant", "accountcode",
           "direction")
MAX_CHUNK = 1 << 20


@dataclass(frozen=True)
class CdrLine:
    uniqueid: str
    sequence: int
    call_id: UUID | None
    started_at: datetime
    answered_at: datetime | None
    ended_at: datetime
    duration: float
    talk_seconds: float
    disposition: str
    src: str
    dst: str
    reason: str
    sip_code: int | None
    tenant_id: int | None
    account_code: str
    direction: str


def _time(raw: str) -> datetime | None:
    value = float(raw or 0)
    return datetime.fromtimestamp(value, UTC) if value > 0 else None


def _span(start: str, end: str) -> float:
    return max(0.0, float(end or 0) - float(start or 0))


def _int(raw: str, digits: int = 9) -> int | None:
    """A whole number that fits its column (int4 unless told), or None."""
    raw = raw.strip()
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= digits else None


def _uuid(raw: str) -> UUID | None:
    try:
        return UUID(raw) if raw else None
    except ValueError:
        return None


def parse_line(text: str) -> CdrLine | None:
    """One record, or None when the line is not one of ours (then it is skipped)."""
    try:
        row = next(csv.reader(io.StringIO(text)))
    except (csv.Error, StopIteration):
        return None
    if len(row) != len(COLUMNS):
        return None
    f = dict(zip(COLUMNS, row, strict=True))
    try:  # a line the node mangled is skipped, never retried forever
        started, ended, answered = _time(f["start"]), _time(f["end"]), _time(f["answer"])
        if not f["uniqueid"] or started is None:
            return None
        return CdrLine(
            uniqueid=f["uniqueid"], sequence=_int(f["sequence"]) or 0, call_id=_uuid(f["call"]),
            started_at=started, answered_at=answered, ended_at=ended or started,
            # from the exact times: the record's duration and billsec are whole seconds
            duration=_span(f["start"], f["end"]),
            talk_seconds=_span(f["answer"], f["end"]) if answered is not None else 0.0,
            disposition=f["disposition"], src=f["src"], dst=f["dst"], reason=f["reason"],
            sip_code=_int(f["sip_code"]), tenant_id=_int(f["tenant"], 18),
            account_code=f["accountcode"], direction=f["direction"])
    except (ValueError, OverflowError, OSError):
        return None


def state(path: Path) -> tuple[str, int] | None:
    """(identity, size) of the file from one `stat`: its identity is device:inode, to notice
    a new file at the same path; None when there is no file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return f"{st.st_dev}:{st.st_ino}", st.st_size


def read_from(path: Path, offset: int) -> tuple[list[str], int]:
    """Complete lines from `offset` (a partly written last line waits for the next read),
    and the offset after them."""
    with open(path, "rb") as fh:
        fh.seek(offset)
        chunk = fh.read(MAX_CHUNK)
    end = chunk.rfind(b"\n")
    if end < 0:
        return [], offset
    lines = chunk[:end].decode("utf-8", "replace").split("\n")
    return [line for line in lines if line.strip()], offset + end + 1
