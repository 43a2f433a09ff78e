"""`muster backup`: one snapshot of a job, full or incremental, in one streaming pass.

The walk is merged against the previous catalog (its local index, else the cached
catalog, else the catalog in storage): an entry whose size, times, inode and mode are
unchanged keeps its earlier line, copied byte for byte, and its data is not read at all.
Everything else is cut into volumes, contiguous ranges of the walk, each written by a
worker process (agent/workers.py: files read once, hashed, tar, zstd, age, upload) while
this process walks on; their catalog lines come back and are written in walk order. The
snapshot record is written last, once every volume is committed.
"""

import contextlib
import gc
import os
import stat
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import BinaryIO

from agent import age
from agent.catalog import TYPE_BITS, Entry, read_lines
from agent.members import Item, item
from agent.repository import Repository
from agent.state import (
    CatalogCache,
    ChunkedCompressor,
    Indexed,
    IndexWriter,
    fingerprint,
    indexed,
    read_index,
    stat_fingerprint,
)
from agent.tarheader import BLOCK
from agent.throttle import OpenWriter, Throttle, paced
from agent.volumes import HashingSink
from agent.walk import Walk
from agent.workers import FINISH, FLUSH, PART, Done, VolumeSettings, Workers
from broker.plan import Job
from broker.snapshot import (
    ObjectInfo,
    SnapshotRecord,
    SnapshotStats,
    VolumeInfo,
    catalog_name,
    new_snapshot_id,
    snapshot_of,
    volume_name,
)
from broker.types import utcnow

S_ISREG, S_ISDIR = stat.S_ISREG, stat.S_ISDIR

# Catalog lines held behind members not written yet (a few changed files amid unchanged
# ones keep one volume open for a long stretch of the walk): every BACKLOG of them, the
# open volume's worker is asked to write what it has and send its lines (the volume stays
# open) while the walk goes on; past HOLD_LIMIT (about 0.5 KiB each) the walk waits.
BACKLOG = 4096
HOLD_LIMIT = 4 * BACKLOG
MEMBERS_PER_VOLUME = 4096
PART_ITEMS, PART_BYTES = 1024, 16 << 20  # a volume goes to its worker in parts this size
# Lines written, at most, per entry the walk sends: a volume's 16k lines, written at once
# when its worker answers, kept the walk (and so the next volume's worker) waiting.
EMIT_STEP = 16
POLL = 0.2  # seconds between progress reports while the main process waits for workers
RUN = 256  # unchanged entries per run at most; progress is reported after each

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
    workers: int | None = None,
) -> BackupOutcome:
    """One snapshot; `workers` processes write its volumes (default: `default_workers`)."""
    with cache.writer_lock(), _frozen_heap():
        count = workers or default_workers()
        return _backup(job, repo, identity, cache, agent_version, progress, count)


@contextlib.contextmanager
def _frozen_heap() -> Iterator[None]:
    """No garbage collection while the run makes its objects, in this process and its
    workers: they form no cycles (tuples, lines, entries freed by reference count), yet
    a GiB of small files set off about 200 collections here, 0.13 s of the walk's time.
    What existed before (modules, the plan) is frozen: no worker's collection, after the
    run, writes to (so copies) the pages it shares with this process."""
    enabled = gc.isenabled()
    gc.disable()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        if enabled:
            gc.enable()


