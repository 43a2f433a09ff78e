"""Nothing lost: every result, alert and progress message is written here before it is sent.

One file per message, `<sequence>-<type>-<id>.json`, written to a temporary name, fsynced and
renamed, so a file is either whole or absent. The sequence (nanoseconds, strictly increasing
within this directory) orders delivery: oldest first. The broker side removes a file only
once RabbitMQ confirmed the publish, so a crash between the two sends the message twice,
never zero times; consumers process each message id at most once.

While the broker is unreachable the spool grows, within bounds (`max_files`, `max_bytes`).
To make room, the oldest run_status messages go first (progress is stale by then anyway);
results and alerts are dropped only when nothing else is left, oldest first, and every such
loss is logged at ERROR with what was lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from broker.codec import decode, encode
from broker.errors import InvalidMessage
from broker.messages import Message

log = logging.getLogger(__name__)

_NAME = re.compile(r"^(\d{20})-([a-z_]+)-([A-Za-z0-9_.-]{1,128})\.json$")
DISPOSABLE = "run_status"


@dataclass(frozen=True, order=True)
class Spooled:
    sequence: int
    type: str
    id: str
    path: Path
    size: int


class Spool:
    def __init__(self, directory: Path, max_files: int = 10_000, max_bytes: int = 64 << 20):
        self.directory = directory
        self.max_files = max_files
        self.max_bytes = max_bytes
        self.changed = threading.Event()  # set whenever a message is added
        self.dropped = 0
        self._lock = threading.Lock()
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        for leftover in directory.glob(".tmp-*"):  # a write that a crash cut short
            leftover.unlink(missing_ok=True)
        self._entries: dict[Path, Spooled] = {}
        for path in directory.iterdir():
            entry = _parse(path)
            if entry is not None:
                self._entries[path] = entry
        self._last = max((e.sequence for e in self._entries.values()), default=0)
        if self._entries:
            self.changed.set()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def size(self) -> int:
        with self._lock:
            return sum(e.size for e in self._entries.values())

    def add(self, message: Message) -> Spooled:
        """Write the message durably, then make room if the spool is over its bounds."""
        body = encode(message)
        with self._lock:
            self._last = max(time.time_ns(), self._last + 1)
            sequence = self._last
        name = f"{sequence:020d}-{message.type}-{message.id}.json"
        path = self.directory / name
        temp = self.directory / f".tmp-{name}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(body)
            out.flush()
            os.fsync(out.fileno())
        temp.rename(path)
        _fsync_dir(self.directory)
        entry = Spooled(sequence, message.type, message.id, path, len(body))
        with self._lock:
            self._entries[path] = entry
            self._bound(keep=path)
        self.changed.set()
        return entry

    def pending(self) -> list[Spooled]:
        """Everything not yet confirmed, oldest first."""
        with self._lock:
            return sorted(self._entries.values())

    def read(self, entry: Spooled) -> Message | None:
        """The message, or None if it is gone (dropped meanwhile) or unreadable (then it is
        moved aside as `<name>.bad`, with a log line: it can never be sent)."""
        try:
            return decode(entry.path.read_bytes())
        except FileNotFoundError:
            self._forget(entry.path)
            return None
        except (OSError, InvalidMessage) as error:
            log.error("spooled message %s is unreadable and is set aside: %s", entry.path, error)
            with contextlib.suppress(OSError):
                entry.path.rename(entry.path.with_name(entry.path.name + ".bad"))
            self._forget(entry.path)
            return None

    def remove(self, entry: Spooled) -> None:
        """The broker confirmed the message: its file goes."""
        entry.path.unlink(missing_ok=True)
        self._forget(entry.path)

    def _forget(self, path: Path) -> None:
        with self._lock:
            self._entries.pop(path, None)

    def _bound(self, keep: Path) -> None:
        """Drop messages until within bounds: progress first, then the oldest of the rest."""
        count = len(self._entries)
        total = sum(e.size for e in self._entries.values())
        if count <= self.max_files and total <= self.max_bytes:
            return
        ordered = sorted(self._entries.values())
        victims = [e for e in ordered if e.type == DISPOSABLE] + [
            e for e in ordered if e.type != DISPOSABLE
        ]
        for victim in victims:
            if count <= self.max_files and total <= self.max_bytes:
                break
            if victim.path == keep:
                continue
            victim.path.unlink(missing_ok=True)
            del self._entries[victim.path]
            count -= 1
            total -= victim.size
            self.dropped += 1
            if victim.type == DISPOSABLE:
                log.warning("spool full: dropped progress message %s", victim.id)
            else:
                log.error(
                    "SPOOL FULL (%d files, %d bytes, limits %d files, %d bytes): DROPPED %s "
                    "message %s from %s that never reached the broker; raise spool_max_files "
                    "or spool_max_bytes, or fix the broker connection",
                    count + 1,
                    total + victim.size,
                    self.max_files,
                    self.max_bytes,
                    victim.type,
                    victim.id,
                    time.strftime(
                        "%Y-%m-%dT%H:%M:%SZ", time.gmtime(victim.sequence / 1_000_000_000)
                    ),
                )


def _parse(path: Path) -> Spooled | None:
    match = _NAME.match(path.name)
    if match is None:
        return None
    try:
        size = path.stat().st_size
    except OSError:
        return None
    return Spooled(int(match[1]), match[2], match[3], path, size)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
