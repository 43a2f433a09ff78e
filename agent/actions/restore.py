"""`muster restore PATH...`: files and directories back, from the latest or a chosen snapshot.

Without `--at`, each path comes from the newest snapshot that holds it, so a file deleted
before the last backup still comes back. Only the volumes that hold the requested files
are read: by ranged GETs when the files are a small part of a volume, streamed whole
otherwise. Every file is checked against its catalog sha256 before it takes its place;
one bad file is reported and the others are still restored.
"""

import os
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from agent.archive import Archive, NoSnapshot, under
from agent.catalog import DIRECTORY, FILE, HARDLINK, SYMLINK, Entry
from agent.extract import Block, ContentMismatch, Overwrite, Sink, Target, UnsafePath, components
from agent.fetch import (
    CorruptVolume,
    VolumeKeys,
    member_data,
    member_name,
    member_stream,
    read_member,
)
from agent.fetch import volume_members as stream_volume
from agent.storage import NotFound
from broker.snapshot import SnapshotRecord

Progress = Callable[[int, int], None]  # (files done, bytes done)
WORKERS = max(2, os.cpu_count() or 1)  # volumes restored at once: zstd, sha256, ChaCha20
# and file I/O release the GIL, so threads keep every core busy


@dataclass
class RestoreOutcome:
    snapshots: dict[str, str] = field(default_factory=dict)  # requested path -> snapshot id
    files: int = 0
    bytes: int = 0
    errors: list[str] = field(default_factory=list)
    written: set[str] = field(default_factory=set)  # paths written (not left in place)


def absolute(path: str) -> str:
    """Paths as the catalog holds them: absolute, normalised, no trailing slash."""
    return os.path.normpath(os.path.join(os.getcwd(), path)) if path else "/"


def run_restore(
    archive: Archive,
    paths: list[str],
    root: Path,
    *,
    at: str | None = None,
    overwrite: Overwrite = lambda path: False,
    strict: bool = True,
    progress: Progress | None = None,
    sink: Sink | None = None,
    whole: bool = False,
) -> RestoreOutcome:
    """Restore `paths` under `root` ("/" restores in place); `strict` forbids following
    any symlink found under `root`, as a `--to DIR` restore must.

    `sink` replaces the directory tree under `root` (verify hashes instead of writing);
    `whole` streams every volume that holds a requested file from its first byte to its
    last, even where ranged reads would fetch less (verify tests whole volumes)."""
    outcome = RestoreOutcome()
    wanted = [absolute(p) for p in paths]
    chosen = choose_snapshots(archive, wanted, at, outcome)
    target = sink or Target(root, overwrite, strict)
    restorer = _Restorer(archive, target, outcome, progress, whole)
    try:
        for record, _, selected in chosen:
            restorer.restore(selected, _link_sources(archive, record, selected))
        target.finish()
    finally:
        if isinstance(target, Target):
            target.close()
    return outcome


def _link_sources(archive: Archive, record: SnapshotRecord, selected: list[Entry]) -> list[Entry]:
    """The files that selected hard links name but that were not selected themselves:
    their data is what such a link restores."""
    chosen = {e.path for e in selected}
    needed = {e.link for e in selected if e.type == HARDLINK and e.link not in chosen}
    if not needed:
        return []
    with archive.entries(record, sorted(needed)) as entries:
        return [e for e in entries if e.path in needed]


def choose_snapshots(
    archive: Archive, wanted: list[str], at: str | None, outcome: RestoreOutcome
) -> list[tuple[SnapshotRecord, list[str], list[Entry]]]:
    """Which snapshot each path comes from (the chosen one, or the newest that has it),
    with the entries to restore from it: each catalog is read once."""
    candidates = [archive.select(at)] if at else list(reversed(archive.records))
    if not candidates:
        raise NoSnapshot(f"no snapshots yet for {archive.repo.node}/{archive.repo.job}")
    chosen: list[tuple[SnapshotRecord, list[str], list[Entry]]] = []
    missing = list(wanted)
    for record in candidates:
        if not missing:
            break
        with archive.entries(record, missing) as entries:
            matching = [e for e in entries if under(e, missing)]
        found = sorted({p for p in missing if any(under(e, [p]) for e in matching)})
        if found:
            selected = (
                matching if len(found) == len(missing) else [e for e in matching if under(e, found)]
            )
            chosen.append((record, found, selected))
            outcome.snapshots.update(dict.fromkeys(found, record.id))
        missing = [p for p in missing if p not in found]
    if missing:
        where = f"snapshot {candidates[0].id}" if at else "any snapshot"
        raise NoSnapshot(f"not in {where}: {', '.join(missing)} (try `muster find NAME`)")
    return chosen


