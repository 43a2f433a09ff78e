"""The agent engine end to end on real storage: backup, incrementals, restore, faults."""

import dataclasses
import hashlib
import io
import os
import shutil
import socket
import stat
import tempfile
import uuid
from pathlib import Path

import pytest

from agent import age
from agent.actions.backup import run_backup
from agent.actions.restore import run_restore
from agent.archive import Archive
from agent.catalog import Entry, read_entries, write_entries
from agent.repository import Repository
from agent.state import CatalogCache, JobBusy
from agent.storage import open_storage
from broker.plan import Job
from broker.snapshot import catalog_name

pytestmark = pytest.mark.integration


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture(params=["local", "swift", "s3"])
def target(request, tmp_path, monkeypatch) -> dict:
    """A storage target of each kind, on the real servers, with credentials in the env."""
    name = f"engine-{uuid.uuid4().hex[:16]}"  # a fresh container or bucket per test
    if request.param == "local":
        return {"kind": "local", "path": str(tmp_path / "repo")}
    if request.param == "swift":
        swift = request.getfixturevalue("swift_credentials")
        monkeypatch.setenv("ST_AUTH", swift.auth_url)
        monkeypatch.setenv("ST_USER", swift.user)
        monkeypatch.setenv("ST_KEY", swift.key)
        return {"kind": "swift", "container": name, "prefix": "fleet"}
    s3 = request.getfixturevalue("s3_credentials")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    return {
        "kind": "s3",
        "bucket": name,
        "prefix": "fleet",
        "endpoint": s3.endpoint,
        "region": s3.region,
    }


class Node:
    """A node's view: its sources, key, state dir and repository job."""

    def __init__(self, tmp_path: Path, storage: dict, **job: object) -> None:
        self.source = tmp_path / "src"
        self.source.mkdir()
        self.identity = age.Identity.generate()
        self.cache = CatalogCache(tmp_path / "state", "engine-test")
        self.job = Job.model_validate(
            {"name": "files", "storage": storage, "sources": {"paths": [str(self.source)]}, **job}
        )
        self.storage = open_storage(self.job.storage)
        self.repo = Repository(self.storage, "node1", "files")

    def backup(self, **kwargs):
        return run_backup(self.job, self.repo, self.identity, self.cache, "test", **kwargs)

    def restore(self, root: Path, paths: list[str] | None = None, **kwargs):
        archive = Archive(self.repo, [self.identity], self.cache)
        return run_restore(archive, paths or [str(self.source)], root, **kwargs)


