"""`muster verify`: a restore test, through the very code that restores.

A sample of a snapshot's files is restored with `run_restore` into a temporary directory
(strict, overwriting): the same fetch, decryption, decompression, tar reading and sha256
check against the catalog as a real restore, so a verify that passes means a restore of
those files would have worked. Only the catalog that `run_restore` reads is narrowed to the
chosen entries, so picking files costs one catalog pass, not one per file.

Sampling rotates. A small JSON file per repository job in the state directory remembers
when each volume last passed a test; volumes never tested (or failed since) come first,
then the least recently tested. `sample` files are spread over as many of those volumes as
possible, one volume at a time, so that over successive runs every volume is tested. A
volume that holds no file data (only directories, say) is checked by its stored bytes
instead. Before its files are restored, each chosen volume's stored size is compared with
its record, so a truncated volume fails even where the sampled file lies before the cut.

`all` reads every volume the snapshot uses once, through the same `run_restore` (the same
fetch, decryption, decompression, tar reading and sha256 check of every file against the
catalog, volumes in parallel), with a sink that hashes each file instead of writing it: no
scratch space, and no second download. The same pass hashes the stored bytes, checked
against the size and sha256 of the record that wrote the volume (a volume whose record was
forgotten is authenticated whole by age instead). Volumes are taken in batches, so that
the entries held in memory stay bounded.

A failure names the volume and the files it affects: a missing volume, one whose size or
sha256 differs from its record, or files that did not restore. `max_duration` stops
picking more volumes once the time is spent; the outcome says that it stopped.
"""

import contextlib
import hashlib
import io
import json
import os
import random
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from agent import age
from agent.actions.restore import RestoreOutcome, run_restore
from agent.archive import Archive, NoSnapshot
from agent.catalog import FILE, HARDLINK, Entry
from agent.extract import Block, ContentMismatch, Sink, components
from agent.repository import Repository
from agent.storage import NotFound, StorageError
from broker.plan import RestoreTest
from broker.snapshot import SnapshotRecord, VolumeInfo

DEFAULT_SAMPLE = RestoreTest().sample
ALL_BATCH_BYTES = 2 << 30  # logical file bytes checked by one `run_restore` call
ALL_BATCH_FILES = 50_000  # and at most this many files (their entries stay in memory)
NAMED_FILES = 50  # files named in one failure message; `failed_files` has them all
READ_SIZE = 1 << 20


@dataclass
class VerifyOutcome:
    snapshot: str
    files_checked: int = 0
    files_failed: int = 0
    failures: list[str] = field(default_factory=list)
    volumes_tested: list[str] = field(default_factory=list)
    coverage: float = 0.0
    duration: float = 0.0
    stopped: bool = False  # max_duration was spent before everything chosen was tested
    bytes_checked: int = 0
    failed_files: dict[str, list[str]] = field(default_factory=dict)  # volume -> paths

    @property
    def ok(self) -> bool:
        return not self.failures


# -- coverage state ----------------------------------------------------------------------


class Coverage:
    """When each volume of one repository job last passed a test (ISO times, UTC)."""

    def __init__(self, state_dir: Path, repository_key: str) -> None:
        digest = hashlib.sha256(repository_key.encode()).hexdigest()[:24]
        self.path = state_dir / "verify" / f"{digest}.json"
        self._key = repository_key
        self.tested: dict[str, str] = {}
        with contextlib.suppress(FileNotFoundError, ValueError, AttributeError):
            data = json.loads(self.path.read_text())
            self.tested = {str(k): str(v) for k, v in data.get("volumes", {}).items()}

    def order(self, volumes: Iterable[str]) -> list[str]:
        """Never tested (or failed since) first, then least recently tested."""
        return sorted(volumes, key=lambda v: (v in self.tested, self.tested.get(v, ""), v))

    def passed(self, volume: str, when: datetime) -> None:
        self.tested[volume] = when.astimezone(UTC).isoformat(timespec="seconds")

    def failed(self, volume: str) -> None:
        self.tested.pop(volume, None)

    def fraction(self, volumes: set[str]) -> float:
        return sum(v in self.tested for v in volumes) / len(volumes) if volumes else 1.0

    def save(self, known: set[str]) -> None:
        """Write atomically, forgetting volumes that no snapshot uses any more."""
        self.tested = {v: t for v, t in sorted(self.tested.items()) if v in known}
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        body = json.dumps({"repository": self._key, "volumes": self.tested}, indent=1)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(body + "\n")
        temp.replace(self.path)


