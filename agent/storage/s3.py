"""Amazon S3 and S3-compatible servers (Ceph RGW, MinIO, Swift's s3api) through boto3.

Credentials come from the source `credentials.resolve` picks: AWS_ACCESS_KEY_ID and
AWS_SECRET_ACCESS_KEY (plus AWS_SESSION_TOKEN), or AWS_PROFILE with AWS_SHARED_CREDENTIALS_FILE.
From the process environment boto3's whole chain applies as usual (~/.aws/credentials,
instance roles...). The region is the target's, else AWS_REGION or AWS_DEFAULT_REGION, else
us-east-1 when an endpoint is given. The endpoint is the target's, else AWS_ENDPOINT_URL_S3 or
AWS_ENDPOINT_URL; with one, requests use path-style addressing, which every S3-compatible
server accepts (virtual-host style needs wildcard DNS), and checksums only where the API
requires them, since many such servers reject the CRC headers newer botocore sends by default.
The target's `proxy` carries every request. botocore retries in "standard" mode.

Layout: object `name` is the key `<prefix>/<name>` in the target's bucket, created on first
write if missing. Objects above the part size are multipart uploads (parts of at least
5 MiB, at most 10,000 of them) completed last, so the object appears whole or not at all, and
aborted on any failure. An agent killed mid-upload leaves an invisible but billed upload: give
the bucket an AbortIncompleteMultipartUpload lifecycle rule.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import boto3
import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from broker.plan import S3Target

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
from .credentials import Credentials, CredentialsError

MIN_PART_SIZE = 5 * MIB
DEFAULT_REGION = "us-east-1"


@dataclass(frozen=True)
class S3Settings:
    """Everything needed to build a client, resolved from a target and its credentials."""

    access_key: str | None
    secret_key: str | None = field(repr=False)
    session_token: str | None = field(default=None, repr=False)
    profile: str | None = None
    credentials_file: str | None = None
    region: str | None = None
    endpoint: str | None = None
    proxy: str | None = field(default=None, repr=False)  # may hold a proxy password
    source: str = "the environment"

    @property
    def host(self) -> str:
        """The server's host, safe to show."""
        if self.endpoint is None:
            return "AWS S3"
        return urlsplit(self.endpoint).hostname or self.endpoint


