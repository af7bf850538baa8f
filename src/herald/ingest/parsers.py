"""Reading a dropped file: bytes in, rows and rejections out. Pure; no database, no clock.

A file is either one user id per line, or CSV whose header (its first line that is not blank or a
comment) has a ``user_id`` column; the header's first ``,``, ``;`` or tab is the delimiter. Other
columns become template data. Accepted everywhere: a UTF-8 byte order mark, CRLF or LF line ends,
blank lines, and comment lines starting with ``#``. A physical line is one record: quoted CSV
fields may hold delimiters and doubled quotes, not line breaks, so line numbers are always exact
and memory is bounded by ``max_line_bytes``.

A line is rejected, with its number and a reason, when its user id is empty, longer than 128
characters or has a character outside ``[A-Za-z0-9_.:@-]``; when it has the wrong number of CSV
fields or bad quoting; when it holds a NUL or is too long. Duplicates are found by the caller
(``herald.ingest.seen``), which holds every id of the file on disk.

Every item carries ``end``, the byte offset just after its line, so an ingester can record how far
it got and find the same place again after a crash.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import BinaryIO

from herald.errors import HeraldError

USER_ID = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")
USER_ID_COLUMN = "user_id"
MAX_USER_ID = 128
MAX_LINE_BYTES = 64 * 1024
DELIMITERS = (",", ";", "\t")
BOM = codecs.BOM_UTF8
_NO_DATA: Mapping[str, str] = MappingProxyType({})
_READ_BYTES = 1 << 20


class DropFileError(HeraldError):
    """A dropped file that cannot be ingested at all (it goes to ``failed/``); nothing was written."""

    code = "drop_unreadable"
    status = 422
    title = "Dropped file cannot be read"


@dataclass(frozen=True, slots=True)
class Row:
    """An accepted line: the user id and the CSV columns other than ``user_id``."""

    line: int
    end: int
    user_id: str
    data: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Rejection:
    line: int
    end: int
    reason: str


Item = Row | Rejection


@dataclass(frozen=True)
class FileScan:
    """What one pass over the bytes found: the ledger key, the size and the number of lines."""

    digest: str
    size: int
    lines: int


def scan(stream: BinaryIO, *, salt: bytes = b"") -> FileScan:
    """Hash ``salt`` and the whole file (SHA-256) and check it is UTF-8.

    Raises ``DropFileError`` naming the line of the first byte that is not UTF-8.
    """
    head = stream.read(2)
    if head in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
        raise DropFileError("file: UTF-16 (byte order mark), save it as UTF-8")
    digest = hashlib.sha256(salt)
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    size = newlines = 0
    last = b""
    block = head
    while True:
        more = stream.read(_READ_BYTES)
        block += more
        try:
            decoder.decode(block, final=not more)
        except UnicodeDecodeError as exc:
            # exc.object is the decoder's pending bytes (never a newline) followed by ``block``.
            pending = len(exc.object) - len(block)
            line = newlines + exc.object[: exc.start].count(b"\n") + 1
            raise DropFileError(f"line {line}: not valid UTF-8 (byte offset {size - pending + exc.start})") from None
        digest.update(block)
        size += len(block)
        newlines += block.count(b"\n")
        last = block[-1:] or last
        if not more:
            break
        block = b""
    lines = newlines + (1 if last not in (b"", b"\n") else 0)
    return FileScan(digest=digest.hexdigest(), size=size, lines=lines)


def digests(stream: BinaryIO, *, salts: Sequence[bytes]) -> list[str]:
    """``scan``'s digest for each of ``salts``, in one pass over the bytes (no UTF-8 check)."""
    hashes = [hashlib.sha256(salt) for salt in salts]
    while block := stream.read(_READ_BYTES):
        for one in hashes:
            one.update(block)
    return [one.hexdigest() for one in hashes]


def check_user_id(value: str) -> str | None:
    """Why ``value`` is not a user id, or None."""
    if not value:
        return "user_id: empty"
    if len(value) > MAX_USER_ID:
        return f"user_id: longer than {MAX_USER_ID} characters ({len(value)})"
    if USER_ID.fullmatch(value) is None:
        bad = next(c for c in value if USER_ID.fullmatch(c) is None)
        return f"user_id: {bad!r} not allowed (only A-Z a-z 0-9 _ . : @ -), got {_short(value)!r}"
    return None


def _short(value: str, limit: int = 40) -> str:
    return value if len(value) <= limit else value[: limit - 1] + "…"


