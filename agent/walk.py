"""Walks a job's sources in catalog order, deciding what a backup includes.

Directories are read with `scandir` and visited depth-first with names sorted as bytes,
which is exactly the catalog's component order, so the walk can be merged against the
previous catalog as two streams. Only metadata is read here (lstat), never file data.
"""

import fnmatch
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from agent.catalog import sort_key


@dataclass(frozen=True, slots=True)
class Found:
    path: str
    stat: os.stat_result


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
            yield from self._visit(root, info, info.st_dev)

    def _visit(self, path: str, info: os.stat_result, device: int) -> Iterator[Found]:
        mode = info.st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
            self.warnings.append(f"{path}: skipped {_kind(mode)}")
            return
        yield Found(path, info)
        if not stat.S_ISDIR(mode) or (self._one_file_system and info.st_dev != device):
            return
        for child_path, child in self._children(path):
            yield from self._visit(child_path, child, device)

    def _children(self, directory: str) -> list[tuple[str, os.stat_result]]:
        children = []
        try:
            with os.scandir(directory) as listing:
                for item in listing:
                    path = os.path.join(directory, item.name)
                    if self._excluded(path, item.name):
                        continue
                    try:
                        children.append((path, item.stat(follow_symlinks=False)))
                    except FileNotFoundError:
                        continue  # vanished between listing and stat: it is simply gone
                    except OSError as error:
                        self.warnings.append(f"{path}: {error.strerror}")
        except OSError as error:
            self.warnings.append(f"{directory}: cannot list: {error.strerror}")
        children.sort(key=lambda pair: os.fsencode(pair[0]))
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
