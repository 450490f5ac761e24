"""The node's own CDR file: every call's record, written by Asterisk (cdr_custom, see
asterisk-conf/cdr_custom.conf) when the call ends, kept on the node's disk until imported.

The file only grows; the importer remembers how far it read (in PostgreSQL, once the
lines read are settled), so a control plane or AMI outage loses nothing, and a line read
again stores nothing twice (a CDR is unique per node line).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID

# The columns of asterisk-conf/cdr_custom.conf, in order. Columns are only ever added at
# the end: a line with fewer, written before an upgrade, lacks the last ones.
COLUMNS = ("uniqueid", "sequence", "call", "start", "answer", "end", "duration", "billsec",
           "disposition", "src", "dst", "reason", "sip_code", "tenant", "accountcode",
           "direction", "cause")
FIRST_COLUMNS = 16  # the oldest lines'
# A record's times are seconds since 1970 (the node's clock): one outside these years is a
# clock that was wrong, and the line cannot be billed from it.
EARLIEST, LATEST = 946684800.0, 4102444800.0  # 2000-01-01, 2100-01-01
LONGEST = 1e8  # seconds from a record's start to its end (the CDR's columns hold less than 1e9)
MAX_CHUNK = 1 << 20
MAX_RECORD_LINES = 64  # lines one record may span (see read_from)
# A record as cdr_custom writes it: every field quoted, a quote inside one doubled. Text a
# caller put into a field (its quotes doubled too) can never form one on its own.
RECORD = re.compile(rb'"(?:[^"]|"")*"(?:,"(?:[^"]|"")*")*')


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
    hangup_cause: str = ""  # Q.850 cause of the caller's channel, e.g. "16"


class OutOfRange(ValueError):
    pass


def _time(raw: str) -> datetime | None:
    value = float(raw or 0)
    if value <= 0:
        return None
    if not EARLIEST <= value < LATEST:
        raise OutOfRange(f"time {raw} is outside 2000-2100")
    return datetime.fromtimestamp(value, UTC)


def _span(start: str, end: str) -> float:
    span = max(0.0, float(end or 0) - float(start or 0))
    if span > LONGEST:
        raise OutOfRange(f"{span:.0f} s from {start} to {end}")
    return span


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
    if not FIRST_COLUMNS <= len(row) <= len(COLUMNS):
        return None
    f = dict(zip(COLUMNS, row + [""] * (len(COLUMNS) - len(row)), strict=True))
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
            account_code=f["accountcode"], direction=f["direction"],
            hangup_cause=str(_int(f["cause"], 3) or ""))
    except (ValueError, OverflowError, OSError):
        return None


def state(path: Path) -> tuple[str, int] | None:
    """(identity, size) of the file; None when there is no file. Its identity is
    device:inode:fingerprint, the fingerprint a hash of its first line (empty until it has
    one whole): a new file at the same path is noticed even when it got the inode of the
    one it replaced (freed by a rotation that compressed it), or is the same file emptied
    and written again (copytruncate). A file whose `stat` did not change since the last
    look costs that `stat` alone."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    seen = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    known = _states.get(path)
    if known is not None and known[0] == seen:
        return known[1], st.st_size
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            head = fh.read(FINGERPRINT_BYTES)
    except FileNotFoundError:
        return None
    ident = f"{st.st_dev}:{st.st_ino}:{_fingerprint(head)}"
    _states[path] = ((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns), ident)
    return ident, st.st_size


_states: dict[Path, tuple[tuple[int, int, int, int], str]] = {}  # state()'s last looks


def same_file(saved: str, ident: str) -> bool:
    """Whether a position saved for the file of identity `saved` is one in the file of
    identity `ident`. A position saved before its file had a whole first line (an empty
    fingerprint), or before identities had fingerprints (device:inode), is the file's that
    has that device and inode."""
    if saved == ident:
        return True
    parts = saved.split(":")
    return (len(parts) == 2 or (len(parts) == 3 and not parts[2])) and \
        ident.startswith(f"{parts[0]}:{parts[1]}:")


FINGERPRINT_BYTES = 4096  # a record is far shorter: the first line is whole within it


def _fingerprint(head: bytes) -> str:
    end = head.find(b"\n")
    return "" if end < 0 else hashlib.blake2b(head[:end], digest_size=8).hexdigest()


