"""Writes one volume: tar members into zstd frames into age into storage.

A backup's worker processes each run one `VolumeWriter` per volume (agent/workers.py);
which members go into which volume is decided by the main process. One pass, nothing
staged on disk. The tar stream is cut into independent zstd frames, a
new frame at the first member boundary past `FRAME_TARGET` bytes (and inside members
every `FRAME_MAX` bytes), so that one file can later be restored by fetching only the age
chunks that hold its frames. Frames are compressed on the worker's compression thread
while the next one fills; at most `IN_FLIGHT` frames are held, so memory does not grow
with the data.
Members' sha256 are computed from the cut frames on one hasher thread, in frame order (a
big file's digest is fed frame by frame), so hashing overlaps reading the next files;
a member is located only once its frames are hashed, so `location` implies `sha256`.
Compressed frames are encrypted, hashed and written on one writer thread, in order (all
three release the GIL), so reading the next files goes on meanwhile; at most
`WRITES_QUEUED` frames wait for it. Locations depend only on compressed sizes, so they
are known before the bytes are written; nothing is visible before the volume commits.
"""

import contextlib
import hashlib
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import BinaryIO

import zstandard

from agent import age
from agent.catalog import Entry, Location
from agent.tarheader import BLOCK, END_OF_ARCHIVE
from agent.throttle import OpenWriter
from broker.snapshot import VolumeInfo

FRAME_TARGET = 1 << 20
FRAME_MAX = 2 << 20
IN_FLIGHT = 2
WRITES_QUEUED = 2
READ_SIZE = 1 << 20


class HashingSink:
    """Counts and hashes the ciphertext on its way to storage."""

    def __init__(self, sink: BinaryIO) -> None:
        self._sink = sink
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self._sink.write(data) or len(data)


@dataclass
class _Pending:
    """A member whose location waits for its frames to be compressed and written."""

    entry: Entry
    first_frame: int
    skip: int
    last_frame: int | None = None  # None while the member's data is still being copied


@dataclass
class _Volume:
    name: str
    stack: contextlib.ExitStack
    sink: HashingSink
    encryptor: age.Encryptor
    members: int = 0
    position: int = 0  # bytes of zstd output written so far: offsets in the decrypted stream
    frame_starts: dict[int, int] = field(default_factory=dict)


# What the hasher does with one member's bytes in one frame: (entry, the digest of a member
# spanning frames or None for one held whole, start, end, final, whole). `final` marks its
# last span; `whole` is False for a file that shrank while read (no sha256 then).
_Span = tuple[Entry, "hashlib._Hash | None", int, int, bool, bool]


def _hash(data: bytearray, spans: list[_Span]) -> None:
    """Hash the members' bytes of one cut frame (the frame is never resized again)."""
    view = memoryview(data)
    for entry, digest, start, end, final, whole in spans:
        if digest is None:
            entry.sha256 = hashlib.sha256(view[start:end]).hexdigest()
            continue
        digest.update(view[start:end])
        if final:
            entry.sha256 = digest.hexdigest() if whole else None


class _Compressors(threading.local):
    def get(self, level: int) -> zstandard.ZstdCompressor:
        if getattr(self, "level", None) != level:
            self.level = level
            self.compressor = zstandard.ZstdCompressor(level=level)
        return self.compressor


_compressors = _Compressors()


def _compress(level: int, data: bytearray) -> bytes:
    return _compressors.get(level).compress(data)


