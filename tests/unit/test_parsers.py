"""Dropped-file parsing: formats, line numbers and byte offsets, rejections, the duplicate finder.

The property tests build a file from a list of entries (ids, comments, blank lines, bad ids, CSV
rows with quoting), render it with any mix of BOM, CRLF/LF and final newline, and check that the
parser finds exactly the expected rows and rejections, each with its line number and the byte
offset of its line end (what resuming after a crash relies on).
"""

from __future__ import annotations

import csv
import hashlib
import io
import string
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from herald.ingest.parsers import BOM, DropFileError, DropParser, Rejection, Row, check_user_id, digests, scan
from herald.ingest.seen import SeenIds

ID_CHARS = string.ascii_letters + string.digits + "_.:@-"
BAD_CHARS = " !$%&*()+=[]{}|~/\\'\"éß中"

user_ids = st.text(alphabet=ID_CHARS, min_size=1, max_size=24).filter(lambda s: s.lower() != "user_id")
bad_ids = st.builds(
    lambda a, bad, b: a + bad + b,
    st.text(alphabet=ID_CHARS, min_size=1, max_size=8),
    st.sampled_from(BAD_CHARS),
    st.text(alphabet=ID_CHARS, min_size=1, max_size=8),
)
long_ids = st.text(alphabet=ID_CHARS, min_size=129, max_size=160)
COMMENT_CHARS = "".join(c for c in string.printable if c not in "\n\r\x0b\x0c") + "é中"
comments = st.text(alphabet=COMMENT_CHARS, max_size=20).map(lambda s: "#" + s)
blanks = st.sampled_from(["", " ", "   ", "\t"])
endings = st.sampled_from(["\n", "\r\n"])


@dataclass
class Expected:
    line: int
    end: int
    user_id: str | None  # None: rejected
    data: dict[str, str] | None = None


def render(lines: list[str], line_ends: list[str], bom: bool, final_newline: bool) -> tuple[bytes, list[int]]:
    """The file's bytes and the byte offset after each line."""
    out = bytearray(BOM if bom else b"")
    ends: list[int] = []
    for index, (text, end) in enumerate(zip(lines, line_ends, strict=True)):
        out += text.encode()
        if index < len(lines) - 1 or final_newline:
            out += end.encode()
        ends.append(len(out))
    return bytes(out), ends


def parse(data: bytes) -> tuple[DropParser, list[Row | Rejection]]:
    parser = DropParser(io.BytesIO(data))
    return parser, list(parser)


plain_entries = st.lists(
    st.one_of(
        st.tuples(st.just("id"), user_ids),
        st.tuples(st.just("id"), user_ids.map(lambda s: f"  {s} ")),  # surrounding blanks are trimmed
        st.tuples(st.just("bad"), bad_ids),
        st.tuples(st.just("bad"), long_ids),
        st.tuples(st.just("skip"), comments),
        st.tuples(st.just("skip"), blanks),
    ),
    max_size=40,
)


@settings(max_examples=120, deadline=None)
@given(entries=plain_entries, data=st.data(), bom=st.booleans(), final_newline=st.booleans())
def test_plain_files_give_every_id_and_rejection_with_its_line_and_offset(
    entries: list[tuple[str, str]], data: st.DataObject, bom: bool, final_newline: bool
) -> None:
    line_ends = [data.draw(endings) for _ in entries]
    content, ends = render([text for _, text in entries], line_ends, bom, final_newline)
    expected = [
        Expected(n + 1, ends[n], text.strip() if kind == "id" else None)
        for n, (kind, text) in enumerate(entries)
        if kind != "skip"
    ]
    parser, items = parse(content)
    got = [Expected(i.line, i.end, i.user_id if isinstance(i, Row) else None) for i in items]
    assert got == expected
    assert parser.columns is None
    assert parser.lines == content.count(b"\n") + (1 if content and not content.endswith(b"\n") else 0)
    assert parser.offset == len(content)
    for item in items:
        if isinstance(item, Rejection):
            assert item.reason.startswith("user_id: ")