def rotated(path: Path, ident: str, since: float) -> tuple[Path | None, list[Path]]:
    """The files beside `path` that rotations made of it (`pbx-cdr.csv.1`,
    `pbx-cdr.csv-20261204`; compressed ones are not read): the one that was the file of
    identity `ident` (see `state`), found by its first line, if it is still there, and those
    written to after `since` (seconds since 1970) besides it, oldest first: files rotated
    after it, never read."""
    parts = ident.split(":")
    fingerprint = parts[2] if len(parts) == 3 else ""
    try:
        entries = [e for e in os.scandir(path.parent)
                   if e.name != path.name and e.name.startswith(path.name)]
    except FileNotFoundError:
        return None, []
    former: Path | None = None
    later: list[tuple[float, str]] = []
    for entry in sorted(entries, key=lambda e: e.name):
        try:
            with open(entry.path, "rb") as fh:
                head = fh.read(FINGERPRINT_BYTES)
                mtime = os.fstat(fh.fileno()).st_mtime
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            continue
        if not head.startswith(b'"'):  # compressed, or not a CDR file of ours
            continue
        if fingerprint and former is None and _fingerprint(head) == fingerprint:
            former = Path(entry.path)
        elif mtime > since:
            later.append((mtime, entry.path))
    return former, [Path(name) for _, name in sorted(later)]


def _whole(raw: bytes) -> bool:
    """A line that is by itself a record of ours: what a caller put inside a field never
    is (its quotes doubled, it forms fields of quotes at most, and never enough of them)."""
    if not RECORD.fullmatch(raw):
        return False
    fields = next(csv.reader([raw.decode("utf-8", "replace")]))
    return len(fields) >= FIRST_COLUMNS and any(f.strip('"') for f in fields)


def read_from(path: Path, offset: int) -> tuple[list[str], int]:
    """Complete records from `offset` (a partly written last one waits for the next read),
    and the offset after them.

    Every field is quoted (quotes inside doubled), and a field may hold a line break: a
    caller ID from the network is written as it came. A record therefore ends at the first
    line break after an even number of quotes. A line whose quote stays open for
    MAX_RECORD_LINES lines, or until a later line is a whole record, was cut short (a node
    that stopped mid-write); lines that close their quotes without forming a RECORD are not
    one of ours. Either way the first line is skipped, but for a record of ours that starts
    within it (the node wrote its next record on the cut one's line), and the next read as a
    record's start. A chunk without any line break is no record's: it is skipped."""
    with open(path, "rb") as fh:
        fh.seek(offset)
        chunk = fh.read(MAX_CHUNK)
    end = chunk.rfind(b"\n")
    if end < 0:
        return [], offset + (len(chunk) if len(chunk) == MAX_CHUNK else 0)
    pieces = chunk[:end].split(b"\n")
    records: list[str] = []
    taken = i = 0
    while i < len(pieces):
        quotes = size = 0
        j = i
        while j < len(pieces) and j - i < MAX_RECORD_LINES:
            quotes += pieces[j].count(b'"')
            size += len(pieces[j]) + 1
            j += 1
            if quotes % 2 == 0:
                break
        if quotes % 2 == 0:
            raw = b"\n".join(pieces[i:j])
            if RECORD.fullmatch(raw):
                records.append(raw.decode("utf-8", "replace"))
                taken, i = taken + size, j
                continue
        elif not (j - i >= MAX_RECORD_LINES or any(_whole(pieces[k]) for k in range(i + 1, j))):
            break  # its quote is still open where the file ends: the rest is on its way
        # not a record, or one cut short (a whole record of ours on a later line): skipped,
        # but for a record that starts within it
        cut = record_within(pieces[i])
        if cut:
            taken, pieces[i] = taken + cut, pieces[i][cut:]
        else:
            taken, i = taken + len(pieces[i]) + 1, i + 1
    return records, offset + taken


# Where a record of ours may start: its unique id, then its sequence number.
RECORD_START = re.compile(rb'"[A-Za-z0-9._-]+","[0-9]+","')


def record_within(raw: bytes) -> int:
    """Where, after its first byte, a whole record of ours starts in `raw`: a node that
    stopped in the middle of a record writes its next one on the same line. 0: nowhere."""
    for m in RECORD_START.finditer(raw, 1):
        tail = raw[m.start():]
        if _whole(tail) and parse_line(tail.decode("utf-8", "replace")) is not None:
            return m.start()
    return 0


def parse_salvaged(text: str) -> CdrLine | None:
    """parse_line, and for a line that is not a record, the record of ours that starts
    within it, if one does (see record_within)."""
    line = parse_line(text)
    if line is None:
        raw = text.encode("utf-8", "replace")
        cut = record_within(raw)
        if cut:
            line = parse_line(raw[cut:].decode("utf-8", "replace"))
    return line

