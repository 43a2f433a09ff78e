"""The agent's local state directory: what it keeps between runs on the node.

It holds a plaintext copy of each job's latest catalog, like GNU tar's
`--listed-incremental` file, so that an incremental backup decides what changed from a
stat walk alone, without downloading or decrypting anything. Next to it, an index of the
same catalog (`CatalogIndex`): per entry its sort key, a stat fingerprint and its catalog
line, in binary, so that an unchanged file costs a bytes comparison instead of a JSON
decode and its line is reused verbatim. Losing either costs one catalog download or
decode; they are caches, never a source of truth, and not part of the repository format.
Files are private (0600).
"""

import fcntl
import hashlib
import os
import stat
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import zstandard

S_ISREG = stat.S_ISREG

DEFAULT_STATE_DIR = Path("/var/lib/muster")


class JobBusy(RuntimeError):
    pass


def default_state_dir() -> Path:
    """Root keeps state in /var/lib/muster; an ordinary user in their own state home."""
    configured = os.environ.get("MUSTER_STATE_DIR")
    if configured:
        return Path(configured)
    if os.geteuid() == 0:
        return DEFAULT_STATE_DIR
    home = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(home) / "muster"


class CatalogCache:
    """The latest catalog of one repository job (target URL + node + job)."""

    def __init__(self, state_dir: Path, repository_key: str) -> None:
        digest = hashlib.sha256(repository_key.encode()).hexdigest()[:24]
        self._dir = state_dir / "catalogs" / digest

    @contextmanager
    def writer_lock(self) -> Iterator[None]:
        """One writer per repository job on this node: the daemon's scheduled backup and
        a `muster backup` or `muster forget` typed meanwhile must not interleave."""
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self._dir / "writer.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise JobBusy(
                    "another backup or forget of this job is running on this node; "
                    "try again when it is done"
                ) from None
            yield
        finally:
            os.close(fd)

    def path(self, snapshot_id: str) -> Path | None:
        candidate = self._dir / f"{snapshot_id}.jsonl.zst"
        return candidate if candidate.is_file() else None

    def index(self, snapshot_id: str) -> Path | None:
        """The index of `snapshot_id`'s catalog, if this node wrote it."""
        candidate = self._dir / f"{snapshot_id}.index"
        return candidate if candidate.is_file() else None

    def open_index_temp(self, snapshot_id: str) -> BinaryIO:
        """A private file for the index being written; `commit` adopts it."""
        return self._open_private(self._temp(snapshot_id, ".index"))

    def open_temp(self, snapshot_id: str) -> BinaryIO:
        """A private file for the catalog being written; `commit` adopts it."""
        return self._open_private(self._temp(snapshot_id))

    def _open_private(self, path: Path) -> BinaryIO:
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        return os.fdopen(fd, "wb")

    def commit(self, snapshot_id: str) -> None:
        """Adopt the written catalog (and its index, when one was written) and drop older
        ones: only the latest is needed."""
        final = self._dir / f"{snapshot_id}.jsonl.zst"
        self._temp(snapshot_id).replace(final)
        index = self._dir / f"{snapshot_id}.index"
        if self._temp(snapshot_id, ".index").exists():
            self._temp(snapshot_id, ".index").replace(index)
        for old in [*self._dir.glob("*.jsonl.zst"), *self._dir.glob("*.index")]:
            if old not in (final, index):
                old.unlink(missing_ok=True)

    def discard(self, snapshot_id: str) -> None:
        self._temp(snapshot_id).unlink(missing_ok=True)
        self._temp(snapshot_id, ".index").unlink(missing_ok=True)

    def _temp(self, snapshot_id: str, suffix: str = "") -> Path:
        return self._dir / f".{snapshot_id}{suffix}.tmp"


# -- the catalog index ---------------------------------------------------------------------

_MAGIC = b"muster catalog index 1\n"
_RECORD = struct.Struct("<IIII")  # lengths of key, fingerprint, line, volume
_FINGERPRINT = struct.Struct("<IqqqQ")  # st_mode, size, mtime_ns, ctime_ns, inode


def fingerprint(mode: int, size: int, mtime_ns: int, ctime_ns: int, inode: int) -> bytes:
    """What decides that a file is unchanged (GNU tar's and restic's test: same type,
    permissions, size, times and inode), as bytes that compare in one operation. A
    symlink's target cannot change in place (a new link is a new inode), so the walk
    need not read it to decide.

    `mode` is a full st_mode (type bits included); `size` counts for regular files only,
    as the catalog records it. Values beyond 64 bits (a far-future mtime) fall back to
    their text: still exact, just longer."""
    size = size if stat.S_ISREG(mode) else 0
    try:
        return _FINGERPRINT.pack(mode, size, mtime_ns, ctime_ns, inode)
    except struct.error:
        return repr((mode, size, mtime_ns, ctime_ns, inode)).encode()


def stat_fingerprint(info: os.stat_result) -> bytes:
    """`fingerprint` of a stat result, in one call: it runs for every entry of a walk."""
    mode = info.st_mode
    try:
        return _FINGERPRINT.pack(
            mode,
            info.st_size if S_ISREG(mode) else 0,
            info.st_mtime_ns,
            info.st_ctime_ns,
            info.st_ino,
        )
    except struct.error:
        return fingerprint(mode, info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino)


