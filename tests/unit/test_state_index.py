"""The local catalog index: records round-trip, fingerprints decide what changed."""

import io
import os
import stat
from pathlib import Path

from agent.state import CHUNK, IndexWriter, fingerprint, read_index, stat_fingerprint


def written(path: Path, records: list[tuple[bytes, bytes, bytes, str]]) -> bytes:
    """The index of `records`, written to a real file (the writer fsyncs it)."""
    with path.open("wb") as sink:
        writer = IndexWriter(sink)
        for record in records:
            writer.add(*record)
        writer.close()
    return path.read_bytes()


def test_records_come_back_in_order_and_verbatim(tmp_path):
    records = [
        (b"\0a", b"print-1", b'{"path": "/a"}\n', "volumes/v1.tar.zst.age"),
        (b"\0a\0\xff\xfe", b"p" * 36, b"line with \xff bytes\n", "volumes/v2.tar.zst.age"),
    ] + [(b"\0b%d" % i, b"x" * 36, b"l" * 300 + b"\n", "v") for i in range(3000)]
    back = read_index(io.BytesIO(written(tmp_path / "index", records)))
    assert back is not None
    assert [(r.key, r.fingerprint, r.line, r.volume) for r in back] == records


def test_something_else_is_no_index():
    assert read_index(io.BytesIO(b"")) is None
    assert read_index(io.BytesIO(b'{"path": "/a"}\n')) is None


def test_a_truncated_index_ends_early_without_a_wrong_record(tmp_path):
    records = [(b"\0k%05d" % i, b"f" * 36, b"line %d\n" % i, "v") for i in range(20000)]
    data = written(tmp_path / "index", records)
    back = read_index(io.BytesIO(data[: len(data) // 2]))
    assert back is not None
    got = [(r.key, r.fingerprint, r.line, r.volume) for r in back]
    assert 0 < len(got) < len(records) and got == records[: len(got)]


def test_every_field_of_the_fingerprint_counts():
    base = (stat.S_IFREG | 0o644, 10, 1_000, 2_000, 77)
    prints = {fingerprint(*base)}
    for field in range(5):
        changed = list(base)
        changed[field] += 1
        prints.add(fingerprint(*changed))
    assert len(prints) == 6


def test_sizes_count_for_regular_files_only_as_in_the_catalog():
    assert fingerprint(stat.S_IFDIR | 0o755, 4096, 1, 2, 3) == fingerprint(
        stat.S_IFDIR | 0o755, 0, 1, 2, 3
    )


def test_times_beyond_64_bits_still_compare_exactly():
    far = 10**20
    assert fingerprint(stat.S_IFREG, 1, far, 2, 3) != fingerprint(stat.S_IFREG, 1, far + 1, 2, 3)
    assert fingerprint(stat.S_IFREG, 1, far, 2, 3) == fingerprint(stat.S_IFREG, 1, far, 2, 3)


def test_a_stat_result_and_its_fields_give_the_same_fingerprint(tmp_path):
    path = tmp_path / "f"
    path.write_text("data")
    info = os.lstat(path)
    assert stat_fingerprint(info) == fingerprint(
        info.st_mode, info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino
    )


def test_copied_records_make_the_same_index(tmp_path):
    records = [(b"\0k%04d" % i, b"f" * 36, b"line %d\n" % i, f"v{i % 3}") for i in range(500)]
    original = written(tmp_path / "index", records)
    back = read_index(io.BytesIO(original))
    assert back is not None
    with (tmp_path / "copy").open("wb") as sink:
        writer = IndexWriter(sink)
        for record in back:
            writer.write(record.record)
        writer.close()
    again = read_index(io.BytesIO((tmp_path / "copy").read_bytes()))
    assert again is not None
    assert [(r.key, r.fingerprint, r.line, r.volume) for r in again] == records


def test_an_index_of_many_chunks_written_from_pieces_and_runs_is_the_same(tmp_path):
    """Records given one by one and as runs (lists of records), across several chunks:
    the same records, in the same order."""
    records = [(b"\0k%06d" % i, b"f" * 36, b"l%d\n" % i * 20, "v") for i in range(8 * CHUNK // 150)]
    with (tmp_path / "index").open("wb") as sink:
        writer = IndexWriter(sink)
        for record in records[:1000]:
            writer.add(*record)
        copied = read_index(io.BytesIO(written(tmp_path / "part", records[1000:])))
        assert copied is not None
        run = [r.record for r in copied]
        writer.extend(run[:7])
        writer.extend(run[7:])
        writer.close()
    back = read_index(io.BytesIO((tmp_path / "index").read_bytes()))
    assert back is not None
    assert [(r.key, r.fingerprint, r.line, r.volume) for r in back] == records