class _Restorer:
    def __init__(
        self,
        archive: Archive,
        target: Sink,
        outcome: RestoreOutcome,
        progress: Progress | None,
        whole: bool,
    ) -> None:
        self._archive = archive
        self._target = target
        self._outcome = outcome
        self._progress = progress
        self._whole = whole
        self._keys = VolumeKeys(archive.repo, archive.identities)
        self._written = outcome.written
        self._lock = threading.Lock()  # the outcome's counts, from several threads

    def restore(self, entries: list[Entry], link_sources: list[Entry]) -> None:
        by_type: dict[str, list[Entry]] = defaultdict(list)
        for entry in entries:
            if self._guard(entry, components, entry.path):
                by_type[entry.type].append(entry)
        for entry in by_type[DIRECTORY]:
            self._guard(entry, self._target.directory, entry)
        files = {e.path: e for e in by_type[FILE]}
        sources = {e.path: e for e in link_sources}
        jobs = [(e, e) for e in files.values()]
        links = []
        for entry in by_type[HARDLINK]:
            if entry.link in files:
                links.append((entry, files[entry.link]))
            elif entry.link in sources:  # a lone link: restore the data it names, as a file
                source = sources[entry.link]
                copy = replace(entry, type=FILE, size=source.size, sha256=source.sha256)
                jobs.append((copy, source))
            else:
                self._outcome.errors.append(f"{entry.path}: hard link to missing {entry.link}")
        by_volume: dict[str, list[tuple[Entry, Entry]]] = defaultdict(list)
        for job in jobs:
            by_volume[job[1].location.volume].append(job)  # type: ignore[union-attr]
        self._restore_volumes(by_volume)
        for entry in by_type[SYMLINK]:
            self._guard(entry, self._target.symlink, entry)
        kept = [(entry, target) for entry, target in links if target.path not in self._written]
        for entry, target in links:
            if target.path in self._written:
                self._guard(entry, self._target.hardlink, entry, target)
        self._restore_copies(kept)

    def _restore_copies(self, links: list[tuple[Entry, Entry]]) -> None:
        """Links whose target was left as it is on disk get the backup's data as a copy,
        never a link to local content that differs from the backup."""
        by_volume: dict[str, list[tuple[Entry, Entry]]] = defaultdict(list)
        for entry, target in links:
            copy = replace(entry, type=FILE, size=target.size, sha256=target.sha256)
            by_volume[target.location.volume].append((copy, target))  # type: ignore[union-attr]
        self._restore_volumes(by_volume)

    def _restore_volumes(self, by_volume: dict[str, list[tuple[Entry, Entry]]]) -> None:
        """Volumes in parallel, each by one thread: they hold different files."""
        if len(by_volume) <= 1:
            for volume, jobs in by_volume.items():
                self._restore_volume(volume, jobs)
            return
        pool = ThreadPoolExecutor(min(WORKERS, len(by_volume)), "restore")
        try:
            for done in [pool.submit(self._restore_volume, *item) for item in by_volume.items()]:
                done.result()
        finally:  # on Ctrl-C, volumes not started yet are not started at all
            pool.shutdown(cancel_futures=True)

    def _restore_volume(self, volume: str, jobs: list[tuple[Entry, Entry]]) -> None:
        """Ranged reads when the files are a small part of the volume, else one stream."""
        size = self._archive.volume_sizes.get(volume) or self._volume_size(volume)
        spans = sum(source.location.span for _, source in jobs)  # type: ignore[union-attr]
        if not self._whole and 2 * spans < size:
            for dest, source in jobs:
                self._guard(dest, self._ranged, dest, source, size)
        else:
            self._guard(jobs[0][0], self._streamed, volume, jobs, size)

    def _volume_size(self, volume: str) -> int:
        """Volumes of forgotten snapshots that kept ones still use have no record left."""
        try:
            return self._archive.repo.size(volume)
        except NotFound:
            return 0  # streamed then, which reports the volume as missing

    def _ranged(self, dest: Entry, source: Entry, volume_size: int) -> None:
        stream = member_stream(self._archive.repo, self._keys, source, volume_size)
        self._write(dest, read_member(stream, source))

    def _streamed(self, volume: str, jobs: list[tuple[Entry, Entry]], size: int) -> None:
        pending: dict[bytes, list[tuple[Entry, Entry]]] = defaultdict(list)
        for dest, source in jobs:
            pending[member_name(source.path)].append((dest, source))
        members = stream_volume(
            self._archive.repo, volume, self._archive.identities, whole=self._whole
        )
        # Frames and age chunks stand alone: when the stream breaks on damage (restore, not
        # a restore test of the whole volume), the files not written yet, the one being
        # written included, are read each by its own range: only those whose chunks are
        # damaged fail.
        passing = () if self._whole else (CorruptVolume,)
        try:
            for member, reader in members:
                waiting = pending.pop(member.name, [])
                if not waiting:
                    if not pending and not self._whole:
                        return
                    continue
                first, *others = (dest for dest, _ in waiting)
                try:
                    blocks = member_data(reader, member, first)
                    self._guard(first, self._write, first, blocks, passing=passing)
                except CorruptVolume:
                    pending[member.name] = waiting
                    raise
                for other in others if first.path in self._written else []:
                    self._guard(other, self._target.hardlink, other, first)
                if not pending and not self._whole:
                    return
        except CorruptVolume:
            if not passing or not pending:
                raise
            for dest, source in (job for waiting in pending.values() for job in waiting):
                self._guard(dest, self._ranged, dest, source, size)
            return
        if not pending:
            return
        lost = ", ".join(dest.path for waiting in pending.values() for dest, _ in waiting)
        raise CorruptVolume(f"{volume}: ends without {lost}")

    def _write(self, entry: Entry, blocks: Iterable[Block]) -> None:
        if not self._target.file(entry, blocks):
            return  # left in place, as the overwrite policy said
        with self._lock:
            self._written.add(entry.path)
            self._outcome.files += 1
            self._outcome.bytes += entry.size
            if self._progress:
                self._progress(self._outcome.files, self._outcome.bytes)

    def _guard(
        self,
        entry: Entry,
        action: Callable[..., object],
        *args: object,
        passing: tuple[type[Exception], ...] = (),
    ) -> bool:
        """Run one step; a bad entry is reported (unless its error is one of `passing`,
        left to the caller), the restore goes on. True if it worked."""
        try:
            action(*args)
        except passing:
            raise
        except (CorruptVolume, ContentMismatch, UnsafePath) as error:
            self._outcome.errors.append(str(error))
        except OSError as error:
            self._outcome.errors.append(f"{entry.path}: {error.strerror or error}")
        else:
            return True
        return False
