"""The walk: catalog order, keys, and what it leaves behind (it lists through descriptors)."""

import os
from pathlib import Path

from agent.catalog import sort_key
from agent.walk import Walk


def make_tree(root: Path) -> None:
    for directory in ("a", "a/b", "a.b", "a/b/c", "z"):
        (root / directory).mkdir(parents=True)
    for name in ("a/b/c/f", "a/b/g", "a.b/h", "a/x y", "a/\u00fcn\u00efcode", "z/last"):
        (root / name).write_text(name)
    (root / "a" / "link").symlink_to("../z")


def test_entries_come_in_catalog_order_with_their_keys(tmp_path):
    make_tree(tmp_path)
    found = list(Walk([str(tmp_path)]))
    keys = [entry.key for entry in found]
    assert keys == sorted(keys)
    assert keys == [sort_key(entry.path) for entry in found]
    relative = [os.path.relpath(entry.path, tmp_path) for entry in found]
    assert relative.index("a/b/c/f") < relative.index("a.b")  # components, not strings
    assert len(relative) == len(set(relative)) == 13


def test_a_symlink_to_a_directory_is_an_entry_not_a_way_in(tmp_path):
    make_tree(tmp_path)
    paths = [entry.path for entry in Walk([str(tmp_path / "a")])]
    assert str(tmp_path / "a" / "link") in paths
    assert not any(path.startswith(str(tmp_path / "a" / "link") + "/") for path in paths)


def test_no_descriptor_stays_open(tmp_path):
    make_tree(tmp_path)
    for number in range(50):
        (tmp_path / "many" / str(number)).mkdir(parents=True)
    before = len(os.listdir("/proc/self/fd"))
    walk = Walk([str(tmp_path)])
    assert sum(1 for _ in walk) == 64
    assert len(os.listdir("/proc/self/fd")) == before
    assert walk.warnings == []


def test_a_directory_that_vanished_is_a_warning(tmp_path):
    make_tree(tmp_path)
    walk = Walk([str(tmp_path)])
    seen = []
    for entry in walk:
        seen.append(os.path.relpath(entry.path, tmp_path))
        if seen[-1] == "a":  # listed next: gone before its turn
            for name in ("b/c/f", "b/c", "b/g", "b", "x y", "\u00fcn\u00efcode", "link"):
                path = tmp_path / "a" / name
                path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
            (tmp_path / "a").rmdir()
    assert "a/b" not in seen and "z/last" in seen
    assert any("cannot list" in warning for warning in walk.warnings)


def test_a_directory_swapped_for_a_symlink_is_not_followed(tmp_path):
    make_tree(tmp_path)
    walk = Walk([str(tmp_path)])
    seen = []
    for entry in walk:
        seen.append(os.path.relpath(entry.path, tmp_path))
        if seen[-1] == "a.b":  # listed next: now a link to a directory elsewhere
            (tmp_path / "a.b" / "h").unlink()
            (tmp_path / "a.b").rmdir()
            (tmp_path / "a.b").symlink_to("z")
    assert "a.b/last" not in seen and "z/last" in seen
    assert any(warning.startswith(f"{tmp_path}/a.b: cannot list") for warning in walk.warnings)
