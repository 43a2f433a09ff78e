"""Runs one Swift server (or builds the rings) with swift.conf read from a directory of ours.

Run with the Swift venv's python, never imported by the test code. Swift reads swift.conf
from /etc/swift/ at import time whatever `swift_dir` says (that setting moves only the rings),
so this sets SWIFT_CONF_FILE and reloads what was derived from it before serving.

    python swift_launcher.py rings SWIFT_DIR ACCOUNT_PORT CONTAINER_PORT OBJECT_PORT
    python swift_launcher.py serve SWIFT_DIR KIND CONF_FILE   (KIND: account|container|...)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from swift.common import constraints, storage_policy, utils
from swift.common.ring import RingBuilder
from swift.common.wsgi import run_wsgi


def use_swift_dir(swift_dir: Path) -> None:
    """Make every part of Swift read swift_dir/swift.conf instead of /etc/swift/swift.conf."""
    utils.SWIFT_CONF_FILE = str(swift_dir / "swift.conf")
    utils.validate_configuration()
    constraints.reload_constraints()
    storage_policy.reload_storage_policies()


def build_ring(swift_dir: Path, kind: str, port: int) -> None:
    """A one-replica ring with a single device; in-process it takes 0.1 s, the CLI takes 1 s."""
    builder = RingBuilder(8, 1, 1)
    device = {"id": 0, "region": 1, "zone": 1, "ip": "127.0.0.1", "port": port}
    builder.add_dev({**device, "device": "d1", "weight": 100.0, "meta": ""})
    builder.rebalance()
    builder.save(str(swift_dir / f"{kind}.builder"))
    builder.get_ring().save(str(swift_dir / f"{kind}.ring.gz"))


def serve(kind: str, conf_file: str) -> int:
    """Run the server in this process (workers = 0), logging to stderr as well as syslog."""
    options: dict[str, Any] = {"verbose": True}
    if kind == "object":
        from swift.obj.server import global_conf_callback

        options["global_conf_callback"] = global_conf_callback
    return run_wsgi(conf_file, f"{kind}-server", **options)


def main(argv: list[str]) -> int:
    command, swift_dir = argv[0], Path(argv[1])
    use_swift_dir(swift_dir)
    if command == "rings":
        for kind, port in zip(("account", "container", "object"), argv[2:5], strict=True):
            build_ring(swift_dir, kind, int(port))
        return 0
    return serve(argv[2], argv[3])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
