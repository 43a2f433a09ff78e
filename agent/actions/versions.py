"""`muster versions PATH`: every distinct version of a file across all snapshots."""

from dataclasses import dataclass

from agent.actions.restore import absolute
from agent.archive import Archive
from agent.catalog import Entry
from broker.snapshot import SnapshotRecord


@dataclass(frozen=True)
class Version:
    first_seen: SnapshotRecord  # the oldest snapshot holding this version
    last_seen: SnapshotRecord
    entry: Entry


def run_versions(archive: Archive, path: str) -> list[Version]:
    """Oldest first; a version is a distinct content (sha256), type or link target."""
    wanted = absolute(path)
    versions: list[Version] = []
    for record in archive.records:
        with archive.entries(record, [wanted]) as catalog:
            entry = next((e for e in catalog if e.path == wanted), None)
        if entry is None:
            continue
        if versions and _same(versions[-1].entry, entry):
            versions[-1] = Version(versions[-1].first_seen, record, versions[-1].entry)
        else:
            versions.append(Version(record, record, entry))
    return versions


def _same(a: Entry, b: Entry) -> bool:
    return (a.type, a.sha256, a.link, a.size) == (b.type, b.sha256, b.link, b.size)
