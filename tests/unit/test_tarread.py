"""The lean tar reader restore uses: it must read what Muster's writer and GNU/Python tar
write (ustar, pax, GNU long names) and refuse what is not a tar stream."""

import io
import tarfile

import pytest

from agent.tarheader import END_OF_ARCHIVE, REGULAR, member_header, padding
from agent.tarread import TarError, TarReader

LONG = "deep/" * 30 + "n\u00e9e with spaces.txt"


def tar_of(members: dict[str, bytes], fmt: int) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link")
        link.type, link.linkname = tarfile.SYMTYPE, target(fmt)
        archive.addfile(link)
    return out.getvalue()


def target(fmt: int) -> str:
    return "short/target" if fmt == tarfile.USTAR_FORMAT else LONG


class Trickle(io.RawIOBase):
    """Hands out a few bytes per read, so every header and block straddles reads."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data, self._step, self._at = data, step, 0

    def read(self, size: int = -1) -> bytes:
        piece = self._data[self._at : self._at + min(size, self._step)]
        self._at += len(piece)
        return piece


def read_all(stream) -> dict[bytes, tuple[bytes, bytes]]:
    reader = TarReader(stream)
    found = {}
    while (member := reader.next()) is not None:
        data = b"".join(reader.data(member)) if member.isfile() else b""
        found[member.name] = (data, member.linkname)
    return found


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
@pytest.mark.parametrize("step", [1 << 20, 700, 1])
def test_reads_names_links_and_data_as_tar_wrote_them(fmt, step):
    members = {"small": b"x" * 10, "empty": b"", "blocks": bytes(range(256)) * 9}
    if fmt == tarfile.USTAR_FORMAT:
        members["p" * 120 + "/leaf"] = b"in the prefix field"
    else:
        members[LONG] = b"long name data"
    found = read_all(Trickle(tar_of(members, fmt), step))
    for name, data in members.items():
        assert found[name.encode()] == (data, b"")
    assert found[b"link"][1] == target(fmt).encode()


def test_reads_the_backup_writers_pax_headers_and_raw_names():
    raw = b"raw-\xff\xfe"  # not UTF-8: kept as bytes, as the backup writes it
    long = ("x" * 150).encode()
    stream = b"".join(
        member_header(name, REGULAR, mode=0o644, uid=1 << 30, gid=0, size=len(data))
        + data
        + padding(len(data))
        for name, data in ((raw, b"one"), (long, b"two" * 300))
    )
    found = read_all(io.BytesIO(stream + END_OF_ARCHIVE))
    assert found == {raw: (b"one", b""), long: (b"two" * 300, b"")}


def test_unread_data_is_skipped_and_partly_read_data_too():
    stream = tar_of({"a": b"A" * 5000, "b": b"B" * 3, "c": b"C"}, tarfile.PAX_FORMAT)
    reader = TarReader(Trickle(stream, 333))
    first = reader.next()
    assert first is not None and first.name == b"a"
    next(iter(reader.data(first)))  # one block of it, then on
    second = reader.next()
    assert second is not None and second.name == b"b"
    third = reader.next()
    assert third is not None and b"".join(reader.data(third)) == b"C"


def test_a_truncated_stream_is_an_error_not_a_short_file():
    stream = tar_of({"a": b"A" * 5000}, tarfile.PAX_FORMAT)
    reader = TarReader(io.BytesIO(stream[:3000]))
    member = reader.next()
    assert member is not None
    with pytest.raises(TarError, match="truncated"):
        b"".join(reader.data(member))


def test_a_damaged_header_is_refused():
    stream = bytearray(tar_of({"a": b"A"}, tarfile.PAX_FORMAT))
    stream[3] ^= 0x20
    with pytest.raises(TarError, match="checksum"):
        TarReader(io.BytesIO(bytes(stream))).next()
    with pytest.raises(TarError):
        TarReader(io.BytesIO(b"not a tar stream at all".ljust(512, b"!"))).next()
