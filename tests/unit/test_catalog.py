import io

import pytest

from agent.catalog import FILE, Entry, encode_line, path_needle, read_entries, write_entries

ODD = [
    "/etc/plain",
    '/data/quote"s and \\back',
    "/data/new\nline",
    "/data/é ü",
    "/raw/\udcff\udcfe",
]


def entry(path: str) -> Entry:
    return Entry(
        path=path,
        type=FILE,
        mode=0o644,
        uid=0,
        gid=0,
        user="root",
        group="root",
        mtime_ns=1,
        size=1,
        sha256="00",
    )


@pytest.mark.parametrize("path", ODD)
def test_a_line_holds_the_needle_of_its_path_and_of_every_parent(path):
    line = encode_line(entry(path))
    parts = path.split("/")
    for depth in range(2, len(parts) + 1):
        assert path_needle("/".join(parts[:depth])) in line


def test_the_prefilter_keeps_what_matches_and_nothing_is_lost():
    compressed = io.BytesIO()
    write_entries([entry(p) for p in ODD], compressed)
    for path in ODD:
        compressed.seek(0)
        found = [e.path for e in read_entries(compressed, [path_needle(path)])]
        assert path in found