def make_tree(root: Path) -> None:
    (root / "etc" / "nginx").mkdir(parents=True)
    (root / "etc" / "nginx" / "nginx.conf").write_text("worker_processes 2;\n" * 50)
    (root / "etc" / "empty").write_bytes(b"")
    (root / "data").mkdir()
    (root / "data" / "random.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (root / "data" / "name with spaces, ünïcode\nand newline").write_text("odd\n")
    long_dir = root / ("d" * 60) / ("e" * 60)
    long_dir.mkdir(parents=True)
    (long_dir / ("f" * 40 + ".txt")).write_text("long path\n")
    (root / "etc" / "link").symlink_to("nginx/nginx.conf")
    os.link(root / "etc" / "nginx" / "nginx.conf", root / "etc" / "hardlink")
    with open(root / "data" / "sparse", "wb") as sparse:
        sparse.seek(5 * 1024 * 1024)
        sparse.write(b"end of a sparse file")
    os.chmod(root / "etc" / "empty", 0o600)
    os.chmod(root / "data", 0o750)
    os.utime(root / "etc" / "nginx" / "nginx.conf", ns=(1_600_000_000_123_456_789,) * 2)


def tree_state(root: Path) -> dict[str, tuple]:
    """Everything a restore must reproduce, keyed by path relative to `root`."""
    state = {}
    for path in sorted([root, *root.rglob("*")]):
        info = path.lstat()
        relative = str(path.relative_to(root))
        if path.is_symlink():
            state[relative] = ("link", os.readlink(path), info.st_mtime_ns)
        elif path.is_dir():
            state[relative] = ("dir", stat.S_IMODE(info.st_mode), info.st_mtime_ns)
        else:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            state[relative] = ("file", stat.S_IMODE(info.st_mode), info.st_mtime_ns, digest)
    return state


def restored_root(out: Path, source: Path) -> Path:
    return out / str(source).lstrip("/")


# -- round trips -------------------------------------------------------------------------


def test_backup_incremental_and_restore_round_trip(tmp_path, target):
    node = Node(tmp_path, target, volume_size="1MiB")
    make_tree(node.source)
    original = tree_state(node.source)
    first = node.backup()
    assert first.record.full and first.warnings == []
    assert first.record.stats.files == 7

    (node.source / "etc" / "nginx" / "nginx.conf").write_text("worker_processes 4;\n")
    (node.source / "etc" / "new").write_text("new file\n")
    (node.source / "data" / "random.bin").unlink()
    second = node.backup()
    changed = second.record
    assert not changed.full and changed.parent == first.record.id
    assert (changed.stats.files_new, changed.stats.files_changed) == (1, 2)  # + its hardlink
    # the second name of the changed file is a tar hard link: its data is read only once
    assert changed.stats.bytes_new == len("worker_processes 4;\n") + len("new file\n")
    assert changed.references, "unchanged files must point into the first snapshot"

    latest = tmp_path / "latest"
    outcome = node.restore(latest)
    assert outcome.errors == []
    assert tree_state(restored_root(latest, node.source)) == tree_state(node.source)
    sparse = (restored_root(latest, node.source) / "data" / "sparse").stat()
    assert sparse.st_blocks * 512 < sparse.st_size, "a sparse file comes back sparse"

    older = tmp_path / "older"
    assert node.restore(older, at=first.record.id).errors == []
    assert tree_state(restored_root(older, node.source)) == original


def test_no_change_backup_reads_and_writes_no_data(tmp_path, target):
    node = Node(tmp_path, target)
    make_tree(node.source)
    node.backup()
    again = node.backup().record
    assert again.volumes == [] and again.stats.bytes_new == 0
    assert again.stats.files_unchanged == again.stats.files == 7


def test_the_cache_is_a_cache_incrementals_work_without_it(tmp_path, target):
    node = Node(tmp_path, target)
    make_tree(node.source)
    node.backup()
    for cached in [
        *(tmp_path / "state").rglob("*.jsonl.zst"),
        *(tmp_path / "state").rglob("*.index"),
    ]:
        cached.unlink()
    again = node.backup().record
    assert again.stats.files_unchanged == 7 and again.volumes == []


def test_hardlinks_in_one_volume_come_back_as_links(tmp_path):
    node = Node(tmp_path, {"kind": "local", "path": str(tmp_path / "repo")})
    make_tree(node.source)
    node.backup()
    out = tmp_path / "out"
    assert node.restore(out).errors == []
    etc = restored_root(out, node.source) / "etc"
    assert (etc / "hardlink").stat().st_ino == (etc / "nginx" / "nginx.conf").stat().st_ino


def test_sockets_and_fifos_are_skipped_with_a_note(tmp_path):
    node = Node(tmp_path, {"kind": "local", "path": str(tmp_path / "repo")})
    (node.source / "file").write_text("x")
    os.mkfifo(node.source / "fifo")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(node.source / "sock"))
    try:
        outcome = node.backup()
    finally:
        server.close()
    assert outcome.record.stats.files == 1
    assert any("fifo: skipped named pipe" in w for w in outcome.warnings)
    assert any("sock: skipped socket" in w for w in outcome.warnings)


# -- files that move under our feet ------------------------------------------------------


def test_files_that_vanish_or_shrink_during_the_run_are_warnings(tmp_path, monkeypatch):
    from agent import members

    node = Node(tmp_path, {"kind": "local", "path": str(tmp_path / "repo")})
    for name in ("a", "b", "c", "d"):
        (node.source / name).write_bytes(name.encode() * 1000)
    real_open = members.open_for_reading

    def meddle(path: str) -> int:
        """In the worker process (forked after this patch): as it opens "a", "b" and "c"
        were listed and stat'ed already."""
        if path.endswith("/a"):
            (node.source / "b").unlink()
            (node.source / "c").write_bytes(b"short")
        return real_open(path)

    monkeypatch.setattr(members, "open_for_reading", meddle)
    outcome = node.backup()
    assert any("b: vanished" in w for w in outcome.warnings)
    assert any("c: shrank while being read" in w for w in outcome.warnings)
    assert outcome.record.stats.files == 3
    out = tmp_path / "out"
    restore = node.restore(out, [str(node.source / "a"), str(node.source / "d")])
    assert restore.errors == [] and restore.files == 2


