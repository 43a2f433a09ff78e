"""`muster restore`, `ls` and `verify` end to end: once as the installed console script in a
subprocess (no terminal) on a directory, and through click's CliRunner against Swift and
Swift's S3 API, from a machine that has only the identity (no plan, no catalog cache)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from muster.cli import cli
from tests.services import S3Credentials, SwiftCredentials

pytestmark = pytest.mark.integration

MUSTER = Path(sys.executable).parent / "muster"
STORAGE_FAMILIES = ("OS_", "ST_", "AWS_")
NODE = "web1"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """Files small and large (the large one is read by range or streamed), a symlink."""
    root = tmp_path / "source"
    (root / "etc" / "app").mkdir(parents=True)
    (root / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    (root / "etc" / "app" / "app.conf").write_text("debug = false\n" * 50)
    (root / "etc" / "app" / "data.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (root / "etc" / "current").symlink_to("app/app.conf")
    return root


def muster(*args: str | Path, env: Mapping[str, str | None] | None = None) -> Result:
    """`muster ARGS` in-process; storage variables of the outer environment are hidden."""
    clean: dict[str, str | None] = {n: None for n in os.environ if n.startswith(STORAGE_FAMILIES)}
    return CliRunner().invoke(cli, [str(arg) for arg in args], env={**clean, **(env or {})})


def ok(result: Result) -> Result:
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}"
    return result


# -- the console script ----------------------------------------------------------------------


def test_console_script_restore(tmp_path: Path, source: Path) -> None:
    assert MUSTER.exists(), f"{MUSTER} missing: run .venv/bin/pip install -e ."
    env = {n: v for n, v in os.environ.items() if not n.startswith(STORAGE_FAMILIES)}
    env["MUSTER_STATE_DIR"] = str(tmp_path / "state")
    repo = ["--repo", f"file://{tmp_path}/repo", "--node", NODE]

    def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
        command = [str(MUSTER), *map(str, args)]
        return subprocess.run(
            command, capture_output=True, text=True, env=env, check=False, cwd=source
        )

    assert run("keys", "generate", tmp_path / "state" / "identity.txt").returncode == 0
    backed_up = run("backup", "--json", *repo, source)
    assert backed_up.returncode == 0, backed_up.stderr
    snapshot = json.loads(backed_up.stdout)["id"]

    hosts, data = source / "etc" / "hosts", source / "etc" / "app" / "data.bin"
    original = data.read_bytes()
    data.unlink()
    hosts.write_text("edited by hand\n")

    refused = run("restore", *repo, "etc")  # relative: from the current directory
    assert refused.returncode == 1
    assert data.read_bytes() == original  # the deleted file is back
    assert hosts.read_text() == "edited by hand\n"  # the edited one is not replaced
    assert refused.stdout.startswith(f"restored in place from {NODE}/default in file://")
    assert f"  {source}/etc  from {snapshot} (" in refused.stdout
    assert "  files      1 (3.0 MiB)" in refused.stdout
    assert "  unchanged  2 (already as in the backup, left alone)" in refused.stdout
    assert f"refused to replace 1 existing file (no terminal to ask on):\n  {hosts}\n" in (
        refused.stderr
    )
    assert "\x1b[" not in refused.stdout + refused.stderr  # no progress bar, no colours

    replaced = run("restore", "--json", "--overwrite", *repo, hosts)
    assert replaced.returncode == 0, replaced.stderr
    assert replaced.stderr == ""
    result = json.loads(replaced.stdout)
    assert (result["files"], result["errors"], result["refused"]) == (1, [], [])
    assert result["snapshots"] == {str(hosts): {"id": snapshot, "started": result["snapshots"][
        str(hosts)]["started"]}}  # fmt: skip
    assert hosts.read_text() == "127.0.0.1 localhost\n"

    missing = run("restore", *repo, source / "nothing")
    assert missing.returncode == 1
    assert missing.stderr == (
        f"Error: not in any snapshot: {source}/nothing (try `muster find NAME`)\n"
    )


# -- Swift and S3 ----------------------------------------------------------------------------


def round_trip(url: str, env: Mapping[str, str], tmp_path: Path, source: Path) -> None:
    """Back up from "the node"; then, elsewhere, with only the identity: ls, restore --to
    (twice: the second time nothing is replaced), verify; then a damaged restore target."""
    key = tmp_path / "keys" / "identity.txt"
    ok(muster("keys", "generate", key))
    node = ["--repo", url, "--node", NODE, "--identity", key]
    on_node = [*node, "--state-dir", tmp_path / "node-state"]
    ok(muster("backup", *on_node, source, env=env))
    (source / "etc" / "hosts").write_text("changed\n")
    second = json.loads(ok(muster("backup", "--json", *on_node, source, env=env)).stdout)

    elsewhere = [*node, "--state-dir", tmp_path / "elsewhere"]  # no cache: catalogs from storage
    listing = json.loads(ok(muster("ls", "--json", *elsewhere, source / "etc", env=env)).stdout)
    assert listing["snapshot"]["id"] == second["id"]
    assert [(e["name"], e["type"]) for e in listing["entries"]] == [
        ("app", "dir"),
        ("current", "symlink"),
        ("hosts", "file"),
    ]
    table = ok(muster("ls", *elsewhere, source / "etc" / "app", env=env)).stdout
    assert "data.bin" in table and "3.0 MiB" in table and "app.conf" in table

    out = tmp_path / "out"
    restored = json.loads(
        ok(muster("restore", "--json", *elsewhere, "--to", out, source, env=env)).stdout
    )
    assert restored["snapshots"][str(source)]["id"] == second["id"]
    assert (restored["files"], restored["errors"]) == (3, [])
    copy = out.joinpath(*source.parts[1:])
    for path in source.rglob("*"):
        twin = copy / path.relative_to(source)
        if path.is_symlink():
            assert os.readlink(twin) == os.readlink(path)
        elif path.is_file():
            assert twin.read_bytes() == path.read_bytes(), path

    again = json.loads(
        ok(muster("restore", "--json", *elsewhere, "--to", out, source, env=env)).stdout
    )
    assert (again["files"], len(again["unchanged"])) == (0, 4)

    old = ok(muster("restore", *elsewhere, "--to", tmp_path / "old", "--at",
                    second["parent"], source / "etc" / "hosts", env=env))  # fmt: skip
    assert f"from {second['parent']}" in old.stdout
    old_hosts = tmp_path / "old" / Path(*source.parts[1:]) / "etc" / "hosts"
    assert old_hosts.read_text() == "127.0.0.1 localhost\n"

    verified = json.loads(ok(muster("verify", "--json", "--all", *elsewhere, env=env)).stdout)
    assert verified["ok"] is True and verified["files_checked"] == 3
    assert verified["snapshot"] == second["id"]
    text = ok(muster("verify", *elsewhere, env=env)).stdout
    assert f"verify of snapshot {second['id']} of {NODE}/default in " in text
    assert ": ok\n" in text

    denied = muster("restore", *elsewhere, "--to", out, source, env={**env, **_wrong(env)})
    assert denied.exit_code != 0
    assert "Traceback" not in denied.output


def _wrong(env: Mapping[str, str]) -> dict[str, str]:
    name = "ST_KEY" if "ST_KEY" in env else "AWS_SECRET_ACCESS_KEY"
    return {name: "wrong"}


def test_restore_ls_verify_on_swift(
    swift_credentials: SwiftCredentials, tmp_path: Path, source: Path
) -> None:
    env = {
        "ST_AUTH": swift_credentials.auth_url,
        "ST_USER": swift_credentials.user,
        "ST_KEY": swift_credentials.key,
    }
    round_trip(f"swift://{unique('restore')}/fleet", env, tmp_path, source)


def test_restore_ls_verify_on_s3(
    s3_credentials: S3Credentials, tmp_path: Path, source: Path
) -> None:
    env = {
        "AWS_ACCESS_KEY_ID": s3_credentials.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_credentials.secret_key,
    }
    url = (
        f"s3://{unique('restore')}/fleet?endpoint={s3_credentials.endpoint}"
        f"&region={s3_credentials.region}"
    )
    round_trip(url, env, tmp_path, source)
