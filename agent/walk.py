"""Walks a job's sources in catalog order, deciding what a backup includes.

Directories are read with `scandir` and visited depth-first with names sorted as bytes,
which is exactly the catalog's component order, so the walk can be merged against the
previous catalog as two streams. Only metadata is read here (lstat), never file data.

The walk is the floor of a no-change backup, so it is iterative (a recursive generator
costs one frame per level for every entry) and hands out each entry's sort key, built
from its parent's, so nobody encodes a path twice.
"""

import fnmatch
import operator
import os
import stat
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from agent.catalog import sort_key

S_ISDIR, S_ISREG, S_ISLNK = stat.S_ISDIR, stat.S_ISREG, stat.S_ISLNK

# A directory is listed through a descriptor: `DirEntry.stat` is then an fstatat of one
# name, where a listing by path has the kernel resolve every entry's whole path again
# (about 15% of a no-change backup's walk on the bench dataset, more on deeper trees).
# O_NOFOLLOW: a directory swapped for a symlink since its lstat is not followed out.
_LIST_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Found(NamedTuple):  # a tuple: built once per entry, the cheapest record there is
    path: str
    stat: os.stat_result
    key: bytes  # `catalog.sort_key(path)`


_KEY = operator.itemgetter(2)  # Found.key


class Walk:
    """Iterate `Found` entries; problems are collected in `warnings`, never raised."""

    def __init__(
        self, paths: Sequence[str], excludes: Sequence[str] = (), one_file_system: bool = False
    ) -> None:
        self._roots = _outermost(paths)
        self._excludes = list(excludes)
        self._one_file_system = one_file_system
        self.warnings: list[str] = []

    def __iter__(self) -> Iterator[Found]:
        for root in self._roots:
            try:
                info = os.lstat(root)
            except OSError as error:
                self.warnings.append(f"{root}: source not backed up: {error.strerror}")
                continue
            yield from self._tree(Found(root, info, sort_key(root)))

    def _tree(self, root: Found) -> Iterator[Found]:
        """The root, then everything under it, depth-first, with an explicit stack."""
        if not self._kept(root):
            return
        yield root
        if not stat.S_ISDIR(root.stat.st_mode):
            return
        device = root.stat.st_dev
        stack = [iter(self._children(root))]
        while stack:
            for child in stack[-1]:
                mode = child.stat.st_mode
                if S_ISDIR(mode):
                    yield child
                    if not (self._one_file_system and child.stat.st_dev != device):
                        stack.append(iter(self._children(child)))
                        break
                elif S_ISREG(mode) or S_ISLNK(mode) or self._kept(child):
                    yield child
            else:
                stack.pop()

    def _kept(self, found: Found) -> bool:
        mode = found.stat.st_mode
        if stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode):
            return True
        self.warnings.append(f"{found.path}: skipped {_kind(mode)}")
        return False

    def _children(self, directory: Found) -> list[Found]:
        """Sorted by key: within one directory, by name bytes."""
        children: list[Found] = []
        append, excludes = children.append, self._excludes
        prefix = directory.path.rstrip("/") + "/"
        key_prefix = directory.key.rstrip(b"\0") + b"\0"
        new = tuple.__new__  # Found(...) would run a Python-level __new__ per entry
        try:
            fd = os.open(directory.path, _LIST_FLAGS)
        except OSError as error:
            self.warnings.append(f"{directory.path}: cannot list: {error.strerror}")
            return []
        try:
            with os.scandir(fd) as listing:  # each stat then resolves one name, not a path
                for item in listing:
                    name = item.name
                    path = prefix + name
                    if excludes and self._excluded(path, name):
                        continue
                    try:
                        info = item.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # vanished between listing and stat: it is simply gone
                    except OSError as error:
                        self.warnings.append(f"{path}: {error.strerror}")
                        continue
                    raw = name.encode("utf-8", "surrogateescape")  # os.fsencode, inlined
                    append(new(Found, (path, info, key_prefix + raw)))
        except OSError as error:
            self.warnings.append(f"{directory.path}: cannot list: {error.strerror}")
        finally:
            os.close(fd)
        children.sort(key=_KEY)  # keys are unique: no two entries compare equal
        return children

    def _excluded(self, path: str, name: str) -> bool:
        """Patterns with a '/' match the whole path, others the name, as in restic."""
        return any(
            fnmatch.fnmatchcase(path if "/" in pattern else name, pattern)
            for pattern in self._excludes
        )


def _outermost(paths: Sequence[str]) -> list[str]:
    """Sources in catalog order, without those inside another source."""
    roots: list[str] = []
    for path in sorted({os.path.normpath(p) for p in paths}, key=sort_key):
        if not any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots):
            roots.append(path)
    return roots


def _kind(mode: int) -> str:
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISFIFO(mode):
        return "named pipe"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device file"
    return "special file"