def test_an_unreadable_file_is_a_warning_not_an_abort(tmp_path):
    """Root reads everything, so the backup runs in a child that drops to `nobody`."""
    node_dir = Path(tempfile.mkdtemp(prefix="muster-nobody-"))  # pytest's tmp is root-only
    os.chmod(node_dir, 0o777)
    node = Node(node_dir, {"kind": "local", "path": str(node_dir / "repo")})
    (node.source / "public").write_text("everyone\n")
    (node.source / "secret").write_text("root only\n")
    os.chmod(node.source / "secret", 0o600)
    os.chmod(node.source, 0o755)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(read_end)
        try:
            os.setgid(65534)
            os.setuid(65534)
            outcome = node.backup()
            report = f"{outcome.record.stats.files}|" + "|".join(outcome.warnings)
        except BaseException as error:
            report = f"error|{error!r}"
        os.write(write_end, report.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        report = pipe.read()
    os.waitpid(pid, 0)
    shutil.rmtree(node_dir)
    files, *warnings = report.split("|")
    assert files == "1", report
    assert any("secret: not backed up: Permission denied" in w for w in warnings), report


# -- faults ------------------------------------------------------------------------------


class CutUpload(Exception):
    pass


def test_an_upload_cut_mid_volume_leaves_no_snapshot_and_the_next_run_succeeds(
    tmp_path, target, monkeypatch
):
    node = Node(tmp_path, target, volume_size="1MiB")
    make_tree(node.source)
    real_open_writer = node.storage.open_writer

    class Cutter:
        """Lets 200 KiB of the second volume through, then the connection 'drops'."""

        def __init__(self, name: str, size_hint: int | None = None) -> None:
            self._inner = real_open_writer(name, size_hint)
            self._cut = "/00002." in name
            self._written = 0

        def __enter__(self):
            self._sink = self._inner.__enter__()
            return self

        def write(self, data: bytes) -> int:
            self._written += len(data)
            if self._cut and self._written > 200 * 1024:
                raise CutUpload("connection reset by peer")
            return self._sink.write(data)

        def __exit__(self, *exc):
            return self._inner.__exit__(*exc)

    monkeypatch.setattr(node.storage, "open_writer", Cutter)
    with pytest.raises(CutUpload):
        node.backup(workers=1)  # one worker: the first volume is surely committed by then
    assert node.repo.snapshots() == []
    assert not [n for n in node.repo.names("volumes/") if "/00002." in n]
    leftovers = node.repo.leftovers()
    assert leftovers, "the first volume was committed before the cut"

    monkeypatch.setattr(node.storage, "open_writer", real_open_writer)
    outcome = node.backup()
    assert outcome.record.full and len(node.repo.snapshots()) == 1
    assert node.repo.leftovers() == []
    assert not set(leftovers) & set(node.repo.names("volumes/"))
    out = tmp_path / "out"
    assert node.restore(out).errors == []
    assert tree_state(restored_root(out, node.source)) == tree_state(node.source)


def test_one_small_file_costs_a_ranged_fetch_not_a_volume(tmp_path, target, monkeypatch):
    node = Node(tmp_path, target, volume_size="64MiB")
    make_tree(node.source)
    (node.source / "data" / "more.bin").write_bytes(os.urandom(12 * 1024 * 1024))
    record = node.backup().record
    assert len(record.volumes) == 1 and record.volumes[0].size > 15 * 1024 * 1024

    fetched = []
    real_range, real_get = node.repo.get_range, node.repo.get
    monkeypatch.setattr(
        node.repo,
        "get_range",
        lambda n, s, length: fetched.append(length) or real_range(n, s, length),
    )
    monkeypatch.setattr(node.repo, "get", lambda n: fetched.append(n) or real_get(n))
    node.cache = CatalogCache(tmp_path / "other-state", "cold")  # a cold machine: no cache
    out = tmp_path / "out"
    wanted = node.source / "etc" / "nginx" / "nginx.conf"
    outcome = node.restore(out, [str(wanted)])
    assert outcome.errors == [] and outcome.files == 1
    volume_reads = [f for f in fetched if isinstance(f, int)]
    assert sum(volume_reads) < 2 * 1024 * 1024, fetched
    whole_objects = [f for f in fetched if isinstance(f, str)]
    assert any(f.endswith(catalog_name(record.id)) for f in whole_objects)
    assert not [f for f in whole_objects if "volumes/" in f], whole_objects
    assert (restored_root(out, node.source) / "etc/nginx/nginx.conf").read_bytes() == (
        wanted.read_bytes()
    )


def forge_catalog(node: Node, record_id: str, entries: list[Entry]) -> None:
    """What anyone with write access to the storage could do: age encrypts, it does not
    sign, so a catalog can be replaced by one encrypted to the node's public key."""
    plain = io.BytesIO()
    write_entries(entries, plain)
    forged = age.encrypt_bytes(plain.getvalue(), [node.identity.recipient])
    name = node.repo._prefix + catalog_name(record_id)
    node.storage.put(name, io.BytesIO(forged), len(forged))


def test_forged_paths_cannot_write_outside_the_target(tmp_path):
    node = Node(tmp_path, {"kind": "local", "path": str(tmp_path / "repo")})
    (node.source / "payload").write_text("attacker controlled\n")
    (node.source / "dir").mkdir()
    record = node.backup().record
    node.cache = CatalogCache(tmp_path / "cold", "cold")
    with Archive(node.repo, [node.identity]).entries(record) as stream:
        real = {e.path: e for e in stream}
    payload = real[str(node.source / "payload")]

    def pointing_at_payload(path: str) -> Entry:
        return dataclasses.replace(payload, path=path)

    outside = tmp_path / "outside"
    outside.mkdir()
    link = dataclasses.replace(payload, path="/trap", type="symlink", link=str(outside))
    forged = [
        pointing_at_payload("/../outside/escaped"),
        pointing_at_payload("relative/escaped"),
        pointing_at_payload("/a/./b"),
        link,
        pointing_at_payload("/trap/escaped"),
    ]
    forge_catalog(node, record.id, sorted(forged, key=lambda e: e.key))
    out = tmp_path / "out"
    outcome = node.restore(out, ["/"])
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "escaped").exists()
    refused = [e for e in outcome.errors if "refusing" in e]
    assert len(refused) == 2, outcome.errors
    for path in ("/../outside/escaped", "/a/./b"):
        assert any(repr(path) in e for e in refused)
    assert not (out / "relative").exists()  # never matches an absolute request
    assert any("trap/escaped" in e for e in outcome.errors), outcome.errors


