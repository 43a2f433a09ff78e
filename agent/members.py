"""One volume's members, built in a backup worker process from the stat data of the walk.

The main process walks and decides what to store and in which volume; it sends each
entry as an `Item` (its path and stat fields: small, no file data). Here each item
becomes a tar member (files read, links read, headers built) and, once its frames are
written, a catalog line. Reading and header building cost about 40 us of Python per
small file: done here, they are spread over the worker processes.
"""

import grp
import os
import pwd
import stat
from collections.abc import Callable
from functools import lru_cache
from typing import NamedTuple

from agent.catalog import DIRECTORY, FILE, HARDLINK, SYMLINK, Entry, encode_line
from agent.tarheader import DIRECTORY as TAR_DIRECTORY
from agent.tarheader import HARDLINK as TAR_HARDLINK
from agent.tarheader import REGULAR, member_header
from agent.tarheader import SYMLINK as TAR_SYMLINK
from agent.volumes import VolumeWriter, open_for_reading
from broker.snapshot import VolumeInfo


class Item(NamedTuple):
    """An entry to store, as the walk saw it: pickled to a worker, so a plain tuple."""

    path: str
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    size: int
    nlink: int
    device: int


def item(path: str, info: os.stat_result) -> Item:
    return Item(
        path,
        info.st_mode,
        info.st_uid,
        info.st_gid,
        info.st_mtime_ns,
        info.st_ctime_ns,
        info.st_ino,
        info.st_size,
        info.st_nlink,
        info.st_dev,
    )


class Stored(NamedTuple):
    """What became of a message's items: a catalog line each (None: not stored, see the
    warnings), and the bytes of file data read."""

    lines: list[bytes | None]
    warnings: list[str]
    bytes_new: int


class VolumeMembers:
    """Adds items to one volume; a hard link to a file earlier in the same volume becomes
    a tar hardlink member, as GNU tar writes it."""

    def __init__(self, volume: VolumeWriter, on_file: Callable[[], None]) -> None:
        self._volume = volume
        self._on_file = on_file  # progress: one more regular file read
        self._links: dict[tuple[int, int], Entry] = {}
        self._entries: list[Entry | None] = []
        self._warnings: list[str] = []
        self._bytes_new = 0

    def add(self, items: list[Item]) -> None:
        for found in items:
            entry = _entry(found)
            stored = self._store(entry, found)
            self._entries.append(entry if stored else None)
            if stored and entry.type in (FILE, HARDLINK):
                self._on_file()

    def located(self) -> Stored:
        """The lines of the members written so far, in order; the rest stay here. Sent
        with every part, so neither process holds a volume's worth of entries."""
        entries = self._entries
        done = 0
        for entry in entries:
            if entry is not None and entry.location is None:
                break
            done += 1
        return self._stored(done)

    def flush(self) -> Stored:
        """Every member added so far written: their lines."""
        self._volume.flush()
        return self._stored(len(self._entries))

    def finish(self) -> tuple[Stored, VolumeInfo]:
        """Commit the volume: the last lines, and the volume's record."""
        info = self._volume.finish()
        return self._stored(len(self._entries)), info

    def abort(self, error: BaseException) -> None:
        self._volume.abort(error)

    def _stored(self, count: int) -> Stored:
        """The first `count` entries' lines, with the warnings and bytes read so far (the
        warnings wait for a line to go with: the main process files them under one)."""
        entries = self._entries
        lines = [None if entry is None else encode_line(entry) for entry in entries[:count]]
        del entries[:count]
        if not lines:
            return Stored(lines, [], 0)
        stored = Stored(lines, self._warnings, self._bytes_new)
        self._warnings, self._bytes_new = [], 0
        return stored

    def _store(self, entry: Entry, found: Item) -> bool:
        """Append the entry's member to the volume; False if it cannot be read."""
        name = _member_name(entry)
        owner = {
            "mode": entry.mode,
            "uid": entry.uid,
            "gid": entry.gid,
            "mtime": entry.mtime_ns // 10**9,
            "uname": entry.user,
            "gname": entry.group,
        }
        if entry.type == DIRECTORY:
            self._volume.add(entry, member_header(name + b"/", TAR_DIRECTORY, **owner))
        elif entry.type == SYMLINK:
            try:
                entry.link = os.readlink(entry.path)
            except OSError as error:
                return self._warn(f"{entry.path}: cannot read link: {error.strerror}")
            link = entry.link.encode("utf-8", "surrogateescape")
            self._volume.add(entry, member_header(name, TAR_SYMLINK, linkname=link, **owner))
        elif not self._store_hardlink(entry, found, name, owner):
            return self._store_file(entry, found, name, owner)
        return True

    def _store_hardlink(self, entry: Entry, found: Item, name: bytes, owner: dict) -> bool:
        """A second name of a file already in this volume becomes a tar hardlink member."""
        if found.nlink < 2:
            return False
        target = self._links.get((found.device, found.inode))
        if target is None:
            return False
        if target.location is None:  # rare: wait for its frames, whose hashing sets its sha256
            self._volume.flush()
        if target.sha256 is None:  # it shrank while being read: store this name in full
            return False
        entry.type, entry.link, entry.sha256 = HARDLINK, target.path, target.sha256
        header = member_header(name, TAR_HARDLINK, linkname=_member_name(target), **owner)
        self._volume.add(entry, header)
        return True

    def _store_file(self, entry: Entry, found: Item, name: bytes, owner: dict) -> bool:
        try:
            fd = open_for_reading(entry.path)
        except FileNotFoundError:
            return self._warn(f"{entry.path}: vanished before it could be read")
        except OSError as error:
            return self._warn(f"{entry.path}: not backed up: {error.strerror}")
        try:
            header = member_header(name, REGULAR, size=entry.size, **owner)
            self._warnings += self._volume.add(entry, header, fd)
            after = os.fstat(fd)
        finally:
            os.close(fd)
        if (after.st_size, after.st_mtime_ns) != (entry.size, entry.mtime_ns):
            self._warnings.append(f"{entry.path}: changed while being read")
        if found.nlink > 1:
            self._links[(found.device, found.inode)] = entry
        self._bytes_new += entry.size
        return True

    def _warn(self, message: str) -> bool:
        self._warnings.append(message)
        return False


def _entry(found: Item) -> Entry:
    mode = found.mode
    kind = DIRECTORY if stat.S_ISDIR(mode) else SYMLINK if stat.S_ISLNK(mode) else FILE
    return Entry(
        path=found.path,
        type=kind,
        mode=stat.S_IMODE(mode),
        uid=found.uid,
        gid=found.gid,
        user=_user(found.uid),
        group=_group(found.gid),
        mtime_ns=found.mtime_ns,
        ctime_ns=found.ctime_ns,
        inode=found.inode,
        size=found.size if kind == FILE else 0,
    )


def _member_name(entry: Entry) -> bytes:
    """Relative names, as GNU tar writes them: extraction lands under the current dir."""
    return entry.path.lstrip("/").encode("utf-8", "surrogateescape") or b"."


@lru_cache(maxsize=1024)
def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return ""


@lru_cache(maxsize=1024)
def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return ""
