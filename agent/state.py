"""The agent's local state directory: what it keeps between runs on the node.

It holds a plaintext copy of each job's latest catalog, like GNU tar's
`--listed-incremental` file, so that an incremental backup decides what changed from a
stat walk alone, without downloading or decrypting anything. Losing it costs one
catalog download; it is a cache, never a source of truth. Files are private (0600).
"""

import fcntl
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

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

    def open_temp(self, snapshot_id: str) -> BinaryIO:
        """A private file for the catalog being written; `commit` adopts it."""
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self._temp(snapshot_id), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        return os.fdopen(fd, "wb")

    def commit(self, snapshot_id: str) -> None:
        """Adopt the written catalog and drop older ones: only the latest is needed."""
        final = self._dir / f"{snapshot_id}.jsonl.zst"
        self._temp(snapshot_id).replace(final)
        for old in self._dir.glob("*.jsonl.zst"):
            if old != final:
                old.unlink(missing_ok=True)

    def discard(self, snapshot_id: str) -> None:
        self._temp(snapshot_id).unlink(missing_ok=True)

    def _temp(self, snapshot_id: str) -> Path:
        return self._dir / f".{snapshot_id}.tmp"
