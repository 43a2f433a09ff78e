"""`muster backup`: one snapshot of a job, full or incremental, in one streaming pass.

The walk is merged against the previous catalog (its local index, else the cached
catalog, else the catalog in storage): an entry whose size, times, inode and mode are
unchanged keeps its earlier line, copied byte for byte, and its data is not read at all.
Everything else is read once, hashed and appended to the current volume. The snapshot
record is written last.
"""

import contextlib
import grp
import os
import pwd
import stat
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import BinaryIO

from agent import age
from agent.catalog import DIRECTORY, FILE, HARDLINK, SYMLINK, Entry, encode_line, read_lines
from agent.repository import Repository
from agent.state import (
    CatalogCache,
    Indexed,
    IndexWriter,
    background_compressor,
    fingerprint,
    indexed,
    read_index,
    stat_fingerprint,
)
from agent.tarheader import DIRECTORY as TAR_DIRECTORY
from agent.tarheader import HARDLINK as TAR_HARDLINK
from agent.tarheader import REGULAR, member_header
from agent.tarheader import SYMLINK as TAR_SYMLINK
from agent.throttle import OpenWriter, Throttle, paced
from agent.volumes import HashingSink, VolumeWriter, open_for_reading
from agent.walk import Found, Walk
from broker.plan import Job
from broker.snapshot import (
    ObjectInfo,
    SnapshotRecord,
    SnapshotStats,
    catalog_name,
    new_snapshot_id,
    snapshot_of,
)
from broker.types import utcnow

# Catalog lines held back, at most, behind a member whose frame is not written yet: a few
# changed files amid unchanged ones would otherwise keep one frame open for a long
# stretch of the walk and hold every line after them (about 1 KiB each) in memory.
BACKLOG = 4096

Progress = Callable[[int, int], None]  # (files done, bytes of files done or being read)


@dataclass
class BackupOutcome:
    record: SnapshotRecord
    warnings: list[str] = field(default_factory=list)


def recipients_for(job: Job, identity: age.Identity) -> list[age.Recipient]:
    """The node's own key first, then every escrow holder of the plan."""
    found = [identity.recipient]
    for text in job.recipients:
        recipient = age.Recipient.parse(text)
        if recipient not in found:
            found.append(recipient)
    return found


def run_backup(
    job: Job,
    repo: Repository,
    identity: age.Identity,
    cache: CatalogCache,
    agent_version: str,
    progress: Progress | None = None,
) -> BackupOutcome:
    with cache.writer_lock():
        return _backup(job, repo, identity, cache, agent_version, progress)


def _backup(
    job: Job,
    repo: Repository,
    identity: age.Identity,
    cache: CatalogCache,
    agent_version: str,
    progress: Progress | None,
) -> BackupOutcome:
    for leftover in repo.leftovers():  # an interrupted run's objects: never visible, now gone
        repo.delete(leftover)
    history = repo.snapshots()
    parent = history[-1] if history else None
    full = parent is None or parent.chain + 1 >= job.full_every
    started = utcnow()
    if parent is not None and started <= parent.started:  # a clock that stepped back
        started = parent.started + timedelta(microseconds=1)
    snapshot_id = new_snapshot_id(started)
    recipients = recipients_for(job, identity)
    run = _Run(job, repo, snapshot_id, recipients, cache, progress)
    with contextlib.ExitStack() as stack:
        previous = iter(()) if full else _previous_entries(repo, parent, cache, identity, stack)
        catalog = run.execute(previous)
    record = SnapshotRecord(
        id=snapshot_id,
        node=repo.node,
        job=repo.job,
        started=started,
        finished=utcnow(),
        full=full,
        parent=parent.id if parent else None,
        chain=0 if full or parent is None else parent.chain + 1,
        paths=list(job.sources.paths),
        catalog=catalog,
        volumes=run.volumes.finished,
        references=_oldest_first(run.referenced - {v.name for v in run.volumes.finished}, history),
        recipients=[str(r) for r in recipients],
        stats=SnapshotStats(
            **run.tally, bytes_stored=catalog.size + sum(v.size for v in run.volumes.finished)
        ),
        agent_version=agent_version,
    )
    repo.commit(record)
    cache.commit(snapshot_id)
    return BackupOutcome(record, run.warnings)


def _oldest_first(volumes: set[str], history: list[SnapshotRecord]) -> list[str]:
    """References in the order their snapshots were taken, so that extracting them in
    record order leaves the newest version of each file (volumes of forgotten snapshots,
    which have no record left, are older than every record)."""
    started = {record.id: record.started for record in history}
    oldest = datetime.min.replace(tzinfo=UTC)
    return sorted(volumes, key=lambda name: (started.get(snapshot_of(name) or "", oldest), name))


