"""A job's snapshots as a reader sees them: records, catalogs and the choice of snapshot.

Shared by every reading action (snapshots, ls, versions, find, restore, verify), so that
each of them stays a short description of what it does with the entries.
"""

import contextlib
from collections.abc import Iterator
from datetime import datetime
from functools import cached_property

from agent import age
from agent.catalog import Entry, read_entries
from agent.repository import Repository
from agent.state import CatalogCache
from agent.when import parse_when
from broker.snapshot import SnapshotRecord, catalog_name


class NoSnapshot(LookupError):
    pass


class Archive:
    def __init__(
        self, repo: Repository, identities: list[age.Identity], cache: CatalogCache | None = None
    ) -> None:
        self.repo = repo
        self.identities = identities
        self._cache = cache

    @cached_property
    def records(self) -> list[SnapshotRecord]:
        """Committed snapshots, oldest first (listed once per command)."""
        return self.repo.snapshots()

    @cached_property
    def volume_sizes(self) -> dict[str, int]:
        return {volume.name: volume.size for r in self.records for volume in r.volumes}

    def select(self, when: str | None) -> SnapshotRecord:
        """The snapshot `--at WHEN` names: an id or id prefix, or the last one at a time."""
        if not self.records:
            raise NoSnapshot(f"no snapshots yet for {self.repo.node}/{self.repo.job}")
        if when is None:
            return self.records[-1]
        moment = parse_when(when)
        if isinstance(moment, str):
            matches = [r for r in self.records if r.id.startswith(moment)]
            if len(matches) != 1:
                raise NoSnapshot(f"{len(matches)} snapshots match {moment!r}; `muster snapshots`")
            return matches[0]
        return self._at(moment)

    def _at(self, moment: datetime) -> SnapshotRecord:
        earlier = [r for r in self.records if r.started <= moment]
        if not earlier:
            first = self.records[0].started.isoformat(timespec="seconds")
            raise NoSnapshot(f"no snapshot before {moment:%Y-%m-%d %H:%M}; the first is {first}")
        return earlier[-1]

    @contextlib.contextmanager
    def entries(self, record: SnapshotRecord) -> Iterator[Iterator[Entry]]:
        """Stream a snapshot's catalog, from the local cache when it holds this one."""
        with contextlib.ExitStack() as stack:
            cached = self._cache.path(record.id) if self._cache else None
            if cached is not None:
                yield read_entries(stack.enter_context(cached.open("rb")))
                return
            encrypted = stack.enter_context(self.repo.get(catalog_name(record.id)))
            plain = stack.enter_context(age.Decryptor(encrypted, self.identities))
            yield read_entries(plain)


def under(entry: Entry, paths: list[str]) -> bool:
    """Whether the entry is one of `paths` or inside one of them."""
    return inside(entry.path, paths)


def inside(path: str, paths: list[str]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in paths)