def default_repository_key(repo: Repository) -> str:
    """Names the coverage file when the caller passes no key (the CLI passes the same key
    as the catalog cache's)."""
    storage = repo.storage
    where = next(
        (str(v) for a in ("directory", "container", "bucket") if (v := getattr(storage, a, None))),
        "",
    )
    return f"{type(storage).__name__}:{where}/{storage.root}#{repo.node}/{repo.job}"


# -- the archive run_restore sees -----------------------------------------------------------

EntrySource = Callable[[SnapshotRecord], AbstractContextManager[Iterator[Entry]]]


class _Narrowed(Archive):
    """The archive, with the catalog of the snapshot under test narrowed to chosen entries.
    Everything else (records, keys, volume sizes, fetching) is the real archive's."""

    def __init__(self, base: Archive, source: EntrySource, repo: Repository | None = None) -> None:
        super().__init__(repo or base.repo, base.identities)
        self._base = base
        self._source = source
        self.seen: dict[str, Entry] = {}  # every regular file handed out, by path

    @property  # type: ignore[override]
    def records(self) -> list[SnapshotRecord]:
        return self._base.records

    @property  # type: ignore[override]
    def volume_sizes(self) -> dict[str, int]:
        return self._base.volume_sizes

    @contextlib.contextmanager
    def entries(
        self, record: SnapshotRecord, paths: list[str] | None = None
    ) -> Iterator[Iterator[Entry]]:
        with self._source(record) as entries:
            yield self._note(entries)

    def _note(self, entries: Iterator[Entry]) -> Iterator[Entry]:
        for entry in entries:
            if entry.type == FILE:
                self.seen.setdefault(entry.path, entry)
            yield entry


def _restore(
    archive: _Narrowed, record: SnapshotRecord, root: Path, sink: Sink | None
) -> RestoreOutcome:
    """Restore everything the narrowed catalog holds, as `muster restore / --to` would;
    with a sink, every volume is read whole, into the sink."""
    return run_restore(
        archive,
        ["/"],
        root,
        at=record.id,
        overwrite=lambda _: True,
        strict=True,
        sink=sink,
        whole=sink is not None,
    )


class _Checker:
    """A restore sink that hashes each file instead of writing it; the paths are still
    checked as a restore checks them. `run_restore` counts a file as written only when
    `file` returns, that is when its sha256 matched the catalog."""

    def directory(self, entry: Entry) -> None:
        components(entry.path)

    def file(self, entry: Entry, blocks: Iterable[Block]) -> bool:
        components(entry.path)
        digest = hashlib.sha256()
        for block in blocks:
            digest.update(block)
        if entry.sha256 and digest.hexdigest() != entry.sha256:
            raise ContentMismatch(f"{entry.path}: content does not match the catalog's sha256")
        return True

    def symlink(self, entry: Entry) -> None:
        components(entry.path)

    def hardlink(self, entry: Entry, target: Entry) -> None:
        components(entry.path)

    def finish(self) -> None:
        pass


Stored = Callable[[str, str, int], None]  # (volume, sha256 of its bytes, size)


class _HashedReads:
    """The repository, with each whole-object read hashed as it streams: verify checks a
    volume's stored bytes in the same pass that restores its files."""

    def __init__(self, repo: Repository, stored: Stored) -> None:
        self._repo = repo
        self._stored = stored

    def __getattr__(self, name: str) -> object:
        return getattr(self._repo, name)

    def get(self, name: str) -> io.RawIOBase:
        return _HashingReader(self._repo.get(name), lambda sha, size: self._stored(name, sha, size))


