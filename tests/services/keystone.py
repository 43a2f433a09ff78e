"""OpenStack Keystone (from PyPI, its own venv) and a second Swift proxy that trusts it.

Keystone runs on SQLite with Fernet tokens. The second proxy shares the Swift server's rings,
backends and memcached but authenticates with keystonemiddleware's auth_token plus Swift's
keystoneauth, as an OpenStack cloud's Swift does; the first proxy keeps tempauth and the S3 API,
so the other tests never depend on Keystone. Started after Swift (it needs Swift's ports).

The catalog holds one object-store endpoint; a project `muster` with a user `muster` that has
the `member` role is what a node's credentials look like in a real cloud.
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .common import HOST, SERVICES_HOME, Server, ServiceError, port_open
from .swift import Swift, filter_sections

KEYSTONE_BIN = SERVICES_HOME / "venv-keystone" / "bin"
HERE = Path(__file__).parent
ADMIN_PASSWORD = "admin-secret"
PROJECT, USER, PASSWORD = "muster", "muster", "muster-secret"
REGION = "RegionOne"
MEMBER_ROLE = "member"  # made by `keystone-manage bootstrap`

PIPELINE = (
    "catch_errors gatekeeper healthcheck proxy-logging cache authtoken keystoneauth "
    "slo dlo proxy-logging proxy-server"
)


class Keystone(Server):
    """Keystone (identity) and a Keystone-authenticated Swift proxy."""

    name = "keystone"
    processes = ("identity", "proxy")
    port_names = ("identity", "proxy")
    after = ("swift",)
    start_timeout = 120

    @property
    def auth_url(self) -> str:
        return f"http://{HOST}:{self.ports['identity']}/v3"

    @property
    def swift(self) -> Swift:
        return Swift(self.dir.parent)

    def prepare(self) -> None:
        """Configs every start; the database, keys and admin once (they survive restarts)."""
        (self.dir / "keystone.conf").write_text(self.keystone_conf())
        (self.dir / "proxy-server.conf").write_text(self.proxy_conf())
        if not (self.dir / "keystone.db").exists():
            self.bootstrap()

    def keystone_conf(self) -> str:
        return (
            "[DEFAULT]\nuse_stderr = true\n\n"
            f"[database]\nconnection = sqlite:///{self.dir / 'keystone.db'}\n\n"
            "[token]\nprovider = fernet\n\n"
            f"[fernet_tokens]\nkey_repository = {self.dir / 'fernet-keys'}\n\n"
            f"[fernet_receipts]\nkey_repository = {self.dir / 'fernet-receipts'}\n\n"
            f"[credential]\nkey_repository = {self.dir / 'credential-keys'}\n"
        )

    def proxy_conf(self) -> str:
        swift = self.swift
        return (
            swift.defaults(self.ports["proxy"])
            + f"[pipeline:main]\npipeline = {PIPELINE}\n\n"
            + "[app:proxy-server]\nuse = egg:swift#proxy\naccount_autocreate = true\n\n"
            + "[filter:cache]\nuse = egg:swift#memcache\n"
            + f"memcache_servers = {HOST}:{swift.ports['memcached']}\n\n"
            + "[filter:authtoken]\n"
            + "paste.filter_factory = keystonemiddleware.auth_token:filter_factory\n"
            + f"www_authenticate_uri = {self.auth_url}\nauth_url = {self.auth_url}\n"
            + "auth_type = password\ninterface = public\n"
            + "user_domain_id = default\nproject_domain_id = default\n"
            + f"project_name = admin\nusername = admin\npassword = {ADMIN_PASSWORD}\n\n"
            + "[filter:keystoneauth]\nuse = egg:swift#keystoneauth\n"
            + f"operator_roles = admin, {MEMBER_ROLE}\n\n"
            + filter_sections(("catch_errors", "gatekeeper", "healthcheck", "proxy-logging", "dlo"))
            + "[filter:slo]\nuse = egg:swift#slo\n"
        )

    def bootstrap(self) -> None:
        """Schema, Fernet keys and the admin user: what keystone-manage does on a new cloud."""
        conf = str(self.dir / "keystone.conf")
        owner = ["--keystone-user", "root", "--keystone-group", "root"]
        for key_dir in ("fernet-keys", "fernet-receipts", "credential-keys"):
            (self.dir / key_dir).mkdir(exist_ok=True)
        steps = [
            ["db_sync"],
            ["fernet_setup", *owner],
            ["credential_setup", *owner],
            [
                "bootstrap",
                *("--bootstrap-password", ADMIN_PASSWORD, "--bootstrap-region-id", REGION),
                *("--bootstrap-public-url", self.auth_url),
            ],
        ]
        for step in steps:
            argv = [str(KEYSTONE_BIN / "keystone-manage"), "--config-file", conf, *step]
            result = subprocess.run(argv, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                (self.dir / "keystone.db").unlink(missing_ok=True)
                raise ServiceError(f"keystone: keystone-manage {step[0]} failed:\n{result.stderr}")

    def launch(self, process: str) -> None:
        python = str(KEYSTONE_BIN / "python")
        if process == "identity":
            launcher = str(HERE / "keystone_launcher.py")
            conf = self.dir / "keystone.conf"
            self.spawn(process, [python, "-I", launcher, str(conf), str(self.ports["identity"])])
        else:
            launcher = str(HERE / "swift_launcher.py")
            conf = self.dir / "proxy-server.conf"
            self.spawn(
                process, [python, "-I", launcher, "serve", str(self.swift.dir), "proxy", str(conf)]
            )

    def wait_ready(self, deadline: float) -> None:
        """Both ports listen, the cloud is provisioned, and the user reaches its Swift account."""
        for process in self.processes:
            self.wait_for(lambda p=process: port_open(self.ports[p]), deadline, f"{process} port")
        self.wait_for(self.version_served, deadline, "Keystone's /v3")
        if not (self.dir / "provisioned").exists():
            self.provision()
            (self.dir / "provisioned").touch()
        self.wait_for(self.account_reachable, deadline, "a Keystone login reaching Swift")

    def version_served(self) -> bool:
        try:
            with urllib.request.urlopen(self.auth_url, timeout=5) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def provision(self) -> None:
        """The object-store endpoint, a project, a user and its member role."""
        admin = IdentityClient(
            self.auth_url, token(self.auth_url, "admin", ADMIN_PASSWORD, "admin")[0]
        )
        service = admin.create("services", {"type": "object-store", "name": "swift"})
        url = f"http://{HOST}:{self.ports['proxy']}/v1/AUTH_%(tenant_id)s"
        endpoint = {"service_id": service, "interface": "public", "url": url, "region_id": REGION}
        admin.create("endpoints", endpoint)
        project = admin.create("projects", {"name": PROJECT, "domain_id": "default"})
        user = admin.create("users", {"name": USER, "password": PASSWORD, "domain_id": "default"})
        role = admin.find("roles", MEMBER_ROLE)
        admin.put(f"projects/{project}/users/{user}/roles/{role}")

    def account_reachable(self) -> bool:
        """The user's token lists an object-store endpoint, and a HEAD of it succeeds."""
        try:
            token, url = login(self.auth_url, USER, PASSWORD, PROJECT)
            head = urllib.request.Request(url, method="HEAD", headers={"X-Auth-Token": token})
            with urllib.request.urlopen(head, timeout=5) as response:
                return 200 <= response.status < 300
        except (OSError, urllib.error.URLError, KeyError, ValueError):
            return False

    def env(self) -> dict[str, str]:
        return {
            "MUSTER_TEST_KEYSTONE_AUTH_URL": self.auth_url,
            "MUSTER_TEST_KEYSTONE_USER": USER,
            "MUSTER_TEST_KEYSTONE_PASSWORD": PASSWORD,
            "MUSTER_TEST_KEYSTONE_PROJECT": PROJECT,
            "MUSTER_TEST_KEYSTONE_REGION": REGION,
        }


