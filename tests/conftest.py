"""Session fixtures connecting tests to the real servers (RabbitMQ, MongoDB protocol, Swift/S3).

When the MUSTER_TEST_* variables are set (as `python -m tests.services run` and `make test` do),
the fixtures use them. Otherwise the servers are started here once per session with the same
tests/services code and stopped at the end. A server that cannot start makes the tests that need
it ERROR with its log: they are never skipped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.services import (
    CLIENT_VARS,
    Fleet,
    KeystoneCredentials,
    S3Credentials,
    ServiceSet,
    SwiftCredentials,
)
from tests.services.common import SERVICES_HOME, STATE_DIR_VAR


@pytest.fixture(scope="session")
def services() -> Iterator[ServiceSet]:
    """The servers' env, plus stop/start/kill/restart(name) and rabbitmqctl for fault tests."""
    given = {name: os.environ[name] for name in CLIENT_VARS if name in os.environ}
    directory = os.environ.get(STATE_DIR_VAR)
    if len(given) == len(CLIENT_VARS):
        yield ServiceSet(given, Fleet(Path(directory)) if directory else None)
        return
    fleet = Fleet(Path(directory) if directory else SERVICES_HOME / f"pytest-{os.getpid()}")
    with fleet.session() as env:
        yield ServiceSet({**env, **given}, fleet)


@pytest.fixture(scope="session")
def amqp_url(services: ServiceSet) -> str:
    """amqp://guest:guest@127.0.0.1:PORT//"""
    return services.env["MUSTER_TEST_AMQP_URL"]


@pytest.fixture(scope="session")
def mongo_url(services: ServiceSet) -> str:
    """mongodb://127.0.0.1:PORT/"""
    return services.env["MUSTER_TEST_MONGO_URL"]


@pytest.fixture(scope="session")
def swift_credentials(services: ServiceSet) -> SwiftCredentials:
    """tempauth (v1) credentials for python-swiftclient."""
    return SwiftCredentials.from_env(services.env)


@pytest.fixture(scope="session")
def s3_credentials(services: ServiceSet) -> S3Credentials:
    """S3 credentials for Swift's s3api: path-style addressing."""
    return S3Credentials.from_env(services.env)


@pytest.fixture(scope="session")
def keystone_credentials(services: ServiceSet) -> KeystoneCredentials:
    """A Keystone v3 user and project; the catalog's object-store is Swift behind keystoneauth."""
    return KeystoneCredentials.from_env(services.env)