class _HashingReader(io.RawIOBase):
    """Hashes what is read; on close, reads what is left (a restore stopped by damage
    still learns whether the stored bytes match their record) and reports the digest."""

    def __init__(self, inner: BinaryIO, done: Callable[[str, int], None]) -> None:
        super().__init__()
        self._inner = inner
        self._done = done
        self._digest = hashlib.sha256()
        self._size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        readinto = getattr(self._inner, "readinto", None)
        if readinto is not None:
            count = readinto(view) or 0
        else:
            data = self._inner.read(len(view))
            count = len(data)
            view[:count] = data
        self._digest.update(view[:count])
        self._size += count
        return count

    def close(self) -> None:
        if self.closed:
            return
        try:
            with contextlib.suppress(OSError, StorageError):  # the read itself reported it
                while block := self._inner.read(READ_SIZE):
                    self._digest.update(block)
                    self._size += len(block)
                self._done(self._digest.hexdigest(), self._size)
        finally:
            self._inner.close()
            super().close()


def _testable(entry: Entry) -> bool:
    return (
        entry.type == FILE and entry.size > 0 and entry.sha256 is not None and bool(entry.location)
    )


# -- one run -------------------------------------------------------------------------------


class _Verify:
    def __init__(
        self,
        archive: Archive,
        record: SnapshotRecord,
        coverage: Coverage,
        max_duration: float | None,
        now: datetime,
        scratch: Path | None,
    ) -> None:
        self.archive = archive
        self.repo = archive.repo
        self.record = record
        self.coverage = coverage
        self.max_duration = max_duration
        self.now = now
        self.scratch = scratch
        self.began = time.monotonic()
        self.outcome = VerifyOutcome(snapshot=record.id)
        self.volumes = record.all_volumes()
        self.infos: dict[str, VolumeInfo] = {
            v.name: v for r in archive.records for v in r.volumes if v.name in self.volumes
        }
        self.problems: dict[str, list[str]] = defaultdict(list)  # volume -> what is wrong
        self.failed: dict[str, set[str]] = defaultdict(set)  # volume -> files affected
        self.loose: list[str] = []  # errors that name no volume we could tell

    # -- time --------------------------------------------------------------------------

    def out_of_time(self) -> bool:
        if self.max_duration is None:
            return False
        if time.monotonic() - self.began >= self.max_duration:
            self.outcome.stopped = True
        return self.outcome.stopped

    # -- volume-level checks -----------------------------------------------------------

    def check_stored_size(self, volume: str) -> bool:
        """A HEAD: False when the volume is missing (then nothing of it can be restored)."""
        try:
            size = self.repo.size(volume)
        except NotFound:
            self.problems[volume].append("missing from storage")
            return False
        info = self.infos.get(volume)
        if info is not None and size != info.size:
            how = "truncated" if size < info.size else "longer than written"
            self.problems[volume].append(f"{how}: {size} bytes stored, the record says {info.size}")
        return True

    def check_stored_bytes(self, volume: str) -> bool:
        """Download the volume: size and sha256 against its record, or, for a volume whose
        record is gone, decrypt it whole. False when it is missing."""
        info = self.infos.get(volume)
        try:
            if info is None:
                return self._decrypts(volume)
            digest, size = hashlib.sha256(), 0
            with self.repo.get(volume) as stream:
                while block := stream.read(READ_SIZE):
                    digest.update(block)
                    size += len(block)
        except NotFound:
            self.problems[volume].append("missing from storage")
            return False
        self.stored(volume, digest.hexdigest(), size)
        return True

    def stored(self, volume: str, digest: str, size: int) -> None:
        """Compare a volume's stored bytes, read whole, with the record that wrote it."""
        info = self.infos.get(volume)
        if info is None:
            return  # no record left: age authenticated the volume as it was read
        if size != info.size:
            how = "truncated" if size < info.size else "longer than written"
            self.problems[volume].append(f"{how}: {size} bytes stored, the record says {info.size}")
        elif digest != info.sha256:
            self.problems[volume].append(
                f"tampered: sha256 {digest[:16]}... differs from the record's {info.sha256[:16]}..."
            )

    def _decrypts(self, volume: str) -> bool:
        try:
            with (
                self.repo.get(volume) as encrypted,
                age.Decryptor(encrypted, self.archive.identities) as plain,
            ):
                while plain.read(READ_SIZE):
                    pass
        except age.AgeError as error:
            self.problems[volume].append(f"does not decrypt: {error}")
        return True

    # -- restoring ---------------------------------------------------------------------

    def restore(self, source: EntrySource, volumes: set[str], whole: bool = False) -> list[Entry]:
        """Restore what `source` yields into a fresh temporary directory, or with `whole`
        into a hashing sink, reading each volume whole and checking its stored bytes;
        returns the files it held, and notes which of them failed and why."""
        repo = _HashedReads(self.repo, self.stored) if whole else None
        narrowed = _Narrowed(self.archive, source, repo)  # type: ignore[arg-type]
        with tempfile.TemporaryDirectory(prefix="muster-verify-", dir=self.scratch) as temp:
            try:
                result = _restore(narrowed, self.record, Path(temp), _Checker() if whole else None)
            except NotFound as error:  # a volume vanished between the HEAD and the GET
                result = RestoreOutcome(errors=[str(error)])
            except NoSnapshot:  # nothing in this part of the catalog
                result = RestoreOutcome()
            files = list(narrowed.seen.values())
            for entry in files:
                if entry.path not in result.written:
                    self.failed[entry.location.volume].add(entry.path)  # type: ignore[union-attr]
        self.outcome.files_checked += len(files)
        self.outcome.bytes_checked += sum(e.size for e in files)
        self._attribute(result.errors, files, volumes)
        return files

    def _attribute(self, errors: list[str], files: list[Entry], volumes: set[str]) -> None:
        """Give each restore error to the volume it is about: restore names the volume in
        what it reads, and only the path when a file's sha256 differs."""
        volume_of = {e.path: e.location.volume for e in files}  # type: ignore[union-attr]
        for error in errors:
            volume = next((v for v in self.volumes if error.startswith(v)), None)
            if volume is None:
                path = error.split(": ", 1)[0]
                volume = volume_of.get(path)
            if volume is None and len(volumes) == 1:
                volume = next(iter(volumes))
            if volume is None:
                self.loose.append(error)
            else:
                self.problems[volume].append(error)

    # -- the result --------------------------------------------------------------------

    def finish(self, tested: Iterable[str], holders: dict[str, list[str]]) -> VerifyOutcome:
        """Record what passed, name what failed. `holders` lists, for volumes with a
        problem of their own, the files they hold (those files are all affected)."""
        outcome = self.outcome
        for volume in tested:
            outcome.volumes_tested.append(volume)
            if self.problems.get(volume) or self.failed.get(volume):
                self.coverage.failed(volume)
            else:
                self.coverage.passed(volume, self.now)
        for volume in sorted(set(self.problems) | set(self.failed)):
            files = sorted(self.failed.get(volume, set()))
            if self.problems.get(volume) and not files:
                files = sorted(holders.get(volume, []))
            if not files and not self.problems.get(volume):
                continue
            outcome.failed_files[volume] = files
            outcome.failures.append(_describe(volume, self.problems.get(volume, []), files))
        outcome.failures += self.loose
        outcome.files_failed = len({f for files in outcome.failed_files.values() for f in files})
        outcome.coverage = self.coverage.fraction(self.volumes)
        known = set().union(*(r.all_volumes() for r in self.archive.records))
        self.coverage.save(known)
        outcome.duration = time.monotonic() - self.began
        return outcome


