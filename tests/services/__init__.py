"""Real test servers on 127.0.0.1: RabbitMQ, a MongoDB-protocol server (SecantusDB) and Swift.

Run `python -m tests.services start|stop|kill|status|env|run -- CMD...` from the repository
root; tests/conftest.py uses the same code when no MUSTER_TEST_* variables are set.
"""

from .common import ServiceError
from .fleet import CLIENT_VARS, Fleet, S3Credentials, ServiceSet, SwiftCredentials

__all__ = [
    "CLIENT_VARS",
    "Fleet",
    "S3Credentials",
    "ServiceError",
    "ServiceSet",
    "SwiftCredentials",
]
