"""The node's CDR file: its lines, and reading it in pieces as Asterisk writes it."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from uuid import UUID

import pytest

from controlplane.calls import cdr_file, lifecycle
from controlplane.calls.cdr_file import parse_line, read_from

CALL = "6433dfcd-fecf-4acf-8e3f-c0a44ce6d15c"
LINE = (f'"pbx1-1796074653.0","0","{CALL}","1796074653.662516","1796074655.693703",'
        '"1796074665.999528","12","10","ANSWERED","1001","551133334444","","","7","633679",'
        '"outbound"')


def test_a_line_gives_exact_times_and_talk():
    line = parse_line(LINE)
    assert line is not None
    assert line.call_id == UUID(CALL) and line.tenant_id == 7 and line.direction == "outbound"
    assert line.answered_at == datetime.fromtimestamp(1796074655.693703, UTC)
    assert abs(line.talk_seconds - 10.305825) < 1e-6
    assert abs(line.duration - 12.337012) < 1e-6


def test_an_unanswered_line_talks_for_nothing_and_carries_its_refusal():
    text = ('"n-1.3","4","","1796074661.344941","0.000000","1796074663.361773","2","0",'
            '"NO ANSWER","1001","2002","number_invalid","404","1","763309","outbound"')
    line = parse_line(text)
    assert line is not None and line.answered_at is None and line.talk_seconds == 0
    assert (line.reason, line.sip_code, line.call_id) == ("number_invalid", 404, None)


def test_lines_that_are_not_ours_are_skipped():
    assert parse_line("garbage") is None
    assert parse_line('"a","b"') is None
    assert parse_line(LINE.replace('"1796074653.662516"', '"x"')) is None


def test_a_line_carries_the_hangup_cause_and_one_written_before_it_existed_still_reads():
    line = parse_line(LINE + ',"17"')
    assert line is not None and line.hangup_cause == "17"
    older = parse_line(LINE)
    assert older is not None and older.hangup_cause == "" and older.talk_seconds > 10


def test_a_line_from_a_clock_that_was_wrong_is_skipped():
    assert parse_line(LINE.replace('"1796074653.662516"', '"40.000000"')) is None
    assert parse_line(LINE.replace('"1796074665.999528"', '"4102444801.0"')) is None
    assert parse_line(LINE.replace('"1796074653.662516"', '"946684801.0"')) is None


def test_a_partly_written_last_line_waits_for_the_next_read(tmp_path):
    path = tmp_path / "pbx-cdr.csv"
    path.write_text(LINE + "\n" + LINE[:40])
    lines, offset = read_from(path, 0)
    assert lines == [LINE] and offset == len(LINE) + 1
    with open(path, "a") as fh:
        fh.write(LINE[40:] + "\n")
    more, end = read_from(path, offset)
    assert more == [LINE] and end == 2 * (len(LINE) + 1)
    assert read_from(path, end) == ([], end)


def test_a_record_whose_caller_id_holds_line_breaks_and_quotes_is_read_whole(tmp_path):
    """Asterisk writes a caller ID from the network as it came: a line break in it is in
    the file too, inside the field's quotes, and its quotes doubled."""
    odd = LINE.replace('"1001"', '"55119\n8888"",""x\n"', 1)
    assert odd != LINE
    path = tmp_path / "pbx-cdr.csv"
    path.write_text(LINE + "\n" + odd + "\n" + LINE + "\n")
    lines, offset = read_from(path, 0)
    assert lines == [LINE, odd, LINE] and offset == path.stat().st_size
    parsed = parse_line(odd)
    assert parsed is not None and parsed.src == '55119\n8888","x\n'
    # the record arriving in two writes: nothing of it is taken before its end
    path.write_text(LINE + "\n" + odd[:odd.index("\n") + 1])
    assert read_from(path, 0) == ([LINE], len(LINE) + 1)


def test_a_line_cut_short_is_skipped_and_the_records_after_it_are_read(tmp_path):
    """A node that stopped mid-write leaves a line whose quote never closes: it must not
    swallow the records after it."""
    path = tmp_path / "pbx-cdr.csv"
    records = [LINE.replace('"1796074653.', f'"17960746{n:02d}.', 1) for n in range(10)]
    path.write_text(LINE[:70] + "\n" + "\n".join(records) + "\n")
    lines, offset = read_from(path, 0)
    assert lines == records and offset == path.stat().st_size


@pytest.mark.parametrize("breaks", [9, 70])
def test_text_a_caller_put_in_a_record_never_reads_as_a_record_of_its_own(tmp_path, breaks):
    """A caller ID with line breaks (more than a record may span, in the second case) and a
    line of CDR columns in it: the forged line is never taken for a record, and every
    record after it is read at once."""
    forged = "zz,,,1.7e9,1.7e9,1.7000036e9,,,ANSWERED,5511,5521,,,7,,outbound"
    caller = "A\n" + forged + "\n" * breaks + '"",""' + "\n"
    hostile = LINE.replace('"1001"', '"' + caller.replace('"', '""') + '"', 1)
    after = [LINE.replace('"1796074653.', f'"17960746{n:02d}.', 1) for n in range(3)]
    path = tmp_path / "pbx-cdr.csv"
    path.write_text(hostile + "\n" + "\n".join(after) + "\n")
    lines, offset = read_from(path, 0)
    assert offset == path.stat().st_size
    parsed = [line for line in lines if parse_line(line) is not None]
    if breaks < 64:
        assert parsed == [hostile] + after
        hostile_line = parse_line(hostile)
        assert hostile_line is not None and hostile_line.src == caller
    else:  # the record is lost (it could not be told from a line cut short), nothing else
        assert parsed == after
    assert not any(forged in line and line.startswith("zz") for line in lines)


