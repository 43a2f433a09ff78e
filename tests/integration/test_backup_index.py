"""The local catalog index that makes unchanged files cheap: it must never change results.

An incremental backup reads the previous snapshot's entries from the index when this
node wrote one, and falls back to the cached or stored catalog otherwise; both paths
must produce the same catalog, and a damaged index may cost work but never a wrong line.
"""

import os
import shutil
from pathlib import Path

import pytest
import zstandard

from tests.integration.test_engine import Node, make_tree, restored_root, tree_state

pytestmark = pytest.mark.integration


def local_node(tmp_path: Path) -> Node:
    node = Node(tmp_path, {"kind": "local", "path": str(tmp_path / "repo")}, volume_size="1MiB")
    make_tree(node.source)
    return node


def index_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "state").rglob("*.index"))


def cached_catalog(node: Node, snapshot_id: str) -> bytes:
    """The plain catalog lines of a snapshot, from the cache (only the latest is kept)."""
    path = node.cache.path(snapshot_id)
    assert path is not None
    return zstandard.ZstdDecompressor().stream_reader(path.read_bytes()).read()


def test_each_backup_leaves_one_index_of_its_own_catalog(tmp_path):
    node = local_node(tmp_path)
    first = node.backup().record
    assert [p.name for p in index_files(tmp_path)] == [f"{first.id}.index"]
    second = node.backup().record
    assert [p.name for p in index_files(tmp_path)] == [f"{second.id}.index"]
    assert (index_files(tmp_path)[0].stat().st_mode & 0o777) == 0o600


def test_without_the_index_the_catalog_is_decoded_to_the_same_result(tmp_path):
    node = local_node(tmp_path)
    node.backup()
    with_index = node.backup().record
    expected = cached_catalog(node, with_index.id)
    for index in index_files(tmp_path):
        index.unlink()
    without_index = node.backup().record
    assert without_index.stats.files_unchanged == without_index.stats.files == 7
    assert without_index.volumes == []
    assert cached_catalog(node, without_index.id) == expected
    assert [p.name for p in index_files(tmp_path)] == [f"{without_index.id}.index"]


@pytest.mark.parametrize("damage", ["foreign", "truncated", "empty"])
def test_a_damaged_index_costs_work_never_a_wrong_catalog(tmp_path, damage):
    node = local_node(tmp_path)
    first = node.backup().record
    reference = cached_catalog(node, first.id)
    (index,) = index_files(tmp_path)
    data = index.read_bytes()
    index.write_bytes(
        {"foreign": b"not an index at all", "truncated": data[: len(data) // 2], "empty": b""}[
            damage
        ]
    )
    again = node.backup()
    assert again.record.stats.files == 7
    assert cached_catalog(node, again.record.id).count(b"\n") == reference.count(b"\n")
    out = tmp_path / "out"
    assert node.restore(out).errors == []
    assert tree_state(restored_root(out, node.source)) == tree_state(node.source)


def test_an_index_of_an_older_snapshot_is_not_used(tmp_path):
    """A state directory restored from an older copy holds the index of a snapshot that
    is no longer the latest: the latest catalog is then fetched from storage."""
    node = local_node(tmp_path)
    node.backup()
    shutil.copytree(tmp_path / "state", tmp_path / "state-copy")
    (node.source / "etc" / "new").write_text("new file\n")
    second = node.backup().record
    shutil.rmtree(tmp_path / "state")
    (tmp_path / "state-copy").rename(tmp_path / "state")
    third = node.backup().record
    assert third.parent == second.id
    assert third.stats.files_unchanged == third.stats.files == 8
    assert third.volumes == []


def test_same_size_and_mtime_but_a_new_ctime_is_read_again(tmp_path):
    node = local_node(tmp_path)
    node.backup()
    conf = node.source / "etc" / "empty"
    conf.write_bytes(b"")  # same size (0) ...
    target = node.source / "data" / "name with spaces, ünïcode\nand newline"
    before = target.stat()
    target.write_text("ODD\n")  # same size, different content
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))  # ... and same mtime
    assert target.stat().st_ctime_ns != before.st_ctime_ns
    again = node.backup().record
    assert again.stats.files_changed >= 1 and again.stats.bytes_new >= 4
    out = tmp_path / "out"
    assert node.restore(out).errors == []
    assert (restored_root(out, node.source) / target.relative_to(node.source)).read_text() == (
        "ODD\n"
    )


