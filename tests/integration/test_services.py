"""Proof that each real test server works with the client library Muster uses for it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pymongo
import pytest
from botocore.config import Config
from kombu import Connection
from pymongo.errors import DuplicateKeyError
from swiftclient.client import Connection as SwiftConnection

from tests.services import S3Credentials, ServiceSet, SwiftCredentials

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def publish_and_get(amqp_url: str, queue: str, body: str) -> str:
    """Publish body to a durable queue on a fresh connection, then take it back."""
    with Connection(amqp_url, connect_timeout=10) as connection:
        simple = connection.SimpleQueue(queue)
        simple.put(body, delivery_mode=2)
        message = simple.get(block=False)  # basic.get: ordered after the publish, no consumer
        message.ack()
        received = message.payload
        simple.queue.delete()
        simple.close()
    return received


def test_rabbitmq_publish_and_get(amqp_url: str) -> None:
    assert publish_and_get(amqp_url, unique("test"), "hello") == "hello"


def test_rabbitmq_message_survives_restart(services: ServiceSet, amqp_url: str) -> None:
    """Stopping and restarting the broker keeps its URL and its durable messages."""
    queue = unique("durable")
    with Connection(amqp_url, connect_timeout=10) as connection:
        connection.SimpleQueue(queue).put("kept", delivery_mode=2)
    try:
        services.stop("rabbitmq")
        with pytest.raises(OSError), Connection(amqp_url, connect_timeout=2) as connection:
            connection.connect()
    finally:
        services.start("rabbitmq")
    with Connection(amqp_url, connect_timeout=10) as connection:
        simple = connection.SimpleQueue(queue)
        message = simple.get(block=False)
        message.ack()
        assert message.payload == "kept"
        simple.queue.delete()
        simple.close()


def test_rabbitmq_comes_back_after_kill(services: ServiceSet, amqp_url: str) -> None:
    try:
        services.kill("rabbitmq")
    finally:
        services.start("rabbitmq")
    assert publish_and_get(amqp_url, unique("after-kill"), "back") == "back"


@pytest.fixture
def mongo_db(mongo_url: str) -> Iterator[pymongo.database.Database]:
    client: pymongo.MongoClient = pymongo.MongoClient(mongo_url, serverSelectionTimeoutMS=10_000)
    name = unique("muster_test").replace("-", "_")
    try:
        yield client[name]
    finally:
        client.drop_database(name)
        client.close()


def test_mongo_round_trip(mongo_db: pymongo.database.Database) -> None:
    mongo_db.agents.insert_one({"_id": "web-1", "tags": ["web"], "seen": 3})
    assert mongo_db.agents.find_one({"tags": "web"}) == {"_id": "web-1", "tags": ["web"], "seen": 3}


def test_mongo_unique_index(mongo_db: pymongo.database.Database) -> None:
    mongo_db.plans.create_index("fingerprint", unique=True)
    mongo_db.plans.insert_one({"fingerprint": "abc"})
    with pytest.raises(DuplicateKeyError):
        mongo_db.plans.insert_one({"fingerprint": "abc"})


def test_swift_put_get_list(swift_credentials: SwiftCredentials) -> None:
    swift = SwiftConnection(
        authurl=swift_credentials.auth_url,
        user=swift_credentials.user,
        key=swift_credentials.key,
        auth_version="1",
        retries=1,
    )
    container = unique("backups")
    swift.put_container(container)
    try:
        swift.put_object(container, "host/2024.tar.zst", contents=b"data" * 1000)
        _headers, body = swift.get_object(container, "host/2024.tar.zst")
        assert body == b"data" * 1000
        listing = swift.get_container(container)[1]
        assert [item["name"] for item in listing] == ["host/2024.tar.zst"]
    finally:
        swift.delete_object(container, "host/2024.tar.zst")
        swift.delete_container(container)
        swift.close()


@pytest.fixture
def s3_bucket(s3_credentials: S3Credentials) -> Iterator[tuple[Any, str]]:
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_credentials.endpoint,
        aws_access_key_id=s3_credentials.access_key,
        aws_secret_access_key=s3_credentials.secret_key,
        region_name=s3_credentials.region,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
    )
    bucket = unique("muster")
    s3.create_bucket(Bucket=bucket)
    try:
        yield s3, bucket
    finally:
        for item in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
            s3.delete_object(Bucket=bucket, Key=item["Key"])
        s3.delete_bucket(Bucket=bucket)


def test_s3_put_get_list(s3_bucket: tuple[Any, str]) -> None:
    s3, bucket = s3_bucket
    s3.put_object(Bucket=bucket, Key="host/a.age", Body=b"secret")
    got = s3.get_object(Bucket=bucket, Key="host/a.age")
    assert got["Body"].read() == b"secret"
    listing = s3.list_objects_v2(Bucket=bucket, Prefix="host/")
    assert [item["Key"] for item in listing["Contents"]] == ["host/a.age"]


def test_s3_multipart_upload(s3_bucket: tuple[Any, str]) -> None:
    s3, bucket = s3_bucket
    parts = [b"a" * (5 * MIB), b"b" * 1000]  # every part but the last must be >= 5 MiB
    upload = s3.create_multipart_upload(Bucket=bucket, Key="big")
    done = []
    for number, data in enumerate(parts, start=1):
        part = s3.upload_part(
            Bucket=bucket, Key="big", UploadId=upload["UploadId"], PartNumber=number, Body=data
        )
        done.append({"PartNumber": number, "ETag": part["ETag"]})
    s3.complete_multipart_upload(
        Bucket=bucket,
        Key="big",
        UploadId=upload["UploadId"],
        MultipartUpload={"Parts": done},
    )
    assert s3.get_object(Bucket=bucket, Key="big")["Body"].read() == b"".join(parts)