def test_a_member_that_is_not_the_catalogs_file_is_refused(tmp_path):
    """The tar member's own name must match: a catalog line cannot borrow another file."""
    node = Node(tmp_path, {"kind": "local", "path": str(tmp_path / "repo")})
    (node.source / "a").write_text("a\n")
    (node.source / "b").write_text("b\n")
    record = node.backup().record
    with Archive(node.repo, [node.identity], node.cache).entries(record) as stream:
        entries = list(stream)
    a = next(e for e in entries if e.path.endswith("/a"))
    b = next(e for e in entries if e.path.endswith("/b"))
    forged = dataclasses.replace(a, location=b.location, sha256=b.sha256)
    forge_catalog(node, record.id, [forged if e is a else e for e in entries])
    node.cache = CatalogCache(tmp_path / "cold", "cold")
    outcome = node.restore(tmp_path / "out", [forged.path])
    assert outcome.files == 0
    assert any("where" in e and "belongs" in e for e in outcome.errors), outcome.errors


def test_catalog_lines_are_sorted_and_stream(tmp_path):
    node = Node(tmp_path, {"kind": "local", "path": str(tmp_path / "repo")})
    make_tree(node.source)
    record = node.backup().record
    cached = node.cache.path(record.id)
    with cached.open("rb") as plain:
        keys = [entry.key for entry in read_entries(plain)]
    assert keys == sorted(keys) and len(keys) == len(set(keys))


def test_one_writer_per_job_on_a_node(tmp_path):
    """The daemon's backup and a `muster backup` typed meanwhile never interleave."""
    node = Node(tmp_path, {"kind": "local", "path": str(tmp_path / "repo")})
    (node.source / "file").write_text("x")
    with node.cache.writer_lock(), pytest.raises(JobBusy, match="another backup"):
        node.backup()
    assert node.backup().record.full  # and the lock is free again afterwards


def test_names_of_255_bytes_come_back(tmp_path):
    node = Node(tmp_path, {"kind": "local", "path": str(tmp_path / "repo")})
    longest = node.source / ("é" * 127 + "x")  # 255 bytes, the most a name may hold
    longest.write_text("a name as long as it gets\n")
    node.backup()
    out = tmp_path / "out"
    assert node.restore(out).errors == []
    assert (restored_root(out, node.source) / longest.name).read_text() == longest.read_text()
