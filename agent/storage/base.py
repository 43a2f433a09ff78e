"""The one interface every storage backend implements, and what they share.

A backend (local directory, Swift, S3) stores opaque, already encrypted objects under
'/'-separated names relative to its target's prefix. The guarantee callers build on is
atomicity: a reader sees an object either complete or not at all, never half of one, even
when the writer crashes or the network drops mid-upload.

Writing is implemented once, here: `open_writer` hands the backup pipeline a writable file
that cuts the byte stream into parts of `part_size` and gives them, in order, to the
backend's `Upload` on a worker thread, so encryption and network overlap while memory stays
bounded by two parts. A backend only says how to store one part, how to make the object
visible at the end, and how to drop everything on failure.
"""

from __future__ import annotations

import contextlib
import io
import math
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import BinaryIO

MIB = 1024 * 1024
COPY_CHUNK = MIB  # read size when `put` copies from a stream


class StorageError(Exception):
    """Base of every storage failure. Messages say what to do and never hold a secret."""


class NotFound(StorageError):
    """The object (or its container or bucket) does not exist."""


class ConfigError(StorageError, ValueError):
    """The target, URL or credentials are unusable as given; retrying will not help."""


class InvalidName(ConfigError):
    """An object name that could escape the prefix or that a backend cannot store."""


class AuthError(StorageError):
    """The server rejected the credentials or refused access to the container or bucket."""


class Unavailable(StorageError):
    """The server could not be reached or kept failing after retries; try again later."""


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: `name` is relative to the target's prefix."""

    name: str
    size: int
    mtime: datetime


@dataclass(frozen=True)
class Tuning:
    """Knobs that are about this node's memory and network rather than about the plan.

    `part_size` is both the threshold above which an object is uploaded in parts (an SLO
    on Swift, a multipart upload on S3) and the size of those parts; a writer holds at most
    two parts in memory (each backup worker has one writer open). None: the backend's own
    (`Storage.part_size`). `page_size` is the number of names asked for per listing request.
    """

    part_size: int | None = None
    page_size: int = 1000
    retries: int = 5
    timeout: float = 60.0

    def __post_init__(self) -> None:
        parts_ok = self.part_size is None or self.part_size >= 1
        if not parts_ok or self.page_size < 1 or self.retries < 0 or self.timeout <= 0:
            raise ConfigError(f"invalid storage tuning {self}: sizes and timeout must be > 0")


def check_name(name: str) -> str:
    """Refuse names that would escape the prefix or mean different things per backend."""
    parts = name.split("/")
    if not name or "\x00" in name or any(part in ("", ".", "..") for part in parts):
        raise InvalidName(
            f"invalid object name {name!r}: use '/'-separated parts, none empty, '.' or '..'"
        )
    return name


def check_prefix(prefix: str) -> str:
    """A listing prefix is any start of a valid name ('' lists everything)."""
    if prefix.startswith("/") or "\x00" in prefix or ".." in prefix.split("/"):
        raise InvalidName(f"invalid listing prefix {prefix!r}: use a relative '/'-separated one")
    return prefix


class Upload(ABC):
    """One object being written: full parts arrive in order, then commit or abort.

    `add_part` runs on the writer's worker thread, the other calls on the caller's thread,
    never two at once.
    """

    @abstractmethod
    def add_part(self, data: memoryview) -> None:
        """Store one full part; the object must stay invisible until `commit`. `data` is
        the writer's buffer, filled again once this returns: use it, keep no reference."""

    @abstractmethod
    def commit(self, tail: memoryview) -> None:
        """Store `tail` (the whole object if no part was added) and make the object visible."""

    @abstractmethod
    def abort(self) -> None:
        """Drop every stored part so that nothing stays visible or billed; must not raise."""


class ObjectWriter(io.BufferedIOBase):
    """The writable file `open_writer` yields; the object appears only when its block ends.

    `close()` inside the block only stops further writes, so wrappers that close their sink
    (an encryptor, a compressor) cannot commit or discard the object behind the caller's back.
    """

    def __init__(self, upload: Upload, part_size: int, max_parts: int) -> None:
        super().__init__()
        self._upload = upload
        self._part_size = part_size
        self._max_parts = max_parts
        self._parts = 0
        self._buffer = bytearray(part_size)  # filled in place: no growth, no reallocation
        self._spare: bytearray | None = None  # the other buffer, once its part is stored
        self._filled = 0
        self._written = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="storage-upload")
        self._pending: Future[None] | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        """Buffer `data`; a full part is shipped once a byte beyond it arrives, so that an
        object of exactly one part still goes out as a single plain upload."""
        if self.closed:
            raise ValueError("write to a closed storage writer")
        view = memoryview(data).cast("B")
        size = len(view)
        while view:
            if self._filled == self._part_size:
                self._ship()
            count = min(len(view), self._part_size - self._filled)
            self._buffer[self._filled : self._filled + count] = view[:count]
            self._filled += count
            view = view[count:]
        self._written += size
        return size

    def tell(self) -> int:
        """Bytes written so far."""
        return self._written

    def _ship(self) -> None:
        """Hand the full buffer to the worker once the previous part is stored, and fill
        that part's buffer meanwhile: two buffers, taken in turn, and no copy of either."""
        self._wait()
        self._parts += 1
        if self._parts >= self._max_parts:  # at least one more part follows this one
            raise StorageError(
                f"object exceeds {self._max_parts} parts of {self._part_size} bytes: "
                "pass size_hint or raise the part size"
            )
        full = self._buffer
        self._buffer = self._spare if self._spare is not None else bytearray(self._part_size)
        self._spare = full
        self._pending = self._pool.submit(self._upload.add_part, memoryview(full))
        self._filled = 0

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _commit(self) -> None:
        try:
            self._wait()
            self._upload.commit(memoryview(self._buffer)[: self._filled])
        finally:
            self._pool.shutdown()
            self._buffer, self._spare = bytearray(), None

    def _abort(self) -> None:
        with contextlib.suppress(Exception):
            self._wait()
        self._pool.shutdown()
        self._buffer, self._spare = bytearray(), None
        self._upload.abort()


