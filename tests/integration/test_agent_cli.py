"""`muster keys generate`, `muster backup` and `muster snapshots` end to end: through click's
CliRunner against a directory, Swift and Swift's S3 API, and once as the installed
`muster` console script in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result

from agent import age
from broker.plan import Plan
from broker.signing import generate_signing_key, sign_plan
from muster.cli import cli
from tests.services import S3Credentials, SwiftCredentials

pytestmark = pytest.mark.integration

MUSTER = Path(sys.executable).parent / "muster"
STORAGE_FAMILIES = ("OS_", "ST_", "AWS_")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def muster(*args: str | Path, env: Mapping[str, str | None] | None = None) -> Result:
    """Run `muster ARGS` in-process; storage variables of the outer environment are hidden,
    so that only `env` supplies credentials."""
    clean: dict[str, str | None] = {n: None for n in os.environ if n.startswith(STORAGE_FAMILIES)}
    return CliRunner().invoke(cli, [str(arg) for arg in args], env={**clean, **(env or {})})


def ok(result: Result) -> Result:
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}"
    return result


def as_json(result: Result) -> dict | list:
    return json.loads(ok(result).stdout)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A small tree: 5 regular files (one empty, one of 3 MiB), a symlink, a subdirectory."""
    root = tmp_path / "source"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "hello.txt").write_text("hello\n")
    (root / "empty").write_bytes(b"")
    (root / "sub" / "random.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    (root / "sub" / "deeper" / "notes.md").write_text("# notes\n" * 100)
    (root / "sub" / "deeper" / "z.json").write_text("{}")
    (root / "link").symlink_to("hello.txt")
    return root


FILES = 5


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "keys" / "identity.txt"
    ok(muster("keys", "generate", path))
    return path


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


def backup(*args: str | Path, env: Mapping[str, str | None] | None = None) -> dict:
    data = as_json(muster("backup", "--json", *args, env=env))
    assert isinstance(data, dict)
    return data


def snapshot_ids(*args: str | Path, env: Mapping[str, str | None] | None = None) -> list[str]:
    data = as_json(muster("snapshots", "--json", *args, env=env))
    assert isinstance(data, list)
    return [item["id"] for item in data]


# -- keys generate -------------------------------------------------------------------------


def test_keys_generate(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "identity.txt"
    result = ok(muster("keys", "generate", path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    (identity,) = age.load_identities(path)
    assert result.stdout == f"{identity.recipient}\n"
    assert "AGE-SECRET-KEY" not in result.output
    assert str(identity) not in result.output
    assert f"identity written to {path}" in result.stderr
    if shutil.which("age-keygen"):  # the reference tool reads it and derives the same recipient
        derived = subprocess.run(
            ["age-keygen", "-y", str(path)], capture_output=True, text=True, check=True
        )
        assert derived.stdout.strip() == str(identity.recipient)

    again = muster("keys", "generate", path)
    assert again.exit_code == 1
    assert "already exists; refusing to overwrite an identity" in again.stderr
    assert age.load_identities(path) == [identity]


# -- ad hoc backups to a directory ---------------------------------------------------------


def test_ad_hoc_backup_twice_then_list(
    tmp_path: Path, source: Path, key: Path, state: Path
) -> None:
    repo = f"file://{tmp_path}/repo"
    common = ["--repo", repo, "--identity", key, "--state-dir", state, "--node", "web1"]
    first = backup(*common, source)
    assert first["full"] is True
    assert (first["node"], first["job"]) == ("web1", "default")
    assert first["paths"] == [str(source)]
    assert first["stats"]["files"] == first["stats"]["files_new"] == FILES
    assert first["stats"]["directories"] == 3
    assert first["warnings"] == []
    assert first["recipients"] == [str(age.load_identities(key)[0].recipient)]

    second = backup(*common, source)
    assert second["full"] is False
    assert second["parent"] == first["id"]
    assert second["chain"] == 1
    assert second["stats"]["files_unchanged"] == FILES
    assert second["stats"]["files_new"] == second["stats"]["files_changed"] == 0
    assert second["stats"]["bytes_new"] == 0

    assert snapshot_ids(*common) == [first["id"], second["id"]]
    listing = as_json(muster("snapshots", "--json", *common))
    assert [(s["full"], s["chain"], s["files"]) for s in listing] == [(True, 0, 5), (False, 1, 5)]

    table = ok(muster("snapshots", *common)).stdout
    assert f"web1/default in {repo}" in table
    assert first["id"] in table and second["id"] in table
    assert "incremental +1" in table and "3.0 MiB" in table

    (source / "hello.txt").write_text("changed\n")
    summary = ok(muster("backup", *common, source)).stdout
    assert "  kind     incremental +2 on " + second["id"] in summary
    assert f"  files    {FILES}: 0 new, 1 changed, 4 unchanged; 3 directories" in summary
    assert summary.startswith(f"snapshot {summary.split()[1]} of web1/default in {repo}\n")


def test_recipients_and_job_name(tmp_path: Path, source: Path, key: Path, state: Path) -> None:
    escrow = age.Identity.generate().recipient
    record = backup(
        "--repo", f"file://{tmp_path}/repo", "--identity", key, "--state-dir", state,
        "--job", "etc", "--recipient", escrow, "--node", "web1", source,
    )  # fmt: skip
    assert record["job"] == "etc"
    assert record["recipients"][1:] == [str(escrow)]
    assert (tmp_path / "repo" / "web1" / "etc" / "snapshots" / f"{record['id']}.json").is_file()


def test_warnings_do_not_fail_a_backup(tmp_path: Path, source: Path, key: Path) -> None:
    os.mkfifo(source / "pipe")
    args = ["--repo", f"file://{tmp_path}/repo", "--identity", key, "--state-dir", tmp_path]
    result = ok(muster("backup", *args, source))
    assert f"{source}/pipe: skipped" in result.stderr
    assert "1 warning:" in result.stderr
    assert "  warnings 1 (on stderr)" in result.stdout
    record = backup(*args, source)
    assert [w for w in record["warnings"] if w.startswith(f"{source}/pipe")]


def test_empty_repository(tmp_path: Path, state: Path) -> None:
    args = ["snapshots", "--repo", f"file://{tmp_path}/repo", "--state-dir", state]
    assert as_json(muster(*args, "--json")) == []
    result = ok(muster(*args, "--node", "web1"))
    assert f"no snapshots of web1/default in file://{tmp_path}/repo yet" in result.stderr


# -- backups from a plan -------------------------------------------------------------------


def plan_data(tmp_path: Path, source: Path) -> dict:
    escrow = str(age.Identity.generate().recipient)
    return {
        "node": "web1.example.org",
        "issued": "2026-01-02T03:04:05Z",
        "jobs": [
            {
                "name": "etc",
                "storage": {"kind": "local", "path": str(tmp_path / "repo"), "prefix": "fleet"},
                "sources": {"paths": [str(source)], "excludes": ["*.md"]},
                "recipients": [escrow],
                "full_every": 2,
            }
        ],
    }


def test_backup_from_plan_yaml(tmp_path: Path, source: Path, key: Path, state: Path) -> None:
    data = plan_data(tmp_path, source)
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump(data))
    args = ["--plan", plan, "--identity", key, "--state-dir", state]
    first = backup(*args)
    assert (first["node"], first["job"], first["full"]) == ("web1.example.org", "etc", True)
    assert first["stats"]["files"] == FILES - 1  # the plan excludes *.md
    assert first["recipients"][1:] == data["jobs"][0]["recipients"]
    stored = tmp_path / "repo" / "fleet" / "web1.example.org" / "etc" / "snapshots"
    assert (stored / f"{first['id']}.json").is_file()

    second = backup(*args)
    assert (second["full"], second["stats"]["files_unchanged"]) == (False, FILES - 1)
    third = backup(*args)
    assert third["full"] is True  # full_every: 2
    assert snapshot_ids("--plan", plan, "--state-dir", state) == [
        first["id"],
        second["id"],
        third["id"],
    ]


def test_backup_from_the_daemons_signed_plan(tmp_path: Path, source: Path) -> None:
    """With the plan and identity where `muster agent run` keeps them, no option is needed."""
    state = tmp_path / "state"
    ok(muster("keys", "generate", state / "identity.txt"))
    signed = sign_plan(
        Plan.model_validate(plan_data(tmp_path, source)),
        generate_signing_key(tmp_path / "signing.pem"),
    )
    (state / "plan.json").write_text(signed.model_dump_json())
    env = {"MUSTER_STATE_DIR": str(state)}
    record = as_json(muster("backup", "--json", env=env))
    assert isinstance(record, dict)
    assert (record["node"], record["job"]) == ("web1.example.org", "etc")
    assert snapshot_ids(env=env) == [record["id"]]


# -- Swift and S3 --------------------------------------------------------------------------


def test_ad_hoc_backup_to_swift(
    swift_credentials: SwiftCredentials, source: Path, key: Path, state: Path
) -> None:
    url = f"swift://{unique('cli')}/fleet/prod"
    args = ["--repo", url, "--identity", key, "--state-dir", state, "--node", "web1"]
    tempauth = {
        "ST_AUTH": swift_credentials.auth_url,
        "ST_USER": swift_credentials.user,
        "ST_KEY": swift_credentials.key,
    }
    first = backup(*args, source, env=tempauth)
    assert first["full"] is True and first["stats"]["files"] == FILES

    openstack = {  # the same account through the OS_* names, v1 auth
        "OS_AUTH_URL": swift_credentials.auth_url,
        "OS_USERNAME": swift_credentials.user,
        "OS_PASSWORD": swift_credentials.key,
        "OS_AUTH_VERSION": "1",
    }
    second = backup(*args, source, env=openstack)
    assert second["full"] is False
    assert second["stats"]["files_unchanged"] == FILES
    assert snapshot_ids(*args, env=openstack) == [first["id"], second["id"]]

    denied = muster("snapshots", *args, env={**tempauth, "ST_KEY": "wrong"})
    assert denied.exit_code != 0
    assert "Traceback" not in denied.output and "wrong" not in denied.output


def test_ad_hoc_backup_to_s3(
    s3_credentials: S3Credentials, source: Path, key: Path, tmp_path: Path
) -> None:
    bucket, prefix = unique("cli"), "fleet/prod"
    keys = {
        "AWS_ACCESS_KEY_ID": s3_credentials.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_credentials.secret_key,
    }
    in_url = (
        f"s3://{bucket}/{prefix}?endpoint={s3_credentials.endpoint}&region={s3_credentials.region}"
    )
    args = ["--identity", key, "--node", "web1"]
    first = backup("--repo", in_url, "--state-dir", tmp_path / "one", *args, source, env=keys)
    assert first["full"] is True and first["stats"]["files"] == FILES

    # the endpoint from the environment instead, and a fresh state directory: the previous
    # catalog now comes from the bucket, decrypted with the identity
    from_env = {
        **keys,
        "AWS_ENDPOINT_URL": s3_credentials.endpoint,
        "AWS_REGION": s3_credentials.region,
    }
    plain = f"s3://{bucket}/{prefix}"
    second = backup("--repo", plain, "--state-dir", tmp_path / "two", *args, source, env=from_env)
    assert second["full"] is False
    assert second["stats"]["files_unchanged"] == FILES
    assert snapshot_ids("--repo", plain, *args, env=from_env) == [first["id"], second["id"]]


# -- the installed console script ----------------------------------------------------------


def test_console_script(tmp_path: Path, source: Path) -> None:
    assert MUSTER.exists(), f"{MUSTER} missing: run .venv/bin/pip install -e ."
    env = {
        name: value for name, value in os.environ.items() if not name.startswith(STORAGE_FAMILIES)
    }
    env["MUSTER_STATE_DIR"] = str(tmp_path / "state")

    def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
        command = [str(MUSTER), *map(str, args)]
        return subprocess.run(command, capture_output=True, text=True, env=env, check=False)

    no_plan = run("backup")
    assert no_plan.returncode == 2
    assert no_plan.stderr == (
        f"Error: no plan at {tmp_path}/state/plan.json; pass --repo URL --identity KEY, "
        "or run `muster agent run` to receive a plan\n"
    )

    generated = run("keys", "generate", tmp_path / "state" / "identity.txt")
    assert generated.returncode == 0, generated.stderr
    (identity,) = age.load_identities(tmp_path / "state" / "identity.txt")
    assert generated.stdout == f"{identity.recipient}\n"
    assert "AGE-SECRET-KEY" not in generated.stdout + generated.stderr

    repo = f"file://{tmp_path}/repo"
    runs = [run("backup", "--json", "--repo", repo, source) for _ in range(2)]
    for result in runs:
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
    first, second = (json.loads(result.stdout) for result in runs)
    assert (first["full"], second["full"]) == (True, False)
    assert second["stats"]["files_unchanged"] == FILES

    listed = run("snapshots", "--json", "--repo", repo)
    assert listed.returncode == 0, listed.stderr
    assert [s["id"] for s in json.loads(listed.stdout)] == [first["id"], second["id"]]

    quiet = run("backup", "--repo", repo, source)  # not a terminal: only the summary
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert quiet.stdout.startswith("snapshot ") and "incremental +2" in quiet.stdout
    for result in [*runs, listed, quiet]:
        assert "AGE-SECRET-KEY" not in result.stdout + result.stderr
