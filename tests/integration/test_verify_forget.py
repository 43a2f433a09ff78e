"""verify and forget on real storage: a local directory for every case, and a round trip of
each on Swift and on S3 (Swift's s3api). Backups are made with run_backup, damage is done
through the storage API itself (read an object, change it, put it back)."""

from __future__ import annotations

import os
import resource
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent import age
from agent.actions import restore as restore_module
from agent.actions.backup import run_backup
from agent.actions.forget import run_forget
from agent.actions.restore import run_restore
from agent.actions.verify import Coverage, VerifyOutcome, run_verify
from agent.archive import Archive
from agent.catalog import FILE, Entry
from agent.repository import Repository
from agent.state import CatalogCache
from agent.storage import open_storage
from broker.plan import Job, Retention
from broker.snapshot import SnapshotRecord, catalog_name, record_name
from tests.services import S3Credentials, SwiftCredentials

pytestmark = pytest.mark.integration

NODE = "node1"
KEY = "test-repository"


@dataclass
class Setup:
    """A source tree, a repository on one backend and everything run_backup needs."""

    tmp: Path
    source: Path
    job: Job
    repo: Repository
    identity: age.Identity
    cache: CatalogCache

    @property
    def state(self) -> Path:
        return self.tmp / "state"

    def backup(self) -> SnapshotRecord:
        return run_backup(self.job, self.repo, self.identity, self.cache, "test").record

    def archive(self) -> Archive:
        """A fresh reader, as each command builds one."""
        return Archive(self.repo, [self.identity], self.cache)

    def verify(self, **options: object) -> VerifyOutcome:
        return run_verify(self.archive(), self.state, repository_key=KEY, **options)  # type: ignore[arg-type]

    def files(self, record: SnapshotRecord) -> dict[str, list[Entry]]:
        """Volume -> the regular files of `record` stored in it, in catalog order."""
        found: dict[str, list[Entry]] = {}
        with self.archive().entries(record) as entries:
            for entry in entries:
                if entry.type == FILE and entry.location is not None:
                    found.setdefault(entry.location.volume, []).append(entry)
        return found

    def names(self, folder: str) -> set[str]:
        return set(self.repo.names(folder))

    def read(self, name: str) -> bytes:
        with self.repo.get(name) as stream:
            return stream.read()

    def write(self, name: str, data: bytes) -> None:
        with self.repo.open_writer(name) as out:
            out.write(data)


def make_setup(tmp: Path, target: dict, volume_size: str = "256KiB") -> Setup:
    source = tmp / "src"
    source.mkdir()
    job = Job.model_validate(
        {"name": "files", "storage": target, "sources": {"paths": [str(source)]}}
        | {"volume_size": volume_size, "full_every": 100}
    )
    repo = Repository(open_storage(job.storage), NODE, job.name)
    cache = CatalogCache(tmp / "state", KEY)
    return Setup(tmp, source, job, repo, age.Identity.generate(), cache)


def fill(source: Path, count: int, size: int, prefix: str = "f") -> dict[str, bytes]:
    """Incompressible files, so volume sizes follow file sizes."""
    written = {}
    for number in range(count):
        data = os.urandom(size)
        (source / f"{prefix}{number:02d}").write_bytes(data)
        written[str(source / f"{prefix}{number:02d}")] = data
    return written


@pytest.fixture
def local(tmp_path: Path) -> Setup:
    return make_setup(tmp_path, {"kind": "local", "path": str(tmp_path / "repository")})


def unique(kind: str) -> str:
    return f"muster-verify-{kind}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=["local", "swift", "s3"])
