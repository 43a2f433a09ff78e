"""Real test servers on 127.0.0.1: RabbitMQ, a MongoDB-protocol server (SecantusDB),
Swift, and Keystone with a Swift proxy that trusts it.

Run `python -m tests.services start|stop|kill|status|env|run -- CMD...` from the repository
root; tests/conftest.py uses the same code when no MUSTER_TEST_* variables are set.
"""

from .common import ServiceError
from .fleet import (
    CLIENT_VARS,
    Fleet,
    KeystoneCredentials,
    S3Credentials,
    ServiceSet,
    SwiftCredentials,
)

__all__ = [
    "CLIENT_VARS",
    "Fleet",
    "KeystoneCredentials",
    "S3Credentials",
    "ServiceError",
    "ServiceSet",
    "SwiftCredentials",
]