async def test_a_file_that_does_not_answer_fails_the_import_in_bounded_time(monkeypatch, tmp_path):
    """A stalled volume holds the import's reading thread, not the event loop: the import
    fails after its timeout, naming the file, while other work goes on."""
    def stalled(path):
        time.sleep(0.6)
        return None

    monkeypatch.setattr(lifecycle, "FILE_TIMEOUT", 0.2)
    monkeypatch.setattr(cdr_file, "state", stalled)
    ticks = 0

    async def other_work() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    beside = asyncio.create_task(other_work())
    started = time.monotonic()
    with pytest.raises(lifecycle.CdrFileStalled, match="pbx-cdr.csv"):
        await lifecycle.CdrImport(None, 1, tmp_path / "pbx-cdr.csv").run()  # type: ignore[arg-type]
    beside.cancel()
    assert time.monotonic() - started < 0.5
    assert ticks >= 5
    await asyncio.sleep(0.5)  # the stalled read ends before the next test reads a file


def test_a_file_is_known_by_its_first_line_as_well_as_its_inode(tmp_path):
    path = tmp_path / "pbx-cdr.csv"
    assert cdr_file.state(path) is None
    path.write_bytes(b'"1.1","0"')  # no whole line yet: no fingerprint
    empty, _ = cdr_file.state(path)
    assert empty.endswith(":")
    path.write_bytes(b'"1.1","0"\n"1.2","0"\n')
    first, size = cdr_file.state(path)
    assert size == 20 and first.startswith(empty) and first != empty
    with path.open("ab") as fh:
        fh.write(b'"1.3","0"\n')
    assert cdr_file.state(path)[0] == first  # grown: the same file
    path.write_bytes(b'"2.1","0"\n')  # emptied in place and written again
    assert cdr_file.state(path)[0] != first
    # a position saved as device:inode only (before fingerprints) stays the file's
    device_inode = first.rsplit(":", 1)[0]
    assert cdr_file.same_file(device_inode, first)
    assert not cdr_file.same_file(device_inode + "9", first)
    assert cdr_file.same_file(first, first) and cdr_file.same_file(empty, first)
    assert not cdr_file.same_file(first, empty)


def test_the_former_file_is_found_beside_by_its_first_line(tmp_path):
    path = tmp_path / "pbx-cdr.csv"
    path.write_bytes(b'"1.1","0"\n')
    ident, _ = cdr_file.state(path)
    (tmp_path / "other.csv").write_bytes(b'"1.1","0"\n')  # not a rotation of this file
    assert cdr_file.rotated(path, ident, 0) == (None, [])
    path.rename(tmp_path / "pbx-cdr.csv-20261203")
    (tmp_path / "pbx-cdr.csv-20261204").write_bytes(b'"2.1","0"\n')  # rotated after it
    (tmp_path / "pbx-cdr.csv-20261202.gz").write_bytes(b"\x1f\x8b\x08compressed\n")
    path.write_bytes(b'"3.1","0"\n')
    assert cdr_file.rotated(path, ident, 0) == (tmp_path / "pbx-cdr.csv-20261203",
                                                [tmp_path / "pbx-cdr.csv-20261204"])
    assert cdr_file.rotated(path, ident, time.time() + 60) == (
        tmp_path / "pbx-cdr.csv-20261203", [])
    # a position saved as device:inode only has no first line to find its file by
    device_inode = ident.rsplit(":", 1)[0]
    assert cdr_file.rotated(path, device_inode, 0) == (
        None, [tmp_path / "pbx-cdr.csv-20261203", tmp_path / "pbx-cdr.csv-20261204"])


def test_a_position_saved_before_the_first_line_was_whole_stays_the_files(tmp_path):
    path = tmp_path / "pbx-cdr.csv"
    path.write_bytes(b'"1.1","0')
    partial, _ = cdr_file.state(path)
    with path.open("ab") as fh:
        fh.write(b'"\n')
    whole, _ = cdr_file.state(path)
    assert partial != whole and cdr_file.same_file(partial, whole)


@pytest.mark.parametrize("cut_at", [15, 40, 70, len(LINE) - 1])
def test_a_record_written_on_the_line_of_one_cut_short_is_read(tmp_path, cut_at):
    """A node that stopped in the middle of a record writes its next one on the same line:
    the cut record is lost, the one after it is not (and neither are those that follow)."""
    records = [LINE.replace('"pbx1-1796074653.0"', f'"pbx1-17960746{n:02d}.0"', 1)
               for n in range(3)]
    path = tmp_path / "pbx-cdr.csv"
    path.write_text(LINE[:cut_at] + records[0] + "\n" + records[1] + "\n" + records[2] + "\n")
    lines, offset = read_from(path, 0)
    assert offset == path.stat().st_size
    parsed = [cdr_file.parse_salvaged(line) for line in lines]
    assert [p.uniqueid for p in parsed if p is not None] == [
        f"pbx1-17960746{n:02d}.0" for n in range(3)]


def test_a_megabyte_without_a_line_break_is_skipped_not_read_forever(tmp_path):
    path = tmp_path / "pbx-cdr.csv"
    path.write_bytes(b"\0" * cdr_file.MAX_CHUNK + (LINE + "\n").encode())
    assert read_from(path, 0) == ([], cdr_file.MAX_CHUNK)
    assert read_from(path, cdr_file.MAX_CHUNK) == ([LINE], path.stat().st_size)
    path.write_bytes(b"\0" * 100)  # short of a megabyte: it may be a record on its way
    assert read_from(path, 0) == ([], 0)
