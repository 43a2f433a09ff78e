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
import json.scanner
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import zstandard

_quote = json.encoder.encode_basestring  # a JSON string, non-ASCII kept as it is

FILE, DIRECTORY, SYMLINK, HARDLINK = "file", "dir", "symlink", "hardlink"
# The file-type bits of each entry type: a hard link is a second name of a regular file.
TYPE_BITS = {
    FILE: stat.S_IFREG,
    HARDLINK: stat.S_IFREG,
    DIRECTORY: stat.S_IFDIR,
    SYMLINK: stat.S_IFLNK,
}


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


_scan = json.scanner.make_scanner(json.JSONDecoder())  # json.loads without its checks


def decode_line(line: bytes) -> Entry:
    """One catalog line; keys this version does not know are ignored. This runs once per
    entry of every catalog read, so it skips `json.loads`'s wrappers and `Entry(**data)`."""
    text = line.decode("utf-8", "surrogateescape")
    try:
        data = _scan(text, 0)[0]
    except StopIteration as error:  # what json.loads turns into this error too
        raise json.JSONDecodeError("Expecting value", text, error.value) from None
    volume = data.get("volume")
    return Entry(
        data["path"],
        data["type"],
        int(data["mode"], 8),
        data["uid"],
        data["gid"],
        data["user"],
        data["group"],
        data["mtime_ns"],
        data.get("ctime_ns", 0),
        data.get("inode", 0),
        data.get("size", 0),
        data.get("link"),
        data.get("sha256"),
        None
        if volume is None
        else Location(volume, data["frame"], data["chunk"], data["skip"], data["span"]),
    )


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
    if needles is not None:
        yield from _matching(reader, needles)  # type: ignore[arg-type]
        return
    for line in io.BufferedReader(reader, 1 << 16):  # type: ignore[arg-type]
        yield decode_line(line)


def _matching(reader: BinaryIO, needles: list[bytes]) -> Iterator[Entry]:
    """The lines holding a needle, found with `bytes.find` over 1 MiB blocks (searched in
    place, not copied): finding one file in a catalog then costs about its decompression."""
    carry = b""  # the start of a line that the previous block cut
    while block := reader.read(1 << 20):
        first = block.find(b"\n") + 1
        if not first:
            carry += block
            continue
        head = carry + block[:first]
        if any(needle in head for needle in needles):
            yield decode_line(head)
        last = block.rfind(b"\n") + 1
        yield from map(decode_line, _lines_with(block, first, last, needles))
        carry = block[last:]
    if carry and any(needle in carry for needle in needles):
        yield decode_line(carry)


def _lines_with(data: bytes, begin: int, end: int, needles: list[bytes]) -> list[bytes]:
    """The whole lines of `data[begin:end]` that hold a needle, in order."""
    starts: set[int] = set()
    for needle in needles:
        found = data.find(needle, begin, end)
        while found >= 0:
            starts.add(data.rfind(b"\n", begin, found) + 1 or begin)
            found = data.find(needle, data.find(b"\n", found, end) + 1, end)
    return [data[start : data.find(b"\n", start, end) + 1] for start in sorted(starts)]


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
