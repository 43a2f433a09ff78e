"""Reads tar members back out of volumes, by ranged GET or by streaming a whole volume.

One small file costs one ranged GET of the volume's age header and one of the chunks that
hold its zstd frames: the bytes fetched depend on the file, not on the volume. Restoring
much of a volume streams it once instead. Either way every byte is authenticated (age)
and every file is checked against its catalog sha256 by the caller.
"""

import contextlib
import io
from collections.abc import Iterator
from typing import BinaryIO

import zstandard

from agent import age
from agent.catalog import Entry
from agent.repository import Repository
from agent.storage import NotFound
from agent.tarread import READ_SIZE, Member, TarError, TarReader

HEADER_PREFIX = 4096
BATCH_CHUNKS = 128  # 8 MiB of ciphertext per ranged GET


class CorruptVolume(Exception):
    """A volume does not hold what its catalog says: missing, truncated or tampered."""


@contextlib.contextmanager
def _present(volume: str) -> Iterator[None]:
    """A volume that storage no longer has is a damaged backup, reported like one."""
    try:
        yield
    except NotFound:
        raise CorruptVolume(f"{volume}: missing from storage") from None


class VolumeKeys:
    """Each volume's payload key, unwrapped once from a ranged GET of its header."""

    def __init__(self, repo: Repository, identities: list[age.Identity]) -> None:
        self._repo = repo
        self._identities = identities
        self._keys: dict[str, age.PayloadKey] = {}

    def get(self, volume: str) -> age.PayloadKey:
        if volume not in self._keys:
            length = HEADER_PREFIX
            while True:
                with _present(volume):
                    prefix = self._repo.get_range(volume, 0, length)
                try:
                    self._keys[volume] = age.open_header(prefix, self._identities)
                    break
                except age.IncompleteHeader:
                    if len(prefix) < length:
                        raise CorruptVolume(f"{volume}: truncated inside its age header") from None
                    length *= 4
        return self._keys[volume]


class _ChunkReader(io.RawIOBase):
    """Plaintext of chunks [first, last] of one volume, fetched in batches."""

    def __init__(
        self, repo: Repository, volume: str, key: age.PayloadKey, first: int, last: int, size: int
    ) -> None:
        self._repo, self._volume, self._key = repo, volume, key
        self._next, self._last, self._size = first, last, size
        self._buffer = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, target: bytearray | memoryview) -> int:  # type: ignore[override]
        if not self._buffer:
            if self._next > self._last:
                return 0
            self._buffer = memoryview(self._fetch())
        count = min(len(target), len(self._buffer))
        target[:count] = self._buffer[:count]
        self._buffer = self._buffer[count:]
        return count

    def _fetch(self) -> bytes:
        first, last = self._next, min(self._next + BATCH_CHUNKS - 1, self._last)
        self._next = last + 1
        start = age.ciphertext_offset(self._key.header_length, first * age.CHUNK_SIZE)
        end = min(start + (last - first + 1) * age.ENCRYPTED_CHUNK_SIZE, self._size)
        with _present(self._volume):
            data = self._repo.get_range(self._volume, start, end - start)
        final = age.is_final_chunk(self._size, self._key.header_length, last)
        if len(data) != end - start:
            raise CorruptVolume(f"{self._volume}: truncated ({len(data)} of {end - start} bytes)")
        try:
            return self._key.decrypt_chunks(first, data, final)
        except age.AgeError as error:
            raise CorruptVolume(f"{self._volume}: chunks {first}-{last}: {error}") from None


def member_stream(repo: Repository, keys: VolumeKeys, entry: Entry, volume_size: int) -> BinaryIO:
    """Decompressed tar bytes from the entry's member header on, fetched by range."""
    location = entry.location
    assert location is not None
    first = location.frame // age.CHUNK_SIZE
    last = (location.frame + location.span - 1) // age.CHUNK_SIZE
    key = keys.get(location.volume)
    chunks = io.BufferedReader(_ChunkReader(repo, location.volume, key, first, last, volume_size))
    chunks.read(location.frame - first * age.CHUNK_SIZE)
    frames = _Limited(chunks, location.span)
    stream = zstandard.ZstdDecompressor().stream_reader(frames, read_across_frames=True)
    _skip(stream, location.skip, location.volume)
    return stream  # type: ignore[return-value]


def read_member(stream: BinaryIO, entry: Entry) -> Iterator[memoryview]:
    """The data of the next tar member, which must be the entry's own."""
    reader = TarReader(stream)
    try:
        member = reader.next()
    except (TarError, zstandard.ZstdError, age.AgeError) as error:
        raise CorruptVolume(f"{_where(entry)}: unreadable tar member: {error}") from None
    expected = member_name(entry.path)
    if member is None or member.name != expected:
        found = member.name if member else b"end of archive"
        raise CorruptVolume(f"{_where(entry)}: holds {found!r} where {expected!r} belongs")
    if member.isfile():
        yield from member_data(reader, member, entry)


def member_name(path: str) -> bytes:
    """The tar member name of a catalog path, as the backup wrote it."""
    return path.lstrip("/").encode("utf-8", "surrogateescape") or b"."


def volume_members(
    repo: Repository,
    volume: str,
    identities: list[age.Identity],
    *,
    whole: bool = False,
) -> Iterator[tuple[Member, TarReader]]:
    """Every member of a whole volume, streamed once from storage. With `whole`, the
    stream is read to its very end after the last member, so that the age layer has
    authenticated every chunk of the volume, up to its final one."""
    with _present(volume):
        encrypted = repo.get(volume)
    with encrypted, age.Decryptor(encrypted, identities) as plain:
        stream = zstandard.ZstdDecompressor().stream_reader(
            plain, read_size=READ_SIZE, read_across_frames=True
        )
        reader = TarReader(stream)  # type: ignore[arg-type]
        try:
            while (member := reader.next()) is not None:
                yield member, reader
            if whole:
                reader.drain()
        except (TarError, zstandard.ZstdError, age.AgeError) as error:
            raise CorruptVolume(f"{volume}: {error}") from None


def member_data(reader: TarReader, member: Member, entry: Entry) -> Iterator[memoryview]:
    try:
        yield from reader.data(member)
    except (TarError, zstandard.ZstdError, age.AgeError, OSError) as error:
        raise CorruptVolume(f"{_where(entry)}: {error}") from None


class _Limited(io.RawIOBase):
    def __init__(self, source: BinaryIO, limit: int) -> None:
        self._source, self._left = source, limit

    def readable(self) -> bool:
        return True

    def readinto(self, target: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._left <= 0:
            return 0
        data = self._source.read(min(len(target), self._left))
        target[: len(data)] = data
        self._left -= len(data)
        return len(data)


def _skip(stream: BinaryIO, count: int, volume: str) -> None:
    while count:
        try:
            block = stream.read(min(count, 1 << 20))
        except zstandard.ZstdError as error:
            raise CorruptVolume(f"{volume}: {error}") from None
        if not block:
            raise CorruptVolume(f"{volume}: frame ends before its member")
        count -= len(block)


def _where(entry: Entry) -> str:
    volume = entry.location.volume if entry.location else "?"
    return f"{volume} ({entry.path})"
