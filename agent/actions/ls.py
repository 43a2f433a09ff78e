"""`muster ls [PATH] [--at WHEN]`: one directory level of a snapshot, like `ls -l`."""

from dataclasses import dataclass

from agent.actions.restore import absolute
from agent.archive import Archive
from agent.catalog import DIRECTORY, Entry
from broker.snapshot import SnapshotRecord


@dataclass(frozen=True)
class Listing:
    snapshot: SnapshotRecord
    directory: str
    entries: list[Entry]  # children with an entry of their own
    implied: list[str]  # directories known only as parents of backed-up paths


def run_ls(archive: Archive, path: str = "/", at: str | None = None) -> Listing:
    record = archive.select(at)
    directory = absolute(path)
    prefix = directory.rstrip("/") + "/"
    entries: list[Entry] = []
    implied: list[str] = []
    with archive.entries(record, [directory]) as catalog:
        for entry in catalog:
            if not entry.path.startswith(prefix):
                continue
            name, _, rest = entry.path[len(prefix) :].partition("/")
            if not rest:
                entries.append(entry)
            elif not implied or implied[-1] != name:
                implied.append(name)
    named = {e.path[len(prefix) :] for e in entries if e.type == DIRECTORY}
    return Listing(record, directory, entries, [n for n in implied if n not in named])
