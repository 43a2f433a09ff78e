"""OpenStack Swift through python-swiftclient.

Authentication reads the usual variables (from the source `credentials.resolve` picks):

* tempauth / v1: ST_AUTH, ST_USER, ST_KEY (or OS_AUTH_URL, OS_USERNAME, OS_PASSWORD with
  OS_AUTH_VERSION=1).
* Keystone v3 (the default when ST_AUTH is unset): OS_AUTH_URL, OS_USERNAME, OS_PASSWORD,
  OS_PROJECT_NAME or OS_PROJECT_ID, OS_USER_DOMAIN_NAME and OS_PROJECT_DOMAIN_NAME (both
  default to "Default"), OS_REGION_NAME, OS_INTERFACE (default "public"). It needs the
  keystoneauth1 package.

The target's `endpoint`, when set, is the auth URL (the one address a Swift client is given);
OS_STORAGE_URL overrides the storage URL that authentication returns. The target's `proxy`
carries every request, the login included.

Layout: object `name` is `<prefix>/<name>` in the target's container, created on first write.
Objects above the part size become Static Large Objects: their segments go to the container
`<container>_segments` (as the `swift` tool does), named `<prefix>/<name>/<upload>/<index>`
with a fresh upload id per write, and the manifest is written last, so the object appears
only once all of it is stored. The separate container keeps segments out of every listing
of the main one. Deleting the object (here or with `swift delete`) deletes its segments;
overwriting it deletes the old object's segments after the new one is in place; a failed
upload deletes those it stored. Swift limits an SLO to `max_manifest_segments` segments
(1000 by default), so an object may hold at most that many parts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import requests
from swiftclient.client import ClientException, Connection

from broker.plan import SwiftTarget

from .base import (
    MIB,
    AuthError,
    ConfigError,
    NotFound,
    ObjectInfo,
    Storage,
    StorageError,
    Tuning,
    Unavailable,
    Upload,
    part_file,
    stream_reader,
)
from .credentials import Credentials

SEGMENTS_SUFFIX = "_segments"
READ_CHUNK = 256 * 1024


@dataclass(frozen=True)
class SwiftSettings:
    """Everything needed to connect, resolved from a target and its credentials."""

    auth_version: str  # "1" or "3"
    auth_url: str
    user: str
    key: str = field(repr=False)
    project_name: str | None = None
    project_id: str | None = None
    user_domain_name: str = "Default"
    project_domain_name: str = "Default"
    region: str | None = None
    interface: str = "public"
    storage_url: str | None = None
    proxy: str | None = field(default=None, repr=False)  # may hold a proxy password
    source: str = "the environment"

    @property
    def host(self) -> str:
        """The auth server's host and port, safe to show (no user info)."""
        return urlsplit(self.auth_url).hostname or self.auth_url


def settings(target: SwiftTarget, credentials: Credentials) -> SwiftSettings:
    """Pick v1 or Keystone v3 and collect its variables; missing ones are named in the error."""
    get, require = credentials.get, credentials.require
    version = get("OS_AUTH_VERSION", "OS_IDENTITY_API_VERSION") or ("1" if get("ST_AUTH") else "3")
    common: dict[str, Any] = {
        "storage_url": get("OS_STORAGE_URL"),
        "proxy": target.proxy,
        "source": credentials.source,
    }
    if version in ("1", "1.0"):
        return SwiftSettings(
            "1",
            target.endpoint or require("ST_AUTH", "OS_AUTH_URL"),
            require("ST_USER", "OS_USERNAME"),
            require("ST_KEY", "OS_PASSWORD"),
            **common,
        )
    if version not in ("3", "3.0"):
        raise ConfigError(f"OS_AUTH_VERSION={version} is not supported: use 1 or 3")
    if not get("OS_PROJECT_NAME", "OS_PROJECT_ID"):
        require("OS_PROJECT_NAME", "OS_PROJECT_ID")
    return SwiftSettings(
        "3",
        target.endpoint or require("OS_AUTH_URL"),
        require("OS_USERNAME"),
        require("OS_PASSWORD"),
        project_name=get("OS_PROJECT_NAME"),
        project_id=get("OS_PROJECT_ID"),
        user_domain_name=get("OS_USER_DOMAIN_NAME") or "Default",
        project_domain_name=get("OS_PROJECT_DOMAIN_NAME") or "Default",
        region=target.region or get("OS_REGION_NAME"),
        interface=get("OS_INTERFACE") or "public",
        **common,
    )


