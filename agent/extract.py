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
import itertools
import os
import pwd
import resource
import secrets
import stat
import threading
from collections.abc import Callable, Iterable
from functools import lru_cache
from pathlib import Path
from typing import Protocol

from agent.catalog import Entry

DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC

Block = bytes | memoryview
_Cache = dict[tuple[str, ...], tuple[int, bool]]  # directory -> (fd, set-group-ID)


class UnsafePath(Exception):
    """A catalog path that would land outside the restore target."""


class ContentMismatch(Exception):
    """Restored bytes differ from the catalog's sha256."""


Overwrite = Callable[[str], bool]


class Sink(Protocol):
    """Where restored entries go: a directory tree (`Target`), or a verify's checker."""

    def directory(self, entry: Entry) -> None: ...
    def file(self, entry: Entry, blocks: Iterable[Block]) -> bool: ...
    def symlink(self, entry: Entry) -> None: ...
    def hardlink(self, entry: Entry, target: Entry) -> None: ...
    def finish(self) -> None: ...


class Target:
    """Safe to use from several threads at once (volumes are restored in parallel): each
    thread keeps its own cache of open directories."""

    def __init__(self, root: Path, overwrite: Overwrite, strict: bool) -> None:
        self.root = root
        self._overwrite = overwrite
        self._strict = strict
        self._made_links: set[str] = set()
        self._directories: list[Entry] = []
        self._as_root = os.geteuid() == 0
        self._own_ids = (os.geteuid(), os.getegid())
        self._umask = _umask()
        self._fresh: set[tuple[str, ...]] = set()  # directories this restore created
        self._local = threading.local()
        self._caches: list[tuple[threading.Thread, _Cache]] = []
        self._cache_size = _cache_size()
        self._lock = threading.Lock()
        # temporary names: short (a `name` may be 255 bytes already), unguessable, and
        # without a getrandom call per file
        self._temp_prefix = secrets.token_hex(6)
        self._temp_numbers = itertools.count()
        root.mkdir(parents=True, exist_ok=True)

    # -- entries -------------------------------------------------------------------------

    def directory(self, entry: Entry) -> None:
        """Create it now (private until `finish`), set its mode and times at the end."""
        *parents, name = components(entry.path)
        parent = self._parent(parents)
        try:
            os.mkdir(name, 0o700, dir_fd=parent)
            self._fresh.add((*parents, name))
        except FileExistsError:
            pass
        with self._open_dir(parent, name, follow=not self._strict):
            pass  # it is a directory we may enter, not a file or a planted symlink
        self._directories.append(entry)

    def file(self, entry: Entry, blocks: Iterable[Block]) -> bool:
        """Write the file; False when an existing one was left in place."""
        *parents, name = components(entry.path)
        parent = self._parent(parents)
        if tuple(parents) not in self._fresh and not self._may_replace(parent, name, entry.path):
            return False
        temp = f".muster-{self._temp_prefix}{next(self._temp_numbers)}"  # short: see `_temp_prefix`
        created = entry.mode & 0o777 & ~self._umask
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(temp, flags, created, dir_fd=parent)
        try:
            digest = _write_sparse(fd, blocks)
            if entry.sha256 and digest.hexdigest() != entry.sha256:
                raise ContentMismatch(
                    f"{entry.path}: restored content does not match the catalog's sha256"
                )
            self._own(fd, entry, created, self._cache()[tuple(parents)][1])
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
        parent = self._parent(parents)
        if not self._may_replace(parent, name, entry.path):
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=parent)
        os.symlink(entry.link or "", name, dir_fd=parent)
        if self._as_root:
            os.chown(name, *self._ids(entry), dir_fd=parent, follow_symlinks=False)
        os.utime(name, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=parent, follow_symlinks=False)
        self._made_links.add(entry.path)

    def hardlink(self, entry: Entry, target: Entry) -> None:
        """A second name for a file this restore wrote."""
        *parents, name = components(entry.path)
        *target_parents, target_name = components(target.path)
        parent = os.dup(self._parent(parents))  # reaching `source` may evict it from the cache
        try:
            source = self._parent(target_parents)
            if not self._may_replace(parent, name, entry.path):
                return
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=parent)
            os.link(target_name, name, src_dir_fd=source, dst_dir_fd=parent, follow_symlinks=False)
        finally:
            os.close(parent)

    def finish(self) -> None:
        """Directory modes and times last, deepest first, once nothing more is written."""
        for entry in sorted(self._directories, key=lambda e: e.path.count("/"), reverse=True):
            *parents, name = components(entry.path)
            parent = self._parent(parents)
            if self._as_root:
                os.chown(name, *self._ids(entry), dir_fd=parent, follow_symlinks=False)
            os.chmod(name, entry.mode, dir_fd=parent, follow_symlinks=True)
            os.utime(name, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=parent)
        self.close()

    def close(self) -> None:
        """Close every thread's cached directories."""
        with self._lock:
            for _, cache in self._caches:
                _close_all(cache)
            self._caches.clear()

    # -- walking -------------------------------------------------------------------------

    def _cache(self) -> _Cache:
        """This thread's open directories: path -> (fd, whether it is set-group-ID).
        A new thread's cache first closes those of threads that have ended (each pool of
        volume workers is a new set of threads), so open fds stay bounded."""
        cache = getattr(self._local, "cache", None)
        if cache is None:
            cache = self._local.cache = {}
            with self._lock:
                for thread, ended in [c for c in self._caches if not c[0].is_alive()]:
                    _close_all(ended)
                    self._caches.remove((thread, ended))
                self._caches.append((threading.current_thread(), cache))
        return cache

    def _parent(self, parents: list[str]) -> int:
        """An fd for the directory holding an entry, creating missing ones on the way.

        Directories reached are kept open (a few hundred per thread): each was reached
        safely, and an open fd cannot be redirected. The fd stays owned by the cache."""
        cache = self._cache()
        key = tuple(parents)
        found = cache.pop(key, None)
        if found is not None:
            cache[key] = found  # most recently used last: eviction takes the oldest
            return found[0]
        depth = len(parents) - 1
        while depth >= 0 and key[:depth] not in cache:
            depth -= 1
        fd = cache[key[:depth]][0] if depth >= 0 else self._open_root(cache)
        for end in range(max(depth, 0) + 1, len(parents) + 1):
            fd = self._enter(cache, fd, key[:end])
        return fd

    def _open_root(self, cache: _Cache) -> int:
        fd = os.open(self.root, DIRECTORY_FLAGS)
        self._keep(cache, (), fd)
        return fd

    def _enter(self, cache: _Cache, parent: int, key: tuple[str, ...]) -> int:
        """Open (making it if missing) the directory `key`, whose parent is open as `parent`."""
        name = key[-1]
        path = "/" + "/".join(key)
        follow = not self._strict and path not in self._made_links
        flags = DIRECTORY_FLAGS | (0 if follow else os.O_NOFOLLOW)
        try:
            fd = os.open(name, flags, dir_fd=parent)
        except FileNotFoundError:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o755, dir_fd=parent)
                self._fresh.add(key)
            fd = self._checked_open(parent, name, flags)
        except OSError as error:
            raise self._unsafe(name, error) from None
        self._keep(cache, key, fd)
        return fd

    def _keep(self, cache: _Cache, key: tuple[str, ...], fd: int) -> None:
        if len(cache) >= self._cache_size:
            oldest = next(iter(cache))
            os.close(cache.pop(oldest)[0])
        cache[key] = (fd, bool(os.fstat(fd).st_mode & stat.S_ISGID))

    def _checked_open(self, parent: int, name: str, flags: int) -> int:
        try:
            return os.open(name, flags, dir_fd=parent)
        except OSError as error:
            raise self._unsafe(name, error) from None

    def _unsafe(self, name: str, error: OSError) -> UnsafePath:
        return UnsafePath(
            f"{name!r} under {self.root} is not a directory we may enter: {error.strerror}"
        )

    @contextlib.contextmanager
    def _open_dir(self, parent: int, name: str, follow: bool = False):  # type: ignore[no-untyped-def]
        flags = DIRECTORY_FLAGS | (0 if follow else os.O_NOFOLLOW)
        fd = self._checked_open(parent, name, flags)
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

    def _own(self, fd: int, entry: Entry, created: int, setgid_parent: bool) -> None:
        """Owner, then mode (a chown clears set-ID bits), each only when it differs from
        what the file was created with: most restores need neither call."""
        chowned = False
        if self._as_root:
            ids = self._ids(entry)
            chowned = ids != self._own_ids or setgid_parent
            if chowned:
                os.fchown(fd, *ids)
        if chowned or entry.mode & 0o7777 != created:
            os.fchmod(fd, entry.mode)

    @staticmethod
    def _ids(entry: Entry) -> tuple[int, int]:
        """Names first, as tar does: uids differ between hosts, user names rarely."""
        return _uid(entry.user, entry.uid), _gid(entry.group, entry.gid)


