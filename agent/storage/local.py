"""A directory as storage (`file:///dir`): for tests, removable disks and NFS mounts.

Object `a/b/c` is the file `<path>/<prefix>/a/b/c`. An object is written to a hidden temporary
file next to its final place (`.muster-tmp-*`, same directory so the same file system), which
is fsynced and then renamed over the final name, and the directory is fsynced too: after a
crash the object is either absent or complete. Listings skip temporary files; one left by a
crash is garbage that is safe to delete. Unlike Swift and S3, a directory cannot hold both an
object `a` and an object `a/b`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from broker.plan import LocalTarget

from .base import (
    MIB,
    AuthError,
    InvalidName,
    NotFound,
    ObjectInfo,
    Storage,
    StorageError,
    Tuning,
    Upload,
    check_name,
    check_prefix,
)

TEMP_PREFIX = ".muster-tmp-"


@contextlib.contextmanager
def _errors(what: str, path: Path) -> Iterator[None]:
    """Turn OS errors into storage errors that name the path and the likely fix."""
    try:
        yield
    except FileNotFoundError:
        raise NotFound(f"{what}: {path} does not exist") from None
    except PermissionError:
        raise AuthError(
            f"{what}: permission denied on {path}; run the agent as a user that may use it"
        ) from None
    except (NotADirectoryError, FileExistsError, IsADirectoryError):
        raise StorageError(
            f"{what}: {path} clashes with another object (a directory cannot hold both "
            "'a' and 'a/b'); choose other names or another backend"
        ) from None
    except OSError as error:
        raise StorageError(f"{what}: {path}: {error.strerror}") from None


class _LocalUpload(Upload):
    """A temporary file that becomes the object by rename."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._temp = path.with_name(f"{TEMP_PREFIX}{secrets.token_hex(8)}-{path.name}")
        with _errors("cannot create", path.parent):
            path.parent.mkdir(parents=True, exist_ok=True)
        with _errors("cannot write", self._temp):
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            self._file = open(os.open(self._temp, flags, 0o600), "wb")  # noqa: SIM115

    def add_part(self, data: memoryview) -> None:
        with _errors("cannot write", self._temp):
            self._file.write(data)

    def commit(self, tail: memoryview) -> None:
        with _errors("cannot write", self._path):
            self._file.write(tail)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._temp, self._path)
            directory = os.open(self._path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(OSError):
            self._temp.unlink()


class LocalStorage(Storage):
    max_parts = sys.maxsize  # a file has no part limit
    part_size = MIB  # only the size of a write to the file here: no need for more

    def __init__(self, target: LocalTarget, tuning: Tuning) -> None:
        super().__init__(tuning, target.prefix)
        self.directory = Path(target.path, self.root)

    def _path(self, name: str) -> Path:
        parts = check_name(name).split("/")
        if any(part.startswith(TEMP_PREFIX) for part in parts):
            raise InvalidName(f"invalid object name {name!r}: {TEMP_PREFIX}* is reserved")
        return self.directory.joinpath(*parts)

    def _start_upload(self, name: str) -> Upload:
        return _LocalUpload(self._path(name))

    def get(self, name: str) -> BinaryIO:
        path = self._path(name)
        with _errors("cannot read", path):
            if path.is_dir():
                raise FileNotFoundError
            return open(path, "rb")

    def _get_range(self, name: str, start: int, length: int) -> bytes:
        with self.get(name) as file:
            file.seek(start)
            return file.read(length)

    def stat(self, name: str) -> ObjectInfo:
        path = self._path(name)
        with _errors("cannot read", path):
            info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise NotFound(f"cannot read: {path} is not an object")
        return ObjectInfo(name, info.st_size, datetime.fromtimestamp(info.st_mtime, UTC))

    def delete(self, name: str) -> None:
        path = self._path(name)
        with (
            _errors("cannot delete", path),
            contextlib.suppress(FileNotFoundError, IsADirectoryError),
        ):
            path.unlink()

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self._walk(self.directory, "", check_prefix(prefix))

    def _walk(self, directory: Path, relative: str, prefix: str) -> Iterator[ObjectInfo]:
        """Depth first, entries sorted with a '/' after directory names: that visits names
        in the same order as sorting the full names, without holding them all."""
        try:
            with os.scandir(directory) as scan:
                entries = [entry for entry in scan if not entry.name.startswith(TEMP_PREFIX)]
        except (FileNotFoundError, NotADirectoryError):
            return
        keyed = []
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                keyed.append((relative + entry.name + "/", entry, True))
            elif entry.is_file(follow_symlinks=False):
                keyed.append((relative + entry.name, entry, False))
        for key, entry, is_dir in sorted(keyed, key=lambda item: item[0]):
            if is_dir and (key.startswith(prefix) or prefix.startswith(key)):
                yield from self._walk(Path(entry.path), key, prefix)
            elif not is_dir and key.startswith(prefix):
                info = entry.stat(follow_symlinks=False)
                yield ObjectInfo(key, info.st_size, datetime.fromtimestamp(info.st_mtime, UTC))