def _previous_entries(
    repo: Repository,
    parent: SnapshotRecord,
    cache: CatalogCache,
    identity: age.Identity,
    stack: contextlib.ExitStack,
) -> Iterator[Indexed]:
    """The parent's entries: from the local index when this node wrote one, else decoded
    from the cached catalog, else from the catalog in storage."""
    index = cache.index(parent.id)
    if index is not None:
        records = read_index(stack.enter_context(index.open("rb")))
        if records is not None:
            return records
    cached = cache.path(parent.id)
    if cached is not None:
        return _indexed(read_lines(stack.enter_context(cached.open("rb"))))
    encrypted = stack.enter_context(repo.get(catalog_name(parent.id)))
    return _indexed(read_lines(stack.enter_context(age.Decryptor(encrypted, [identity]))))


def _indexed(lines: Iterator[tuple[Entry, bytes]]) -> Iterator[Indexed]:
    """Catalog lines as index records; an entry without a location never matches."""
    for entry, line in lines:
        if entry.location is not None:
            kind = _MODE_TYPES[entry.type]
            stamp = fingerprint(
                kind | entry.mode, entry.size, entry.mtime_ns, entry.ctime_ns, entry.inode
            )
            yield indexed(entry.key, stamp, line, entry.location.volume)


_MODE_TYPES = {
    FILE: stat.S_IFREG,
    HARDLINK: stat.S_IFREG,  # a second name of a regular file: the walk sees a file
    DIRECTORY: stat.S_IFDIR,
    SYMLINK: stat.S_IFLNK,
}


class _Previous:
    """The previous catalog as a stream of index records, advanced in step with the walk."""

    def __init__(self, records: Iterator[Indexed]) -> None:
        self._records = records
        self._next = next(records, None)

    def find(self, key: bytes) -> Indexed | None:
        current = self._next
        while current is not None and current.key < key:
            current = next(self._records, None)
        self._next = current
        return current if current is not None and current.key == key else None


class _Held:
    """Unchanged entries held back behind a stored one whose frame is not written yet,
    gathered as bytes (their lines, their index records) and written in two calls: one
    object per entry here cost about as much as the rest of a 1%-change backup's merge."""

    __slots__ = ("count", "lines", "records")

    def __init__(self) -> None:
        self.lines = bytearray()
        self.records = bytearray()
        self.count = 0


class _Catalog:
    """The catalog being written: age-encrypted to storage, plain to the local cache,
    and as an index (key, fingerprint, line) next to it for the next run."""

    def __init__(
        self,
        open_writer: OpenWriter,
        snapshot_id: str,
        recipients: list[age.Recipient],
        cache: CatalogCache,
    ) -> None:
        self._stack = contextlib.ExitStack()
        self._name = catalog_name(snapshot_id)
        self._sink = HashingSink(self._stack.enter_context(open_writer(self._name)))
        self._encryptor = age.Encryptor(self._sink, recipients)
        self._local = self._stack.enter_context(cache.open_temp(snapshot_id))
        # Level 1: the catalog is rewritten whole on every run, and on catalog text level 1
        # costs about half the CPU of level 3 and comes out smaller (1 MiB jobs).
        self._zstd = background_compressor(1).stream_writer(
            _Tee(self._encryptor, self._local), closefd=False
        )
        self._index = IndexWriter(self._stack.enter_context(cache.open_index_temp(snapshot_id)))
        self._lines = bytearray()

    def write(self, line: bytes, key: bytes, stamp: bytes, volume: str) -> None:
        self._index.add(key, stamp, line, volume)
        self._add(line)

    def reuse(self, before: Indexed) -> None:
        """An unchanged entry: its previous line and index record, copied as they were."""
        self._index.copy(before.record)
        self._add(before.line)

    def reuse_held(self, held: _Held) -> None:
        """A run of unchanged entries, as `reuse` would write them one by one."""
        self._index.copy(held.records)
        self._add(held.lines)

    def _add(self, line: bytes | bytearray) -> None:
        self._lines += line
        if len(self._lines) >= 1 << 18:  # one compressor call per 256 KiB, not per line
            self._zstd.write(self._lines)
            self._lines.clear()

    def close(self) -> ObjectInfo:
        self._zstd.write(self._lines)
        self._zstd.close()
        self._encryptor.close()
        self._local.flush()
        os.fsync(self._local.fileno())
        self._index.close()
        self._stack.close()
        return ObjectInfo(
            name=self._name, size=self._sink.size, sha256=self._sink.sha256.hexdigest()
        )

    def abort(self, error: BaseException) -> None:
        self._stack.__exit__(type(error), error, error.__traceback__)


class _Tee:
    def __init__(self, *sinks: BinaryIO | age.Encryptor) -> None:
        self._sinks = sinks

    def write(self, data: bytes) -> int:
        for sink in self._sinks:
            sink.write(data)
        return len(data)


