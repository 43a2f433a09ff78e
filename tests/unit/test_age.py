"""agent.age against the age v1 spec: keys, streaming both ways, random access, CCTV vectors."""

from __future__ import annotations

import hashlib
import io
import os
import random
import stat
from pathlib import Path

import pytest

from agent import age

VECTORS = Path(__file__).resolve().parents[1] / "data" / "age-testkit"
SPEC_IDENTITY = "AGE-SECRET-KEY-1GFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPQ4EGAEX"
SPEC_RECIPIENT = "age1zvkyg2lqzraa2lnjvqej32nkuu0ues2s82hzrye869xeexvn73equnujwj"
CHUNK = age.CHUNK_SIZE
ENC_CHUNK = age.ENCRYPTED_CHUNK_SIZE


@pytest.fixture(scope="module")
def identity() -> age.Identity:
    return age.Identity.generate()


def encrypt(data: bytes, *recipients: age.Recipient) -> bytes:
    return age.encrypt_bytes(data, recipients)


def decrypt_released(ciphertext: bytes, identities: list[age.Identity]) -> tuple[bytes, Exception]:
    """Read in odd-sized pieces until the end or an error; return what was released."""
    released, buffer = bytearray(), bytearray(7001)
    try:
        reader = age.Decryptor(io.BytesIO(ciphertext), identities)
        while n := reader.readinto(buffer):
            released += buffer[:n]
    except age.AgeError as exc:
        return bytes(released), exc
    return bytes(released), None


# --- keys --------------------------------------------------------------------------------


def test_spec_identity_gives_spec_recipient():
    assert str(age.Identity.parse(SPEC_IDENTITY).recipient) == SPEC_RECIPIENT


def test_identity_round_trips_canonical_upper_case(identity):
    text = str(identity)
    assert text.startswith("AGE-SECRET-KEY-1") and text == text.upper()
    assert age.Identity.parse(text) == identity
    assert age.Identity.parse(f"  {text}\n") == identity


def test_recipient_round_trips_lower_case(identity):
    text = str(identity.recipient)
    assert text.startswith("age1") and text == text.lower()
    assert age.Recipient.parse(text) == identity.recipient


def test_repr_never_shows_the_secret(identity):
    secret = str(identity)
    assert secret not in repr(identity)
    assert secret[16:].lower() not in repr(identity).lower()
    assert str(identity.recipient) in repr(identity)


@pytest.mark.parametrize(
    "text",
    [
        SPEC_IDENTITY[:-1] + "Q",  # checksum
        SPEC_IDENTITY.lower(),  # age identities are upper case
        SPEC_IDENTITY[:20] + SPEC_IDENTITY[20:].lower(),  # mixed case
        SPEC_RECIPIENT,  # a recipient is not an identity
        "AGE-SECRET-KEY-PQ-1HZLGZUPT4ETPKDEV8HSGFDCYZ4E522W0A7PU2LHT8EH9W6YLNC3SW78XKG",
        "AGE-SECRET-KEY-1",
        "",
    ],
)
def test_malformed_identity_is_rejected_without_echoing_it(text):
    with pytest.raises(age.KeyFormatError) as info:
        age.Identity.parse(text)
    if len(text) > 20:
        assert text not in str(info.value)


@pytest.mark.parametrize(
    "text",
    [SPEC_RECIPIENT[:-1] + "q", SPEC_RECIPIENT.upper(), SPEC_IDENTITY, "age1", "ssh-ed25519 AAAA"],
)
def test_malformed_recipient_is_rejected(text):
    with pytest.raises(age.KeyFormatError):
        age.Recipient.parse(text)


def test_identity_file_round_trip(tmp_path, identity):
    path = tmp_path / "key.txt"
    age.write_identity(path, identity)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# created: ")
    assert lines[1] == f"# public key: {identity.recipient}"
    assert lines[2] == str(identity) and len(lines) == 3
    assert age.load_identities(path) == [identity]
    assert [p.name for p in tmp_path.iterdir()] == ["key.txt"]  # no temporary left behind


def test_write_identity_never_replaces_a_file(tmp_path, identity):
    path = tmp_path / "key.txt"
    path.write_text("precious\n")
    with pytest.raises(age.AgeError, match="refusing"):
        age.write_identity(path, identity)
    assert path.read_text() == "precious\n"
    assert [p.name for p in tmp_path.iterdir()] == ["key.txt"]


