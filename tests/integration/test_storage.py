"""The storage contract, run unchanged against a directory, Swift and Swift's S3 API.

Each backend is opened the way the agent opens it (a plan target, credentials from a 0600
file) with a 5 MiB part size, so a 12 MiB object takes the segmented/multipart path, and a
page size of 4, so listings take several pages. `Backend.leftovers` looks behind the
interface for what a failed or deleted upload could leave: temporary files, Swift segments,
pending S3 multipart uploads.
"""

from __future__ import annotations

import http.client
import http.server
import io
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from agent.storage import (
    AuthError,
    InvalidName,
    NotFound,
    Storage,
    StorageError,
    Tuning,
    Unavailable,
    open_storage,
)
from agent.storage.local import TEMP_PREFIX, LocalStorage
from agent.storage.s3 import S3Storage
from agent.storage.swift import SwiftStorage
from broker.plan import CredentialRef, LocalTarget, S3Target, StorageTarget, SwiftTarget
from tests.services import S3Credentials, ServiceSet, SwiftCredentials

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
TUNING = Tuning(part_size=5 * MIB, page_size=4, retries=1, timeout=10)
BIG = 12 * MIB + 3  # three parts: 5 MiB, 5 MiB and a short last one


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def payload(size: int) -> bytes:
    return os.urandom(size)


@dataclass
class Backend:
    """Opens storages of one kind in one container (bucket, directory), and looks behind them."""

    kind: str
    target: Callable[[str, str], StorageTarget]  # (container, prefix) -> target
    container: str

    def open(self, prefix: str, container: str | None = None) -> Storage:
        return open_storage(self.target(container or self.container, prefix), TUNING)

    def leftovers(self, storage: Storage) -> list[str]:
        """What is stored under the storage's prefix that no visible object needs."""
        if isinstance(storage, LocalStorage):
            return [str(p) for p in storage.directory.rglob(f"{TEMP_PREFIX}*")]
        if isinstance(storage, SwiftStorage):  # segments no visible manifest refers to
            items = storage._listing(storage.segments, storage.root + "/")
            stored = {f"/{storage.segments}/{item['name']}" for item in items}
            for info in storage.list():
                stored -= set(storage._segments_of(storage._key(info.name)))
            return sorted(stored)
        assert isinstance(storage, S3Storage)
        uploads = storage.client.list_multipart_uploads(
            Bucket=storage.bucket, Prefix=storage.root + "/"
        )
        return [upload["Key"] for upload in uploads.get("Uploads", [])]

    def segmented(self, storage: Storage, name: str) -> bool:
        """Whether the object was stored in parts (always true for a local file)."""
        if isinstance(storage, SwiftStorage):
            conn = storage._take()
            try:
                headers = conn.head_object(storage.container, storage._key(name))
            finally:
                storage._give(conn)
            return headers.get("x-static-large-object") == "True"
        if isinstance(storage, S3Storage):
            head = storage.client.head_object(Bucket=storage.bucket, Key=storage._key(name))
            return "-" in head["ETag"]  # a multipart ETag ends in -<number of parts>
        return True


def secret_file(directory: Path, values: dict[str, str]) -> str:
    path = directory / f"{uuid.uuid4().hex}.env"
    path.write_text("".join(f"{name}={value}\n" for name, value in values.items()))
    path.chmod(0o600)
    return str(path)


def swift_backend(
    credentials: SwiftCredentials, directory: Path, key: str = "", proxy: str | None = None
) -> Backend:
    values = {"ST_AUTH": credentials.auth_url, "ST_USER": credentials.user}
    ref = CredentialRef(file=secret_file(directory, {**values, "ST_KEY": key or credentials.key}))

    def target(container: str, prefix: str) -> StorageTarget:
        return SwiftTarget(container=container, prefix=prefix, credentials=ref, proxy=proxy)

    return Backend("swift", target, unique("storage"))


def s3_backend(
    credentials: S3Credentials, directory: Path, key: str = "", proxy: str | None = None
) -> Backend:
    values = {"AWS_ACCESS_KEY_ID": credentials.access_key}
    secret = {"AWS_SECRET_ACCESS_KEY": key or credentials.secret_key}
    ref = CredentialRef(file=secret_file(directory, {**values, **secret}))

    def target(bucket: str, prefix: str) -> StorageTarget:
        return S3Target(
            bucket=bucket,
            prefix=prefix,
            credentials=ref,
            endpoint=credentials.endpoint,
            region=credentials.region,
            proxy=proxy,
        )

    return Backend("s3", target, unique("storage"))