def _describe(volume: str, problems: list[str], files: list[str]) -> str:
    seen: list[str] = []
    for problem in problems:
        text = problem.removeprefix(volume).lstrip(": ")
        if text not in seen:
            seen.append(text)
    what = "; ".join(seen) or "files did not restore"
    named = ", ".join(files[:NAMED_FILES])
    if len(files) > NAMED_FILES:
        named += f" and {len(files) - NAMED_FILES} more"
    return f"{volume}: {what}; files: {named or 'none recorded in the catalog'}"


def run_verify(
    archive: Archive,
    state_dir: Path,
    snapshot: str | None = None,
    sample: int | None = None,
    all: bool = False,  # the command's --all (shadows the builtin only in here)
    max_duration: float | None = None,
    now: datetime | None = None,
    *,
    repository_key: str | None = None,
    scratch: Path | None = None,
) -> VerifyOutcome:
    """Test-restore `sample` files (or `all` of them) of a snapshot (latest by default).

    `repository_key` names the coverage file (pass the catalog cache's key; by default one
    is made from the storage and job); `scratch` is where temporary restores go."""
    if sample is not None and sample < 1:
        raise ValueError(f"sample must be at least 1 file, not {sample}")
    record = archive.select(snapshot)
    coverage = Coverage(state_dir, repository_key or default_repository_key(archive.repo))
    run = _Verify(archive, record, coverage, max_duration, now or datetime.now(UTC), scratch)
    if all:
        return _verify_all(run)
    return _verify_sample(run, sample or DEFAULT_SAMPLE)


