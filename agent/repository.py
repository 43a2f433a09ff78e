"""One node's job inside a storage target: the objects under `<prefix>/<node>/<job>/`.

Each node writes only its own prefix, so there is exactly one writer and no lock. The
snapshot record is the commit point: objects of a snapshot without a record are
leftovers of an interrupted run, invisible to readers and removed by the next run.
"""

import io
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import BinaryIO

from agent.storage import NotFound, Storage
from broker.snapshot import SnapshotRecord, job_prefix, record_name, snapshot_of


class Repository:
    def __init__(self, storage: Storage, node: str, job: str) -> None:
        self.storage = storage
        self.node = node
        self.job = job
        self._prefix = job_prefix(node, job)

    def open_writer(
        self, name: str, size_hint: int | None = None
    ) -> AbstractContextManager[BinaryIO]:
        return self.storage.open_writer(self._prefix + name, size_hint)  # type: ignore[return-value]

    def get(self, name: str) -> BinaryIO:
        return self.storage.get(self._prefix + name)

    def get_range(self, name: str, start: int, length: int) -> bytes:
        return self.storage.get_range(self._prefix + name, start, length)

    def size(self, name: str) -> int:
        return self.storage.size(self._prefix + name)

    def delete(self, name: str) -> None:
        self.storage.delete(self._prefix + name)

    def names(self, folder: str) -> Iterator[str]:
        """Object names under `folder`, relative to the job prefix."""
        for info in self.storage.list(self._prefix + folder):
            yield info.name.removeprefix(self._prefix)

    def snapshots(self) -> list[SnapshotRecord]:
        """Committed snapshots, oldest first (ids sort by second only, times are exact)."""
        records = [self.record(snapshot_of(name) or "") for name in self.names("snapshots/")]
        return sorted(records, key=lambda record: (record.started, record.id))

    def record(self, snapshot_id: str) -> SnapshotRecord:
        try:
            with self.get(record_name(snapshot_id)) as stream:
                return SnapshotRecord.model_validate_json(stream.read())
        except NotFound:
            raise NotFound(
                f"no snapshot {snapshot_id} for {self.node}/{self.job}; "
                "`muster snapshots` lists them"
            ) from None

    def commit(self, record: SnapshotRecord) -> None:

        body = record.model_dump_json(indent=2).encode()
        self.storage.put(self._prefix + record_name(record.id), io.BytesIO(body), len(body))

    def leftovers(self) -> list[str]:
        """Objects of snapshots that never got their record, and that no committed
        snapshot uses (a kept incremental may still use volumes of a forgotten one)."""
        records = self.snapshots()
        committed = {record.id for record in records}
        in_use = set().union(*(record.all_volumes() for record in records))
        return [
            name
            for folder in ("catalogs/", "volumes/")
            for name in self.names(folder)
            if snapshot_of(name) not in committed and name not in in_use
        ]