def anywhere(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Setup:
    """The same repository on each backend; credentials come from environment variables
    named by the target's env_prefix, as on a node."""
    if request.param == "local":
        target = {"kind": "local", "path": str(tmp_path / "repository")}
    elif request.param == "swift":
        swift: SwiftCredentials = request.getfixturevalue("swift_credentials")
        monkeypatch.setenv("MUSTER_VERIFY_ST_AUTH", swift.auth_url)
        monkeypatch.setenv("MUSTER_VERIFY_ST_USER", swift.user)
        monkeypatch.setenv("MUSTER_VERIFY_ST_KEY", swift.key)
        target = {"kind": "swift", "container": unique("swift"), "prefix": "fleet"}
        target["credentials"] = {"env_prefix": "MUSTER_VERIFY"}
    else:
        s3: S3Credentials = request.getfixturevalue("s3_credentials")
        monkeypatch.setenv("MUSTER_VERIFY_AWS_ACCESS_KEY_ID", s3.access_key)
        monkeypatch.setenv("MUSTER_VERIFY_AWS_SECRET_ACCESS_KEY", s3.secret_key)
        target = {"kind": "s3", "bucket": unique("s3"), "prefix": "fleet"}
        target |= {"endpoint": s3.endpoint, "region": s3.region}
        target["credentials"] = {"env_prefix": "MUSTER_VERIFY"}
    return make_setup(tmp_path, target)


def named_in(failures: list[str], paths: list[str]) -> set[str]:
    return {path for path in paths if any(path + "," in f or f.endswith(path) for f in failures)}


def assert_fails_naming(
    outcome: VerifyOutcome, volume: str, files: dict[str, list[Entry]], *must: str
) -> set[str]:
    """The volume has a failure that names it and only files it holds (at least `must`);
    no other volume is blamed. Returns the files named."""
    assert not outcome.ok
    mine = [f for f in outcome.failures if f.startswith(volume + ":")]
    assert mine, outcome.failures
    assert all(f.startswith(volume) for f in outcome.failures), outcome.failures
    everything = [e.path for entries in files.values() for e in entries]
    named = named_in(mine, everything)
    assert named, mine
    assert named <= {e.path for e in files[volume]}, (named, mine)
    assert set(must) <= named, (must, mine)
    assert set(outcome.failed_files) == {volume}
    assert set(outcome.failed_files[volume]) == named
    assert outcome.files_failed == len(named)
    return named


# -- verify --------------------------------------------------------------------------------


def test_verify_passes_on_a_good_snapshot(local: Setup) -> None:
    fill(local.source, 12, 60_000)
    record = local.backup()
    assert len(record.volumes) >= 3
    outcome = local.verify(sample=5)
    assert outcome.ok, outcome.failures
    assert outcome.snapshot == record.id
    assert outcome.files_checked == 5 and outcome.files_failed == 0
    assert outcome.bytes_checked == 5 * 60_000
    assert len(outcome.volumes_tested) == len(record.volumes)  # spread over every volume
    assert outcome.coverage == 1.0
    assert not outcome.stopped and outcome.duration > 0
    everything = local.verify(all=True)
    assert everything.ok, everything.failures
    assert everything.files_checked == 12
    assert sorted(everything.volumes_tested) == sorted(v.name for v in record.volumes)


def test_rotation_tests_every_volume_in_turn(local: Setup) -> None:
    fill(local.source, 24, 60_000)
    record = local.backup()
    volumes = {v.name for v in record.volumes}
    assert len(volumes) >= 4
    seen: list[str] = []
    coverage = []
    for _ in volumes:
        outcome = local.verify(sample=1)
        assert outcome.ok, outcome.failures
        assert outcome.files_checked == 1
        assert len(outcome.volumes_tested) == 1
        seen += outcome.volumes_tested
        coverage.append(outcome.coverage)
    assert sorted(seen) == sorted(volumes)  # each run took one not tested before
    assert coverage == sorted(coverage) and coverage[-1] == 1.0
    assert coverage[0] == pytest.approx(1 / len(volumes))
    state = Coverage(local.state, KEY)
    assert set(state.tested) == volumes
    # the next run goes back to the volume tested longest ago
    assert local.verify(sample=1).volumes_tested == [seen[0]]


def test_a_deleted_volume_fails_naming_it_and_every_file_it_holds(local: Setup) -> None:
    fill(local.source, 12, 60_000)
    record = local.backup()
    files = local.files(record)
    victim = record.volumes[1].name
    local.repo.delete(victim)
    outcome = local.verify(sample=100)
    named = assert_fails_naming(outcome, victim, files, *[e.path for e in files[victim]])
    assert "missing" in outcome.failures[0]
    assert outcome.files_checked == 12
    assert len(named) == len(files[victim])
    # the other volumes were still tested and pass
    assert set(outcome.volumes_tested) == {v.name for v in record.volumes}
    assert outcome.coverage == pytest.approx((len(record.volumes) - 1) / len(record.volumes))
    everything = local.verify(all=True)
    assert_fails_naming(everything, victim, files, *[e.path for e in files[victim]])


def test_a_truncated_volume_fails_naming_it_and_the_files_lost(local: Setup) -> None:
    fill(local.source, 12, 60_000)
    record = local.backup()
    files = local.files(record)
    victim = record.volumes[0].name
    assert len(files[victim]) >= 3
    data = local.read(victim)
    local.write(victim, data[: len(data) // 2])
    outcome = local.verify(sample=100)
    assert_fails_naming(outcome, victim, files, files[victim][-1].path)
    assert "truncated" in outcome.failures[0]
    assert f"{len(data) // 2} bytes stored" in outcome.failures[0]
    assert not Coverage(local.state, KEY).tested.get(victim)


def test_a_volume_cut_short_by_a_few_bytes_fails_even_if_sampled_files_restore(
    local: Setup,
) -> None:
    fill(local.source, 12, 60_000)
    record = local.backup()
    files = local.files(record)
    victim = record.volumes[0].name
    data = local.read(victim)
    local.write(victim, data[:-3])
    outcome = local.verify(sample=1)  # one file: restored before the cut, or not
    assert outcome.volumes_tested == [record.volumes[0].name]
    named = assert_fails_naming(outcome, victim, files)
    assert "truncated" in outcome.failures[0]
    assert len(named) == 1


def test_a_flipped_byte_fails_naming_the_volume_and_the_files_after_it(local: Setup) -> None:
    fill(local.source, 12, 60_000)
    record = local.backup()
    files = local.files(record)
    victim = record.volumes[0].name
    data = bytearray(local.read(victim))
    data[len(data) // 2] ^= 0x01
    local.write(victim, bytes(data))
    outcome = local.verify(sample=100)
    assert_fails_naming(outcome, victim, files, files[victim][-1].path)
    everything = local.verify(all=True)
    assert_fails_naming(everything, victim, files, files[victim][-1].path)
    assert "sha256" in everything.failures[0]


def test_all_finds_a_tampered_volume_by_its_sha256(local: Setup) -> None:
    fill(local.source, 12, 60_000)
    record = local.backup()
    files = local.files(record)
    victim = record.volumes[-1].name
    data = bytearray(local.read(victim))
    data[-5] ^= 0x80  # inside the final chunk's tag: after the last file's data
    local.write(victim, bytes(data))
    outcome = local.verify(all=True)
    assert_fails_naming(outcome, victim, files)
    assert "tampered: sha256" in outcome.failures[0]
    assert outcome.files_checked == 12


def test_a_flipped_byte_is_found_by_ranged_reads_of_the_file_holding_it(tmp_path: Path) -> None:
    """Large frames and few sampled files: restore fetches files by range, and only the file
    whose frames hold the damage fails."""
    target = {"kind": "local", "path": str(tmp_path / "repository")}
    setup = make_setup(tmp_path, target, volume_size="64MiB")
    fill(setup.source, 6, 1_500_000)
    record = setup.backup()
    assert len(record.volumes) == 1
    files = setup.files(record)
    victim = record.volumes[0].name
    target = files[victim][2]
    location = target.location
    assert location is not None
    offset = age.ciphertext_offset(record.volumes[0].header_length, location.frame)
    data = bytearray(setup.read(victim))
    data[offset + location.span // 2] ^= 0x01
    setup.write(victim, bytes(data))
    hits = misses = 0
    for _ in range(40):
        outcome = setup.verify(sample=2)  # 2 of 6 files: fetched by range
        assert outcome.files_checked == 2
        if outcome.ok:
            misses += 1
            continue
        hits += 1
        assert_fails_naming(outcome, victim, files, target.path)
        assert outcome.files_failed == 1
        if hits >= 2 and misses >= 2:
            break
    assert hits and misses


def test_max_duration_stops_picking_and_says_so(local: Setup) -> None:
    fill(local.source, 24, 60_000)
    record = local.backup()
    outcome = local.verify(sample=50, max_duration=1e-9)
    assert outcome.stopped
    assert len(outcome.volumes_tested) == 1  # always at least one
    assert outcome.files_checked < 24
    assert outcome.coverage == pytest.approx(1 / len(record.volumes))
    assert not local.verify(sample=50).stopped


def test_verify_an_older_snapshot_by_id(local: Setup) -> None:
    fill(local.source, 6, 60_000)
    first = local.backup()
    (local.source / "f00").write_bytes(b"changed")
    second = local.backup()
    outcome = local.verify(snapshot=first.id, all=True)
    assert outcome.snapshot == first.id and outcome.ok and outcome.files_checked == 6
    assert local.verify(sample=3).snapshot == second.id


def mixed_tree(source: Path) -> None:
    """Files in two volumes, a subdirectory, an empty file, a symlink, a hard link whose
    first name is in another volume (stored as a file) and one in the same volume (a tar
    hard link member)."""
    fill(source, 10, 60_000)
    (source / "sub" / "deeper").mkdir(parents=True)
    (source / "sub" / "deeper" / "data").write_bytes(os.urandom(70_000))
    (source / "sub" / "empty").write_bytes(b"")
    os.link(source / "f03", source / "sub" / "hard")
    (source / "sub" / "soft").symlink_to("../f04")
    (source / "a1").write_bytes(os.urandom(1000))
    os.link(source / "a1", source / "a2")


def test_verify_agrees_with_restore_on_a_tree_with_links(local: Setup, tmp_path: Path) -> None:
    mixed_tree(local.source)
    local.backup()
    (local.source / "f09").unlink()  # the next snapshot: a new volume with directories only
    record = local.backup()
    files = local.files(record)
    assert any(not files.get(v) for v in record.all_volumes())
    regular = {e.path for entries in files.values() for e in entries}
    restore = run_restore(local.archive(), [str(local.source)], tmp_path / "out")
    back = {
        str(local.source / p.relative_to(tmp_path / "out" / str(local.source)[1:]))
        for p in (tmp_path / "out").rglob("*")
        if p.is_file() and not p.is_symlink()
    }
    outcome = local.verify(all=True)
    assert outcome.files_checked == len(regular) >= 12  # the empty file too, not a2
    assert sorted(outcome.volumes_tested) == sorted(record.all_volumes())
    lost = regular - back
    assert outcome.ok == (not restore.errors), (outcome.failures, restore.errors)
    assert {f for names in outcome.failed_files.values() for f in names} == lost
    for volume, names in outcome.failed_files.items():
        assert set(names) <= {e.path for e in files[volume]}
    if not lost:
        for _ in record.all_volumes():
            sampled = local.verify(sample=1)
            assert sampled.ok, sampled.failures
        assert sampled.coverage == 1.0


# -- forget --------------------------------------------------------------------------------


@dataclass
class History:
    records: list[SnapshotRecord]
    contents: list[dict[str, bytes]]  # path -> data, as each snapshot saw it


def four_snapshots(setup: Setup) -> History:
    """1: f00..f07 and big.bin, a volume of its own. 2: big.bin deleted, f01 changed, m01
    added. 3: f01 changed again, m01 deleted (snapshot 2's volume is then unused). 4: f02
    changed. f00 and f03..f07 never change: kept snapshots still read them from the volumes
    of snapshot 1."""
    files = fill(setup.source, 8, 40_000)
    files |= fill(setup.source, 1, 400_000, prefix="big")
    contents, records = [], []

    def snap() -> None:
        records.append(setup.backup())
        contents.append(dict(files))

    def change(name: str, data: bytes | None) -> None:
        path = setup.source / name
        if data is None:
            path.unlink()
            files.pop(str(path))
        else:
            path.write_bytes(data)
            files[str(path)] = data

    snap()
    change("big00", None)
    change("f01", os.urandom(40_000))
    change("m01", os.urandom(30_000))
    snap()
    change("f01", os.urandom(41_000))
    change("m01", None)
    snap()
    change("f02", os.urandom(42_000))
    snap()
    return History(records, contents)


def test_a_damaged_chunk_loses_only_the_files_its_frames_hold(tmp_path: Path) -> None:
    """A volume read as one stream stops at a damaged chunk; the requested files past it
    are then read each by its own range, so only those sharing the damaged chunk fail."""
    setup = make_setup(tmp_path, {"kind": "local", "path": str(tmp_path / "repository")}, "64MiB")
    written = fill(setup.source, 6, 1_500_000)
    record = setup.backup()
    assert len(record.volumes) == 1
    victim = record.volumes[0].name
    entries = {e.path: e for e in setup.files(record)[victim]}
    location = entries[str(setup.source / "f02")].location
    assert location is not None
    data = bytearray(setup.read(victim))
    header = record.volumes[0].header_length
    flipped = age.ciphertext_offset(header, location.frame) + 100  # in f02's first frame
    data[flipped] ^= 0x01
    setup.write(victim, bytes(data))
    out = tmp_path / "out"
    outcome = run_restore(setup.archive(), [str(setup.source)], out)  # one stream: all of it
    assert outcome.errors and all(e.startswith(victim) for e in outcome.errors), outcome.errors
    restored = {p.name: p.read_bytes() for p in restored_root(out, setup.source).iterdir()}
    chunk = (flipped - header) // age.ENCRYPTED_CHUNK_SIZE  # the age chunk it damaged
    damaged = {
        Path(path).name
        for path, entry in entries.items()
        if entry.location is not None
        and entry.location.frame // age.CHUNK_SIZE
        <= chunk
        <= (entry.location.frame + entry.location.span - 1) // age.CHUNK_SIZE
    }
    assert "f02" in damaged and len(damaged) < 3
    assert set(restored) == {Path(path).name for path in written} - damaged
    assert all(restored[name] == written[str(setup.source / name)] for name in restored)


def restored_tree(setup: Setup, root: Path, at: str | None = None) -> dict[str, bytes]:
    outcome = run_restore(setup.archive(), [str(setup.source)], root, at=at)
    assert outcome.errors == []
    found = {}
    for path in (root / str(setup.source).lstrip("/")).iterdir():
        found[str(setup.source / path.name)] = path.read_bytes()
    return found


def test_forget_keeps_the_last_two_and_deletes_only_unused_volumes(
    anywhere: Setup, tmp_path: Path
) -> None:
    setup = anywhere
    history = four_snapshots(setup)
    one, two, three, four = history.records
    assert not two.full and not three.full and not four.full
    assert set(three.references) & {v.name for v in one.volumes}  # unchanged files
    before = {folder: setup.names(folder) for folder in ("snapshots/", "catalogs/", "volumes/")}
    big = next(v for v, entries in setup.files(one).items() if entries[0].path.endswith("big00"))

    preview = run_forget(setup.repo, Retention(keep_last=2), dry_run=True)
    assert [r.id for r in preview.forgotten] == [one.id, two.id]
    assert [r.id for r in preview.kept] == [three.id, four.id]
    assert preview.dry_run and preview.deleted_objects and preview.freed_bytes > 0
    assert {f: setup.names(f) for f in before} == before  # nothing deleted

    outcome = run_forget(setup.repo, Retention(keep_last=2), dry_run=False)
    assert outcome.deleted_objects == preview.deleted_objects
    assert outcome.freed_bytes == preview.freed_bytes
    needed = three.all_volumes() | four.all_volumes()
    unused = {v.name for v in one.volumes + two.volumes} - needed
    assert big in unused and {v.name for v in two.volumes} <= unused
    assert setup.names("snapshots/") == {record_name(three.id), record_name(four.id)}
    assert setup.names("catalogs/") == {catalog_name(three.id), catalog_name(four.id)}
    assert setup.names("volumes/") == before["volumes/"] - unused
    assert setup.names("volumes/") >= needed
    expected = [record_name(one.id), record_name(two.id)]  # records first
    expected += [catalog_name(one.id), catalog_name(two.id)]
    assert outcome.deleted_objects[:4] == expected
    assert set(outcome.deleted_objects[4:]) == unused
    sizes = {v.name: v.size for v in one.volumes + two.volumes}
    catalogs = one.catalog.size + two.catalog.size
    assert outcome.freed_bytes > catalogs + sum(sizes[name] for name in unused)

    # files unchanged since snapshot 1 come back from the kept incrementals
    assert restored_tree(setup, tmp_path / "r3", at=three.id) == history.contents[2]
    assert restored_tree(setup, tmp_path / "r4") == history.contents[3]
    for record in (three, four):
        verified = setup.verify(snapshot=record.id, all=True)
        assert verified.ok, verified.failures

    again = run_forget(setup.repo, Retention(keep_last=2), dry_run=False)
    assert again.forgotten == [] and again.deleted_objects == [] and again.freed_bytes == 0


def test_verify_then_damage_then_forget_round_trip(anywhere: Setup, tmp_path: Path) -> None:
    setup = anywhere
    fill(setup.source, 10, 60_000)
    first = setup.backup()
    (setup.source / "f09").unlink()
    second = setup.backup()
    good = setup.verify(sample=20)
    assert good.ok and good.coverage == 1.0, good.failures
    files = setup.files(second)
    victim = first.volumes[0].name  # still used by the second snapshot
    data = bytearray(setup.read(victim))
    data[len(data) // 2] ^= 0x01
    setup.write(victim, bytes(data))
    bad = setup.verify(sample=20)
    assert_fails_naming(bad, victim, files, files[victim][-1].path)
    assert setup.verify(all=True).failures[0].startswith(victim)
    setup.write(victim, bytes(data[: len(data) // 3]))
    assert "truncated" in setup.verify(sample=20).failures[0]
    setup.repo.delete(victim)
    gone = setup.verify(sample=20)
    assert_fails_naming(gone, victim, files, *[e.path for e in files[victim]])
    # forgetting the first snapshot must keep (what is left of) its volumes in use
    outcome = run_forget(setup.repo, Retention(keep_last=1), dry_run=False)
    assert [r.id for r in outcome.forgotten] == [first.id]
    unused = {v.name for v in first.volumes} - second.all_volumes()
    assert (
        set(outcome.deleted_objects)
        == {
            record_name(first.id),
            catalog_name(first.id),
        }
        | unused
    )
    assert setup.names("volumes/") == second.all_volumes() - {victim}


def test_all_zero_retention_forgets_nothing(local: Setup) -> None:
    four_snapshots(local)
    before = local.names("volumes/")
    outcome = run_forget(local.repo, Retention(), dry_run=False)
    assert len(outcome.kept) == 4 and outcome.forgotten == []
    assert outcome.deleted_objects == [] and local.names("volumes/") == before


def test_forget_finishes_what_an_interrupted_forget_left(local: Setup) -> None:
    history = four_snapshots(local)
    time.sleep(1.1)  # ids name the second a run started: the next one must be later
    history.records.append(local.backup())
    one = history.records[0]
    local.repo.delete(record_name(one.id))  # a forget that stopped right after the record
    outcome = run_forget(local.repo, Retention(keep_last=4), dry_run=False)
    assert outcome.forgotten == []
    remaining = set().union(*(r.all_volumes() for r in history.records[1:]))
    assert catalog_name(one.id) in outcome.deleted_objects
    assert local.names("volumes/") == remaining
    assert catalog_name(one.id) not in local.names("catalogs/")


def test_forget_leaves_a_running_backups_objects_alone(local: Setup) -> None:
    history = four_snapshots(local)
    running = "29991231T235959Z-abcdef"  # no record yet, newer than every snapshot
    local.write(f"volumes/{running}/00001.tar.zst.age", b"in flight")
    local.write(catalog_name(running), b"in flight")
    run_forget(local.repo, Retention(keep_last=2), dry_run=False)
    assert local.read(f"volumes/{running}/00001.tar.zst.age") == b"in flight"
    assert local.read(catalog_name(running)) == b"in flight"
    assert len(local.repo.snapshots()) == 2
    del history


# -- restore and backup behaviour that verify and forget depend on ----------------------------


def test_restore_reports_a_missing_volume_and_restores_the_rest(
    local: Setup, tmp_path: Path
) -> None:
    fill(local.source, 12, 60_000)
    record = local.backup()
    files = local.files(record)
    victim = record.volumes[0].name
    local.repo.delete(victim)
    outcome = run_restore(local.archive(), [str(local.source)], tmp_path / "out")
    assert any(victim in error for error in outcome.errors)
    restored = {str(local.source / p.name) for p in (tmp_path / "out").rglob("f*")}
    others = {e.path for v, entries in files.items() if v != victim for e in entries}
    assert restored == others


def test_a_backup_after_forget_keeps_volumes_that_kept_snapshots_use(
    local: Setup, tmp_path: Path
) -> None:
    history = four_snapshots(local)
    three, four = history.records[2:]
    run_forget(local.repo, Retention(keep_last=2), dry_run=False)
    referenced = three.all_volumes() | four.all_volumes()
    assert local.names("volumes/") >= referenced
    local.backup()
    assert local.names("volumes/") >= referenced, "volumes kept snapshots need were deleted"
    assert restored_tree(local, tmp_path / "r3", at=three.id) == history.contents[2]


def test_members_after_a_tar_hard_link_restore(local: Setup, tmp_path: Path) -> None:
    mixed_tree(local.source)
    local.backup()
    restore = run_restore(local.archive(), [str(local.source)], tmp_path / "out")
    assert restore.errors == []


# -- volumes read in parallel ----------------------------------------------------------------


def tree_of(root: Path) -> dict[str, tuple[bytes, int, int]]:
    """Relative path -> (content, mode, mtime) of every regular file under root."""
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mode, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_parallel_restore_of_many_volumes_matches_a_one_at_a_time_restore(
    local: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for folder in ("a", "b/c", "d"):
        (local.source / folder).mkdir(parents=True)
        fill(local.source / folder, 8, 60_000)
    (local.source / "b" / "c" / "f03").chmod(0o600)
    record = local.backup()
    assert len(record.volumes) >= 4
    threads: set[str] = set()
    real_file = restore_module.Target.file

    def noting_thread(self, entry, blocks):  # type: ignore[no-untyped-def]
        threads.add(threading.current_thread().name)
        return real_file(self, entry, blocks)

    monkeypatch.setattr(restore_module.Target, "file", noting_thread)
    parallel = run_restore(local.archive(), [str(local.source)], tmp_path / "parallel")
    assert len(threads) > 1  # volumes really were restored by several threads
    monkeypatch.setattr(restore_module, "WORKERS", 1)
    threads.clear()
    serial = run_restore(local.archive(), [str(local.source)], tmp_path / "serial")
    assert len(threads) == 1
    assert parallel.errors == serial.errors == []
    assert parallel.files == serial.files == 24
    expected = tree_of(local.source)
    assert tree_of(restored_root(tmp_path / "parallel", local.source)) == expected
    assert tree_of(restored_root(tmp_path / "serial", local.source)) == expected


def restored_root(out: Path, source: Path) -> Path:
    return out / str(source).lstrip("/")


def test_all_names_each_damaged_volume_with_its_own_files(local: Setup) -> None:
    """Volumes are checked in parallel: each failure still names its volume and only the
    files that volume holds, and the intact volumes pass."""
    fill(local.source, 24, 60_000)
    record = local.backup()
    files = local.files(record)
    flipped, cut = record.volumes[1].name, record.volumes[3].name
    data = bytearray(local.read(flipped))
    data[len(data) // 2] ^= 0x01
    local.write(flipped, bytes(data))
    local.write(cut, local.read(cut)[:-1000])
    outcome = local.verify(all=True)
    assert not outcome.ok
    assert set(outcome.failed_files) == {flipped, cut}
    for volume in (flipped, cut):
        mine = [f for f in outcome.failures if f.startswith(volume + ":")]
        assert len(mine) == 1, outcome.failures
        named = set(outcome.failed_files[volume])
        assert named and named <= {e.path for e in files[volume]}
        assert named_in(mine, sorted(named))  # the message names them too
    assert "sha256" in next(f for f in outcome.failures if f.startswith(flipped))
    assert "truncated" in next(f for f in outcome.failures if f.startswith(cut))
    assert outcome.files_checked == 24
    state = Coverage(local.state, KEY)
    assert set(state.tested) == {v.name for v in record.volumes} - {flipped, cut}


def test_all_covers_every_volume_and_rotation_resumes_at_a_damaged_one(local: Setup) -> None:
    fill(local.source, 12, 60_000)
    record = local.backup()
    volumes = {v.name for v in record.volumes}
    everything = local.verify(all=True)
    assert everything.ok and everything.coverage == 1.0
    assert set(Coverage(local.state, KEY).tested) == volumes
    victim = record.volumes[2].name
    data = bytearray(local.read(victim))
    data[-5] ^= 0x80  # the final chunk's tag: every file still restores
    local.write(victim, bytes(data))
    damaged = local.verify(all=True)
    assert set(damaged.failed_files) == {victim}
    assert damaged.coverage == pytest.approx((len(volumes) - 1) / len(volumes))
    assert local.verify(sample=1).volumes_tested == [victim]  # tested first next time


def test_modes_come_back_whatever_the_umask(local: Setup, tmp_path: Path) -> None:
    """Files are created with their own mode where the umask allows it, and chmod-ed
    only where it does not: both ways must end in the catalog's mode."""
    modes = {"public": 0o644, "private": 0o600, "tool": 0o755, "shared": 0o666, "odd": 0o640}
    for name, mode in modes.items():
        (local.source / name).write_bytes(name.encode())
        (local.source / name).chmod(mode)
    local.backup()
    for umask in (0o022, 0o077, 0o000):
        old = os.umask(umask)
        try:
            out = tmp_path / f"umask-{umask:03o}"
            assert run_restore(local.archive(), [str(local.source)], out).errors == []
        finally:
            os.umask(old)
        back = restored_root(out, local.source)
        assert {n: (back / n).stat().st_mode & 0o7777 for n in modes} == modes


def test_restoring_from_several_snapshots_keeps_open_fds_bounded(
    local: Setup, tmp_path: Path
) -> None:
    """Each snapshot's volumes get their own pool of threads, each thread its own cache of
    open directories: under a low fd limit the restore still works, and leaves none open."""
    for number in range(120):
        (local.source / f"d{number:03d}").mkdir()
        (local.source / f"d{number:03d}" / "f").write_bytes(os.urandom(9_000))
    local.backup()
    for number in range(0, 120, 2):  # newer versions of half the files, in new volumes
        (local.source / f"d{number:03d}" / "f").write_bytes(os.urandom(9_000))
    local.backup()
    (local.source / "d000" / "f").unlink()
    (local.source / "d000").rmdir()  # then restored from the second snapshot
    local.backup()
    wanted = [str(local.source / f"d{n:03d}") for n in range(120)]
    fds = len(os.listdir("/proc/self/fd"))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (fds + 64, hard))
    try:
        outcome = run_restore(local.archive(), wanted, tmp_path / "out")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert outcome.errors == []
    assert len(set(outcome.snapshots.values())) >= 2
    assert outcome.files == 120
    assert len(os.listdir("/proc/self/fd")) == fds