def _verify_sample(run: _Verify, sample: int) -> VerifyOutcome:
    ordered = run.coverage.order(run.volumes)
    candidates = _candidates(run, set(ordered), per_volume=sample if len(ordered) < sample else 1)
    picks = _allocate(ordered, candidates, sample)
    tested: list[str] = []
    holders = {v: [e.path for e in found] for v, found in candidates.items()}
    for volume in ordered:
        if volume not in picks and (candidates.get(volume) or len(tested) >= sample):
            continue  # a volume with files but none picked, or enough tested already
        if tested and run.out_of_time():
            break
        tested.append(volume)
        if volume not in picks:  # no file data to restore: check its stored bytes
            run.check_stored_bytes(volume)
            continue
        chosen = picks[volume]
        if not run.check_stored_size(volume):
            run.failed[volume].update(e.path for e in chosen)
            run.outcome.files_checked += len(chosen)
            continue
        run.restore(lambda _record, chosen=chosen: contextlib.nullcontext(iter(chosen)), {volume})
        holders[volume] = [e.path for e in chosen]
    return run.finish(tested, holders)


def _candidates(run: _Verify, volumes: set[str], per_volume: int) -> dict[str, list[Entry]]:
    """Up to `per_volume` testable files of each volume, drawn uniformly (reservoir)."""
    rng = random.Random()
    found: dict[str, list[Entry]] = defaultdict(list)
    seen: dict[str, int] = defaultdict(int)
    with run.archive.entries(run.record) as entries:
        for entry in entries:
            if not _testable(entry) or entry.location.volume not in volumes:  # type: ignore[union-attr]
                continue
            volume = entry.location.volume  # type: ignore[union-attr]
            seen[volume] += 1
            if len(found[volume]) < per_volume:
                found[volume].append(entry)
            elif (slot := rng.randrange(seen[volume])) < per_volume:
                found[volume][slot] = entry
    return dict(found)


def _allocate(
    ordered: list[str], candidates: dict[str, list[Entry]], sample: int
) -> dict[str, list[Entry]]:
    """`sample` files, one per volume in priority order, round after round."""
    picks: dict[str, list[Entry]] = {}
    left = sample
    for round_ in range(max((len(c) for c in candidates.values()), default=0)):
        for volume in ordered:
            if left == 0:
                return picks
            pool = candidates.get(volume, [])
            if round_ < len(pool):
                picks.setdefault(volume, []).append(pool[round_])
                left -= 1
    return picks