def test_a_mode_change_alone_is_a_change(tmp_path):
    node = local_node(tmp_path)
    node.backup()
    os.chmod(node.source / "etc" / "nginx" / "nginx.conf", 0o600)
    again = node.backup().record
    assert again.stats.files_changed == 2  # the file and its second name
    assert again.stats.files_unchanged == 5


def test_with_the_index_no_catalog_line_is_decoded(tmp_path, monkeypatch):
    node = local_node(tmp_path)
    node.backup()

    def refuse(line: bytes) -> None:
        raise AssertionError(f"decoded a catalog line: {line[:60]!r}")

    monkeypatch.setattr("agent.catalog.decode_line", refuse)
    again = node.backup().record
    assert again.stats.files_unchanged == again.stats.files == 7


@pytest.mark.parametrize("hold_limit", [8, 1 << 20], ids=["walk-waits", "walk-goes-on"])
def test_lines_held_behind_an_unwritten_frame_are_bounded(tmp_path, monkeypatch, hold_limit):
    """One changed file amid many unchanged ones: its volume's part is sent to a worker
    early, and written, rather than holding every following line until the volume ends;
    past the hold limit the walk waits for the worker's answer."""
    from agent.actions import backup
    from agent.workers import FLUSH

    node = local_node(tmp_path)
    many = node.source / "many"
    many.mkdir()
    for number in range(60):
        (many / f"{number:02d}").write_text(f"file {number}\n")
    node.backup()
    (node.source / "data" / "name with spaces, ünïcode\nand newline").write_text("changed\n")
    sent, waits = [], []
    send, flush = backup._Volumes._send, backup._Volumes.flush
    monkeypatch.setattr(backup, "BACKLOG", 8)
    monkeypatch.setattr(backup, "HOLD_LIMIT", hold_limit)
    monkeypatch.setattr(backup._Volumes, "_send", lambda self, m: (sent.append(m), send(self, m)))
    monkeypatch.setattr(backup._Volumes, "flush", lambda self: (waits.append(1), flush(self)))
    again = node.backup().record
    assert FLUSH in sent, "the backlog never asked the open volume's worker for its lines"
    assert bool(waits) == (hold_limit == 8), "the walk waited below the limit, or not past it"
    assert len(again.volumes) == 1, "a flush cut the volume short"
    assert again.stats.files_changed == 1 and again.stats.files_unchanged == 66
    out = tmp_path / "out"
    assert node.restore(out).errors == []
    assert tree_state(restored_root(out, node.source)) == tree_state(node.source)


@pytest.mark.parametrize(("backlog", "run"), [(8, 256), (4096, 256), (4096, 1), (8, 3)])
def test_lines_held_behind_a_changed_file_keep_their_order_and_bytes(
    tmp_path, monkeypatch, backlog, run
):
    """Unchanged entries after a changed one wait, as runs of bytes, for its frame: the
    catalog must hold each of their lines once, verbatim, in order, and the index written
    with them must find them all unchanged on the next run (runs of one entry, or ending
    anywhere around the changed one, included)."""
    from agent.actions import backup

    monkeypatch.setattr(backup, "RUN", run)

    node = local_node(tmp_path)
    many = node.source / "many"
    many.mkdir()
    for number in range(60):
        (many / f"{number:02d}").write_text(f"file {number}\n")
    first = node.backup().record
    before = cached_catalog(node, first.id).splitlines(keepends=True)
    (many / "00").write_text("changed, and longer\n")
    monkeypatch.setattr(backup, "BACKLOG", backlog)
    changed = node.backup().record
    assert changed.stats.files_changed == 1
    after = cached_catalog(node, changed.id).splitlines(keepends=True)
    needle = str(many / "00").encode()
    assert [line for line in after if needle not in line] == [
        line for line in before if needle not in line
    ]
    assert len(after) == len(before)
    again = node.backup().record
    assert again.stats.files_unchanged == again.stats.files == changed.stats.files
