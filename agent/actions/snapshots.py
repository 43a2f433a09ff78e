"""`muster snapshots`: a job's committed snapshots, read from their records alone.

Records are plain JSON, so listing needs no key. The command line only formats what this
module returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from agent.repository import Repository
from broker.snapshot import SnapshotRecord, snapshot_of


@dataclass(frozen=True)
class SnapshotSummary:
    """What one line of a listing shows about a snapshot."""

    id: str
    node: str
    job: str
    started: datetime
    finished: datetime
    full: bool
    chain: int
    parent: str | None
    paths: list[str]
    files: int
    directories: int
    bytes: int
    bytes_new: int
    bytes_stored: int
    volumes: int
    agent_version: str

    @classmethod
    def of(cls, record: SnapshotRecord) -> SnapshotSummary:
        stats = record.stats
        return cls(
            id=record.id,
            node=record.node,
            job=record.job,
            started=record.started,
            finished=record.finished,
            full=record.full,
            chain=record.chain,
            parent=record.parent,
            paths=list(record.paths),
            files=stats.files,
            directories=stats.directories,
            bytes=stats.bytes,
            bytes_new=stats.bytes_new,
            bytes_stored=stats.bytes_stored,
            volumes=len(record.volumes),
            agent_version=record.agent_version,
        )

    @property
    def duration(self) -> float:
        """Seconds the backup took."""
        return (self.finished - self.started).total_seconds()

    @property
    def kind(self) -> str:
        """ "full", or "incremental +N" for the Nth incremental since the last full."""
        return "full" if self.full else f"incremental +{self.chain}"

    def as_json(self) -> dict[str, Any]:
        """Plain JSON data; times in UTC ISO 8601."""
        data = self.__dict__.copy()
        data["started"] = self.started.isoformat().replace("+00:00", "Z")
        data["finished"] = self.finished.isoformat().replace("+00:00", "Z")
        return data


def list_snapshots(repo: Repository) -> list[SnapshotSummary]:
    """Every committed snapshot of the repository's job, oldest first."""
    return [SnapshotSummary.of(record) for record in repo.snapshots()]


def latest(repo: Repository) -> SnapshotRecord | None:
    """The newest committed snapshot, read without fetching every record."""
    ids = sorted(filter(None, (snapshot_of(name) for name in repo.names("snapshots/"))))
    return repo.record(ids[-1]) if ids else None