class VolumeWriter:
    """Adds members to one volume; `finish` commits it.

    An entry's `location` is filled in once the frames holding it are written: after
    `flush` or `finish`, every member added so far has one.
    """

    def __init__(
        self,
        open_writer: OpenWriter,
        name: str,
        recipients: Iterable[age.Recipient],
        *,
        level: int,
        target_size: int,
        pool: ThreadPoolExecutor,
        writer: ThreadPoolExecutor,
        hasher: ThreadPoolExecutor,
        on_read: Callable[[int], None] = lambda count: None,
    ) -> None:
        self._open_writer = open_writer
        self.name = name
        self._recipients = list(recipients)
        self._level = level
        self._target = target_size
        self._pool = pool
        self._writer = writer  # one thread: writes stay in order
        self._hasher = hasher  # one thread: a big file's frames are hashed in order
        self._read_buffer = bytearray(READ_SIZE)
        self._writes: deque[Future[int]] = deque()
        self._on_read = on_read  # progress: file bytes as they are read
        self._volume: _Volume | None = None
        self._frame = bytearray()
        self._frame_index = 0
        self._in_flight: deque[tuple[int, Future[bytes], Future[None] | None]] = deque()
        self._spans: list[_Span] = []  # the open frame's, hashed once it is cut
        self._streaming: tuple[Entry, hashlib._Hash, int] | None = None  # a big member
        self._pending: deque[_Pending] = deque()

    # -- members -------------------------------------------------------------------------

    def add(self, entry: Entry, header: bytes, content: int | None = None) -> list[str]:
        """Write one member (header, then `entry.size` bytes read from the file
        descriptor `content`); returns warnings about the file changing while it was read.
        Without `content` the member has no data (directories, symlinks, hard links),
        whatever `entry.size` says."""
        size = entry.size if content is not None else 0
        volume = self._current(size)
        if len(self._frame) >= FRAME_TARGET:
            self._cut_frame()
        pending = _Pending(entry, self._frame_index, len(self._frame))
        self._pending.append(pending)  # first, so its first frame's offset is kept
        self._frame += header
        warnings = self._copy(entry, content) if content is not None else []
        pad = -size % BLOCK
        if pad:
            self._frame += bytes(pad)
        pending.last_frame = self._frame_index
        volume.members += 1
        return warnings

    def _copy(self, entry: Entry, content: int) -> list[str]:
        size = entry.size
        if size <= READ_SIZE:  # most files: one read, no loop
            chunk = os.read(content, size)
            if len(chunk) == size:
                start = len(self._frame)
                self._frame += chunk
                self._spans.append((entry, None, start, start + size, True, True))
                self._on_read(size)
                if len(self._frame) >= FRAME_MAX:
                    self._cut_frame()
                return []
            return self._copy_rest(entry, content, chunk)
        return self._copy_rest(entry, content, b"")

    def _copy_rest(self, entry: Entry, content: int, first: bytes) -> list[str]:
        """Large files, read into one reused buffer (no allocation per read), and files
        that shrank under us (`first`: what a single read got of them). Their digest is
        fed by the hasher, one span per frame the member crosses."""
        remaining = entry.size - len(first)
        self._streaming = (entry, hashlib.sha256(), len(self._frame))
        self._frame += first
        self._on_read(len(first))
        view = memoryview(self._read_buffer)
        while remaining:
            count = os.readv(content, [view[: min(READ_SIZE, remaining)]])
            if not count:
                break
            self._frame += view[:count]
            remaining -= count
            self._on_read(count)
            if len(self._frame) >= FRAME_MAX:
                self._cut_frame()
        _, digest, start = self._streaming
        self._streaming = None
        self._spans.append((entry, digest, start, len(self._frame), True, not remaining))
        if remaining:  # the file shrank under us: tar needs the declared size, as GNU tar does
            self._frame += bytes(remaining)
            return [f"{entry.path}: shrank while being read; padded with zeros"]
        return []

    # -- frames --------------------------------------------------------------------------

    def _cut_frame(self) -> None:
        if not self._frame:
            return
        data, self._frame = self._frame, bytearray()
        if self._streaming is not None:  # a big member goes on in the next frame
            entry, digest, start = self._streaming
            self._spans.append((entry, digest, start, len(data), False, True))
            self._streaming = (entry, digest, 0)
        hashed = self._hasher.submit(_hash, data, self._spans) if self._spans else None
        self._spans = []
        compressed = self._pool.submit(_compress, self._level, data)
        self._in_flight.append((self._frame_index, compressed, hashed))
        self._frame_index += 1
        while len(self._in_flight) > IN_FLIGHT:
            self._write_oldest()

    def flush(self) -> None:
        """Cut the open frame and write every frame, so that every member added so far
        has its location: for a caller whose backlog waits on them."""
        self._cut_frame()
        while self._in_flight:
            self._write_oldest()

    def _write_oldest(self) -> None:
        index, future, hashed = self._in_flight.popleft()
        compressed = future.result()
        if hashed is not None:
            hashed.result()  # its members' sha256 are set before they get a location
        volume = self._current()
        volume.frame_starts[index] = volume.position
        self._writes.append(self._writer.submit(volume.encryptor.write, compressed))
        volume.position += len(compressed)
        self._locate(volume, written_through=index)
        while len(self._writes) > WRITES_QUEUED:
            self._writes.popleft().result()  # raises what the writer met

    def _locate(self, volume: _Volume, written_through: int) -> None:
        header_length = volume.encryptor.header_length
        while self._pending:
            head = self._pending[0]
            if head.last_frame is None or head.last_frame > written_through:
                break
            done = self._pending.popleft()
            frame = volume.frame_starts[done.first_frame]
            done.entry.location = Location(
                volume=volume.name,
                frame=frame,
                chunk=age.ciphertext_offset(header_length, frame),
                skip=done.skip,
                span=volume.position - frame,
            )
        for index in [i for i in volume.frame_starts if i < self._first_needed_frame()]:
            del volume.frame_starts[index]

    def _first_needed_frame(self) -> int:
        return self._pending[0].first_frame if self._pending else self._frame_index

    # -- volumes -------------------------------------------------------------------------

    def _current(self, first_member: int = 0) -> _Volume:
        if self._volume is None:
            name = self.name
            stack = contextlib.ExitStack()
            # How big it may grow, so storage can size its parts (a big file's own volume)
            hint = max(self._target, first_member) * 102 // 100 + (1 << 20)
            sink = HashingSink(stack.enter_context(self._open_writer(name, hint)))
            self._volume = _Volume(name, stack, sink, age.Encryptor(sink, self._recipients))
        return self._volume

    def finish(self) -> VolumeInfo:
        """End the tar stream, flush every frame and commit the object to storage."""
        volume = self._current()
        self._frame += END_OF_ARCHIVE
        self._cut_frame()
        while self._in_flight:
            self._write_oldest()
        while self._writes:
            self._writes.popleft().result()
        volume.encryptor.close()
        volume.stack.close()  # commits: the object becomes visible only now
        self._volume = None
        return VolumeInfo(
            name=volume.name,
            size=volume.sink.size,
            sha256=volume.sink.sha256.hexdigest(),
            header_length=volume.encryptor.header_length,
            members=volume.members,
        )

    def abort(self, error: BaseException) -> None:
        """Discard the open volume: storage leaves no object behind for it."""
        for _, future, hashed in self._in_flight:
            future.cancel()
            if hashed is not None:
                hashed.cancel()
        self._in_flight.clear()
        for write in self._writes:
            write.cancel()
        wait(self._writes)  # the one being written: its sink is about to be discarded
        self._writes.clear()
        if self._volume is not None:
            self._volume.stack.__exit__(type(error), error, error.__traceback__)
            self._volume = None


def open_for_reading(path: str) -> int:
    """A raw file descriptor, opened without updating atime where the kernel lets us
    (owner or CAP_FOWNER). Not a file object: `io.FileIO` costs an fstat of its own per
    file, and reads here are whole-file-sized `os.read` calls anyway."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NOATIME", 0)
    try:
        return os.open(path, flags)
    except PermissionError:
        return os.open(path, flags & ~getattr(os, "O_NOATIME", 0))
