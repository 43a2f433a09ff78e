"""`muster find PATTERN`: search names across every snapshot."""

import fnmatch
import posixpath
from dataclasses import dataclass

from agent.archive import Archive
from agent.catalog import Entry
from broker.snapshot import SnapshotRecord


@dataclass(frozen=True)
class Match:
    entry: Entry  # as in the newest snapshot holding the path
    first_seen: SnapshotRecord
    last_seen: SnapshotRecord


def run_find(archive: Archive, pattern: str) -> list[Match]:
    """A pattern with '/' matches whole paths, otherwise names (as excludes do);
    matches are sorted by path."""
    found: dict[str, Match] = {}
    for record in archive.records:
        with archive.entries(record) as catalog:
            for entry in catalog:
                if not _matches(entry.path, pattern):
                    continue
                earlier = found.get(entry.path)
                first = earlier.first_seen if earlier else record
                found[entry.path] = Match(entry, first, record)
    return [found[path] for path in sorted(found)]


def _matches(path: str, pattern: str) -> bool:
    subject = path if "/" in pattern else posixpath.basename(path)
    return fnmatch.fnmatchcase(subject, pattern)