def _cache_size() -> int:
    """Open directories kept per thread: a few hundred at most, and a small share of the
    fds the process may open (several threads each keep a cache)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 128 if soft == resource.RLIM_INFINITY else max(4, min(128, soft // 16))


def _close_all(cache: _Cache) -> None:
    for fd, _ in cache.values():
        os.close(fd)
    cache.clear()


def _umask() -> int:
    """The process umask, read without setting it when Linux says it: other threads (the
    daemon's) may be creating files at this very moment."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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


def _is_hole(block: Block) -> bool:
    """All zeros? Data blocks almost always fail at the first byte; memcmp does the rest."""
    return len(block) <= len(_ZEROS) and block[:1] == b"\0" and _ZEROS[: len(block)] == block


def _write_sparse(fd: int, blocks: Iterable[Block]) -> "hashlib._Hash":
    """Write the data, seeking over blocks of zeros so that sparse files (VM images,
    databases) come back sparse; returns the sha256 of every byte."""
    digest = hashlib.sha256()
    size = 0
    hole = False  # whether the file so far ends in a hole
    for block in blocks:
        digest.update(block)
        size += len(block)
        hole = _is_hole(block)
        if hole:
            os.lseek(fd, len(block), os.SEEK_CUR)
            continue
        view = memoryview(block)
        while view:
            view = view[os.write(fd, view) :]
    if hole:
        os.ftruncate(fd, size)  # a file ending in a hole still has its full length
    return digest


_CLIMBING = frozenset(("", ".", ".."))


def components(path: str) -> list[str]:
    """The parts of an absolute catalog path, refusing anything that could climb out."""
    if not path.startswith("/"):
        raise UnsafePath(f"{path!r}: catalog paths are absolute; refusing a relative one")
    parts = path.split("/")[1:]
    if path == "/" or not _CLIMBING.isdisjoint(parts) or "\0" in path:
        raise UnsafePath(f"{path!r}: refusing a path with empty, '.' or '..' components")
    return parts