def settings(target: S3Target, credentials: Credentials) -> S3Settings:
    """Collect the AWS_* variables; a named source must hold keys or a profile."""
    get = credentials.get
    access_key, profile = get("AWS_ACCESS_KEY_ID"), get("AWS_PROFILE")
    secret_key = credentials.require("AWS_SECRET_ACCESS_KEY") if access_key else None
    if credentials.explicit and not access_key and not profile:
        credentials.require("AWS_ACCESS_KEY_ID", "AWS_PROFILE")
    endpoint = target.endpoint or get("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
    region = target.region or get("AWS_REGION", "AWS_DEFAULT_REGION")
    return S3Settings(
        access_key,
        secret_key,
        session_token=get("AWS_SESSION_TOKEN"),
        profile=profile,
        credentials_file=get("AWS_SHARED_CREDENTIALS_FILE"),
        region=region or (DEFAULT_REGION if endpoint else None),
        endpoint=endpoint,
        proxy=target.proxy,
        source=credentials.source,
    )


def make_client(config: S3Settings, tuning: Tuning) -> Any:
    """A boto3 S3 client for `config`; clients are thread-safe, so one serves all threads."""
    core = botocore.session.Session()
    if config.credentials_file:
        core.set_config_variable("credentials_file", config.credentials_file)
    session = boto3.session.Session(
        aws_access_key_id=config.access_key,
        aws_secret_access_key=config.secret_key,
        aws_session_token=config.session_token,
        region_name=config.region,
        profile_name=config.profile,
        botocore_session=core,
    )
    compatible = config.endpoint is not None
    options = Config(
        retries={"mode": "standard", "max_attempts": tuning.retries + 1},
        connect_timeout=tuning.timeout,
        read_timeout=tuning.timeout,
        proxies={"http": config.proxy, "https": config.proxy} if config.proxy else None,
        s3={"addressing_style": "path"} if compatible else None,
        request_checksum_calculation="when_required" if compatible else "when_supported",
        response_checksum_validation="when_required" if compatible else "when_supported",
    )
    return session.client("s3", endpoint_url=config.endpoint, config=options)


class S3Storage(Storage):
    max_parts = 10_000
    part_size = MIN_PART_SIZE

    def __init__(self, target: S3Target, config: S3Settings, tuning: Tuning) -> None:
        if tuning.part_size is not None and tuning.part_size < MIN_PART_SIZE:
            raise ConfigError(f"S3 parts must be at least {MIN_PART_SIZE} bytes")
        super().__init__(tuning, target.prefix)
        self.bucket = target.bucket
        self._config = config
        self.client = make_client(config, tuning)
        self._bucket_checked = False

    def reconnect(self) -> None:
        self.client = make_client(self._config, self.tuning)

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Turn botocore failures into storage errors that say what to check."""
        try:
            yield
        except ClientError as error:
            raise self._client_error(what, error) from None
        except NoCredentialsError:
            raise CredentialsError(
                f"{what}: no S3 credentials found; set AWS_ACCESS_KEY_ID and "
                f"AWS_SECRET_ACCESS_KEY in {self._config.source}"
            ) from None
        except (BotoCoreError, OSError) as error:
            raise Unavailable(
                f"{what}: cannot reach S3 at {self._config.host} ({type(error).__name__}) "
                f"after {self.tuning.retries} retries; check the network, proxy and endpoint"
            ) from None

    def _client_error(self, what: str, error: ClientError) -> StorageError:
        code = error.response.get("Error", {}).get("Code", "")
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if status == 404 or code in ("NoSuchKey", "NoSuchBucket", "NotFound"):
            return NotFound(f"{what}: not found")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"):
            return AuthError(
                f"{what}: S3 at {self._config.host} refused the credentials from "
                f"{self._config.source} ({code}); check the access key and secret"
            )
        if status == 403:
            return AuthError(f"{what}: access denied ({code}); check the key's bucket policy")
        if status >= 500 or code in ("SlowDown", "RequestTimeout"):
            return Unavailable(
                f"{what}: S3 kept failing ({code or status}) after {self.tuning.retries} "
                "retries; try again later"
            )
        return StorageError(f"{what}: S3 answered {code or status}")

    def _where(self, name: str) -> str:
        return f"s3://{self.bucket}/{self._key(name)}"

    def _ensure_bucket(self) -> None:
        """Create the bucket on first write if HEAD says it is missing. A 403 is left to the
        write itself: a key allowed to write may not be allowed to HEAD."""
        if self._bucket_checked:
            return
        try:
            with self._errors(f"cannot check bucket {self.bucket}"):
                self.client.head_bucket(Bucket=self.bucket)
        except NotFound:
            self._create_bucket()
        except AuthError:
            pass
        self._bucket_checked = True

    def _create_bucket(self) -> None:
        region = self._config.region or DEFAULT_REGION
        where = {"LocationConstraint": region}
        extra = {} if region == DEFAULT_REGION else {"CreateBucketConfiguration": where}
        with self._errors(f"cannot create bucket {self.bucket}"):
            try:
                self.client.create_bucket(Bucket=self.bucket, **extra)
            except ClientError as error:  # another writer created it first
                if error.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
                    raise

    def _start_upload(self, name: str) -> Upload:
        self._ensure_bucket()
        return _S3Upload(self, self._key(name))

    def get(self, name: str) -> BinaryIO:
        what = f"cannot read {self._where(name)}"
        with self._errors(what):
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"]

        def read(size: int) -> bytes:
            with self._errors(what):
                return body.read(size)

        return stream_reader(read, body.close)

    def _get_range(self, name: str, start: int, length: int) -> bytes:
        with self._errors(f"cannot read {self._where(name)}"):
            try:
                response = self.client.get_object(
                    Bucket=self.bucket,
                    Key=self._key(name),
                    Range=f"bytes={start}-{start + length - 1}",
                )
            except ClientError as error:
                if error.response.get("Error", {}).get("Code") == "InvalidRange":
                    return b""  # start at or past the end
                raise
            return response["Body"].read()

    def stat(self, name: str) -> ObjectInfo:
        with self._errors(f"cannot stat {self._where(name)}"):
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(name))
        return ObjectInfo(name, head["ContentLength"], head["LastModified"])

    def delete(self, name: str) -> None:
        with contextlib.suppress(NotFound), self._errors(f"cannot delete {self._where(name)}"):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(name))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        full = self._key_prefix(prefix)
        pages: dict[str, Any] = {}
        while True:
            try:
                with self._errors(f"cannot list s3://{self.bucket}/{full}"):
                    page = self.client.list_objects_v2(
                        Bucket=self.bucket, Prefix=full, MaxKeys=self.tuning.page_size, **pages
                    )
            except NotFound:
                return
            for item in page.get("Contents", []):
                yield ObjectInfo(self._relative(item["Key"]), item["Size"], item["LastModified"])
            if not page.get("IsTruncated"):
                return
            pages = {"ContinuationToken": page["NextContinuationToken"]}


def _md5(data: bytes | memoryview) -> str:
    """Content-MD5, which every S3 server checks: a part damaged in transit fails the backup
    now rather than the restore later (CRC headers are not sent to every server, see above)."""
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


class _S3Upload(Upload):
    """A plain PUT when the object fits in one part, else a multipart upload."""

    def __init__(self, storage: S3Storage, key: str) -> None:
        self._storage = storage
        self._key = key
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []

    def _call(self, operation: str, **kwargs: Any) -> dict[str, Any]:
        storage = self._storage
        with storage._errors(f"cannot upload s3://{storage.bucket}/{self._key}"):
            method = getattr(storage.client, operation)
            return method(Bucket=storage.bucket, Key=self._key, **kwargs)

    def add_part(self, data: memoryview) -> None:
        if self._upload_id is None:
            self._upload_id = self._call("create_multipart_upload")["UploadId"]
        number = len(self._parts) + 1
        response = self._call(
            "upload_part",
            UploadId=self._upload_id,
            PartNumber=number,
            Body=part_file(data),
            ContentMD5=_md5(data),
        )
        self._parts.append({"PartNumber": number, "ETag": response["ETag"]})

    def commit(self, tail: memoryview) -> None:
        if self._upload_id is None:
            self._call("put_object", Body=part_file(tail), ContentMD5=_md5(tail))
            return
        if tail:
            self.add_part(tail)
        self._call(
            "complete_multipart_upload",
            UploadId=self._upload_id,
            MultipartUpload={"Parts": self._parts},
        )

    def abort(self) -> None:
        """Abort the multipart upload; after a completion that only seemed to fail this
        finds no upload, and the object stays."""
        if self._upload_id is not None:
            with contextlib.suppress(StorageError):
                self._call("abort_multipart_upload", UploadId=self._upload_id)
