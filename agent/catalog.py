"""Catalog entries: one JSON object per line, sorted by path, for every entry of a snapshot.

The catalog is how Muster finds one file without reading volumes, and how an incremental
backup knows what changed without reading file data. Lines are plain JSON (UTF-8, names
unescaped) so that a decrypted catalog is greppable; a name that is not valid UTF-8 keeps
its raw bytes in the line (decode lines with `surrogateescape`).

Order is by path *components*: "/a/b" sorts before "/a.b", as a depth-first walk with
sorted directories produces them, so catalogs can be merged as streams.
"""

import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import zstandard

_quote = json.encoder.encode_basestring  # a JSON string, non-ASCII kept as it is

FILE, DIRECTORY, SYMLINK, HARDLINK = "file", "dir", "symlink", "hardlink"


@dataclass(slots=True)
class Location:
    """Where an entry's tar member lives: volume, the zstd frame holding its header
    (`frame`: offset in the decrypted stream; `chunk`: offset of the age chunk holding
    that byte), `skip` bytes into the decompressed frame, and `span` compressed bytes
    from `frame` to the end of the last frame holding the member."""

    volume: str
    frame: int
    chunk: int
    skip: int
    span: int


@dataclass(slots=True)
class Entry:
    path: str
    type: str
    mode: int
    uid: int
    gid: int
    user: str
    group: str
    mtime_ns: int
    ctime_ns: int = 0
    inode: int = 0
    size: int = 0
    link: str | None = None
    sha256: str | None = None
    location: Location | None = None

    @property
    def key(self) -> bytes:
        return sort_key(self.path)


def sort_key(path: str) -> bytes:
    """Component order: the separator sorts before every byte a name can hold."""
    return path.encode("utf-8", "surrogateescape").replace(b"/", b"\0")


def encode_line(entry: Entry) -> bytes:
    """The entry's line, exactly as `json.dumps(..., ensure_ascii=False)` writes it (keys
    in this order), built by hand: the encoder's generality costs more than the rest of
    a small file's backup. Strings go through json's own C string encoder."""
    line = (
        f'{{"path": {_quote(entry.path)}, "type": {_quote(entry.type)}, '
        f'"mode": "{entry.mode:04o}", "uid": {entry.uid}, "gid": {entry.gid}, '
        f'"user": {_quote(entry.user)}, "group": {_quote(entry.group)}, '
        f'"mtime_ns": {entry.mtime_ns}, "ctime_ns": {entry.ctime_ns}, '
        f'"inode": {entry.inode}, "size": {entry.size}'
    )
    if entry.link is not None:
        line += f', "link": {_quote(entry.link)}'
    if entry.sha256 is not None:
        line += f', "sha256": {_quote(entry.sha256)}'
    if (where := entry.location) is not None:
        line += (
            f', "volume": {_quote(where.volume)}, "frame": {where.frame}, '
            f'"chunk": {where.chunk}, "skip": {where.skip}, "span": {where.span}'
        )
    return (line + "}\n").encode("utf-8", "surrogateescape")


def decode_line(line: bytes) -> Entry:
    data = json.loads(line.decode("utf-8", "surrogateescape"))
    location = None
    if "volume" in data:
        location = Location(
            data.pop("volume"),
            data.pop("frame"),
            data.pop("chunk"),
            data.pop("skip"),
            data.pop("span"),
        )
    data["mode"] = int(data["mode"], 8)
    return Entry(**data, location=location)


def read_lines(compressed: BinaryIO) -> Iterator[tuple[Entry, bytes]]:
    """Stream (entry, its line) from zstd-compressed catalog lines, one at a time; the
    line lets an unchanged entry be written to the next catalog without re-encoding."""
    reader = zstandard.ZstdDecompressor().stream_reader(
        compressed, read_across_frames=True, closefd=False
    )
    for line in io.BufferedReader(reader, 1 << 16):  # type: ignore[arg-type]
        yield decode_line(line), line


def read_entries(compressed: BinaryIO, needles: list[bytes] | None = None) -> Iterator[Entry]:
    """Entries; with `needles`, only lines holding one of them are decoded at all."""
    reader = zstandard.ZstdDecompressor().stream_reader(
        compressed, read_across_frames=True, closefd=False
    )
    for line in io.BufferedReader(reader, 1 << 16):  # type: ignore[arg-type]
        if needles is None or any(needle in line for needle in needles):
            yield decode_line(line)


def path_needle(path: str) -> bytes:
    """The bytes every catalog line of `path`, or of a path under it, contains: its
    JSON-escaped form, escaped character by character, as `encode_line` writes it."""
    return json.dumps(path, ensure_ascii=False)[1:-1].encode("utf-8", "surrogateescape")


def write_entries(entries: Iterable[Entry], sink: BinaryIO, level: int = 3) -> int:
    """Compress catalog lines into `sink`; returns how many entries were written."""
    count = 0
    compressor = zstandard.ZstdCompressor(level=level)
    with compressor.stream_writer(sink, closefd=False) as writer:
        for entry in entries:
            writer.write(encode_line(entry))
            count += 1
    return count