def test_load_identities_reads_comments_blank_lines_and_several_keys(tmp_path):
    first, second = age.Identity.generate(), age.Identity.generate()
    path = tmp_path / "keys.txt"
    path.write_text(f"# created: x\n\n# public key: y\n{first}\n\n  {second}  \n# end\n")
    assert age.load_identities(path) == [first, second]


def test_load_identities_names_the_bad_line_but_not_its_content(tmp_path, identity):
    broken = str(identity)[:-1] + ("A" if str(identity)[-1] != "A" else "C")
    path = tmp_path / "keys.txt"
    path.write_text(f"# comment\n{identity}\n{broken}\n")
    with pytest.raises(age.KeyFormatError, match="line 3") as info:
        age.load_identities(path)
    assert broken not in str(info.value) and str(identity) not in str(info.value)


def test_load_identities_rejects_a_file_without_keys(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text("# nothing\n")
    with pytest.raises(age.KeyFormatError, match="no"):
        age.load_identities(path)


# --- round trips -------------------------------------------------------------------------

RNG = random.Random(20240501)
SIZES = [0, 1, 65535, 65536, 65537, 3 * 65536, *(RNG.randrange(1, 400_000) for _ in range(6))]


@pytest.mark.parametrize("size", SIZES)
def test_round_trip(identity, size):
    data = os.urandom(size)
    sink = io.BytesIO()
    with age.Encryptor(sink, [identity.recipient]) as writer:
        writer.write(data)
    ciphertext = sink.getvalue()
    assert len(ciphertext) == age.ciphertext_size(writer.header_length, size)
    assert age.decrypt_bytes(ciphertext, [identity]) == data


@pytest.mark.parametrize("size", [0, 65536, 200_001])
def test_writes_of_any_shape_give_the_same_plaintext(identity, size):
    data = os.urandom(size)
    sink = io.BytesIO()
    with age.Encryptor(sink, [identity.recipient]) as writer:
        view, rng = memoryview(data), random.Random(size)
        while view:
            n = rng.choice([1, 7, 4096, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK])
            piece = view[:n]
            writer.write(bytearray(piece) if n % 2 else piece)
            view = view[n:]
        assert writer.tell() == size
    assert age.decrypt_bytes(sink.getvalue(), [identity]) == data


def test_multiple_recipients_each_decrypt(identity):
    others = [age.Identity.generate() for _ in range(3)]
    ciphertext = encrypt(b"volume", identity.recipient, *(o.recipient for o in others))
    for each in [identity, *others]:
        assert age.decrypt_bytes(ciphertext, [each]) == b"volume"
    assert age.decrypt_bytes(ciphertext, [age.Identity.generate(), others[2]]) == b"volume"


def test_wrong_identity_is_no_match(identity):
    ciphertext = encrypt(b"secret", identity.recipient)
    with pytest.raises(age.NoIdentityMatch, match="identity"):
        age.decrypt_bytes(ciphertext, [age.Identity.generate()])


def test_encryptor_needs_a_recipient():
    with pytest.raises(age.AgeError, match="recipient"):
        age.Encryptor(io.BytesIO(), [])


def test_header_length_is_where_chunk_zero_starts(identity):
    sink = io.BytesIO()
    writer = age.Encryptor(sink, [identity.recipient, age.Identity.generate().recipient])
    assert len(sink.getvalue()) == writer.header_length
    writer.write(b"x" * 100)
    writer.close()
    ciphertext = sink.getvalue()
    assert ciphertext[: writer.header_length].count(b"-> X25519 ") == 2
    assert len(ciphertext) == writer.header_length + 100 + age.CHUNK_OVERHEAD
    assert age.Decryptor(io.BytesIO(ciphertext), [identity]).header_length == writer.header_length


def test_close_leaves_the_sink_open_unless_asked(identity):
    sink = io.BytesIO()
    age.Encryptor(sink, [identity.recipient]).close()
    assert not sink.closed
    age.Encryptor(sink, [identity.recipient], close_sink=True).close()
    assert sink.closed


def test_write_after_close_fails(identity):
    writer = age.Encryptor(io.BytesIO(), [identity.recipient])
    writer.close()
    writer.close()  # idempotent
    with pytest.raises(ValueError):
        writer.write(b"late")


def test_an_exception_inside_with_leaves_an_unfinished_file(identity):
    sink = io.BytesIO()
    with pytest.raises(RuntimeError), age.Encryptor(sink, [identity.recipient]) as writer:
        writer.write(b"a" * (2 * CHUNK + 5))
        raise RuntimeError("tar failed")
    released, error = decrypt_released(sink.getvalue(), [identity])
    assert isinstance(error, age.PayloadError)
    assert released == b"a" * (2 * CHUNK)  # only whole, verified chunks came out


def test_decryptor_read_shapes(identity):
    data = os.urandom(3 * CHUNK + 17)
    ciphertext = encrypt(data, identity.recipient)
    assert age.Decryptor(io.BytesIO(ciphertext), [identity]).read() == data
    assert age.Decryptor(io.BytesIO(ciphertext), [identity]).read(len(data) + 10) == data
    reader, out, buf = (
        age.Decryptor(io.BytesIO(ciphertext), [identity]),
        bytearray(),
        bytearray(5000),
    )
    while n := reader.readinto(buf):
        out += buf[:n]
    assert out == data and reader.read(10) == b""


def test_read_never_returns_a_short_result_for_a_damaged_file(identity):
    data = os.urandom(2 * CHUNK + 10)
    reader = age.Decryptor(io.BytesIO(encrypt(data, identity.recipient)[:-1]), [identity])
    assert reader.read(CHUNK) == data[:CHUNK]
    with pytest.raises(age.PayloadError, match="truncated"):
        reader.read(2 * CHUNK)
    with pytest.raises(age.PayloadError):  # and it keeps failing
        reader.read(1)


class _ReadOnly:
    """A source with only read(), returning short reads, like some HTTP bodies."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)

    def read(self, n: int = -1) -> bytes:
        n = min(n if n >= 0 else len(self._data), 1000)
        out, self._data = bytes(self._data[:n]), self._data[n:]
        return out


def test_decryptor_accepts_a_source_with_only_short_reads(identity):
    data = os.urandom(2 * CHUNK + 3)
    ciphertext = encrypt(data, identity.recipient)
    assert age.Decryptor(_ReadOnly(ciphertext), [identity]).read() == data


# --- tampering ---------------------------------------------------------------------------


def _header_length(ciphertext: bytes) -> int:
    return ciphertext.index(b"\n--- ") + 49 + age.NONCE_SIZE


def test_altered_header_mac_fails(identity):
    ciphertext = bytearray(encrypt(b"data", identity.recipient))
    at = ciphertext.index(b"\n--- ") + 5
    ciphertext[at] = ord("A") if ciphertext[at] != ord("A") else ord("B")
    with pytest.raises(age.HeaderMacError, match="altered"):
        age.decrypt_bytes(bytes(ciphertext), [identity])


def test_altered_stanza_argument_fails_the_mac(identity):
    # An added stanza for someone else keeps the header well-formed but changes the MAC input.
    ciphertext = encrypt(b"data", identity.recipient)
    at = ciphertext.index(b"---")
    forged = ciphertext[:at] + b"-> grease\n\n" + ciphertext[at:]
    with pytest.raises(age.HeaderMacError):
        age.decrypt_bytes(forged, [identity])


@pytest.mark.parametrize("size", [10, CHUNK, 2 * CHUNK + 10])
@pytest.mark.parametrize("where", ["first", "last"])
def test_flipped_payload_byte_fails(identity, size, where):
    ciphertext = bytearray(encrypt(os.urandom(size), identity.recipient))
    ciphertext[_header_length(ciphertext) if where == "first" else -1] ^= 1
    with pytest.raises(age.PayloadError):
        age.decrypt_bytes(bytes(ciphertext), [identity])


@pytest.mark.parametrize("size", [0, 10, CHUNK, 2 * CHUNK + 10])
@pytest.mark.parametrize("cut", [1, 15, 16, 17])
def test_truncated_final_chunk_fails(identity, size, cut):
    ciphertext = encrypt(os.urandom(size), identity.recipient)
    with pytest.raises((age.PayloadError, age.HeaderError)):
        age.decrypt_bytes(ciphertext[:-cut], [identity])


@pytest.mark.parametrize("size", [0, 10, CHUNK, 2 * CHUNK])
def test_truncation_at_a_chunk_boundary_fails(identity, size):
    ciphertext = encrypt(os.urandom(size), identity.recipient)
    end = _header_length(ciphertext) + (max(0, (size - 1)) // CHUNK) * ENC_CHUNK
    with pytest.raises(age.PayloadError, match=r"truncated|no payload"):
        age.decrypt_bytes(ciphertext[:end], [identity])


@pytest.mark.parametrize("size", [0, 10, CHUNK, 2 * CHUNK + 1])
@pytest.mark.parametrize("extra", [b"\x00", os.urandom(16), os.urandom(ENC_CHUNK)])
def test_appended_bytes_fail(identity, size, extra):
    data = os.urandom(size)
    released, error = decrypt_released(encrypt(data, identity.recipient) + extra, [identity])
    assert isinstance(error, age.PayloadError)
    assert data.startswith(released)


def test_dropped_or_swapped_chunks_fail(identity):
    ciphertext = encrypt(os.urandom(3 * CHUNK + 5), identity.recipient)
    start = _header_length(ciphertext)
    chunks = [
        ciphertext[start + i : start + i + ENC_CHUNK] for i in range(0, 4 * ENC_CHUNK, ENC_CHUNK)
    ]
    for body in (chunks[0] + chunks[2] + chunks[3], chunks[1] + chunks[0] + chunks[2] + chunks[3]):
        with pytest.raises(age.PayloadError):
            age.decrypt_bytes(ciphertext[:start] + body, [identity])


def test_empty_final_chunk_after_full_chunks_is_rejected(identity):
    # Hand-build chunk 0 (full, not last) + an empty final chunk: legal STREAM, forbidden by age.
    sink = io.BytesIO()
    writer = age.Encryptor(sink, [identity.recipient])
    writer.write(b"z" * CHUNK)
    writer._emit(bytes(writer._pending), last=False)
    writer._pending.clear()
    writer._emit(b"", last=True)
    writer._closed = True
    released, error = decrypt_released(sink.getvalue(), [identity])
    assert isinstance(error, age.PayloadError) and "empty" in str(error)
    assert released == b"z" * CHUNK


def test_not_an_age_file():
    for junk in (b"", b"hello\n", b"\x00" * 5000, os.urandom(100_000)):
        with pytest.raises(age.HeaderError):
            age.decrypt_bytes(junk, [age.Identity.generate()])
    with pytest.raises(age.HeaderError, match="armor"):
        age.decrypt_bytes(b"-----BEGIN AGE ENCRYPTED FILE-----\nYWdl\n", [age.Identity.generate()])


# --- random access -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def volume(identity) -> tuple[bytes, bytes]:
    data = os.urandom(16 * CHUNK + 12345)  # ~1 MiB, with a short final chunk
    return data, encrypt(data, identity.recipient)


def test_offsets_and_sizes_agree_with_the_file(volume, identity):
    data, ciphertext = volume
    key = age.open_header(ciphertext[:4096], [identity])
    assert key.header_length == _header_length(ciphertext)
    assert age.chunk_count(len(ciphertext), key.header_length) == 17
    assert age.plaintext_size(len(ciphertext), key.header_length) == len(data)
    assert age.ciphertext_size(key.header_length, len(data)) == len(ciphertext)
    assert [age.is_final_chunk(len(ciphertext), key.header_length, i) for i in (0, 15, 16)] == [
        False,
        False,
        True,
    ]
    assert age.ciphertext_offset(key.header_length, 0) == key.header_length
    assert age.ciphertext_offset(key.header_length, CHUNK - 1) == key.header_length
    assert age.ciphertext_offset(key.header_length, CHUNK) == key.header_length + ENC_CHUNK


@pytest.mark.parametrize(
    "first,count", [(0, 1), (0, 3), (7, 2), (15, 1), (15, 2), (16, 1), (0, 17)]
)
def test_decrypt_a_run_of_chunks_from_a_slice(volume, identity, first, count):
    data, ciphertext = volume
    key = age.open_header(ciphertext[:4096], [identity])
    start = key.header_length + first * ENC_CHUNK
    piece = ciphertext[start : start + count * ENC_CHUNK]
    last = age.is_final_chunk(len(ciphertext), key.header_length, first + count - 1)
    assert key.decrypt_chunks(first, piece, last) == data[first * CHUNK : (first + count) * CHUNK]


def test_restore_one_small_file_by_plaintext_offset(volume, identity):
    data, ciphertext = volume
    wanted_at, wanted_len = 5 * CHUNK + 60_000, 10_000  # spans chunks 5 and 6
    key = age.open_header(ciphertext[:4096], [identity])
    start = age.ciphertext_offset(key.header_length, wanted_at)
    end = age.ciphertext_offset(key.header_length, wanted_at + wanted_len - 1) + ENC_CHUNK
    first = wanted_at // CHUNK
    plain = key.decrypt_chunks(first, ciphertext[start:end], is_last_included=False)
    skip = wanted_at - first * CHUNK
    assert plain[skip : skip + wanted_len] == data[wanted_at : wanted_at + wanted_len]


def test_wrong_index_or_last_flag_fails(volume, identity):
    _, ciphertext = volume
    key = age.open_header(ciphertext[:4096], [identity])
    chunk3 = ciphertext[key.header_length + 3 * ENC_CHUNK :][:ENC_CHUNK]
    with pytest.raises(age.PayloadError):
        key.decrypt_chunks(4, chunk3, is_last_included=False)
    with pytest.raises(age.PayloadError):
        key.decrypt_chunks(3, chunk3, is_last_included=True)
    final = ciphertext[key.header_length + 16 * ENC_CHUNK :]
    with pytest.raises(age.PayloadError):
        key.decrypt_chunks(16, final, is_last_included=False)


def test_short_prefix_asks_for_more(volume, identity):
    _, ciphertext = volume
    header_length = _header_length(ciphertext)
    for size in (0, 10, header_length - 17, header_length - 1):
        with pytest.raises(age.IncompleteHeader, match="longer prefix") as info:
            age.open_header(ciphertext[:size], [identity])
        assert info.value.available == size
    assert age.open_header(ciphertext[:header_length], [identity]).header_length == header_length


def test_open_header_checks_identity_and_mac(volume, identity):
    _, ciphertext = volume
    with pytest.raises(age.NoIdentityMatch):
        age.open_header(ciphertext[:4096], [age.Identity.generate()])
    tampered = bytearray(ciphertext[:4096])
    tampered[tampered.index(b"\n--- ") + 6] ^= 0x01
    with pytest.raises(age.HeaderError):
        age.open_header(bytes(tampered), [identity])


# --- CCTV test vectors -------------------------------------------------------------------

EXPECTED_ERROR = {
    "header failure": age.HeaderError,
    "HMAC failure": age.HeaderMacError,
    "no match": age.NoIdentityMatch,
    "payload failure": age.PayloadError,
}


def _load_vector(path: Path) -> tuple[dict[str, list[str]], bytes]:
    head, _, body = path.read_bytes().partition(b"\n\n")
    meta: dict[str, list[str]] = {}
    for line in head.decode().splitlines():
        key, _, value = line.partition(": ")
        meta.setdefault(key, []).append(value)
    return meta, body


VECTOR_PATHS = sorted(p for p in VECTORS.iterdir() if p.name != "README.md")


def test_the_vector_set_is_complete():
    assert len(VECTOR_PATHS) == 59


@pytest.mark.parametrize("path", VECTOR_PATHS, ids=lambda p: p.name)
def test_cctv_vector(path):
    meta, body = _load_vector(path)
    expect = meta["expect"][0]
    identities = [age.Identity.parse(text) for text in meta.get("identity", [])]
    released, error = decrypt_released(body, identities)
    if expect == "success":
        assert error is None
    else:
        assert isinstance(error, EXPECTED_ERROR[expect]), repr(error)
        if expect == "header failure":  # a parse error must not surface as a MAC failure
            assert not isinstance(error, age.HeaderMacError)
    if "payload" in meta:  # everything released, even before a failure, must match
        assert hashlib.sha256(released).hexdigest() == meta["payload"][0]
    else:
        assert released == b""


@pytest.mark.parametrize(
    "name", ["x25519", "stream_two_chunks", "stream_three_chunks", "stream_last_chunk_full"]
)
def test_cctv_vector_by_random_access(name):
    meta, body = _load_vector(VECTORS / name)
    key = age.open_header(body[:4096], [age.Identity.parse(meta["identity"][0])])
    count = age.chunk_count(len(body), key.header_length)
    plain = b"".join(
        key.decrypt_chunks(
            i,
            body[age.ciphertext_offset(key.header_length, i * CHUNK) :][:ENC_CHUNK],
            age.is_final_chunk(len(body), key.header_length, i),
        )
        for i in range(count)
    )
    assert hashlib.sha256(plain).hexdigest() == meta["payload"][0]