def _backup(
    job: Job,
    repo: Repository,
    identity: age.Identity,
    cache: CatalogCache,
    agent_version: str,
    progress: Progress | None,
    workers: int,
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
    run = _Run(job, repo, snapshot_id, recipients, cache, progress, workers)
    with contextlib.ExitStack() as stack:
        previous = iter(()) if full else _previous_entries(repo, parent, cache, identity, stack)
        catalog = run.execute(previous)
    finished = run.finished
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
        volumes=finished,
        references=_oldest_first(run.referenced - {v.name for v in finished}, history),
        recipients=[str(r) for r in recipients],
        stats=SnapshotStats(**run.tally, bytes_stored=catalog.size + sum(v.size for v in finished)),
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
            kind = TYPE_BITS[entry.type]
            stamp = fingerprint(
                kind | entry.mode, entry.size, entry.mtime_ns, entry.ctime_ns, entry.inode
            )
            yield indexed(entry.key, stamp, line, entry.location.volume)


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
    """A run of consecutive unchanged entries (their lines, their index records), written
    in two calls, or held back behind a stored entry whose frame is not written yet: one
    object per entry here cost about as much as the rest of a 1%-change backup's merge."""

    __slots__ = ("count", "lines", "records")

    def __init__(self, lines: list[bytes], records: list[bytes], count: int) -> None:
        self.lines = lines
        self.records = records
        self.count = count


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
        self._lines = ChunkedCompressor(1, _Tee(self._encryptor, self._local))
        self._index = IndexWriter(self._stack.enter_context(cache.open_index_temp(snapshot_id)))

    def write(self, line: bytes, key: bytes, stamp: bytes, volume: str) -> None:
        self._index.add(key, stamp, line, volume)
        self._lines.write(line)

    def reuse_held(self, held: _Held) -> None:
        """A run of unchanged entries: their previous lines and index records, as they were."""
        self._index.extend(held.records)
        self._lines.extend(held.lines)

    def close(self) -> ObjectInfo:
        self._lines.close()
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
    """A stored entry's catalog line, waiting for its worker to write the member (`done`)."""

    key: bytes
    stamp: bytes
    done: bool = False
    mode: int = 0  # what the walk saw of a stored entry, for the tally
    size: int = 0
    change: str = ""
    line: bytes | None = None  # None when done: it could not be stored (see warnings)
    volume: str = ""
    warnings: list[str] | None = None  # its worker's, about this entry and those before it


class _Volumes:
    """Cuts the entries to store into volumes, contiguous ranges of the walk so that the
    catalog stays sorted, and gives each to a free worker process, in parts as the walk
    finds them; fills in their lines as the workers answer. A volume ends past the target
    size, or after `MEMBERS_PER_VOLUME` members; a file bigger than the target gets a
    volume of its own.
    Each worker writes one volume at a time, so at most as many are in flight."""

    def __init__(
        self, workers: Workers, snapshot_id: str, target: int, on_wait: Callable[[], None]
    ) -> None:
        self._workers = workers
        self._snapshot_id = snapshot_id
        self._target = target
        self._on_wait = on_wait  # progress, while the main process waits for the workers
        self._number = 0  # of the open volume, or of the last one
        self._tar_bytes = 0  # of the open volume, estimated with 512-byte headers
        self._members = 0
        self._worker = 0  # the open volume's
        self._writing = [0] * workers.count  # the volume each worker writes, 0 for none
        self._items: list[Item] = []  # the open volume's, not sent yet
        self._slots: list[_Line] = []
        self._part_bytes = 0
        self._unanswered = False  # entries of the open volume that no answer will cover
        self._waiting: dict[int, deque[_Line]] = {}  # per volume: lines its worker owes
        self.finished: dict[int, VolumeInfo] = {}
        self.bytes_new = 0

    def add(self, entry: Item, slot: _Line) -> None:
        size = entry.size if stat.S_ISREG(entry.mode) else 0
        target = self._target
        if self._members and (
            self._tar_bytes >= target or size > target or self._members >= MEMBERS_PER_VOLUME
        ):
            self._send(FINISH)
        if not self._members:
            self._start_volume()
        self._items.append(entry)
        self._slots.append(slot)
        self._unanswered = True
        self._members += 1
        self._tar_bytes += BLOCK + size + -size % BLOCK
        self._part_bytes += size
        if size > target:
            self._send(FINISH)
        elif len(self._items) >= PART_ITEMS or self._part_bytes >= PART_BYTES:
            self._send(PART)
            self.collect()  # the lines written so far: a worker waits until they are read

    def flush(self) -> None:
        """Every entry added so far stored, and its line filled in."""
        self.request_flush()
        while self._workers.busy:
            self.wait()

    def request_flush(self) -> None:
        """Ask the open volume's worker for the lines of all it was sent, without waiting."""
        if self._members and self._unanswered:
            self._send(FLUSH)

    def collect(self) -> None:
        """Fill in the lines of the answers that have come, without waiting."""
        while (done := self._workers.receive(0)) is not None:
            self._fill(done)

    def finish(self) -> None:
        """The last volume sent, and every volume committed."""
        if self._members:
            self._send(FINISH)
        while self._workers.busy:
            self.wait()

    def _start_volume(self) -> None:
        """The next volume, on the first worker free (waiting for one if need be)."""
        while 0 not in self._writing:
            self.wait()
        self._number += 1
        self._worker = self._writing.index(0)
        self._writing[self._worker] = self._number

    def _send(self, mode: int) -> None:
        self._workers.send(self._worker, self._number, self._items, mode)
        self._waiting.setdefault(self._number, deque()).extend(self._slots)
        self._items, self._slots, self._part_bytes = [], [], 0
        self._unanswered = mode == PART
        if mode == FINISH:
            self._members, self._tar_bytes = 0, 0

    def wait(self) -> None:
        """Take one answer of a worker, if one comes within `POLL` seconds."""
        done = self._workers.receive(POLL)
        if done is not None:
            self._fill(done)
        self._on_wait()

    def _fill(self, done: Done) -> None:
        slots = self._waiting[done.number]
        name = volume_name(self._snapshot_id, done.number)
        slot = None
        for line in done.stored.lines:
            slot = slots.popleft()
            slot.line, slot.volume, slot.done = line, name, True
        if slot is not None and done.stored.warnings:
            slot.warnings = done.stored.warnings
        self.bytes_new += done.stored.bytes_new
        if done.info is not None:
            self.finished[done.number] = done.info
            del self._waiting[done.number]
            self._writing[done.worker] = 0


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
        workers: int,
    ) -> None:
        self.job = job
        self.repo = repo
        self.snapshot_id = snapshot_id
        self.recipients = recipients
        self.cache = cache
        self.progress = progress
        self.worker_count = workers
        self.tally: Counter[str] = Counter()  # becomes the record's SnapshotStats
        self.warnings: list[str] = []
        self.referenced: set[str] = set()
        self.volumes: _Volumes
        self._workers: Workers
        self._ordered: deque[_Line | _Held] = deque()
        self._held = 0  # unchanged entries in `_ordered`
        self._since_check = 0  # entries held since the open volume's worker was last asked
        self._unchanged = [0, 0, 0]  # files, their bytes, directories

    @property
    def finished(self) -> list[VolumeInfo]:
        """The volumes written, in order."""
        return [info for _, info in sorted(self.volumes.finished.items())]

    def execute(self, previous: Iterator[Indexed]) -> ObjectInfo:
        sources = self.job.sources
        walk = Walk(sources.paths, sources.excludes, sources.one_file_system)
        open_writer: OpenWriter = self.repo.open_writer
        if self.job.bandwidth_limit:
            open_writer = paced(open_writer, Throttle(int(self.job.bandwidth_limit)))
        settings = VolumeSettings(
            open_writer,
            self.snapshot_id,
            self.recipients,
            level=self.job.compression_level,
            target_size=self.job.volume_size,
            reconnect=self.repo.storage.reconnect,
        )
        with Workers(self.worker_count, settings) as self._workers:
            self.volumes = _Volumes(
                self._workers, self.snapshot_id, self.job.volume_size, self._report
            )
            catalog = _Catalog(open_writer, self.snapshot_id, self.recipients, self.cache)
            try:
                self._walk(walk, _Previous(previous), catalog)
                info = catalog.close()
            except BaseException as error:
                catalog.abort(error)
                self.cache.discard(self.snapshot_id)
                raise
        self.warnings[:0] = walk.warnings
        return info

    def _walk(self, walk: Walk, previous: _Previous, catalog: _Catalog) -> None:
        """Merge the walk with the previous catalog. Unchanged entries are gathered in runs
        (their lines and records, as they are) right here: a call or two per entry (to
        write it, or to hold it behind a stored one) cost about 10% of a no-change
        backup's walk."""
        find, referenced, volumes = previous.find, self.referenced, self.volumes
        lines: list[bytes] = []
        records: list[bytes] = []
        count = 0
        limit = min(RUN, BACKLOG)
        files = size = directories = 0  # unchanged ones, kept in locals for speed
        for found in walk:  # names bound once: this loop runs for every entry
            info = found.stat
            before = find(found.key)
            stamp = stat_fingerprint(info)
            if before is not None and before.fingerprint == stamp:
                lines.append(before.line)  # its line and record, as they were: not decoded
                records.append(before.record)
                referenced.add(before.volume)
                mode = info.st_mode
                if S_ISREG(mode):
                    files += 1
                    size += info.st_size
                elif S_ISDIR(mode):
                    directories += 1
                count += 1
                if count == limit:
                    self._end_run(_Held(lines, records, count), [files, size, directories], catalog)
                    lines, records, count = [], [], 0
                continue
            if count:
                self._end_run(_Held(lines, records, count), [files, size, directories], catalog)
                lines, records, count = [], [], 0
            change = "new" if before is None else "changed"
            slot = _Line(found.key, stamp, mode=info.st_mode, size=info.st_size, change=change)
            self._ordered.append(slot)
            volumes.add(item(found.path, info), slot)
            self._emit_located(catalog, EMIT_STEP)
        if count:
            self._end_run(_Held(lines, records, count), [files, size, directories], catalog)
        volumes.finish()
        self._report()  # with all that the workers read
        self._emit_located(catalog)
        self._tally_unchanged()
        self.tally["bytes_new"] += volumes.bytes_new

    def _end_run(self, run: _Held, unchanged: list[int], catalog: _Catalog) -> None:
        """Write a run of unchanged entries, or queue it behind the stored entries whose
        workers have not answered; every `BACKLOG` entries queued, ask the open volume's
        worker for its lines, and past `HOLD_LIMIT` wait for them. `unchanged`: the files,
        their bytes and the directories so far, for the tally and progress."""
        self._unchanged = unchanged
        self._report()
        if not self._ordered:
            catalog.reuse_held(run)
            return
        self._ordered.append(run)
        self._held += run.count
        self._since_check += run.count
        if self._since_check >= BACKLOG:
            self._since_check = 0
            volumes = self.volumes
            volumes.request_flush()  # a volume's part sent early costs less than the wait
            volumes.collect()
            self._emit_located(catalog)
            if self._held >= HOLD_LIMIT:
                volumes.flush()
                self._emit_located(catalog)

    def _emit_located(self, catalog: _Catalog, limit: int = -1) -> None:
        """Catalog lines leave in walk order, each once its member is written; at most
        `limit` of them (if given; a run of held entries counts as one), so that the walk
        goes on feeding the workers."""
        ordered = self._ordered
        while limit and ordered:
            head = ordered[0]
            if isinstance(head, _Held):
                catalog.reuse_held(head)
                self._held -= head.count
            elif not head.done:
                return
            else:
                if head.warnings:
                    self.warnings += head.warnings
                if head.line is not None:
                    catalog.write(head.line, head.key, head.stamp, head.volume)
                    self.referenced.add(head.volume)
                    self._count(head)
            ordered.popleft()
            limit -= 1

    def _tally_unchanged(self) -> None:
        files, size, directories = self._unchanged
        self.tally.update(files=files, bytes=size, files_unchanged=files, directories=directories)

    def _count(self, stored: _Line) -> None:
        if stat.S_ISDIR(stored.mode):
            self.tally["directories"] += 1
        elif stat.S_ISREG(stored.mode):
            self.tally["files"] += 1
            self.tally["bytes"] += stored.size
            self.tally[f"files_{stored.change}"] += 1

    def _report(self) -> None:
        """Progress: files and bytes unchanged here, plus what the workers have read."""
        if self.progress:
            files, size = self._workers.progress()
            self.progress(self._unchanged[0] + files, self._unchanged[1] + size)


def default_workers() -> int:
    """`MUSTER_BACKUP_WORKERS`, else one worker process per core this process may use
    (so `CPUAffinity=` or `taskset` also bounds a backup's processes, and their memory)."""
    configured = os.environ.get("MUSTER_BACKUP_WORKERS", "").strip()
    if not configured:
        return max(1, len(os.sched_getaffinity(0)))
    if not configured.isdigit() or int(configured) < 1:
        raise ValueError(
            f"MUSTER_BACKUP_WORKERS={configured!r}: set a number of worker processes, "
            "1 or more, or unset it for one per core"
        )
    return int(configured)