@dataclass(slots=True)
class _Line:
    """A stored entry's catalog line, encoded once its member has a location."""

    entry: Entry
    key: bytes
    stamp: bytes


class _Run:
    """The state of one backup run: the walk, the volumes, the catalog and the tallies."""

    def __init__(
        self,
        job: Job,
        repo: Repository,
        snapshot_id: str,
        recipients: list[age.Recipient],
        cache: CatalogCache,
        progress: Progress | None,
    ) -> None:
        self.job = job
        self.repo = repo
        self.snapshot_id = snapshot_id
        self.recipients = recipients
        self.cache = cache
        self.progress = progress
        self.tally: Counter[str] = Counter()  # becomes the record's SnapshotStats
        self.warnings: list[str] = []
        self.referenced: set[str] = set()
        self.volumes: VolumeWriter
        self._ordered: deque[_Line | _Held] = deque()
        self._held = 0  # unchanged entries in `_ordered`
        self._links: dict[tuple[int, int], tuple[Entry, int]] = {}
        self._files_done = 0
        self._bytes_done = 0
        self._unchanged = [0, 0, 0]  # files, their bytes, directories

    def execute(self, previous: Iterator[Indexed]) -> ObjectInfo:
        sources = self.job.sources
        walk = Walk(sources.paths, sources.excludes, sources.one_file_system)
        open_writer: OpenWriter = self.repo.open_writer
        if self.job.bandwidth_limit:
            open_writer = paced(open_writer, Throttle(int(self.job.bandwidth_limit)))
        with (
            ThreadPoolExecutor(max_workers=2, thread_name_prefix="zstd") as pool,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="volume-writer") as writer,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="hasher") as hasher,
        ):
            self.volumes = VolumeWriter(
                open_writer,
                self.snapshot_id,
                self.recipients,
                level=self.job.compression_level,
                target_size=self.job.volume_size,
                pool=pool,
                writer=writer,
                hasher=hasher,
                on_read=self._read,
            )
            catalog = _Catalog(open_writer, self.snapshot_id, self.recipients, self.cache)
            try:
                self._walk(walk, _Previous(previous), catalog)
                info = catalog.close()
            except BaseException as error:
                self.volumes.abort(error)
                catalog.abort(error)
                self.cache.discard(self.snapshot_id)
                raise
        self.warnings[:0] = walk.warnings
        return info

    def _walk(self, walk: Walk, previous: _Previous, catalog: _Catalog) -> None:
        ordered, find, referenced = self._ordered, previous.find, self.referenced
        for found in walk:  # names bound once: this loop runs for every entry
            before = find(found.key)
            stamp = stat_fingerprint(found.stat)
            if before is not None and before.fingerprint == stamp:
                self._count_unchanged(found.stat)  # its line, as it was: nothing decoded
                referenced.add(before.volume)
                if ordered:
                    self._hold(before, catalog)
                else:
                    catalog.reuse(before)
                continue
            entry = _entry(found)
            if self._store(entry, found):
                self._count(entry, "new" if before is None else "changed")
                ordered.append(_Line(entry, found.key, stamp))
                self._emit_located(catalog)
        self.volumes.finish_volume()
        self._emit_located(catalog)
        self._tally_unchanged()

    def _hold(self, before: Indexed, catalog: _Catalog) -> None:
        """Queue an unchanged entry behind the stored ones still waiting for a location."""
        tail = self._ordered[-1]
        if not isinstance(tail, _Held):
            tail = _Held()
            self._ordered.append(tail)
        tail.lines += before.line
        tail.records += before.record
        tail.count += 1
        self._held += 1
        if self._held >= BACKLOG:
            self.volumes.flush()  # a frame cut early costs less than the wait
            self._emit_located(catalog)

    def _emit_located(self, catalog: _Catalog) -> None:
        """Catalog lines leave in walk order, each once its member has a location."""
        ordered = self._ordered
        while ordered:
            head = ordered[0]
            if isinstance(head, _Held):
                catalog.reuse_held(head)
                self._held -= head.count
            else:
                where = head.entry.location
                if where is None:
                    return
                catalog.write(encode_line(head.entry), head.key, head.stamp, where.volume)
                self.referenced.add(where.volume)
            ordered.popleft()

    def _count_unchanged(self, info: os.stat_result) -> None:
        """Plain counters, added to the tally once at the end: this runs for every
        unchanged entry, the whole of a no-change backup."""
        mode = info.st_mode
        if stat.S_ISREG(mode):
            self._unchanged[0] += 1
            self._unchanged[1] += info.st_size
            self._files_done += 1
            self._bytes_done += info.st_size
            if self.progress:
                self._report()
        elif stat.S_ISDIR(mode):
            self._unchanged[2] += 1

    def _tally_unchanged(self) -> None:
        files, size, directories = self._unchanged
        self.tally.update(files=files, bytes=size, files_unchanged=files, directories=directories)

    def _count(self, entry: Entry, change: str) -> None:
        if entry.type == DIRECTORY:
            self.tally["directories"] += 1
        elif entry.type in (FILE, HARDLINK):
            self.tally["files"] += 1
            self.tally["bytes"] += entry.size
            self.tally[f"files_{change}"] += 1
            self._files_done += 1
            self._report()

    def _read(self, count: int) -> None:
        self._bytes_done += count
        self._report()

    def _report(self) -> None:
        if self.progress:
            self.progress(self._files_done, self._bytes_done)

    def _store(self, entry: Entry, found: Found) -> bool:
        """Append the entry's member to the current volume; False if it cannot be read."""
        name = _member_name(entry)
        owner = {
            "mode": entry.mode,
            "uid": entry.uid,
            "gid": entry.gid,
            "mtime": entry.mtime_ns // 10**9,
            "uname": entry.user,
            "gname": entry.group,
        }
        if entry.type == DIRECTORY:
            self.volumes.add(entry, member_header(name + b"/", TAR_DIRECTORY, **owner))
        elif entry.type == SYMLINK:
            try:
                entry.link = os.readlink(entry.path)
            except OSError as error:
                return self._warn(f"{entry.path}: cannot read link: {error.strerror}")
            link = entry.link.encode("utf-8", "surrogateescape")
            self.volumes.add(entry, member_header(name, TAR_SYMLINK, linkname=link, **owner))
        elif not self._store_hardlink(entry, found, name, owner):
            return self._store_file(entry, found, name, owner)
        return True

    def _store_hardlink(self, entry: Entry, found: Found, name: bytes, owner: dict) -> bool:
        """A second name of a file already in this volume becomes a tar hardlink member."""
        if found.stat.st_nlink < 2:
            return False
        first = self._links.get((found.stat.st_dev, found.stat.st_ino))
        # 0 means no open volume: the first name was closed into a volume of its own
        in_this_volume = (
            first is not None and first[1] != 0 and first[1] == (self.volumes.volume_number)
        )
        if not in_this_volume or self.volumes.is_full:
            return False
        target = first[0]
        if target.location is None:  # rare: wait for its frames, whose hashing sets its sha256
            self.volumes.flush()
        if target.sha256 is None:  # it shrank while being read: store this name in full
            return False
        entry.type, entry.link, entry.sha256 = HARDLINK, target.path, target.sha256
        header = member_header(name, TAR_HARDLINK, linkname=_member_name(target), **owner)
        self.volumes.add(entry, header)
        return True

    def _store_file(self, entry: Entry, found: Found, name: bytes, owner: dict) -> bool:
        try:
            fd = open_for_reading(entry.path)
        except FileNotFoundError:
            return self._warn(f"{entry.path}: vanished before it could be read")
        except OSError as error:
            return self._warn(f"{entry.path}: not backed up: {error.strerror}")
        try:
            header = member_header(name, REGULAR, size=entry.size, **owner)
            self.warnings += self.volumes.add(entry, header, fd)
            after = os.fstat(fd)
        finally:
            os.close(fd)
        if (after.st_size, after.st_mtime_ns) != (entry.size, entry.mtime_ns):
            self.warnings.append(f"{entry.path}: changed while being read")
        if found.stat.st_nlink > 1:
            self._links[(found.stat.st_dev, found.stat.st_ino)] = (
                entry,
                self.volumes.volume_number,
            )
        self.tally["bytes_new"] += entry.size
        return True

    def _warn(self, message: str) -> bool:
        self.warnings.append(message)
        return False


def _entry(found: Found) -> Entry:
    info = found.stat
    kind = (
        DIRECTORY if stat.S_ISDIR(info.st_mode) else SYMLINK if stat.S_ISLNK(info.st_mode) else FILE
    )
    return Entry(
        path=found.path,
        type=kind,
        mode=stat.S_IMODE(info.st_mode),
        uid=info.st_uid,
        gid=info.st_gid,
        user=_user(info.st_uid),
        group=_group(info.st_gid),
        mtime_ns=info.st_mtime_ns,
        ctime_ns=info.st_ctime_ns,
        inode=info.st_ino,
        size=info.st_size if kind == FILE else 0,
    )


def _member_name(entry: Entry) -> bytes:
    """Relative names, as GNU tar writes them: extraction lands under the current dir."""
    return entry.path.lstrip("/").encode("utf-8", "surrogateescape") or b"."


@lru_cache(maxsize=1024)
def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return ""


@lru_cache(maxsize=1024)
def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return ""
