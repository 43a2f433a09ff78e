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


def test_the_needle_scan_finds_lines_cut_by_block_boundaries():
    """More than a MiB of lines: the scan works on 1 MiB blocks, so lines straddle them."""
    paths = sorted(f"/srv/d{n % 7}/file-{n:06d}-" + "p" * (n % 97) for n in range(12_000))
    paths += [f"/zz/{name}" for name in ODD[1:]]
    compressed = io.BytesIO()
    write_entries([entry(p) for p in paths], compressed)
    assert sum(len(encode_line(entry(p))) for p in paths) > 2 << 20
    for wanted in (["/srv/d3"], ["/srv/d1/file-000008-pppppppp", "/zz"], ["/"], ["/nowhere"]):
        needles = [path_needle(p) for p in wanted]
        compressed.seek(0)
        found = [e.path for e in read_entries(compressed, needles)]
        expected = [p for p in paths if any(n in encode_line(entry(p)) for n in needles)]
        assert found == expected