def local_backend(directory: Path) -> Backend:
    def target(container: str, prefix: str) -> StorageTarget:
        return LocalTarget(path=str(directory / container), prefix=prefix)

    return Backend("local", target, "repository")


@pytest.fixture(scope="module", params=["local", "swift", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Backend:
    directory = tmp_path_factory.mktemp("storage")
    if request.param == "local":
        return local_backend(directory)
    if request.param == "swift":
        return swift_backend(request.getfixturevalue("swift_credentials"), directory)
    return s3_backend(request.getfixturevalue("s3_credentials"), directory)


@pytest.fixture
def storage(backend: Backend) -> Storage:
    return backend.open(unique("host"))


def test_put_get_round_trip(backend: Backend, storage: Storage) -> None:
    for name, size in [("empty", 0), ("small/one.age", 1000), ("big.tar.zst.age", BIG)]:
        data = payload(size)
        assert storage.put(name, io.BytesIO(data)) == size
        with storage.get(name) as reader:
            assert reader.read() == data
        assert storage.size(name) == size
        assert storage.exists(name)
    listed = {info.name: info.size for info in storage.list()}
    assert listed == {"empty": 0, "small/one.age": 1000, "big.tar.zst.age": BIG}
    assert backend.segmented(storage, "big.tar.zst.age")
    assert backend.leftovers(storage) == []


def test_put_with_size_hint_reads_in_chunks(storage: Storage) -> None:
    data = payload(BIG)
    assert storage.put("hinted", io.BufferedReader(io.BytesIO(data)), size_hint=len(data)) == BIG
    assert storage.get_range("hinted", BIG - 10, 10) == data[-10:]


def test_open_writer_many_small_writes(backend: Backend, storage: Storage) -> None:
    data = payload(BIG)
    with storage.open_writer("pushed") as writer:
        for offset in range(0, len(data), 4093):
            writer.write(data[offset : offset + 4093])
        assert not storage.exists("pushed")  # nothing visible before the block ends
    assert writer.tell() == BIG
    with storage.get("pushed") as reader:
        assert reader.read() == data
    assert backend.leftovers(storage) == []


def test_open_writer_survives_the_sink_being_closed(storage: Storage) -> None:
    """An encryptor or compressor that closes its sink must not commit or lose the object."""
    with storage.open_writer("closed-early") as writer:
        writer.write(b"complete")
        writer.close()
        with pytest.raises(ValueError):
            writer.write(b"more")
    with storage.get("closed-early") as reader:
        assert reader.read() == b"complete"


@pytest.mark.parametrize("size", [100, BIG], ids=["one-part", "three-parts"])
def test_exception_in_open_writer_leaves_nothing(
    backend: Backend, storage: Storage, size: int
) -> None:
    with pytest.raises(RuntimeError, match="pipeline broke"), storage.open_writer("half") as w:
        w.write(payload(size))
        raise RuntimeError("pipeline broke")
    assert not storage.exists("half")
    assert list(storage.list()) == []
    assert backend.leftovers(storage) == []


def test_failed_put_leaves_nothing(backend: Backend, storage: Storage) -> None:
    class Broken(io.RawIOBase):
        """A source that fails after 11 MiB, like a disk read error mid-backup."""

        def __init__(self) -> None:
            self.left = 11 * MIB

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
            if self.left <= 0:
                raise OSError("read error")
            count = min(len(buffer), self.left)
            buffer[:count] = b"x" * count
            self.left -= count
            return count

    with pytest.raises(OSError, match="read error"):
        storage.put("broken", Broken())
    assert not storage.exists("broken")
    assert backend.leftovers(storage) == []


def test_part_limit_is_enforced_and_size_hint_avoids_it(backend: Backend, storage: Storage) -> None:
    storage.max_parts = 2  # as if the server allowed only two segments per object
    data = payload(BIG)
    with pytest.raises(StorageError, match="pass size_hint"), storage.open_writer("x") as writer:
        writer.write(data)
    assert not storage.exists("x")
    assert backend.leftovers(storage) == []
    assert storage.put("x", io.BytesIO(data), size_hint=BIG) == BIG  # 2 parts of 7 MiB
    with storage.get("x") as reader:
        assert reader.read() == data


def test_get_range(storage: Storage) -> None:
    data = payload(BIG)
    storage.put("ranged", io.BytesIO(data))
    assert storage.get_range("ranged", 0, 100) == data[:100]
    middle = 5 * MIB - 50  # across the first part boundary
    assert storage.get_range("ranged", middle, 100) == data[middle : middle + 100]
    assert storage.get_range("ranged", BIG - 100, 100) == data[-100:]
    assert storage.get_range("ranged", BIG - 10, 100) == data[-10:]
    assert storage.get_range("ranged", BIG, 100) == b""
    assert storage.get_range("ranged", 10, 0) == b""
    with pytest.raises(ValueError):
        storage.get_range("ranged", -1, 10)


def test_get_streams_in_pieces(storage: Storage) -> None:
    data = payload(3 * MIB)
    storage.put("streamed", io.BytesIO(data))
    pieces = []
    with storage.get("streamed") as reader:
        while piece := reader.read(65536):
            pieces.append(piece)
    assert b"".join(pieces) == data


def test_list_is_sorted_paginated_and_relative(storage: Storage) -> None:
    names = ["a/b", "a-c", "a0", "a/b0/c", "b", "snap/2", "snap/10", "snap/1/x", "z", "é", "y/z"]
    for index, name in enumerate(names):
        storage.put(name, io.BytesIO(b"x" * index))
    listed = list(storage.list())
    assert [info.name for info in listed] == sorted(names)  # 11 names: three pages of 4
    assert {info.name: info.size for info in listed} == {n: i for i, n in enumerate(names)}
    assert all(info.mtime.tzinfo is not None for info in listed)
    assert [info.name for info in storage.list("snap/")] == ["snap/1/x", "snap/10", "snap/2"]
    assert [info.name for info in storage.list("a/")] == ["a/b", "a/b0/c"]
    assert [info.name for info in storage.list("a")] == ["a-c", "a/b", "a/b0/c", "a0"]
    assert list(storage.list("nothing-here")) == []


def test_delete_is_idempotent_and_removes_parts(backend: Backend, storage: Storage) -> None:
    storage.put("small", io.BytesIO(b"data"))
    storage.put("big", io.BytesIO(payload(BIG)))
    for name in ["small", "big"]:
        storage.delete(name)
        storage.delete(name)
        assert not storage.exists(name)
    storage.delete("never-existed")
    assert list(storage.list()) == []
    assert backend.leftovers(storage) == []


def test_overwrite_replaces_and_leaves_nothing_behind(backend: Backend, storage: Storage) -> None:
    storage.put("name", io.BytesIO(payload(BIG)))
    storage.put("name", io.BytesIO(payload(BIG)))
    storage.put("name", io.BytesIO(b"short now"))
    with storage.get("name") as reader:
        assert reader.read() == b"short now"
    assert backend.leftovers(storage) == []


def test_missing_objects_raise_not_found(backend: Backend, storage: Storage) -> None:
    with pytest.raises(NotFound):
        storage.get("missing")
    with pytest.raises(NotFound):
        storage.get_range("missing", 0, 10)
    with pytest.raises(NotFound):
        storage.size("missing")
    assert not storage.exists("missing")
    storage.put("dir/file", io.BytesIO(b"x"))
    assert not storage.exists("dir")  # a common prefix is not an object


def test_never_written_container_reads_as_empty(backend: Backend) -> None:
    storage = backend.open("p", container=unique("absent"))
    assert list(storage.list()) == []
    assert not storage.exists("x")
    storage.delete("x")
    with pytest.raises(NotFound):
        storage.get("x")


def test_prefixes_are_isolated(backend: Backend) -> None:
    base = unique("iso")
    one, other = backend.open(f"{base}/a"), backend.open(f"{base}/ab")
    one.put("file", io.BytesIO(b"one"))
    other.put("file", io.BytesIO(b"other"))
    with one.get("file") as reader:
        assert reader.read() == b"one"
    assert [info.name for info in one.list()] == ["file"]
    assert [info.name for info in other.list()] == ["file"]
    one.delete("file")
    assert other.exists("file")
    assert [info.name for info in backend.open(base).list()] == ["ab/file"]


@pytest.mark.parametrize("name", ["", "/abs", "a//b", "a/../b", "..", "trailing/", "nul\x00"])
def test_invalid_names_are_refused(storage: Storage, name: str) -> None:
    with pytest.raises(InvalidName):
        storage.put(name, io.BytesIO(b"x"))
    with pytest.raises(InvalidName):
        storage.get(name)


@pytest.fixture(params=["swift", "s3"])
def wrong_key_backend(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[Backend, str]]:
    key = "not-the-key-" + uuid.uuid4().hex
    if request.param == "swift":
        yield swift_backend(request.getfixturevalue("swift_credentials"), tmp_path, key), key
    else:
        yield s3_backend(request.getfixturevalue("s3_credentials"), tmp_path, key), key


def test_wrong_credentials_raise_auth_error_without_the_secret(
    wrong_key_backend: tuple[Backend, str],
) -> None:
    backend, key = wrong_key_backend
    storage = backend.open("p")
    for action in (lambda: storage.put("x", io.BytesIO(b"x")), lambda: list(storage.list())):
        with pytest.raises(AuthError) as raised:
            action()
        assert key not in str(raised.value)
        assert "credentials" in str(raised.value)


def test_unreachable_server_raises_unavailable(
    services: ServiceSet, swift_credentials: SwiftCredentials, tmp_path: Path
) -> None:
    storage = swift_backend(swift_credentials, tmp_path).open("p")
    services.stop("swift")
    try:
        with pytest.raises(Unavailable, match="cannot reach Swift"):
            storage.put("x", io.BytesIO(b"x"))
    finally:
        services.start("swift")
    storage.put("x", io.BytesIO(b"after restart"))
    assert storage.exists("x")


def test_an_upload_outlasts_a_short_swift_outage(
    services: ServiceSet, swift_credentials: SwiftCredentials, tmp_path: Path
) -> None:
    """Swift PUTs are retried with backoff: a part goes out through a seekable reader,
    which the client seeks back to send again (swiftclient does not retry a PUT of bytes,
    which it cannot rewind). An object written while the server restarts is stored whole."""
    backend = swift_backend(swift_credentials, tmp_path)
    tuning = replace(TUNING, part_size=MIB, retries=5)
    storage = open_storage(backend.target(backend.container, "p"), tuning)
    data = payload(3 * MIB)
    # logged in, both containers made: the first request of the outage is a segment PUT
    storage.put("before", io.BytesIO(payload(2 * MIB)))
    services.stop("swift")
    restart = threading.Timer(1.0, services.start, ("swift",))
    restart.start()
    try:
        assert storage.put("x", io.BytesIO(data)) == len(data)  # 3 segments of 1 MiB
    finally:
        restart.join()
    with storage.get("x") as reader:
        assert reader.read() == data
    assert backend.leftovers(storage) == []


class ForwardProxy(http.server.ThreadingHTTPServer):
    """A minimal real HTTP forward proxy on 127.0.0.1 that records the requests it carries."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Forward)
        self.seen: list[str] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class _Forward(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ForwardProxy
    hop_by_hop = ("connection", "keep-alive", "proxy-connection", "transfer-encoding")

    def forward(self) -> None:
        target = urlsplit(self.path)  # a proxied request names the absolute URL
        self.server.seen.append(f"{self.command} {target.path}")
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in self.hop_by_hop}
        upstream = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
        path = target.path + (f"?{target.query}" if target.query else "")
        upstream.request(self.command, path, body=body, headers=headers)
        response = upstream.getresponse()
        data = response.read()
        upstream.close()
        self.send_response(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in (*self.hop_by_hop, "content-length"):
                self.send_header(name, value)
        length_header = response.getheader("Content-Length", "0")
        self.send_header(
            "Content-Length", length_header if self.command == "HEAD" else str(len(data))
        )
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = forward

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def forward_proxy() -> Iterator[ForwardProxy]:
    proxy = ForwardProxy()
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        proxy.shutdown()
        proxy.server_close()
        thread.join()


@pytest.mark.parametrize("kind", ["swift", "s3"])
def test_proxy_carries_every_request(
    request: pytest.FixtureRequest, forward_proxy: ForwardProxy, tmp_path: Path, kind: str
) -> None:
    if kind == "swift":
        credentials = request.getfixturevalue("swift_credentials")
        backend = swift_backend(credentials, tmp_path, proxy=forward_proxy.url)
    else:
        credentials = request.getfixturevalue("s3_credentials")
        backend = s3_backend(credentials, tmp_path, proxy=forward_proxy.url)
    storage = backend.open("p")
    data = payload(BIG)
    storage.put("big", io.BytesIO(data))
    assert storage.get_range("big", 5 * MIB, 10) == data[5 * MIB : 5 * MIB + 10]
    with storage.get("big") as reader:
        assert reader.read() == data
    assert [info.name for info in storage.list()] == ["big"]
    storage.delete("big")
    assert not storage.exists("big")
    methods = {line.split()[0] for line in forward_proxy.seen}
    assert methods >= {"GET", "PUT", "HEAD", "DELETE"}
    if kind == "swift":
        assert forward_proxy.seen[0] == "GET /auth/v1.0"  # the login too