def token(auth_url: str, user: str, password: str, project: str) -> tuple[str, dict[str, Any]]:
    """A project-scoped token (default domain) and the token body, with its catalog."""
    body = {
        "auth": {
            "identity": {
                "methods": ["password"],
                "password": {
                    "user": {"name": user, "domain": {"id": "default"}, "password": password}
                },
            },
            "scope": {"project": {"name": project, "domain": {"id": "default"}}},
        }
    }
    request = urllib.request.Request(
        f"{auth_url}/auth/tokens",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.headers["X-Subject-Token"], json.load(response)["token"]


def login(auth_url: str, user: str, password: str, project: str) -> tuple[str, str]:
    """A token and the public object-store URL of the project, from the token's catalog."""
    subject, body = token(auth_url, user, password, project)
    [store] = [service for service in body["catalog"] if service["type"] == "object-store"]
    [url] = [e["url"] for e in store["endpoints"] if e["interface"] == "public"]
    return subject, url


class IdentityClient:
    """The few Keystone v3 admin calls provisioning needs, on the standard library."""

    def __init__(self, auth_url: str, token: str) -> None:
        self.auth_url = auth_url
        self.token = token

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        request = urllib.request.Request(
            f"{self.auth_url}/{path}",
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"X-Auth-Token": self.token, "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            content = response.read()
        return json.loads(content) if content else None

    def create(self, collection: str, fields: dict[str, Any]) -> str:
        """POST /collection; returns the new object's id."""
        singular = collection.removesuffix("s")
        return self.call("POST", collection, {singular: fields})[singular]["id"]

    def find(self, collection: str, name: str) -> str:
        [found] = self.call("GET", f"{collection}?name={name}")[collection]
        return found["id"]

    def put(self, path: str) -> None:
        self.call("PUT", path)
