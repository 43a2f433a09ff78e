"""Backups whose volumes are written by several worker processes (agent/workers.py).

The parallel path must give the same snapshot as one worker, and a failing or killed
worker must end the run with a clear error and nothing visible, never a hang.
"""

import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
import zstandard

from agent import age, members
from agent.workers import WorkerFailed
from broker.plan import Sources
from broker.snapshot import catalog_name
from tests.integration.test_engine import Node, make_tree, restored_root, tree_state

pytestmark = pytest.mark.integration


def many_volumes_tree(root: Path) -> None:
    """Small files, a few bigger than the volume target, links: many volumes of 64 KiB."""
    make_tree(root)
    for folder in range(12):
        (root / "many" / f"{folder:02d}").mkdir(parents=True)
        for number in range(40):
            text = f"folder {folder} file {number}\n" * (number * 7 % 300 + 1)
            (root / "many" / f"{folder:02d}" / f"{number:03d}.txt").write_text(text)
    (root / "many" / "big.bin").write_bytes(os.urandom(200_000))
    os.link(root / "many" / "00" / "001.txt", root / "many" / "00" / "zz-second-name")


def node_on(tmp_path: Path, name: str, source: Path) -> Node:
    """A node of its own (key, state, repository) backing up `source`."""
    (tmp_path / name).mkdir()
    node = Node(tmp_path / name, {"kind": "local", "path": str(tmp_path / name / "repo")})
    node.source.rmdir()
    node.source = source
    sources = Sources(paths=[str(source)])
    node.job = node.job.model_copy(update={"sources": sources, "volume_size": 64 * 1024})
    return node


def catalog_lines(node: Node, snapshot: str) -> list[str]:
    """The decrypted catalog, with the snapshot id (in volume names) taken out."""
    with node.repo.get(catalog_name(snapshot)) as encrypted:
        plain = age.Decryptor(encrypted, [node.identity])
        reader = zstandard.ZstdDecompressor().stream_reader(plain, read_across_frames=True)
        text = reader.read()
    return text.decode().replace(snapshot, "SNAPSHOT").splitlines()