class Indexed(NamedTuple):
    """One catalog entry as the index holds it."""

    key: bytes  # catalog.sort_key(path)
    fingerprint: bytes
    line: bytes  # the catalog line, verbatim
    volume: str  # the volume holding its member
    record: bytes  # the whole stored record: an unchanged entry's is copied as it is


def indexed(key: bytes, fingerprint: bytes, line: bytes, volume: str) -> Indexed:
    """A record as the index would hold it (for entries decoded from a catalog)."""
    return Indexed(key, fingerprint, line, volume, _record(key, fingerprint, line, volume))


def _record(key: bytes, fingerprint: bytes, line: bytes, volume: str) -> bytes:
    raw_volume = volume.encode()
    lengths = _RECORD.pack(len(key), len(fingerprint), len(line), len(raw_volume))
    return lengths + key + fingerprint + line + raw_volume


def background_compressor(level: int) -> zstandard.ZstdCompressor:
    """A compressor that works on zstd's own thread, beside the walk, in 1 MiB jobs: the
    default job size would hold about 20 MiB of buffers (at level 3) for it."""
    params = zstandard.ZstdCompressionParameters.from_level(level, threads=1, job_size=1 << 20)
    return zstandard.ZstdCompressor(compression_params=params)


# zstd's fast level -3 for the index: it is rewritten whole and read back whole on every
# run, and only ever by this node. Measured on the bench index (27 MB of records): about
# 40% less CPU to compress and a third less to decompress than level 1, for a file 40%
# larger (6.6 MB instead of 4.7) that never leaves the node.
INDEX_LEVEL = -3


CHUNK = 1 << 18  # bytes handed to the compressor at a time


class ChunkedCompressor:
    """A zstd stream fed in `CHUNK`s: one compressor call per chunk, where one per
    catalog line or index record would cost more than the compression itself. Pieces
    are kept as they come and joined once per chunk: a bytearray grown piece by piece is
    reallocated (and copied) every 1/8 of its size, several copies of every byte, which
    profiled as the main process's largest cost after the walk's system calls."""

    def __init__(self, level: int, sink: Any, start: bytes = b"") -> None:
        self._zstd = background_compressor(level).stream_writer(sink, closefd=False)
        self._pieces = [start]
        self._size = len(start)

    def write(self, data: bytes) -> None:
        self._pieces.append(data)
        self._size += len(data)
        if self._size >= CHUNK:
            self._flush()

    def extend(self, pieces: list[bytes]) -> None:
        """`write` of each piece, in order."""
        self._pieces += pieces
        self._size += sum(map(len, pieces))
        if self._size >= CHUNK:
            self._flush()

    def _flush(self) -> None:
        self._zstd.write(b"".join(self._pieces))
        self._pieces, self._size = [], 0

    def close(self) -> None:
        self._flush()
        self._zstd.close()


class IndexWriter(ChunkedCompressor):
    """Writes index records, zstd-compressed at `INDEX_LEVEL`; `write` takes records as
    `Indexed.record` holds them (or several, back to back)."""

    def __init__(self, sink: BinaryIO) -> None:
        super().__init__(INDEX_LEVEL, sink, _MAGIC)
        self._sink = sink

    def add(self, key: bytes, fingerprint: bytes, line: bytes, volume: str) -> None:
        self.write(_record(key, fingerprint, line, volume))

    def close(self) -> None:
        super().close()
        self._sink.flush()
        os.fsync(self._sink.fileno())


def read_index(source: BinaryIO) -> Iterator[Indexed] | None:
    """The records of an index, in catalog order; None when `source` is no index of this
    format (the caller then falls back to the catalog). A damaged or truncated index
    ends early: entries past the damage are then simply read again, never skipped."""
    reader = zstandard.ZstdDecompressor().stream_reader(
        source, read_across_frames=True, closefd=False
    )
    try:
        if reader.read(len(_MAGIC)) != _MAGIC:
            return None
    except zstandard.ZstdError:
        return None
    return _records(reader)


def _records(reader: BinaryIO) -> Iterator[Indexed]:
    """Parsed from 1 MiB blocks of decompressed data: a read call per record would cost
    as much as the comparison it serves."""
    volumes: dict[bytes, str] = {}  # a few names, shared by thousands of records
    unpack, head = _RECORD.unpack_from, _RECORD.size
    new = tuple.__new__  # a NamedTuple's own __new__ is a Python frame per record
    pending = b""
    try:
        while block := reader.read(1 << 20):
            data = pending + block
            at, end = 0, len(data)
            while at + head <= end:
                key_length, print_length, line_length, volume_length = unpack(data, at)
                key_end = at + head + key_length
                print_end = key_end + print_length
                line_end = print_end + line_length
                stop = line_end + volume_length
                if stop > end:
                    break
                raw_volume = data[line_end:stop]
                volume = volumes.get(raw_volume) or volumes.setdefault(
                    raw_volume, raw_volume.decode()
                )
                yield new(
                    Indexed,
                    (
                        data[at + head : key_end],
                        data[key_end:print_end],
                        data[print_end:line_end],
                        volume,
                        data[at:stop],
                    ),
                )
                at = stop
            pending = data[at:]
    except zstandard.ZstdError:
        return
