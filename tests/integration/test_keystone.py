"""Swift through a real Keystone v3: what a node in an OpenStack cloud does with its openrc.

The `muster` console script runs in a subprocess with only OS_* variables: Keystone issues a
token whose catalog names the object-store endpoint, a Swift proxy with keystonemiddleware and
keystoneauth accepts it, and the objects land in the project's own account.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Mapping
from pathlib import Path

import pytest

from tests.services import KeystoneCredentials, SwiftCredentials
from tests.services.keystone import login

pytestmark = pytest.mark.integration

MUSTER = Path(sys.executable).parent / "muster"
STORAGE_FAMILIES = ("OS_", "ST_", "AWS_")


def muster(*args: str | Path, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """The installed console script, with storage variables only from env."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(STORAGE_FAMILIES)}
    return subprocess.run(
        [str(MUSTER), *map(str, args)],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def list_objects(url: str, token: str, container: str) -> list[str]:
    request = urllib.request.Request(
        f"{url}/{container}?format=json", headers={"X-Auth-Token": token}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return [item["name"] for item in json.load(response)]


@pytest.fixture
def source(tmp_path: Path) -> Path:
    root = tmp_path / "source"
    (root / "etc" / "nginx").mkdir(parents=True)
    (root / "etc" / "nginx" / "nginx.conf").write_text("worker_processes 4;\n")
    (root / "data.bin").write_bytes(os.urandom(2 * 1024 * 1024))
    return root


@pytest.fixture
def repo_args(tmp_path: Path) -> list[str | Path]:
    key = tmp_path / "identity.txt"
    ok(muster("keys", "generate", key, env={}))
    container = f"ks-{uuid.uuid4().hex[:12]}"
    return [
        *("--repo", f"swift://{container}/fleet", "--identity", key),
        *("--node", "web1", "--job", "etc", "--state-dir", tmp_path / "state"),
    ]


def test_backup_restore_verify_through_keystone(
    keystone_credentials: KeystoneCredentials,
    swift_credentials: SwiftCredentials,
    source: Path,
    repo_args: list[str | Path],
    tmp_path: Path,
) -> None:
    env = keystone_credentials.os_env()
    first = json.loads(ok(muster("backup", "--json", *repo_args, source, env=env)))
    (source / "etc" / "nginx" / "nginx.conf").write_text("worker_processes 8;\n")
    second = json.loads(ok(muster("backup", "--json", *repo_args, source, env=env)))
    assert first["full"] is True and second["full"] is False
    assert second["stats"]["files_unchanged"] == 1

    listed = json.loads(ok(muster("snapshots", "--json", *repo_args, env=env)))
    assert [item["id"] for item in listed] == [first["id"], second["id"]]

    target = tmp_path / "restored"
    wanted = source / "etc" / "nginx" / "nginx.conf"
    at_first = ["--at", first["id"], "--to", target]
    ok(muster("restore", *repo_args, *at_first, wanted, env=env))
    assert (target / wanted.relative_to("/")).read_text() == "worker_processes 4;\n"
    ok(muster("verify", *repo_args, "--all", env=env))

    # the objects are in the Keystone project's account, not in the tempauth one
    container = str(repo_args[1]).removeprefix("swift://").split("/")[0]
    credentials = keystone_credentials
    token, url = login(
        credentials.auth_url, credentials.user, credentials.password, credentials.project
    )
    names = list_objects(url, token, container)
    assert any(name.endswith(".tar.zst.age") for name in names)
    assert any(f"fleet/web1/etc/snapshots/{second['id']}" in name for name in names)
    assert "AUTH_test" not in url
    tempauth = {
        "ST_AUTH": swift_credentials.auth_url,
        "ST_USER": swift_credentials.user,
        "ST_KEY": swift_credentials.key,
    }
    elsewhere = muster("snapshots", "--json", *repo_args, env=tempauth)
    assert elsewhere.returncode == 0 and json.loads(elsewhere.stdout) == []


def test_wrong_password_is_refused_without_echoing_it(
    keystone_credentials: KeystoneCredentials, repo_args: list[str | Path]
) -> None:
    env = {**keystone_credentials.os_env(), "OS_PASSWORD": "not-the-password-42"}
    result = muster("snapshots", *repo_args, env=env)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Keystone at 127.0.0.1 refused the credentials" in output
    assert "not-the-password-42" not in output and "Traceback" not in output


def test_a_region_without_swift_is_named(
    keystone_credentials: KeystoneCredentials, repo_args: list[str | Path]
) -> None:
    env = {**keystone_credentials.os_env(), "OS_REGION_NAME": "Atlantis"}
    result = muster("snapshots", *repo_args, env=env)
    assert result.returncode != 0
    assert "no object-store endpoint for region Atlantis" in result.stdout + result.stderr
