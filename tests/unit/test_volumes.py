"""VolumeWriter: frames, locations and volumes, read back by the standard stack."""

import contextlib
import io
import os
import tarfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import zstandard

from agent import age
from agent.catalog import FILE, Entry
from agent.tarheader import REGULAR, member_header
from agent.volumes import FRAME_MAX, IN_FLIGHT, VolumeWriter

KEY = age.Identity.generate()


class Objects(dict):
    """An in-memory object store with the open_writer shape: committed on clean exit."""

    def open_writer(self, name: str, size_hint: int | None = None):
        store = self

        class Writer(io.BytesIO):
            def __enter__(self):
                return self

            def __exit__(self, kind, *rest):
                if kind is None:
                    store[name] = self.getvalue()

        return Writer()


@contextlib.contextmanager
def volume_writer(objects: Objects, *, level: int, target_size: int) -> Iterator[VolumeWriter]:
    """A VolumeWriter with its compression pool and writer thread, as a backup runs it."""
    with (
        ThreadPoolExecutor(2) as pool,
        ThreadPoolExecutor(1) as writes,
        ThreadPoolExecutor(1) as hasher,
    ):
        yield VolumeWriter(
            objects.open_writer,
            "volumes/20260101T000000Z-abcdef/00001.tar.zst.age",
            [KEY.recipient],
            level=level,
            target_size=target_size,
            pool=pool,
            writer=writes,
            hasher=hasher,
        )


def add_file(writer: VolumeWriter, path: str, data: bytes) -> Entry:
    entry = Entry(
        path=path,
        type=FILE,
        mode=0o644,
        uid=0,
        gid=0,
        user="root",
        group="root",
        mtime_ns=0,
        size=len(data),
    )
    header = member_header(
        path.lstrip("/").encode(),
        REGULAR,
        size=len(data),
        mode=0o644,
        uid=0,
        gid=0,
        mtime=0,
        uname="root",
        gname="root",
    )
    fd = os.memfd_create("member")  # a real descriptor, as the backup passes one
    try:
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
        writer.add(entry, header, fd)
    finally:
        os.close(fd)
    return entry


def member_at(volume: bytes, entry: Entry) -> bytes:
    """Read one member the way a ranged restore does: decrypt from the entry's frame."""
    plain = age.decrypt_bytes(volume, [KEY])
    location = entry.location
    frames = plain[location.frame : location.frame + location.span]
    stream = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(frames), read_across_frames=True)
    stream.read(location.skip)
    with tarfile.open(fileobj=stream, mode="r|") as archive:
        member = archive.next()
        assert member.name == entry.path.lstrip("/")
        return archive.extractfile(member).read()


@pytest.mark.parametrize("size", [0, 1, FRAME_MAX - 1, (IN_FLIGHT + 2) * FRAME_MAX + 123])
def test_every_member_is_located_and_reads_back_alone(size):
    objects = Objects()
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    with volume_writer(objects, level=1, target_size=1 << 30) as writer:
        small = add_file(writer, "/a/small", b"before\n")
        big = add_file(writer, "/a/big", data)
        after = add_file(writer, "/a/after", b"after\n")
        writer.finish()
    (volume,) = objects.values()
    assert member_at(volume, small) == b"before\n"
    assert member_at(volume, big) == data
    assert member_at(volume, after) == b"after\n"
    assert big.sha256 is not None


def test_the_whole_volume_is_one_standard_tar_zst_age_stream():
    objects = Objects()
    with volume_writer(objects, level=3, target_size=1 << 20) as writer:
        for number in range(40):
            add_file(writer, f"/files/{number:03d}", bytes([number]) * 100_000)
        info = writer.finish()
    (name,) = objects  # one volume, whatever the target: the backup decides where they end
    assert info.name == name and info.members == 40 and info.size == len(objects[name])
    plain = zstandard.ZstdDecompressor().stream_reader(
        io.BytesIO(age.decrypt_bytes(objects[name], [KEY])), read_across_frames=True
    )
    with tarfile.open(fileobj=plain, mode="r|") as archive:
        names = [member.name for member in archive]
    assert names == [f"files/{n:03d}" for n in range(40)]


def test_with_frames_written_behind_the_tar_stream_every_location_holds_its_member():
    """Frames are compressed in parallel and written on another thread: each member's
    location, computed before its bytes reach storage, must still point at it."""
    objects = Objects()
    sizes = [(n * 7919) % 300_000 for n in range(120)]  # many frames, members across them
    with volume_writer(objects, level=1, target_size=1 << 30) as writer:
        entries = [
            add_file(writer, f"/many/{n:03d}", bytes([n]) * size) for n, size in enumerate(sizes)
        ]
        writer.finish()
    (volume,) = objects.values()
    frames = [entry.location.frame for entry in entries]
    assert frames == sorted(frames) and len(set(frames)) > 10
    for n, (entry, size) in enumerate(zip(entries, sizes, strict=True)):
        assert member_at(volume, entry) == bytes([n]) * size
