"""Reads tar members (ustar, pax, GNU long names) from a stream, in large blocks.

Python's `tarfile` reads a stream in 512-byte steps and builds a full TarInfo per member
(about 100 us each here): on a volume of many small files that was the largest part of a
restore. Restore only needs each member's name, type and data (the catalog holds the
metadata), so this reader parses just those, from 1 MiB reads, and hands out data as views
of the block it read. It reads what `agent.tarheader` writes and what GNU tar writes; a
type it does not know is skipped with its data, as tar does.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

BLOCK = 512
READ_SIZE = 1 << 20
_ZERO_BLOCK = bytes(BLOCK)
_META = {b"x", b"g", b"L", b"K"}  # pax extended / global headers, GNU long name / link


class TarError(Exception):
    """The stream is not a tar archive, or ends inside one."""


@dataclass(slots=True)
class Member:
    name: bytes  # as stored, without a trailing slash
    kind: bytes  # the type flag: b"0" regular, b"5" directory, b"2" symlink, ...
    size: int  # bytes of data that follow the header
    linkname: bytes

    def isfile(self) -> bool:
        return self.kind in (b"0", b"\0", b"7")


class TarReader:
    """Members of one tar stream, in order. Data not read by the caller is skipped."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._buffer = memoryview(b"")
        self._left = 0  # data and padding of the current member not consumed yet

    def next(self) -> Member | None:
        """The next member, or None at the end-of-archive marker."""
        self._skip(self._left)
        self._left = 0
        extended: dict[bytes, bytes] = {}
        while True:
            block = self._take(BLOCK)
            if block == _ZERO_BLOCK:
                return None
            member = _parse_header(block)
            padded = member.size + (-member.size % BLOCK)
            if member.kind not in _META:
                self._left = padded
                return _extend(member, extended)
            data = self._take(padded)[: member.size]
            if member.kind == b"x":
                extended.update(_pax_records(data))
            elif member.kind == b"L":
                extended[b"path"] = data.rstrip(b"\0")
            elif member.kind == b"K":
                extended[b"linkpath"] = data.rstrip(b"\0")

    def data(self, member: Member) -> Iterator[memoryview]:
        """The member's data, as views of the blocks read (valid until the next read)."""
        remaining = member.size
        while remaining:
            if not self._buffer:
                self._fill()
            piece = self._buffer[:remaining]
            self._buffer = self._buffer[len(piece) :]
            remaining -= len(piece)
            self._left -= len(piece)
            yield piece
        self._skip(self._left)
        self._left = 0

    def drain(self) -> None:
        """Read the stream to its end (a verify reads every byte, past the tar end too)."""
        self._buffer = memoryview(b"")
        while self._stream.read(READ_SIZE):
            pass

    def _fill(self) -> None:
        block = self._stream.read(READ_SIZE)
        if not block:
            raise TarError("unexpected end of data: the archive is truncated")
        self._buffer = memoryview(block)

    def _take(self, count: int) -> bytes:
        """Exactly `count` bytes, across reads when needed."""
        if len(self._buffer) >= count:
            piece = self._buffer[:count]
            self._buffer = self._buffer[count:]
            return piece.tobytes()
        parts = [self._buffer.tobytes()]
        need = count - len(parts[0])
        self._buffer = memoryview(b"")
        while need:
            self._fill()
            piece = self._buffer[:need]
            self._buffer = self._buffer[len(piece) :]
            parts.append(piece.tobytes())
            need -= len(piece)
        return b"".join(parts)

    def _skip(self, count: int) -> None:
        while count:
            if not self._buffer:
                self._fill()
            step = min(count, len(self._buffer))
            self._buffer = self._buffer[step:]
            count -= step


def _parse_header(block: bytes) -> Member:
    stored = block[148:156].split(b"\0", 1)[0].strip()
    if not stored or _octal(stored) != sum(block[:148]) + 256 + sum(block[156:]):
        raise TarError("bad header checksum: not a tar member header")
    name = block[:100].split(b"\0", 1)[0]
    if block[257:262] == b"ustar" and block[345] != 0:  # ustar prefix field
        name = block[345:500].split(b"\0", 1)[0] + b"/" + name
    return Member(name, block[156:157], _number(block[124:136]), block[157:257].split(b"\0", 1)[0])


def _extend(member: Member, extended: dict[bytes, bytes]) -> Member:
    """Apply pax (or GNU long-name) values to the header that follows them."""
    if extended:
        member.name = extended.get(b"path", member.name)
        member.linkname = extended.get(b"linkpath", member.linkname)
        if b"size" in extended:
            member.size = _decimal(extended[b"size"])
    member.name = member.name.rstrip(b"/") or member.name
    return member


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    """`"<length> key=value\\n"` records, the length counting the whole record."""
    records: dict[bytes, bytes] = {}
    position = 0
    while position < len(data):
        space = data.find(b" ", position)
        if space < 0:
            raise TarError("malformed pax record")
        length = _decimal(data[position:space])
        record = data[space + 1 : position + length]
        if length <= 0 or not record.endswith(b"\n") or b"=" not in record:
            raise TarError("malformed pax record")
        key, value = record[:-1].split(b"=", 1)
        records[key] = value
        position += length
    return records


def _number(field: bytes) -> int:
    """An octal field, or GNU's base-256 form for values octal cannot hold."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return _octal(text) if text else 0


def _octal(text: bytes) -> int:
    try:
        return int(text, 8)
    except ValueError:
        raise TarError(f"bad octal field {text[:16]!r}") from None


def _decimal(text: bytes) -> int:
    try:
        return int(text)
    except ValueError:
        raise TarError(f"bad decimal value {text[:16]!r}") from None