@st.composite
def csv_files(draw: st.DrawFn) -> tuple[list[str], list[Expected | None], str]:
    """Lines of a CSV drop and what each should give (None: skipped)."""
    delimiter = draw(st.sampled_from([",", ";", "\t"]))
    others = draw(st.lists(st.text(alphabet=string.ascii_lowercase, min_size=1, max_size=8), max_size=3, unique=True))
    others = [o for o in others if o != "user_id"]
    columns = list(others)
    position = draw(st.integers(0, len(columns)))
    columns.insert(position, "user_id")
    values = st.text(alphabet=string.ascii_letters + " ,;\t\"'é€#", max_size=12)

    def row(fields: list[str]) -> str:
        buffer = io.StringIO()
        csv.writer(buffer, delimiter=delimiter, lineterminator="").writerow(fields)
        return buffer.getvalue()

    header = delimiter.join(columns) if len(columns) > 1 else "User_ID"
    lines: list[str] = [header]
    expected: list[Expected | None] = [None]
    for _ in range(draw(st.integers(0, 25))):
        kind = draw(st.sampled_from(["ok", "ok", "ok", "bad", "count", "comment", "blank"]))
        if kind == "comment":
            lines.append(draw(comments))
            expected.append(None)
            continue
        if kind == "blank":
            lines.append("")
            expected.append(None)
            continue
        fields = [draw(values) for _ in columns]
        fields[position] = draw(user_ids if kind != "bad" else bad_ids)
        if position == 0 and draw(st.booleans()):
            fields[position] = " " + fields[position]
        if kind == "count":
            fields.append("extra")
        text = row(fields)
        if text.strip() == "" or text.lstrip().startswith("#"):
            continue
        lines.append(text)
        if kind == "ok":
            data = {c: v for c, v in zip(columns, fields, strict=True) if c != "user_id"}
            expected.append(Expected(0, 0, fields[position].strip(), data))
        else:
            expected.append(Expected(0, 0, None))
    return lines, expected, delimiter


@settings(max_examples=120, deadline=None)
@given(spec=csv_files(), data=st.data(), bom=st.booleans(), final_newline=st.booleans())
def test_csv_files_keep_columns_quoting_and_line_numbers(
    spec: tuple[list[str], list[Expected | None], str], data: st.DataObject, bom: bool, final_newline: bool
) -> None:
    lines, expected, _delimiter = spec
    content, ends = render(lines, [data.draw(endings) for _ in lines], bom, final_newline)
    want = []
    for n, entry in enumerate(expected):
        if entry is not None:
            want.append(Expected(n + 1, ends[n], entry.user_id, entry.data))
    parser, items = parse(content)
    got = [
        Expected(i.line, i.end, i.user_id, dict(i.data)) if isinstance(i, Row) else Expected(i.line, i.end, None)
        for i in items
    ]
    assert got == want
    assert parser.columns is not None and "user_id" in [c.lower() for c in parser.columns]


@settings(max_examples=100, deadline=None)
@given(entries=plain_entries, cut=st.integers(0, 40))
def test_a_resumed_parse_continues_exactly_after_the_committed_offset(entries: list[tuple[str, str]], cut: int) -> None:
    content, _ = render([text for _, text in entries], ["\n"] * len(entries), False, True)
    _, items = parse(content)
    if not items:
        return
    offset = items[min(cut, len(items) - 1)].end
    _, again = parse(content)
    assert [i for i in again if i.end > offset] == [i for i in items if i.end > offset]
    assert all(i.end <= offset for i in items[: min(cut, len(items) - 1) + 1])


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("id,name", "has no user_id column, got 'id,name'"),
        ("user_id,USER_ID", "has twice user_id column"),
        ("user_id,,name", "an empty column name"),
        ("user_id;a;a", "names column 'a' twice"),
        ('user_id,"a', "CSV header"),
    ],
)
def test_a_bad_csv_header_makes_the_file_unreadable(header: str, message: str) -> None:
    with pytest.raises(DropFileError, match=message) as info:
        parse(f"# comment\n\n{header}\nu1,x\n".encode())
    assert info.value.message.startswith("line 3: ")