class _PartReader(io.RawIOBase):
    """A part as a seekable file over the writer's buffer rather than a copy of it: HTTP
    clients stream it, and seek back to send it again when they retry."""

    def __init__(self, data: memoryview) -> None:
        super().__init__()
        self._data = data
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        chunk = self._data[self._position : self._position + len(buffer)]
        buffer[: len(chunk)] = chunk
        self._position += len(chunk)
        return len(chunk)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        start = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: len(self._data)}
        self._position = max(0, start[whence] + offset)
        return self._position

    def tell(self) -> int:
        return self._position


def part_file(data: memoryview) -> BinaryIO:
    """What a network backend sends for a part (see `Upload.add_part`)."""
    return _PartReader(data)  # type: ignore[return-value]


class _StreamReader(io.RawIOBase):
    """Adapts a backend's `read(n)`/`close()` body to a real file object."""

    def __init__(self, read: Callable[[int], bytes], close: Callable[[], None]) -> None:
        super().__init__()
        self._read = read
        self._close = close

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self._read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._close()
        super().close()


def stream_reader(read: Callable[[int], bytes], close: Callable[[], None]) -> BinaryIO:
    """A buffered binary reader over a backend's streaming body (see `Storage.get`)."""
    return io.BufferedReader(_StreamReader(read, close), buffer_size=256 * 1024)


class Storage(ABC):
    """A place for objects under one prefix: what the agent needs from Swift, S3 or a disk.

    Subclasses implement `_start_upload`, `get`, `_get_range`, `list`, `delete` and `stat`;
    writing (`put`, `open_writer`), `get_range`, `exists` and `size` are built here on them.
    """

    max_parts: int = 10_000  # a backend's limit on parts (segments) per object
    part_size: int = 5 * MIB  # its default upload unit: the agent's peak memory moves with it

    def __init__(self, tuning: Tuning, root: str) -> None:
        self.tuning = tuning
        self.root = check_name(root) if root else ""  # the target's prefix

    def _key(self, name: str) -> str:
        """The full name of object `name` under the target's prefix (checked first)."""
        check_name(name)
        return f"{self.root}/{name}" if self.root else name

    def _key_prefix(self, prefix: str) -> str:
        """The full form of a listing prefix; `_relative` is its inverse on listed names."""
        check_prefix(prefix)
        return f"{self.root}/{prefix}" if self.root else prefix

    def _relative(self, key: str) -> str:
        return key[len(self.root) + 1 :] if self.root else key

    def reconnect(self) -> None:
        """Forget every connection, in a forked process: a socket shared with the parent
        would mix both sides' requests. Backends that keep connections override this;
        a local directory has none."""
        return

    def put(self, name: str, stream: BinaryIO, size_hint: int | None = None) -> int:
        """Store everything `stream` yields as `name`, atomically; returns the bytes stored."""
        with self.open_writer(name, size_hint) as writer:
            shutil.copyfileobj(stream, writer, COPY_CHUNK)
        return writer.tell()

    @contextlib.contextmanager
    def open_writer(self, name: str, size_hint: int | None = None) -> Iterator[ObjectWriter]:
        """Yield a file to write `name` into: committed when the block ends normally,
        discarded without a trace when it raises. `size_hint` (if known) lets very large
        objects use larger parts so they stay within the backend's part limit."""
        upload = self._start_upload(check_name(name))
        writer = ObjectWriter(upload, self._part_size(size_hint), self.max_parts)
        try:
            yield writer
        except BaseException:
            writer._abort()
            raise
        try:
            writer._commit()
        except BaseException:
            upload.abort()
            raise

    def _part_size(self, size_hint: int | None) -> int:
        """The configured part size, raised (in whole MiB) if size_hint needs more."""
        configured = self.tuning.part_size or self.part_size
        if size_hint is None:
            return configured
        needed = math.ceil(math.ceil(size_hint / self.max_parts) / MIB) * MIB
        return max(configured, needed)

    def get_range(self, name: str, start: int, length: int) -> bytes:
        """Bytes [start, start + length) in one request: shorter at the object's end, empty
        from the end on. Raises NotFound."""
        if start < 0 or length < 0:
            raise ValueError(f"invalid range: start={start} length={length}")
        return self._get_range(name, start, length) if length else b""

    def exists(self, name: str) -> bool:
        try:
            self.stat(name)
        except NotFound:
            return False
        return True

    def size(self, name: str) -> int:
        return self.stat(name).size

    @abstractmethod
    def _start_upload(self, name: str) -> Upload:
        """Begin writing `name` (already checked); nothing may be visible yet."""

    @abstractmethod
    def get(self, name: str) -> BinaryIO:
        """A streaming reader of the whole object; raises NotFound. Close it when done."""

    @abstractmethod
    def _get_range(self, name: str, start: int, length: int) -> bytes:
        """`get_range` once the range is known to be valid and non-empty."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects whose name starts with `prefix`, sorted by name, fetched page by page."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove `name` and everything stored for it; removing a missing object is fine."""

    @abstractmethod
    def stat(self, name: str) -> ObjectInfo:
        """Size and modification time of `name`; raises NotFound."""