def test_several_workers_write_the_snapshot_one_worker_writes(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    many_volumes_tree(source)
    one, several = node_on(tmp_path, "one", source), node_on(tmp_path, "several", source)
    alone = one.backup(workers=1).record
    shared = several.backup(workers=3).record
    assert len(alone.volumes) > 10
    assert catalog_lines(several, shared.id) == catalog_lines(one, alone.id)
    assert [(v.members, v.header_length) for v in shared.volumes] == [
        (v.members, v.header_length) for v in alone.volumes
    ]
    assert shared.stats == alone.stats
    out = tmp_path / "out"
    assert several.restore(out).errors == []
    assert tree_state(restored_root(out, source)) == tree_state(source)
    assert multiprocessing.active_children() == []  # every worker was joined


def test_an_incremental_keeps_changed_files_in_one_volume_across_flushes(tmp_path, monkeypatch):
    from agent.actions import backup

    node = Node(tmp_path, {"kind": "local", "path": str(tmp_path / "repo")})
    many_volumes_tree(node.source)
    node.backup(workers=2)
    for folder in range(0, 12, 3):
        (node.source / "many" / f"{folder:02d}" / "005.txt").write_text("changed\n")
    monkeypatch.setattr(backup, "BACKLOG", 16)  # many flushes: lines wait for few members
    monkeypatch.setattr(backup, "HOLD_LIMIT", 32)  # and the walk waits for their answers
    again = node.backup(workers=2).record
    assert again.stats.files_changed == 4 and len(again.volumes) == 1
    out = tmp_path / "out"
    assert node.restore(out).errors == []
    assert tree_state(restored_root(out, node.source)) == tree_state(node.source)


def test_lines_come_back_with_every_part_not_only_with_the_volume(tmp_path, monkeypatch):
    """A worker answers each part with the lines of the members written so far, so
    neither process holds a volume's worth of entries (up to MEMBERS_PER_VOLUME) until
    the volume ends: memory stays flat in the number of files. 3,000 files of 8 KiB in
    one volume, in parts of 64."""
    from agent.actions import backup

    node = Node(tmp_path, {"kind": "local", "path": str(tmp_path / "repo")})
    for folder in range(30):
        (node.source / f"{folder:02d}").mkdir()
        for number in range(100):
            (node.source / f"{folder:02d}" / f"{number:02d}").write_bytes(os.urandom(8192))
    monkeypatch.setattr(backup, "PART_ITEMS", 64)
    early = []
    real_fill = backup._Volumes._fill

    def fill(volumes, done):
        if done.info is None:
            early.append(len(done.stored.lines))
        real_fill(volumes, done)

    monkeypatch.setattr(backup._Volumes, "_fill", fill)
    record = node.backup(workers=1).record
    assert len(record.volumes) == 1 and record.stats.files == 3000
    # all but the last few frames' members (about 128 files of 8 KiB per MiB)
    assert sum(early) > 2000, early
    out = tmp_path / "out"
    assert node.restore(out).errors == []
    assert tree_state(restored_root(out, node.source)) == tree_state(node.source)


class Refused(Exception):
    pass


def test_an_error_in_a_worker_ends_the_run_with_that_error_and_no_snapshot(tmp_path, monkeypatch):
    node = Node(tmp_path, {"kind": "local", "path": str(tmp_path / "repo")}, volume_size="64KiB")
    many_volumes_tree(node.source)
    real_open_writer = node.storage.open_writer

    def refuse_the_fifth(name: str, size_hint: int | None = None):
        if name.endswith("/00005.tar.zst.age"):
            raise Refused("storage refused volume 5")
        return real_open_writer(name, size_hint)

    monkeypatch.setattr(node.storage, "open_writer", refuse_the_fifth)
    with pytest.raises(Refused, match="storage refused volume 5") as raised:
        node.backup(workers=2)
    assert "refuse_the_fifth" in str(raised.value.__cause__)  # the worker's traceback
    assert node.repo.snapshots() == []
    assert multiprocessing.active_children() == []
    monkeypatch.setattr(node.storage, "open_writer", real_open_writer)
    assert node.backup(workers=2).record.full
    assert node.repo.leftovers() == []


def test_a_worker_that_dies_ends_the_run_with_a_clear_error(tmp_path, monkeypatch):
    node = Node(tmp_path, {"kind": "local", "path": str(tmp_path / "repo")}, volume_size="64KiB")
    many_volumes_tree(node.source)
    real_open = members.open_for_reading

    def crash(path: str) -> int:
        if path.endswith("/many/03/010.txt"):
            os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would
        return real_open(path)

    monkeypatch.setattr(members, "open_for_reading", crash)
    with pytest.raises(WorkerFailed, match=r"exit code -9.*no snapshot was recorded"):
        node.backup(workers=2)
    assert node.repo.snapshots() == []
    assert multiprocessing.active_children() == []


def test_workers_stop_and_leave_nothing_when_the_main_process_is_killed(tmp_path, monkeypatch):
    node = Node(tmp_path, {"kind": "local", "path": str(tmp_path / "repo")}, volume_size="64KiB")
    many_volumes_tree(node.source)
    pids = tmp_path / "worker-pids"
    real_open = members.open_for_reading

    def hang(path: str) -> int:
        if path.endswith("/010.txt"):
            with open(pids, "a") as out:
                out.write(f"{os.getpid()}\n")
            time.sleep(60)
        return real_open(path)

    monkeypatch.setattr(members, "open_for_reading", hang)
    main = os.fork()
    if main == 0:  # pragma: no cover - the backup's main process
        try:
            node.backup(workers=2)
        finally:
            os._exit(1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(_read_pids(pids)) < 2:
        time.sleep(0.05)
    workers = _read_pids(pids)
    assert len(workers) == 2, "both workers should be writing a volume"
    os.kill(main, signal.SIGKILL)
    os.waitpid(main, 0)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(map(_alive, workers)):
        time.sleep(0.05)
    assert not any(map(_alive, workers)), "a worker outlived the backup's main process"
    # each worker dropped its open volume's upload (the killed process's catalog is the
    # usual garbage of a crash, safe to delete)
    written = [p.name for p in (tmp_path / "repo").rglob("*.tar.zst.age")]
    assert not [name for name in written if name.startswith(".muster-tmp-")]
    assert node.repo.snapshots() == []


def _read_pids(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    """Not gone and not a zombie (process 1 may be slow to reap an orphan)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status


def test_no_collections_during_a_run_and_the_collector_is_given_back(tmp_path, monkeypatch):
    import gc

    from agent.actions import backup

    node = Node(tmp_path, {"kind": "local", "path": str(tmp_path / "repo")})
    make_tree(node.source)
    seen = []
    real_add = backup._Volumes.add

    def add(volumes, entry, slot):
        seen.append((gc.isenabled(), gc.get_freeze_count() > 0))
        real_add(volumes, entry, slot)

    monkeypatch.setattr(backup._Volumes, "add", add)
    node.backup(workers=1)
    assert seen and set(seen) == {(False, True)}
    assert gc.isenabled() and gc.get_freeze_count() == 0
