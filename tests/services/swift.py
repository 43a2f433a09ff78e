"""OpenStack Swift (from PyPI, its own venv) with tempauth and the S3 API in one proxy.

Swift-All-In-One style: one replica on one plain directory, account, container, object and proxy
servers each in a single process (workers = 0), plus memcached, where tempauth keeps its tokens.
Swift credentials test:tester / testing are also the S3 access key / secret key.
"""

from __future__ import annotations

import getpass
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from .common import HOST, SERVICES_HOME, Server, ServiceError, port_open

SWIFT_PYTHON = SERVICES_HOME / "venv-swift" / "bin" / "python"
# Run isolated (-I): otherwise the launcher's own directory comes first on sys.path and
# `import swift` finds this module instead of the Swift package.
LAUNCH = [str(SWIFT_PYTHON), "-I", str(Path(__file__).with_name("swift_launcher.py"))]
USER, KEY = "test:tester", "testing"
REGION = "us-east-1"
BACKENDS = ("account", "container", "object")

# s3api must come after cache and before tempauth; slo serves S3 multipart uploads.
PIPELINE = (
    "catch_errors gatekeeper healthcheck proxy-logging cache listing_formats bulk tempurl "
    "ratelimit s3api tempauth copy container-quotas account-quotas slo dlo versioned_writes "
    "symlink proxy-logging proxy-server"
)
FILTERS = {
    "catch_errors": "catch_errors",
    "gatekeeper": "gatekeeper",
    "healthcheck": "healthcheck",
    "proxy-logging": "proxy_logging",
    "listing_formats": "listing_formats",
    "bulk": "bulk",
    "tempurl": "tempurl",
    "ratelimit": "ratelimit",
    "copy": "copy",
    "container-quotas": "container_quotas",
    "account-quotas": "account_quotas",
    "dlo": "dlo",
    "versioned_writes": "versioned_writes",
    "symlink": "symlink",
}


def filter_sections(names: Iterable[str]) -> str:
    """Paste sections for Swift's own middlewares, named as in FILTERS."""
    return "".join(f"[filter:{name}]\nuse = egg:swift#{FILTERS[name]}\n\n" for name in names)


class Swift(Server):
    """memcached plus the four Swift servers; stopped and killed as one unit."""

    name = "swift"
    processes = ("memcached", *BACKENDS, "proxy")
    port_names = ("memcached", *BACKENDS, "proxy")
    start_timeout = 60
    stop_timeout = 10

    def defaults(self, port: int) -> str:
        """[DEFAULT] shared by all servers: loopback, one process, no privilege drop."""
        return (
            "[DEFAULT]\n"
            f"bind_ip = {HOST}\nbind_port = {port}\nworkers = 0\n"
            f"user = {getpass.getuser()}\nswift_dir = {self.dir}\n"
            f"devices = {self.dir / 'devices'}\nmount_check = false\n"
            "disable_fallocate = true\nlog_level = INFO\n\n"
        )

    def backend_conf(self, kind: str) -> str:
        return (
            self.defaults(self.ports[kind])
            + f"[pipeline:main]\npipeline = {kind}-server\n\n"
            + f"[app:{kind}-server]\nuse = egg:swift#{kind}\n"
        )

    def proxy_conf(self) -> str:
        return (
            self.defaults(self.ports["proxy"])
            + f"[pipeline:main]\npipeline = {PIPELINE}\n\n"
            + "[app:proxy-server]\nuse = egg:swift#proxy\naccount_autocreate = true\n\n"
            + "[filter:cache]\nuse = egg:swift#memcache\n"
            + f"memcache_servers = {HOST}:{self.ports['memcached']}\n\n"
            + "[filter:tempauth]\nuse = egg:swift#tempauth\n"
            + f"user_{USER.replace(':', '_')} = {KEY} .admin\n\n"
            + "[filter:s3api]\nuse = egg:swift#s3api\n"
            + f"location = {REGION}\nmax_upload_part_num = 10000\n\n"
            # An S3 upload of N parts becomes an SLO of N segments.
            + "[filter:slo]\nuse = egg:swift#slo\nmax_manifest_segments = 10000\n\n"
            + filter_sections(FILTERS)
        )

    def prepare(self) -> None:
        """Configs every start (cheap); rings once, as they only depend on the kept ports."""
        (self.dir / "devices" / "d1").mkdir(parents=True, exist_ok=True)
        (self.dir / "swift.conf").write_text(
            "[swift-hash]\nswift_hash_path_suffix = muster-test\n\n"
            "[storage-policy:0]\nname = gold\ndefault = yes\n"
        )
        for kind in BACKENDS:
            (self.dir / f"{kind}-server.conf").write_text(self.backend_conf(kind))
        (self.dir / "proxy-server.conf").write_text(self.proxy_conf())
        if not (self.dir / "object.ring.gz").exists():
            self.build_rings()

    def build_rings(self) -> None:
        ports = [str(self.ports[kind]) for kind in BACKENDS]
        argv = [*LAUNCH, "rings", str(self.dir), *ports]
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise ServiceError(f"swift: building the rings failed:\n{result.stderr}")

    def launch(self, process: str) -> None:
        if process == "memcached":
            port = str(self.ports["memcached"])
            user = getpass.getuser()  # memcached refuses to run as root without -u
            argv = ["memcached", "-l", HOST, "-p", port, "-U", "0", "-u", user, "-m", "64"]
        else:
            conf = self.dir / f"{process}-server.conf"
            argv = [*LAUNCH, "serve", str(self.dir), process, str(conf)]
        self.spawn(process, argv)

    def wait_ready(self, deadline: float) -> None:
        """All ports listen, and a tempauth login plus an account HEAD through the proxy work."""
        for process in self.processes:
            self.wait_for(lambda p=process: port_open(self.ports[p]), deadline, f"{process} port")
        self.wait_for(self.account_reachable, deadline, "a tempauth login")

    def account_reachable(self) -> bool:
        """Log in with tempauth (needs memcached) and HEAD the account (needs the backends)."""
        base = f"http://{HOST}:{self.ports['proxy']}"
        login = urllib.request.Request(
            f"{base}/auth/v1.0", headers={"X-Auth-User": USER, "X-Auth-Key": KEY}
        )
        try:
            with urllib.request.urlopen(login, timeout=5) as response:
                token = response.headers["X-Auth-Token"]
                storage_url = response.headers["X-Storage-Url"]
            head = urllib.request.Request(
                storage_url, method="HEAD", headers={"X-Auth-Token": token}
            )
            with urllib.request.urlopen(head, timeout=5) as response:
                return 200 <= response.status < 300
        except (OSError, urllib.error.URLError, TypeError):
            return False

    def env(self) -> dict[str, str]:
        endpoint = f"http://{HOST}:{self.ports['proxy']}"
        return {
            "MUSTER_TEST_SWIFT_AUTH_URL": f"{endpoint}/auth/v1.0",
            "MUSTER_TEST_SWIFT_USER": USER,
            "MUSTER_TEST_SWIFT_KEY": KEY,
            "MUSTER_TEST_S3_ENDPOINT": endpoint,
            "MUSTER_TEST_S3_ACCESS_KEY": USER,
            "MUSTER_TEST_S3_SECRET_KEY": KEY,
            "MUSTER_TEST_S3_REGION": REGION,
            "MUSTER_TEST_SWIFT_PROXY_PID_FILE": str(self.pid_file("proxy")),
        }