class _Connection(Connection):
    """A swiftclient connection whose every request, the v1 login included, goes through
    `proxy`: swiftclient itself proxies neither the login nor requests whose scheme differs
    from the proxy's."""

    def __init__(self, proxy: str | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.proxy = proxy

    def http_connection(self, url: str | None = None) -> tuple[Any, Any]:
        parsed, conn = super().http_connection(url)
        if self.proxy:
            conn.requests_args["proxies"] = {"http": self.proxy, "https": self.proxy}
        return parsed, conn

    def get_auth(self) -> tuple[str, str]:
        if self.session is not None or not self.proxy:
            return super().get_auth()
        parsed, conn = self.http_connection(self.authurl)
        conn.request("GET", parsed.path, "", {"X-Auth-User": self.user, "X-Auth-Key": self.key})
        response = conn.getresponse()
        body = response.read()
        conn.close()
        url = response.getheader("x-storage-url")
        if not 200 <= response.status < 300 or not url:
            raise ClientException.from_response(response, "Auth GET failed", body)
        self.url = self.os_options.get("object_storage_url") or url
        self.token = response.getheader("x-storage-token", response.getheader("x-auth-token"))
        return self.url, self.token


@dataclass(frozen=True)
class _Keystone:
    """A keystoneauth1 session, and the exception base class that its failures share."""

    session: Any
    error: type[Exception]


def _keystone(config: SwiftSettings, timeout: float) -> _Keystone:
    """A v3 password session, proxied like every other request. keystoneauth1 is imported
    here so that tempauth users do not need it."""
    try:
        from keystoneauth1 import exceptions, session
        from keystoneauth1.identity import v3
    except ImportError:
        raise ConfigError(
            "Keystone v3 authentication needs the keystoneauth1 package: pip install "
            "keystoneauth1 (or use tempauth with ST_AUTH, ST_USER, ST_KEY)"
        ) from None
    auth = v3.Password(
        auth_url=config.auth_url,
        username=config.user,
        password=config.key,
        project_name=config.project_name,
        project_id=config.project_id,
        user_domain_name=config.user_domain_name,
        project_domain_name=config.project_domain_name,
    )
    http = requests.Session()
    if config.proxy:
        http.proxies = {"http": config.proxy, "https": config.proxy}
    return _Keystone(
        session.Session(auth=auth, session=http, timeout=timeout), exceptions.ClientException
    )


class SwiftStorage(Storage):
    max_parts = 1000  # Swift's default max_manifest_segments
    # Swift takes segments of any size: 2 MiB keeps a backup worker's two at 4 MiB, and a
    # default volume (128 MiB) at 64 segments; `size_hint` raises it for bigger objects.
    part_size = 2 * MIB

    def __init__(self, target: SwiftTarget, config: SwiftSettings, tuning: Tuning) -> None:
        super().__init__(tuning, target.prefix)
        self.container = target.container
        self.segments = target.container + SEGMENTS_SUFFIX
        self._config = config
        self._keystone = _keystone(config, tuning.timeout) if config.auth_version == "3" else None
        self._idle: list[_Connection] = []  # swiftclient connections are not thread-safe
        self._login: tuple[str, str] | None = None  # v1 storage URL and token, shared
        self._containers: set[str] = set()
        self._lock = threading.Lock()

    # -- connections ---------------------------------------------------------------------

    def reconnect(self) -> None:
        config = self._config
        self._keystone = _keystone(config, self.tuning.timeout) if self._keystone else None
        self._idle = []
        self._lock = threading.Lock()

    def _connect(self) -> _Connection:
        config, tuning = self._config, self.tuning
        options: dict[str, Any] = {"region_name": config.region, "endpoint_type": config.interface}
        if config.storage_url:
            options["object_storage_url"] = config.storage_url
        common: dict[str, Any] = {
            "retries": tuning.retries,
            "starting_backoff": 1,
            "max_backoff": 30,
            "timeout": tuning.timeout,
            "os_options": options,
        }
        if self._keystone is not None:
            return _Connection(config.proxy, session=self._keystone.session, **common)
        url, token = self._login or (None, None)
        return _Connection(
            config.proxy,
            authurl=config.auth_url,
            user=config.user,
            key=config.key,
            auth_version="1",
            preauthurl=url,
            preauthtoken=token,
            **common,
        )

    def _take(self) -> _Connection:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return self._connect()

    def _give(self, conn: _Connection) -> None:
        with self._lock:
            if conn.url and conn.token:
                self._login = (conn.url, conn.token)
            self._idle.append(conn)

    @contextlib.contextmanager
    def _conn(self, what: str) -> Iterator[_Connection]:
        """Borrow a connection for one call, turning its failures into storage errors."""
        conn = self._take()
        try:
            with self._errors(what):
                yield conn
        finally:
            self._give(conn)

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        keystone_error = self._keystone.error if self._keystone else ()  # () catches nothing
        try:
            yield
        except ClientException as error:
            raise self._client_error(what, error) from None
        except (requests.RequestException, OSError) as error:
            raise Unavailable(
                f"{what}: cannot reach Swift ({type(error).__name__}) after "
                f"{self.tuning.retries} retries; check the network, proxy and {self._config.host}"
            ) from None
        except keystone_error as error:
            raise self._keystone_error(what, error) from None

    def _keystone_error(self, what: str, error: Exception) -> StorageError:
        config = self._config
        status = getattr(error, "http_status", None)
        if status in (401, 403):
            return AuthError(
                f"{what}: Keystone at {config.host} refused the credentials from "
                f"{config.source}; check user, password, project and domains"
            )
        if type(error).__name__ == "EndpointNotFound":
            return ConfigError(
                f"{what}: Keystone lists no object-store endpoint for region {config.region} "
                f"and interface {config.interface}; check OS_REGION_NAME and OS_INTERFACE"
            )
        return Unavailable(
            f"{what}: Keystone at {config.host} failed ({type(error).__name__}, HTTP {status}); "
            "check the network, proxy and OS_AUTH_URL, or try again later"
        )

    def _client_error(self, what: str, error: ClientException) -> StorageError:
        status = error.http_status
        if status == 404:
            return NotFound(f"{what}: not found")
        if status == 401:
            return AuthError(
                f"{what}: Swift at {self._config.host} refused the credentials from "
                f"{self._config.source}; check user, key and project"
            )
        if status == 403:
            return AuthError(f"{what}: access denied; check the user's rights on the container")
        if status is None or status >= 500 or status in (408, 429, 498):
            return Unavailable(
                f"{what}: Swift kept failing (HTTP {status}) after {self.tuning.retries} "
                "retries; try again later"
            )
        return StorageError(f"{what}: Swift answered HTTP {status} {error.http_reason}")

    def _ensure_container(self, container: str) -> None:
        """PUT the container once per instance (PUT is idempotent, and cheaper than HEAD+PUT)."""
        if container not in self._containers:
            with self._conn(f"cannot create container {container}") as conn:
                conn.put_container(container)
            self._containers.add(container)

    # -- names ---------------------------------------------------------------------------

    def _where(self, name: str) -> str:
        return f"{self.container}/{self._key(name)}"

    # -- the interface -------------------------------------------------------------------

    def _start_upload(self, name: str) -> Upload:
        self._ensure_container(self.container)
        return _SwiftUpload(self, self._key(name))

    def get(self, name: str) -> BinaryIO:
        what = f"cannot read {self._where(name)}"
        conn = self._take()
        try:
            with self._errors(what):
                _, body = conn.get_object(self.container, self._key(name), READ_CHUNK)
        except BaseException:
            self._give(conn)
            raise

        def read(size: int) -> bytes:
            with self._errors(what):
                return body.read(size)

        def close() -> None:
            body.close()
            self._give(conn)

        return stream_reader(read, close)

    def _get_range(self, name: str, start: int, length: int) -> bytes:
        headers = {"Range": f"bytes={start}-{start + length - 1}"}
        with self._conn(f"cannot read {self._where(name)}") as conn:
            try:
                return conn.get_object(self.container, self._key(name), headers=headers)[1]
            except ClientException as error:
                if error.http_status == 416:  # start at or past the end
                    return b""
                raise

    def stat(self, name: str) -> ObjectInfo:
        with self._conn(f"cannot stat {self._where(name)}") as conn:
            headers = conn.head_object(self.container, self._key(name))
        mtime = datetime.fromtimestamp(float(headers["x-timestamp"]), UTC)
        return ObjectInfo(name, int(headers["content-length"]), mtime)

    def delete(self, name: str) -> None:
        """Segments first, then the manifest: a delete cut short is finished by running it
        again, where the other order would leave segments nothing points to. (Swift's own
        ?multipart-manifest=delete refuses plain objects, so it cannot be used blindly.)"""
        key = self._key(name)
        for path in self._segments_of(key):
            self._delete_segment(path)
        with contextlib.suppress(NotFound), self._conn(f"cannot delete {self._where(name)}") as c:
            c.delete_object(self.container, key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        for item in self._listing(self.container, self._key_prefix(prefix)):
            modified = datetime.fromisoformat(item["last_modified"]).replace(tzinfo=UTC)
            yield ObjectInfo(self._relative(item["name"]), item["bytes"], modified)

    def _listing(self, container: str, prefix: str) -> Iterator[dict[str, Any]]:
        """All entries of `container` under `prefix`, one page request at a time."""
        marker = ""
        while True:
            try:
                with self._conn(f"cannot list {container}/{prefix}") as conn:
                    _, page = conn.get_container(
                        container, prefix=prefix, marker=marker, limit=self.tuning.page_size
                    )
            except NotFound:
                return
            yield from page
            if len(page) < self.tuning.page_size:
                return
            marker = page[-1]["name"]

    # -- segments ------------------------------------------------------------------------

    def _segments_of(self, key: str) -> list[str]:
        """The segment paths ('/container/name') of the SLO stored at `key`, if it is one."""
        try:
            with self._conn(f"cannot read {self.container}/{key}") as conn:
                headers = conn.head_object(self.container, key)
                if headers.get("x-static-large-object", "").lower() != "true":
                    return []
                _, manifest = conn.get_object(
                    self.container, key, query_string="multipart-manifest=get"
                )
        except NotFound:
            return []
        return [segment["name"] for segment in json.loads(manifest)]

    def _delete_segment(self, path: str) -> None:
        container, _, name = path.lstrip("/").partition("/")
        with contextlib.suppress(NotFound), self._conn(f"cannot delete segment {path}") as conn:
            conn.delete_object(container, name)


def _md5(data: bytes | memoryview) -> str:
    """The ETag Swift checks the stored bytes against: a part damaged in transit fails the
    backup now rather than the restore later."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


class _SwiftUpload(Upload):
    """Segments as the parts, then the object itself or its SLO manifest."""

    def __init__(self, storage: SwiftStorage, key: str) -> None:
        self._storage = storage
        self._key = key
        self._upload_dir = f"{key}/{time.time_ns():x}-{secrets.token_hex(4)}/"
        self._manifest: list[dict[str, Any]] = []
        self._stored_segments = False  # whether a segment PUT was ever sent
        self._committing = False

    def add_part(self, data: memoryview) -> None:
        storage = self._storage
        self._stored_segments = True
        storage._ensure_container(storage.segments)
        segment = f"{self._upload_dir}{len(self._manifest) + 1:08d}"
        with storage._conn(f"cannot upload segment {storage.segments}/{segment}") as conn:
            etag = conn.put_object(
                storage.segments,
                segment,
                part_file(data),
                content_length=len(data),
                etag=_md5(data),
            )
        path = f"/{storage.segments}/{segment}"
        self._manifest.append({"path": path, "etag": etag, "size_bytes": len(data)})

    def commit(self, tail: memoryview) -> None:
        storage = self._storage
        if self._manifest and tail:
            self.add_part(tail)
        replaced = storage._segments_of(self._key)
        self._committing = True
        with storage._conn(f"cannot upload {storage.container}/{self._key}") as conn:
            if self._manifest:
                conn.put_object(
                    storage.container,
                    self._key,
                    json.dumps(self._manifest),
                    query_string="multipart-manifest=put",
                )
            else:
                conn.put_object(
                    storage.container,
                    self._key,
                    part_file(tail),
                    content_length=len(tail),
                    etag=_md5(tail),
                )
        with contextlib.suppress(StorageError):  # at worst the old segments leak
            for path in set(replaced) - {segment["path"] for segment in self._manifest}:
                storage._delete_segment(path)

    def abort(self) -> None:
        """Delete the segments this upload stored, found by listing (a segment PUT that failed
        on the client's side may still have been stored), unless a manifest PUT that seemed
        to fail did reach Swift: then they are a visible object's and must stay."""
        if not self._stored_segments:
            return
        storage = self._storage
        with contextlib.suppress(StorageError):
            live = set(storage._segments_of(self._key)) if self._committing else set()
            for item in storage._listing(storage.segments, self._upload_dir):
                path = f"/{storage.segments}/{item['name']}"
                if path not in live:
                    storage._delete_segment(path)