class DropParser:
    """The rows and rejections of one file, read line by line.

    ``lines`` and ``offset`` say how far it has read: while an item is being handled they are
    that item's line and ``end``. ``columns`` is the CSV header (None for a plain file).
    Raises ``DropFileError`` for a CSV header without a usable ``user_id`` column.
    """

    def __init__(self, stream: BinaryIO, *, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self._stream = stream
        self._max = max_line_bytes
        self.lines = 0
        self.offset = 0
        self.columns: list[str] | None = None
        self.delimiter = ","
        self._id_index = 0

    def __iter__(self) -> Iterator[Item]:
        header_seen = False
        for text in self._texts():
            if text is None or isinstance(text, Rejection):
                if text is not None:
                    yield text
                continue
            stripped = text.strip()
            if not stripped or stripped.startswith("#"):
                continue
            if not header_seen:
                header_seen = True
                if self._header(stripped):
                    continue
            yield self._record(text) if self.columns is not None else self._plain(stripped)

    def _texts(self) -> Iterator[str | Rejection | None]:
        """Each physical line decoded without its line end, or a Rejection for an unreadable one."""
        readline = self._stream.readline
        limit = self._max + 2  # room for CRLF
        while True:
            raw = readline(limit)
            if not raw:
                return
            self.offset += len(raw)
            self.lines += 1
            if not raw.endswith(b"\n") and len(raw) == limit:
                while True:  # skip the rest of an over-long line without holding it
                    rest = readline(_READ_BYTES)
                    self.offset += len(rest)
                    if not rest or rest.endswith(b"\n"):
                        break
                yield Rejection(self.lines, self.offset, f"line: longer than {self._max} bytes")
                continue
            if self.lines == 1 and raw.startswith(BOM):
                raw = raw[len(BOM) :]
            raw = raw.rstrip(b"\n")
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            if len(raw) > self._max:
                yield Rejection(self.lines, self.offset, f"line: longer than {self._max} bytes")
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield Rejection(self.lines, self.offset, "line: not valid UTF-8")
                continue
            if "\x00" in text:
                yield Rejection(self.lines, self.offset, "line: contains a NUL character")
                continue
            yield text

    def _header(self, stripped: str) -> bool:
        """Decide the format from the first meaningful line; True if it is a CSV header."""
        delimiter = next((d for d in DELIMITERS if d in stripped), None)
        if delimiter is None:
            if stripped.lower() != USER_ID_COLUMN:
                return False  # a plain file: this line is its first user id
            delimiter = ","
        try:
            names = [n.strip() for n in next(csv.reader([stripped], delimiter=delimiter, strict=True))]
        except csv.Error as exc:
            raise DropFileError(f"line {self.lines}: CSV header: {exc}") from None
        lowered = [n.lower() for n in names]
        if lowered.count(USER_ID_COLUMN) != 1:
            found = "twice" if USER_ID_COLUMN in lowered else "no"
            raise DropFileError(
                f"line {self.lines}: CSV header has {found} {USER_ID_COLUMN} column, got {_short(stripped, 80)!r}"
            )
        if "" in names:
            raise DropFileError(f"line {self.lines}: CSV header has an empty column name")
        if len(set(names)) != len(names):
            twice = next(n for n in names if names.count(n) > 1)
            raise DropFileError(f"line {self.lines}: CSV header names column {twice!r} twice")
        self.delimiter = delimiter
        self._id_index = lowered.index(USER_ID_COLUMN)
        self.columns = names
        return True

    def _plain(self, stripped: str) -> Item:
        reason = check_user_id(stripped)
        if reason is not None:
            return Rejection(self.lines, self.offset, reason)
        return Row(self.lines, self.offset, stripped, _NO_DATA)

    def _record(self, text: str) -> Item:
        columns = self.columns or []
        try:
            fields = next(csv.reader([text], delimiter=self.delimiter, strict=True))
        except csv.Error as exc:
            return Rejection(self.lines, self.offset, f"CSV: {exc}")
        if len(fields) != len(columns):
            return Rejection(self.lines, self.offset, f"CSV: expected {len(columns)} fields, got {len(fields)}")
        user_id = fields[self._id_index].strip()
        reason = check_user_id(user_id)
        if reason is not None:
            return Rejection(self.lines, self.offset, reason)
        data = {name: value for i, (name, value) in enumerate(zip(columns, fields, strict=True)) if i != self._id_index}
        return Row(self.lines, self.offset, user_id, data)
