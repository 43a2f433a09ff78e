"""The hand-built tar headers and catalog lines match their general forms byte for byte."""

import io
import json
import random
import tarfile

import pytest

from agent.catalog import Entry, Location, decode_line, encode_line
from agent.tarheader import _with_pax, member_header

ODD = ["a", "é", '"', "\\", "\n", "\t", "\x01", "\udcff", "/", " ", "𝄞", "\u2028", "\x7f"]


def general_line(entry: Entry) -> bytes:
    """The line as `json.dumps` writes it: the form the catalog has always had."""
    data: dict[str, object] = {
        "path": entry.path,
        "type": entry.type,
        "mode": f"{entry.mode:04o}",
        "uid": entry.uid,
        "gid": entry.gid,
        "user": entry.user,
        "group": entry.group,
        "mtime_ns": entry.mtime_ns,
        "ctime_ns": entry.ctime_ns,
        "inode": entry.inode,
        "size": entry.size,
    }
    if entry.link is not None:
        data["link"] = entry.link
    if entry.sha256 is not None:
        data["sha256"] = entry.sha256
    if (where := entry.location) is not None:
        data.update(
            volume=where.volume,
            frame=where.frame,
            chunk=where.chunk,
            skip=where.skip,
            span=where.span,
        )
    return json.dumps(data, ensure_ascii=False).encode("utf-8", "surrogateescape") + b"\n"


def test_catalog_lines_are_what_json_dumps_writes():
    rng = random.Random(2)
    for _ in range(3000):
        entry = Entry(
            path="/" + "".join(rng.choice(ODD) for _ in range(rng.randint(0, 30))),
            type=rng.choice(["file", "dir", "symlink", "hardlink"]),
            mode=rng.choice([0, 0o644, 0o7777]),
            uid=rng.choice([0, 2**40]),
            gid=5,
            user=rng.choice(["", "root", 'é"']),
            group="g",
            mtime_ns=rng.choice([-1, 0, 10**19]),
            ctime_ns=3,
            inode=4,
            size=rng.choice([0, 10**12]),
            link=rng.choice([None, 'x"y', "é\n"]),
            sha256=rng.choice([None, "ab" * 32]),
            location=rng.choice([None, Location("volumes/x.tar.zst.age", 1, 2, 3, 4)]),
        )
        line = encode_line(entry)
        assert line == general_line(entry)
        assert decode_line(line) == entry


@pytest.mark.parametrize(
    ("name", "kind", "linkname", "size", "uname"),
    [
        (b"etc/nginx/nginx.conf", b"0", b"", 1234, "root"),
        (b"x" * 100, b"2", b"y" * 100, 0, "u" * 32),
        (b"d/\xc3\xa9t\xc3\xa9/", b"5", b"", 0, ""),
        (b"a/b", b"1", b"a/c", 0, "\u00e9" * 16),
        (b"\xff" * 100, b"2", b"\xfe" * 100, 0, "\u00ff" * 16),  # the largest byte sums
    ],
)
def test_headers_without_pax_are_the_general_block_and_read_back(name, kind, linkname, size, uname):
    fields = {"mode": 0o640, "uid": 1000, "gid": 0o7777777, "size": size, "mtime": 1_700_000_000}
    header = member_header(name, kind, linkname=linkname, uname=uname, gname="wheel", **fields)
    general = _with_pax(
        name, kind, 0o640, 1000, 0o7777777, size, 1_700_000_000, linkname, uname.encode(), b"wheel"
    )
    assert header == general and len(header) == 512
    data = header + bytes(size + (-size % 512)) + bytes(1024)
    with tarfile.open(
        fileobj=io.BytesIO(data), mode="r:", encoding="utf-8", errors="surrogateescape"
    ) as archive:
        member = archive.next()
    assert member is not None
    assert (member.size, member.mode, member.uid, member.gid, member.uname) == (
        size,
        0o640,
        1000,
        0o7777777,
        uname,
    )
