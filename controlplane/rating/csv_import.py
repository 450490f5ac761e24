"""Rate tables from CSV files as spreadsheets write them, checked whole before anything is kept.

The header names the columns (any order, case ignored):
`prefix,description,price_per_minute,connection_fee,first_increment,next_increment,
free_seconds`, and optionally `call_class` (restricts the row to calls of that class).
The delimiter is `;`, `,` or a tab, whichever the header uses; decimals take a point or a
comma (`0,12`, as Brazilian spreadsheets write them); the text is UTF-8, with or without a
byte order mark. An empty connection_fee or free_seconds means 0.

Every row is validated and every error is reported with its line and column (up to
MAX_REPORTED_ERRORS, the total is always given); one bad row rejects the whole file, so a
table is never left half imported.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import NamedTuple

from controlplane.api import fields as F
from controlplane.rating.classify import CallClass

MAX_BYTES = 20 * 1024 * 1024
MAX_ROWS = 200_000
MAX_REPORTED_ERRORS = 1000
MAX_SECONDS = 3600
MAX_DESCRIPTION = 100

REQUIRED = ("prefix", "description", "price_per_minute", "connection_fee", "first_increment",
            "next_increment", "free_seconds")
OPTIONAL = ("call_class",)
RATED_CLASSES = tuple(str(c) for c in CallClass if c is not CallClass.INVALID)

_PREFIX = re.compile(r"^\+?([1-9][0-9]{0,14})$")
# numeric(12, 6): up to 6 digits on each side of the decimal point or comma
_DECIMAL = re.compile(r"^([0-9]{1,6})(?:[.,]([0-9]{1,6}))?$")
_INTEGER = re.compile(r"^[0-9]{1,7}$")
_DESCRIPTION = F.text(MAX_DESCRIPTION, min_len=0)
RATE_TEXT = re.compile(r"[\w .@&'+/:(),;%-]*")


class RateRow(NamedTuple):
    """One valid line of the file, ready to be stored (a tuple: 200,000 are built at once)."""

    line: int
    prefix: str
    description: str
    price_per_minute: Decimal
    connection_fee: Decimal
    first_increment: int
    next_increment: int
    free_seconds: int
    call_class: str | None

    def record(self, rate_table_id: int) -> tuple[object, ...]:
        """The row as the `rates` table's columns (see store.RATE_COLUMNS)."""
        return (rate_table_id, self.prefix, self.description, self.price_per_minute,
                self.connection_fee, self.first_increment, self.next_increment,
                self.free_seconds, self.call_class)


class CsvTooLarge(Exception):
    """The file is over MAX_BYTES or MAX_ROWS."""


class CsvRejected(Exception):
    """The file has errors: (pointer, detail) pairs such as ('/line/12/price_per_minute',
    'must be a decimal number'); `total` counts them all, `errors` holds the first ones."""

    def __init__(self, errors: list[tuple[str, str]], total: int) -> None:
        super().__init__(f"{total} error{'s' if total > 1 else ''}")
        self.errors = errors
        self.total = total


class _Errors:
    """Collects errors, keeping the first MAX_REPORTED_ERRORS and counting the rest."""

    def __init__(self) -> None:
        self.kept: list[tuple[str, str]] = []
        self.total = 0

    def add(self, pointer: str, detail: str) -> None:
        self.total += 1
        if len(self.kept) < MAX_REPORTED_ERRORS:
            self.kept.append((pointer, detail))

    def raise_if_any(self) -> None:
        if self.total:
            raise CsvRejected(self.kept, self.total)


def parse_rates(data: bytes) -> list[RateRow]:
    """Every row of the file, or CsvRejected naming every bad line (CsvTooLarge if huge)."""
    if len(data) > MAX_BYTES:
        raise CsvTooLarge(f"the file is over {MAX_BYTES // (1024 * 1024)} MB")
    text = _decode(data)
    errors = _Errors()
    lines = _lines(text)
    header = _header(lines, errors)
    errors.raise_if_any()
    assert header is not None
    delimiter, columns, width, first_line = header
    rows = _rows(lines, delimiter, columns, width, first_line, errors)
    errors.raise_if_any()
    if not rows:
        raise CsvRejected([("/line/2", "the file holds no rate")], 1)
    return rows


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise CsvRejected([(f"/line/{line}", "is not UTF-8 text: save the file as CSV UTF-8")],
                          1) from exc


def _lines(text: str) -> list[str]:
    """Physical lines as an editor counts them (\\n, \\r\\n or \\r), ends kept for csv."""
    return list(io.StringIO(text, newline=""))