def _verify_all(run: _Verify) -> VerifyOutcome:
    tested, present = _stored_sizes(run)
    survey = _Survey(run)
    for volume in tested:
        if volume not in present:
            run.failed[volume].update(survey.holders.get(volume, []))
        elif not survey.totals[volume][1]:  # no file data to restore: check its stored bytes
            run.check_stored_bytes(volume)
    readable = [v for v in tested if v in present and survey.totals[v][1]]
    for batch in _batches(readable, survey.totals):
        if run.out_of_time():
            break
        members = set(batch)
        named = set().union(*(survey.links.get(v, set()) for v in batch))
        files = run.restore(
            lambda record, members=members, named=named: _only(
                run.archive.entries, record, members, named, present
            ),
            members,
            whole=True,
        )
        _note_holders(run, files, survey.holders)
    return run.finish(tested, survey.holders)


def _stored_sizes(run: _Verify) -> tuple[list[str], set[str]]:
    """A HEAD of each volume, while time lasts: those tested, and those present."""
    tested: list[str] = []
    present = set()
    for volume in sorted(run.volumes):
        if run.out_of_time():
            break
        tested.append(volume)
        if run.check_stored_size(volume):
            present.add(volume)
    return tested, present


class _Survey:
    """One pass over the catalog (from the cache, or fetched once and kept by the
    Archive): what each volume holds, to batch the volumes and name damaged ones' files."""

    def __init__(self, run: _Verify) -> None:
        self.totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # [bytes, files]
        self.holders: dict[str, list[str]] = defaultdict(list)  # files of damaged volumes
        self.links: dict[str, set[str]] = defaultdict(set)  # files its hard links name
        with run.archive.entries(run.record) as entries:
            for entry in entries:
                if entry.location is not None:
                    self._add(run, entry, entry.location.volume)

    def _add(self, run: _Verify, entry: Entry, volume: str) -> None:
        self.totals[volume][0] += entry.size
        self.totals[volume][1] += entry.type == FILE
        if volume in run.problems and entry.type == FILE:
            self.holders[volume].append(entry.path)
        if entry.type == HARDLINK and entry.link:
            self.links[volume].add(entry.link)


def _note_holders(run: _Verify, files: list[Entry], holders: dict[str, list[str]]) -> None:
    """The files of volumes whose stored bytes turned out damaged: all of them affected."""
    damaged = set()
    for entry in files:
        volume = entry.location.volume  # type: ignore[union-attr]
        if run.problems.get(volume):
            holders[volume].append(entry.path)
            damaged.add(volume)
    for volume in damaged:
        holders[volume] = list(dict.fromkeys(holders[volume]))


@contextlib.contextmanager
def _only(
    source: EntrySource,
    record: SnapshotRecord,
    volumes: set[str],
    also: set[str],
    present: set[str],
) -> Iterator[Iterator[Entry]]:
    """The entries stored in `volumes`, and the files in `also` (what their hard links
    name, which restore needs beside them) if their volume is there to read. The root
    directory is no entry to write."""
    with source(record) as entries:
        yield (
            e
            for e in entries
            if e.path != "/"
            and e.location is not None
            and (e.location.volume in volumes or (e.path in also and e.location.volume in present))
        )


def _batches(volumes: list[str], totals: dict[str, list[int]]) -> Iterator[list[str]]:
    batch: list[str] = []
    size = files = 0
    for volume in volumes:
        volume_bytes, volume_files = totals.get(volume, [0, 0])
        if batch and (
            size + volume_bytes > ALL_BATCH_BYTES or files + volume_files > ALL_BATCH_FILES
        ):
            yield batch
            batch, size, files = [], 0, 0
        batch.append(volume)
        size += volume_bytes
        files += volume_files
    if batch:
        yield batch
