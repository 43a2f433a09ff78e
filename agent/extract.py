"""Writes restored entries under a target directory without ever escaping it.

Paths come from the catalog, and a catalog can be forged by anyone who can write to the
storage (age encrypts, it does not sign), so every path is checked: it must be absolute
and free of `.`/`..`/empty components. Directories are walked one component at a time
with `openat`: below a `--to` directory no symlink is ever followed; restoring in place,
the host's own symlinks are (as with `tar -C /`), but never one this restore created.
Files are written to a temporary name, checked against their catalog sha256, and only
then renamed into place: a corrupt file is reported, never left half-written.
"""

import contextlib
import grp
import hashlib
import os
import pwd
import secrets
from collections.abc import Callable, Iterable
from functools import lru_cache
from pathlib import Path

from agent.catalog import Entry

DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class UnsafePath(Exception):
    """A catalog path that would land outside the restore target."""


class ContentMismatch(Exception):
    """Restored bytes differ from the catalog's sha256."""


Overwrite = Callable[[str], bool]


class Target:
    def __init__(self, root: Path, overwrite: Overwrite, strict: bool) -> None:
        self.root = root
        self._overwrite = overwrite
        self._strict = strict
        self._made_links: set[str] = set()
        self._directories: list[Entry] = []
        self._as_root = os.geteuid() == 0
        self._last: tuple[tuple[str, ...], int] | None = None  # the last directory reached
        root.mkdir(parents=True, exist_ok=True)

    # -- entries -------------------------------------------------------------------------

    def directory(self, entry: Entry) -> None:
        """Create it now (private until `finish`), set its mode and times at the end."""
        *parents, name = components(entry.path)
        with self._parent(parents) as parent:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o700, dir_fd=parent)
            with self._open_dir(parent, name, follow=not self._strict):
                pass  # it is a directory we may enter, not a file or a planted symlink
        self._directories.append(entry)

    def file(self, entry: Entry, blocks: Iterable[bytes]) -> bool:
        """Write the file; False when an existing one was left in place."""
        *parents, name = components(entry.path)
        with self._parent(parents) as parent:
            if not self._may_replace(parent, name, entry.path):
                return False
            temp = f".muster-{secrets.token_hex(8)}"  # short: `name` may be 255 bytes already
            fd = os.open(
                temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=parent
            )
            try:
                digest = _write_sparse(fd, blocks)
                if entry.sha256 and digest.hexdigest() != entry.sha256:
                    raise ContentMismatch(
                        f"{entry.path}: restored content does not match the catalog's sha256"
                    )
                self._own(fd, entry)
                os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
                os.rename(temp, name, src_dir_fd=parent, dst_dir_fd=parent)
                return True
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp, dir_fd=parent)
                raise
            finally:
                os.close(fd)

    def symlink(self, entry: Entry) -> None:
        *parents, name = components(entry.path)
        with self._parent(parents) as parent:
            if not self._may_replace(parent, name, entry.path):
                return
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=parent)
            os.symlink(entry.link or "", name, dir_fd=parent)
            if self._as_root:
                os.chown(name, *self._ids(entry), dir_fd=parent, follow_symlinks=False)
            os.utime(
                name, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=parent, follow_symlinks=False
            )
        self._made_links.add(entry.path)

    def hardlink(self, entry: Entry, target: Entry) -> None:
        """A second name for a file this restore wrote."""
        *parents, name = components(entry.path)
        *target_parents, target_name = components(target.path)
        with self._parent(parents) as parent, self._parent(target_parents) as source:
            if not self._may_replace(parent, name, entry.path):
                return
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=parent)
            os.link(target_name, name, src_dir_fd=source, dst_dir_fd=parent, follow_symlinks=False)

    def finish(self) -> None:
        """Directory modes and times last, deepest first, once nothing more is written."""
        self._forget_last()
        for entry in sorted(self._directories, key=lambda e: e.path.count("/"), reverse=True):
            *parents, name = components(entry.path)
            with self._parent(parents) as parent:
                if self._as_root:
                    os.chown(name, *self._ids(entry), dir_fd=parent, follow_symlinks=False)
                os.chmod(name, entry.mode, dir_fd=parent, follow_symlinks=True)
                os.utime(name, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=parent)
        self._forget_last()

    # -- walking -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _parent(self, parents: list[str]):  # type: ignore[no-untyped-def]
        """An fd for the directory holding an entry, creating missing ones on the way.

        Catalog order keeps a directory's files together, so the last directory reached
        is kept open: it was reached safely, and an open fd cannot be redirected."""
        key = tuple(parents)
        if self._last is not None and self._last[0] == key:
            fd = os.dup(self._last[1])
        else:
            fd = self._walk(parents)
            self._forget_last()
            self._last = (key, os.dup(fd))
        try:
            yield fd
        finally:
            os.close(fd)

    def _walk(self, parents: list[str]) -> int:
        fd = os.open(self.root, DIRECTORY_FLAGS)
        path = ""
        try:
            for name in parents:
                path += "/" + name
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o755, dir_fd=fd)
                follow = not self._strict and path not in self._made_links
                with self._open_dir(fd, name, follow) as child:
                    os.close(fd)
                    fd = os.dup(child)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _forget_last(self) -> None:
        if self._last is not None:
            os.close(self._last[1])
            self._last = None

    @contextlib.contextmanager
    def _open_dir(self, parent: int, name: str, follow: bool = False):  # type: ignore[no-untyped-def]
        flags = DIRECTORY_FLAGS | (0 if follow else os.O_NOFOLLOW)
        try:
            fd = os.open(name, flags, dir_fd=parent)
        except (NotADirectoryError, OSError) as error:
            raise UnsafePath(
                f"{name!r} under {self.root} is not a directory we may enter: {error.strerror}"
            ) from None
        try:
            yield fd
        finally:
            os.close(fd)

    def _may_replace(self, parent: int, name: str, path: str) -> bool:
        try:
            os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return True
        return self._overwrite(path)

    def _own(self, fd: int, entry: Entry) -> None:
        if self._as_root:
            os.fchown(fd, *self._ids(entry))
        os.fchmod(fd, entry.mode)

    @staticmethod
    def _ids(entry: Entry) -> tuple[int, int]:
        """Names first, as tar does: uids differ between hosts, user names rarely."""
        return _uid(entry.user, entry.uid), _gid(entry.group, entry.gid)


