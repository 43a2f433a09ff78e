"""agent.age interoperates both ways with the reference `age` and `age-keygen` CLIs.

The Debian package `age` provides them (tests/services/install-system.sh installs it).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from agent import age

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True, scope="module")
def age_cli() -> None:
    """A missing CLI is a broken install (make test provides it), never a reason to skip."""
    missing = [tool for tool in ("age", "age-keygen") if not shutil.which(tool)]
    assert not missing, f"{missing} not installed: run tests/services/install-system.sh"


SIZES = [0, 1, age.CHUNK_SIZE, 5 * 1024 * 1024 + 12345]
IDS = ["0B", "1B", "64KiB", "5MiB"]


def run(*args: str | Path, data: bytes = b"") -> bytes:
    result = subprocess.run([str(a) for a in args], input=data, capture_output=True, check=False)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


@pytest.fixture(scope="module")
def cli_key(tmp_path_factory) -> tuple[Path, str]:
    """A key file written by `age-keygen`, and its recipient as `age-keygen -y` prints it."""
    path = tmp_path_factory.mktemp("cli") / "key.txt"
    run("age-keygen", "-o", path)
    return path, run("age-keygen", "-y", path).decode().strip()


@pytest.fixture(scope="module")
def muster_key(tmp_path_factory) -> tuple[Path, age.Identity]:
    """A key file written by `write_identity`."""
    identity = age.Identity.generate()
    path = tmp_path_factory.mktemp("muster") / "key.txt"
    age.write_identity(path, identity)
    return path, identity


@pytest.mark.parametrize("size", SIZES, ids=IDS)
def test_age_decrypts_what_muster_encrypts(tmp_path, muster_key, size):
    key_path, identity = muster_key
    data = os.urandom(size)
    encrypted = tmp_path / "volume.age"
    with encrypted.open("wb") as sink, age.Encryptor(sink, [identity.recipient]) as writer:
        writer.write(data)
    assert run("age", "-d", "-i", key_path, encrypted) == data


@pytest.mark.parametrize("size", SIZES, ids=IDS)
def test_muster_decrypts_what_age_encrypts(tmp_path, cli_key, size):
    key_path, recipient = cli_key
    data = os.urandom(size)
    encrypted = tmp_path / "volume.age"
    run("age", "-r", recipient, "-o", encrypted, data=data)
    identities = age.load_identities(key_path)
    with encrypted.open("rb") as source:
        assert age.Decryptor(source, identities).read() == data


def test_age_keygen_files_parse_to_the_same_recipient(cli_key):
    key_path, recipient = cli_key
    [identity] = age.load_identities(key_path)
    assert str(identity.recipient) == recipient
    assert age.Recipient.parse(recipient) == identity.recipient
    assert str(identity) in key_path.read_text()  # same canonical spelling


def test_age_keygen_accepts_write_identity_files(muster_key):
    key_path, identity = muster_key
    assert run("age-keygen", "-y", key_path).decode().strip() == str(identity.recipient)


def test_muster_encrypts_to_several_recipients_for_age(tmp_path, cli_key, muster_key):
    cli_path, cli_recipient = cli_key
    muster_path, identity = muster_key
    data = os.urandom(100_000)
    ciphertext = age.encrypt_bytes(data, [identity.recipient, age.Recipient.parse(cli_recipient)])
    (tmp_path / "v.age").write_bytes(ciphertext)
    assert run("age", "-d", "-i", cli_path, tmp_path / "v.age") == data
    assert run("age", "-d", "-i", muster_path, tmp_path / "v.age") == data


def test_age_encrypts_to_several_recipients_for_muster(tmp_path, cli_key, muster_key):
    _, cli_recipient = cli_key
    _, identity = muster_key
    data = os.urandom(70_000)
    encrypted = tmp_path / "v.age"
    run("age", "-r", cli_recipient, "-r", str(identity.recipient), "-o", encrypted, data=data)
    assert age.decrypt_bytes(encrypted.read_bytes(), [identity]) == data


def test_random_access_into_a_file_age_wrote(tmp_path, cli_key):
    key_path, recipient = cli_key
    data = os.urandom(5 * 1024 * 1024 + 12345)
    encrypted = tmp_path / "volume.age"
    run("age", "-r", recipient, "-o", encrypted, data=data)
    size = encrypted.stat().st_size
    with encrypted.open("rb") as volume:
        key = age.open_header(volume.read(4096), age.load_identities(key_path))
        for wanted in (0, 3 * age.CHUNK_SIZE + 5, len(data) - 1):
            index = wanted // age.CHUNK_SIZE
            volume.seek(age.ciphertext_offset(key.header_length, wanted))
            chunk = volume.read(age.ENCRYPTED_CHUNK_SIZE)  # what a ranged GET would return
            last = age.is_final_chunk(size, key.header_length, index)
            plain = key.decrypt_chunks(index, chunk, last)
            assert plain == data[index * age.CHUNK_SIZE : (index + 1) * age.CHUNK_SIZE]


def test_age_rejects_a_truncated_muster_file(tmp_path, muster_key):
    key_path, identity = muster_key
    sink = io.BytesIO()
    with pytest.raises(RuntimeError), age.Encryptor(sink, [identity.recipient]) as writer:
        writer.write(os.urandom(3 * age.CHUNK_SIZE))
        raise RuntimeError("the producer died")
    (tmp_path / "cut.age").write_bytes(sink.getvalue())
    result = subprocess.run(
        ["age", "-d", "-i", str(key_path), str(tmp_path / "cut.age")], capture_output=True
    )
    assert result.returncode != 0