def _header(lines: list[str],
            errors: _Errors) -> tuple[str, dict[str, int], int, int] | None:
    """(delimiter, column -> index, number of fields, line number of the header).

    Columns without a name (the trailing delimiters spreadsheets leave) are ignored, and so
    is the `sep=;` line Excel may write first, except for the delimiter it names.
    """
    number = next((i for i, line in enumerate(lines, 1) if line.strip()), 0)
    if number == 0:
        errors.add("/line/1", "the file is empty: the first line must name the columns")
        return None
    hint = lines[number - 1].rstrip("\r\n").strip(" ").lower()  # "sep=\t": keep the tab
    named = hint[4:] if hint.startswith("sep=") and len(hint) == 5 else ""
    if named:
        number += 1
    raw = lines[number - 1] if number <= len(lines) else ""
    delimiter = named or next((d for d in (";", "\t", ",") if d in raw), ",")
    names = [n.strip().lower() for n in next(csv.reader([raw], delimiter=delimiter), [])]
    columns: dict[str, int] = {}
    for index, name in enumerate(names):
        if not name:
            continue
        if name not in REQUIRED + OPTIONAL:
            errors.add(f"/line/{number}", f"column {name[:40]!r} is not known: the columns"
                                          f" are {', '.join(REQUIRED + OPTIONAL)}")
        elif name in columns:
            errors.add(f"/line/{number}/{name}", "names a column twice")
        else:
            columns[name] = index
    for name in REQUIRED:
        if name not in columns:
            errors.add(f"/line/{number}/{name}", "column is missing from the header")
    return delimiter, columns, len(names), number


def _records(lines: list[str], delimiter: str, start: int,
             errors: _Errors) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each non-blank line after the header."""
    source = iter(lines[start:])
    reader = csv.reader(source, delimiter=delimiter, strict=True)
    consumed = start
    while True:
        line = consumed + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            errors.add(f"/line/{line}", f"is not valid CSV ({exc})")
            return
        consumed = start + reader.line_num
        if any(f.strip() for f in fields):
            yield line, fields


def _rows(lines: list[str], delimiter: str, columns: dict[str, int], width: int,
          header_line: int, errors: _Errors) -> list[RateRow]:
    rows: list[RateRow] = []
    seen: dict[tuple[str, str | None], int] = {}
    for count, (line, fields) in enumerate(_records(lines, delimiter, header_line, errors)):
        if count >= MAX_ROWS:
            raise CsvTooLarge(f"the file holds more than {MAX_ROWS} rates")
        if len(fields) != width:
            errors.add(f"/line/{line}",
                       f"has {len(fields)} fields where the header has {width}")
            continue
        row = _row(line, fields, columns, errors)
        if row is None:
            continue
        key = (row.prefix, row.call_class)
        if key in seen:
            errors.add(f"/line/{line}/prefix", f"{row.prefix} is already on line {seen[key]}"
                       + (f" for class {row.call_class}" if row.call_class else ""))
            continue
        seen[key] = line
        rows.append(row)
    return rows


def _row(line: int, fields: list[str], columns: dict[str, int],
         errors: _Errors) -> RateRow | None:
    """One line's fields, checked; None (and errors recorded) if any is bad."""
    values: list[object] = [line]
    bad = False
    for name, parse in _PARSERS:
        index = columns.get(name)
        try:
            values.append(parse("" if index is None else fields[index].strip()))
        except F.FieldError as exc:
            errors.add(f"/line/{line}/{name}", str(exc))
            bad = True
    return None if bad else RateRow(*values)  # type: ignore[arg-type]


def _prefix(raw: str) -> str:
    match = _PREFIX.fullmatch(raw)
    if match is None:
        raise F.FieldError("must be 1 to 15 digits of an E.164 number (country code first,"
                           " no leading 0)")
    return match.group(1)


def _description(raw: str) -> str:
    # A rate's description never reaches a node's configuration (only the API shows it), so
    # it also takes what carriers' tables write: "Portugal (movel), Lisboa; 10%". RATE_TEXT
    # admits no NUL, surrogate or control character, and none of [ ] $ { } " \ < >.
    if len(raw) <= MAX_DESCRIPTION and RATE_TEXT.fullmatch(raw):
        return raw
    if len(raw) > MAX_DESCRIPTION:
        return str(_DESCRIPTION.parse(raw))  # the API's own message for the length
    raise F.FieldError("must be letters, digits, spaces and . _ @ & ' + / : ( ) , ; % -"
                       " only")


def _money(required: bool) -> Callable[[str], Decimal]:
    def parse(raw: str) -> Decimal:
        if raw == "" and not required:
            return Decimal(0)
        if _DECIMAL.fullmatch(raw) is None:
            raise F.FieldError("must be a decimal number such as 0.12 or 0,12 (at most 6"
                               " digits before and after the decimal separator)")
        return Decimal(raw.replace(",", "."))

    return parse


def _seconds(minimum: int, required: bool) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        if raw == "" and not required:
            return 0
        if _INTEGER.fullmatch(raw) is None or not minimum <= int(raw) <= MAX_SECONDS:
            raise F.FieldError(f"must be a whole number of seconds from {minimum} to"
                               f" {MAX_SECONDS}")
        return int(raw)

    return parse


def _call_class(raw: str) -> str | None:
    if raw == "":
        return None
    if raw.lower() not in RATED_CLASSES:
        raise F.FieldError("must be empty or one of: " + ", ".join(RATED_CLASSES))
    return raw.lower()


# In RateRow's order.
_PARSERS: tuple[tuple[str, Callable[[str], object]], ...] = (
    ("prefix", _prefix),
    ("description", _description),
    ("price_per_minute", _money(required=True)),
    ("connection_fee", _money(required=False)),
    ("first_increment", _seconds(1, required=True)),
    ("next_increment", _seconds(1, required=True)),
    ("free_seconds", _seconds(0, required=False)),
    ("call_class", _call_class),
)