@lru_cache(maxsize=1024)
def _uid(name: str, number: int) -> int:
    try:
        return pwd.getpwnam(name).pw_uid if name else number
    except KeyError:
        return number


@lru_cache(maxsize=1024)
def _gid(name: str, number: int) -> int:
    try:
        return grp.getgrnam(name).gr_gid if name else number
    except KeyError:
        return number


_ZEROS = memoryview(bytes(1 << 20))


def _is_hole(block: bytes) -> bool:
    """All zeros? Data blocks almost always fail at the first byte; memcmp does the rest."""
    return len(block) <= len(_ZEROS) and block[:1] == b"\0" and _ZEROS[: len(block)] == block


def _write_sparse(fd: int, blocks: Iterable[bytes]) -> "hashlib._Hash":
    """Write the data, seeking over blocks of zeros so that sparse files (VM images,
    databases) come back sparse; returns the sha256 of every byte."""
    digest = hashlib.sha256()
    size = 0
    for block in blocks:
        digest.update(block)
        size += len(block)
        if _is_hole(block):
            os.lseek(fd, len(block), os.SEEK_CUR)
            continue
        view = memoryview(block)
        while view:
            view = view[os.write(fd, view) :]
    os.ftruncate(fd, size)  # a file ending in a hole still has its full length
    return digest


def components(path: str) -> list[str]:
    """The parts of an absolute catalog path, refusing anything that could climb out."""
    if not path.startswith("/"):
        raise UnsafePath(f"{path!r}: catalog paths are absolute; refusing a relative one")
    parts = path.split("/")[1:]
    if path == "/" or any(part in ("", ".", "..") for part in parts) or "\0" in path:
        raise UnsafePath(f"{path!r}: refusing a path with empty, '.' or '..' components")
    return parts