def test_rejection_reasons_name_the_problem() -> None:
    assert check_user_id("") == "user_id: empty"
    assert check_user_id("a" * 129) == "user_id: longer than 128 characters (129)"
    assert check_user_id("a b") == "user_id: ' ' not allowed (only A-Z a-z 0-9 _ . : @ -), got 'a b'"
    assert check_user_id("ok:user@x.io_-1") is None
    _, items = parse(b'user_id,name\n,Ann\nu2\nu3,"unterminated\nu\x004,x\n')
    assert [(i.line, i.reason) for i in items if isinstance(i, Rejection)] == [
        (2, "user_id: empty"),
        (3, "CSV: expected 2 fields, got 1"),
        (4, "CSV: unexpected end of data"),
        (5, "line: contains a NUL character"),
    ]


def test_over_long_lines_are_rejected_without_being_held_and_numbering_goes_on() -> None:
    content = b"a\n" + b"x" * 300 + b"\r\nb\n" + b"y" * 1000
    parser = DropParser(io.BytesIO(content), max_line_bytes=100)
    items = list(parser)
    assert [(i.line, type(i).__name__) for i in items] == [(1, "Row"), (2, "Rejection"), (3, "Row"), (4, "Rejection")]
    assert items[1] == Rejection(2, 304, "line: longer than 100 bytes")
    assert parser.offset == len(content) and parser.lines == 4


def test_a_csv_value_may_hold_the_delimiter_quotes_and_non_ascii() -> None:
    _, items = parse('\ufeffname;user_id\r\n"Smith; ""J""";u1\r\nRenée;u2\r\n'.encode())
    assert items == [Row(2, 36, "u1", {"name": 'Smith; "J"'}), Row(3, 47, "u2", {"name": "Renée"})]


@given(lines=st.lists(st.text(alphabet="abc é", max_size=10), min_size=1, max_size=20), data=st.data())
def test_scan_names_the_line_of_the_first_byte_that_is_not_utf8(lines: list[str], data: st.DataObject) -> None:
    bad_line = data.draw(st.integers(0, len(lines) - 1))
    encoded = [line.encode() for line in lines]
    encoded[bad_line] += data.draw(st.sampled_from([b"\xff", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80"]))
    content = b"\n".join(encoded)
    with pytest.raises(DropFileError, match=rf"^line {bad_line + 1}: not valid UTF-8"):
        scan(io.BytesIO(content))


def test_scan_hashes_salt_and_content_and_counts_lines() -> None:
    one = scan(io.BytesIO(b"a\nb\n"), salt=b"tenant-1")
    assert one.lines == 2 and one.size == 4
    assert scan(io.BytesIO(b"a\nb"), salt=b"tenant-1").lines == 2
    assert scan(io.BytesIO(b"a\nb\n"), salt=b"tenant-1").digest == one.digest
    assert scan(io.BytesIO(b"a\nb\n"), salt=b"tenant-2").digest != one.digest
    assert scan(io.BytesIO(b"")).lines == 0
    big = b"user-000000\n" * 200_000  # spans several read blocks
    assert scan(io.BytesIO(big)).lines == 200_000
    with pytest.raises(DropFileError, match="UTF-16"):
        scan(io.BytesIO("user_id\n".encode("utf-16")))


@given(content=st.binary(max_size=300), salts=st.lists(st.binary(max_size=20), max_size=4), block=st.integers(1, 64))
def test_digests_are_scans_digests_for_each_salt(content: bytes, salts: list[bytes], block: int) -> None:
    stream = io.BufferedReader(io.BytesIO(content), buffer_size=block)
    expected = [hashlib.sha256(salt + content).hexdigest() for salt in salts]
    assert digests(stream, salts=salts) == expected
    if content.isascii():
        assert [scan(io.BytesIO(content), salt=salt).digest for salt in salts] == expected


@settings(max_examples=100, deadline=None)
@given(ids=st.lists(st.sampled_from(["a", "b", "c", "d", "e", "f", "g"]), max_size=60), size=st.integers(1, 9))
def test_seen_ids_report_each_repeat_with_the_line_it_first_appeared_on(ids: list[str], size: int) -> None:
    first: dict[str, int] = {}
    expected: dict[int, int] = {}
    for line, user_id in enumerate(ids, start=1):
        if user_id in first:
            expected[line] = first[user_id]
        else:
            first[user_id] = line
    got: dict[int, Any] = {}
    pairs = [(user_id, line) for line, user_id in enumerate(ids, start=1)]
    with SeenIds() as seen:
        for start in range(0, len(pairs), size):
            got.update(seen.add(pairs[start : start + size]))
    assert got == expected
