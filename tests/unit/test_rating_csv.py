"""Rate files as spreadsheets write them: parsed whole, or refused with every bad line named."""

from decimal import Decimal as D

import pytest

from controlplane.rating import csv_import
from controlplane.rating.csv_import import CsvRejected, CsvTooLarge, parse_rates

HEADER = "prefix;description;price_per_minute;connection_fee;first_increment;next_increment;" \
         "free_seconds"


def rejected(data: bytes) -> list[tuple[str, str]]:
    with pytest.raises(CsvRejected) as info:
        parse_rates(data)
    return info.value.errors


def test_brazilian_spreadsheet_semicolons_decimal_commas_bom_and_crlf():
    data = ("\ufeff" + HEADER + "\r\n"
            "55;Brasil fixo;0,05;0;30;6;3\r\n"
            "5511;São Paulo;0,0612;0,01;30;6;3\r\n"
            "\r\n"
            "551199;SP móvel;0,35;;60;60;\r\n").encode()
    rows = parse_rates(data)
    assert [(r.line, r.prefix, r.description) for r in rows] == [
        (2, "55", "Brasil fixo"), (3, "5511", "São Paulo"), (5, "551199", "SP móvel")]
    assert rows[1].price_per_minute == D("0.0612") and rows[1].connection_fee == D("0.01")
    assert (rows[2].connection_fee, rows[2].free_seconds) == (D(0), 0)
    assert (rows[2].first_increment, rows[2].next_increment) == (60, 60)
    assert rows[0].call_class is None


def test_commas_points_any_column_order_quotes_and_an_optional_class():
    data = (b"Next_Increment,prefix,price_per_minute,description,first_increment,"
            b"free_seconds,connection_fee,call_class\n"
            b'6,+351,0.90,"Portugal",30,3,0.10,\n'
            b"6,55,0.40,Brasil movel VC3,30,3,0,mobile_vc3\n")
    rows = parse_rates(data)
    assert [(r.prefix, r.price_per_minute, r.call_class) for r in rows] == [
        ("351", D("0.90"), None), ("55", D("0.40"), "mobile_vc3")]
    assert rows[0].record(7) == (7, "351", "Portugal", D("0.90"), D("0.10"), 30, 6, 3, None)


def test_excel_separator_line_and_unnamed_trailing_columns():
    data = ("sep=;\r\n" + HEADER + ";;\r\n" + "55;Brasil;0,05;0;30;6;3;;\r\n").encode()
    [row] = parse_rates(data)
    assert (row.line, row.prefix, row.price_per_minute) == (3, "55", D("0.05"))
    errors = rejected(("sep=;\n" + HEADER + ";\n55;Brasil;0,05;0;30;6;3\n").encode())
    assert errors == [("/line/3", "has 7 fields where the header has 8")]


def test_an_excel_separator_line_naming_a_tab():
    data = ("sep=\t\r\n" + HEADER.replace(";", "\t") + "\r\n"
            + "55\tBrasil fixo\t0,05\t0\t30\t6\t3\r\n").encode()
    [row] = parse_rates(data)
    assert (row.line, row.prefix, row.description, row.price_per_minute) == (
        3, "55", "Brasil fixo", D("0.05"))


def test_every_bad_line_is_reported_with_line_and_column():
    data = (HEADER + "\n"
            "55;ok;0,05;0;30;6;3\n"
            "5x;bad prefix;0,05;0;30;6;3\n"
            "56;bad price;abc;0;30;6;3\n"
            "57;bad fee;0,1;-1;0;6;3\n"
            "58;semi\tcolon;0,1;0;30;6;3\n"
            "59;too few;0,1\n"
            "55;duplicate;0,1;0;30;6;3\n"
            "0;leading zero;1234567;0;30;6;3601\n").encode()
    errors = rejected(data)
    pointers = [p for p, _ in errors]
    assert pointers == [
        "/line/3/prefix", "/line/4/price_per_minute", "/line/5/connection_fee",
        "/line/5/first_increment", "/line/6/description", "/line/7", "/line/8/prefix",
        "/line/9/prefix", "/line/9/price_per_minute", "/line/9/free_seconds"]
    assert "already on line 2" in dict(errors)["/line/8/prefix"]
    assert all(detail for _, detail in errors)


@pytest.mark.parametrize("description", ["[section]", "${X}", 'say "hi"', "back\\slash",
                                         "<b>", "tab\there", "x" * 101])
def test_descriptions_are_safe_text(description):
    quoted = '"' + description.replace('"', '""') + '"'
    errors = rejected(f"{HEADER}\n55;{quoted};0,1;0;30;6;3\n".encode())
    assert [p for p, _ in errors] == ["/line/2/description"]


def test_descriptions_take_what_carriers_tables_write():
    text = 'Portugal (móvel), Lisboa; 10% desc'
    [row] = parse_rates(f'{HEADER}\n351;"{text}";0,1;0;30;6;3\n'.encode())
    assert row.description == text


def test_header_problems():
    errors = rejected(b"prefix;desc;price_per_minute;price_per_minute\n55;x;1;1\n")
    pointers = {p for p, _ in errors}
    assert "/line/1" in pointers  # 'desc' is not a column
    assert "/line/1/price_per_minute" in pointers  # named twice
    assert {"/line/1/connection_fee", "/line/1/first_increment", "/line/1/next_increment",
            "/line/1/free_seconds", "/line/1/description"} <= pointers


@pytest.mark.parametrize(("data", "pointer"), [
    (b"", "/line/1"), (b"\n\n", "/line/1"), (HEADER.encode() + b"\n", "/line/2"),
    (HEADER.encode() + b"\n55;S\xe3o Paulo;0,1;0;30;6;3\n", "/line/2"),
])
def test_empty_headless_or_not_utf8(data, pointer):
    assert rejected(data)[0][0] == pointer


def test_error_list_is_capped_but_the_total_counted(monkeypatch):
    monkeypatch.setattr(csv_import, "MAX_REPORTED_ERRORS", 5)
    data = (HEADER + "\n" + "x;y;z;0;30;6;3\n" * 20).encode()
    with pytest.raises(CsvRejected) as info:
        parse_rates(data)
    assert len(info.value.errors) == 5 and info.value.total == 40


def test_size_limits(monkeypatch):
    monkeypatch.setattr(csv_import, "MAX_ROWS", 3)
    ok = (HEADER + "\n" + "".join(f"5{i};x;0,1;0;30;6;3\n" for i in range(3))).encode()
    assert len(parse_rates(ok)) == 3
    with pytest.raises(CsvTooLarge):
        parse_rates(ok + b"59;x;0,1;0;30;6;3\n")
    monkeypatch.setattr(csv_import, "MAX_BYTES", len(ok) - 1)
    with pytest.raises(CsvTooLarge):
        parse_rates(ok)
