"""A job's snapshots as a reader sees them: records, catalogs and the choice of snapshot.

Shared by every reading action (snapshots, ls, versions, find, restore, verify), so that
each of them stays a short description of what it does with the entries.
"""

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from datetime import datetime
from functools import cached_property
from pathlib import Path

from agent import age
from agent.catalog import Entry, path_needle, read_entries
from agent.repository import Repository
from agent.state import CatalogCache
from agent.when import parse_when
from broker.snapshot import SnapshotRecord, catalog_name


class NoSnapshot(LookupError):
    pass


class Archive:
    """Catalogs are read from the node's cache when it holds them; any other is fetched
    and decrypted once per Archive, kept compressed in a private temporary directory
    (removed with the Archive) for the next read."""

    def __init__(
        self, repo: Repository, identities: list[age.Identity], cache: CatalogCache | None = None
    ) -> None:
        self.repo = repo
        self.identities = identities
        self._cache = cache
        self._fetched: tempfile.TemporaryDirectory[str] | None = None

    def close(self) -> None:
        if self._fetched is not None:
            self._fetched.cleanup()
            self._fetched = None

    def __enter__(self) -> "Archive":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

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
    def entries(
        self, record: SnapshotRecord, paths: list[str] | None = None
    ) -> Iterator[Iterator[Entry]]:
        """Stream a snapshot's catalog; with `paths`, only entries that may be one of
        them or lie under one (callers still test each entry: it is a fast pre-filter)."""
        needles = [path_needle(p) for p in paths] if paths else None
        with self._catalog_file(record).open("rb") as compressed:
            yield read_entries(compressed, needles)

    def _catalog_file(self, record: SnapshotRecord) -> Path:
        cached = self._cache.path(record.id) if self._cache else None
        if cached is not None:
            return cached
        if self._fetched is None:
            self._fetched = tempfile.TemporaryDirectory(prefix="muster-catalogs-")
        kept = Path(self._fetched.name, f"{record.id}.jsonl.zst")
        if not kept.exists():
            partial = kept.with_suffix(".partial")
            with (
                self.repo.get(catalog_name(record.id)) as encrypted,
                age.Decryptor(encrypted, self.identities) as plain,
                partial.open("wb") as out,
            ):
                shutil.copyfileobj(plain, out, 1 << 20)
            partial.replace(kept)
        return kept


def under(entry: Entry, paths: list[str]) -> bool:
    """Whether the entry is one of `paths` or inside one of them."""
    return inside(entry.path, paths)


def inside(path: str, paths: list[str]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in paths)
