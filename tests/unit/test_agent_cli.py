"""How the agent's commands resolve their options: plan files, defaults and error messages."""

from __future__ import annotations

import io
import json
import os
import socket
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from rich.console import Console

from agent import age
from agent.context import (
    AD_HOC_JOB,
    ContextError,
    RepoOptions,
    default_node,
    load_keys,
    load_plan,
    repository_key,
    resolve,
    sanitise_node,
    target_url,
)
from agent.display import TransferProgress, human_duration, human_size
from agent.storage import parse_repo_url
from broker.plan import LocalTarget, Plan, S3Target, SwiftTarget
from broker.signing import generate_signing_key, sign_plan
from broker.snapshot import SnapshotRecord
from muster.cli import cli

ISSUED = "2026-01-02T03:04:05Z"


def plan_data(tmp_path: Path, jobs: tuple[str, ...] = ("etc",), node: str = "web1") -> dict:
    return {
        "node": node,
        "issued": ISSUED,
        "jobs": [
            {
                "name": name,
                "storage": {"kind": "local", "path": str(tmp_path / "repo")},
                "sources": {"paths": [f"/srv/{name}"]},
            }
            for name in jobs
        ],
    }


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """A state directory with an identity in it, and nothing else."""
    directory = tmp_path / "state"
    directory.mkdir()
    age.write_identity(directory / "identity.txt", age.Identity.generate())
    return directory


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def write_signed(path: Path, data: dict, tmp_path: Path) -> Path:
    key = generate_signing_key(tmp_path / "signing.pem")
    signed = sign_plan(Plan.model_validate(data), key)
    path.write_text(signed.model_dump_json())
    return path


def message(error: pytest.ExceptionInfo[ContextError]) -> str:
    return error.value.format_message()


# -- plan files ----------------------------------------------------------------------------


def test_plan_from_yaml(tmp_path: Path) -> None:
    # YAML turns the timestamp into a datetime; the plan still validates as JSON would
    plan = load_plan(write_yaml(tmp_path / "plan.yaml", plan_data(tmp_path)))
    assert plan.node == "web1"
    assert plan.issued == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert [job.name for job in plan.jobs] == ["etc"]
    assert plan.jobs[0].storage == LocalTarget(path=str(tmp_path / "repo"))


def test_plan_from_plain_json(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan_data(tmp_path)))
    assert load_plan(path).jobs[0].sources.paths == ["/srv/etc"]


def test_plan_from_signed_message(tmp_path: Path) -> None:
    path = write_signed(tmp_path / "plan.json", plan_data(tmp_path, ("etc", "db")), tmp_path)
    assert json.loads(path.read_text())["type"] == "plan"
    plan = load_plan(path)
    assert plan.node == "web1"
    assert [job.name for job in plan.jobs] == ["etc", "db"]


def test_signed_message_as_yaml(tmp_path: Path) -> None:
    signed = write_signed(tmp_path / "plan.json", plan_data(tmp_path), tmp_path)
    path = write_yaml(tmp_path / "plan.yaml", json.loads(signed.read_text()))
    assert load_plan(path) == load_plan(signed)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[1, 2]", "holds a list, not a plan"),
        ('{"type": "announce"}', "holds a 'announce' message, not a plan"),
        ('{"node": "web1", "jobs": []}', "invalid plan in"),
        ('{"node": "web 1", "issued": "2026-01-01T00:00:00Z"}', "node:"),
        ('{"type": "plan", "plan": {"node": "web1"}}', "invalid signed plan message"),
        ("node: [unclosed", "neither JSON nor YAML"),
        ("node: !!binary aGVsbG8=\nissued: 2026-01-01T00:00:00Z\n", "only JSON data"),
    ],
)
def test_bad_plan_files(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "plan"
    path.write_text(text)
    with pytest.raises(ContextError) as error:
        load_plan(path)
    assert expected in message(error)
    assert error.value.exit_code == 2


def test_invalid_plan_names_the_field(tmp_path: Path) -> None:
    data = plan_data(tmp_path)
    data["jobs"][0]["sources"]["paths"] = ["relative/path"]
    with pytest.raises(ContextError) as error:
        load_plan(write_yaml(tmp_path / "plan.yaml", data))
    assert "jobs.0.sources.paths.0" in message(error)
    assert str(tmp_path / "plan.yaml") in message(error)


def test_unreadable_plan(tmp_path: Path) -> None:
    with pytest.raises(ContextError, match="cannot read plan"):
        load_plan(tmp_path / "missing.json")


# -- resolution with a plan ----------------------------------------------------------------


def test_default_plan_is_the_daemons_file(tmp_path: Path, state: Path) -> None:
    write_signed(state / "plan.json", plan_data(tmp_path), tmp_path)
    context = resolve(RepoOptions(state_dir=state))
    assert context.plan is not None
    assert (context.node, context.job.name) == ("web1", "etc")
    assert (context.repo.node, context.repo.job) == ("web1", "etc")
    assert context.state_dir == state
    assert context.identities == age.load_identities(state / "identity.txt")
    assert context.identity == context.identities[0]
    assert context.location == f"file://{tmp_path}/repo"
    assert context.name == "web1/etc"


def test_no_plan_and_no_repo(state: Path) -> None:
    with pytest.raises(ContextError) as error:
        resolve(RepoOptions(state_dir=state))
    assert message(error) == (
        f"no plan at {state}/plan.json; pass --repo URL --identity KEY, or run "
        "`muster agent run` to receive a plan"
    )


def test_state_dir_defaults_to_the_environment(
    tmp_path: Path, state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MUSTER_STATE_DIR", str(state))
    write_yaml(state / "plan.json", plan_data(tmp_path))  # YAML under the JSON name is fine
    assert resolve(RepoOptions()).state_dir == state


def test_several_jobs_need_a_choice(tmp_path: Path, state: Path) -> None:
    plan = write_yaml(tmp_path / "plan.yaml", plan_data(tmp_path, ("etc", "db", "home")))
    with pytest.raises(ContextError) as error:
        resolve(RepoOptions(plan=plan, state_dir=state))
    assert message(error) == (
        "the plan for web1 has several jobs (etc, db, home): choose one with --job NAME"
    )
    assert resolve(RepoOptions(plan=plan, job="db", state_dir=state)).job.name == "db"


def test_unknown_job_lists_the_jobs(tmp_path: Path, state: Path) -> None:
    plan = write_yaml(tmp_path / "plan.yaml", plan_data(tmp_path, ("etc", "db")))
    with pytest.raises(ContextError) as error:
        resolve(RepoOptions(plan=plan, job="nope", state_dir=state))
    assert message(error) == "the plan for web1 has no job 'nope'; its jobs: etc, db"


def test_plan_without_jobs(tmp_path: Path, state: Path) -> None:
    plan = write_yaml(tmp_path / "plan.yaml", plan_data(tmp_path, ()))
    with pytest.raises(ContextError, match="has no jobs; use --repo URL"):
        resolve(RepoOptions(plan=plan, state_dir=state))


def test_plan_and_repo_exclude_each_other(tmp_path: Path, state: Path) -> None:
    plan = write_yaml(tmp_path / "plan.yaml", plan_data(tmp_path))
    with pytest.raises(ContextError, match="--plan and --repo exclude each other"):
        resolve(RepoOptions(plan=plan, repo=f"file://{tmp_path}/r", state_dir=state))


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"sources": ["/etc"]}, "PATH arguments are for ad hoc backups with --repo; job etc of "),
        ({"recipients": ["age1x"]}, "--recipient is for ad hoc backups with --repo"),
        ({"node": "db1"}, "is the plan for node web1, not db1"),
    ],
)
def test_plan_refuses_ad_hoc_options(
    tmp_path: Path, state: Path, options: dict, expected: str
) -> None:
    plan = write_yaml(tmp_path / "plan.yaml", plan_data(tmp_path))
    with pytest.raises(ContextError, match=expected.replace("(", r"\(")):
        resolve(RepoOptions(plan=plan, state_dir=state, **options))


def test_plan_node_may_be_repeated(tmp_path: Path, state: Path) -> None:
    plan = write_yaml(tmp_path / "plan.yaml", plan_data(tmp_path))
    assert resolve(RepoOptions(plan=plan, node="web1", state_dir=state)).node == "web1"


# -- identities ----------------------------------------------------------------------------


def test_missing_identity_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(ContextError) as error:
        resolve(RepoOptions(repo=f"file://{tmp_path}/r", state_dir=tmp_path / "empty"))
    key = tmp_path / "empty" / "identity.txt"
    assert message(error) == (
        f"no identity at {key}; create one with `muster keys generate {key}`, or pass "
        "--identity KEYFILE"
    )


def test_identity_optional_for_reading_records(tmp_path: Path) -> None:
    options = RepoOptions(repo=f"file://{tmp_path}/r", state_dir=tmp_path / "empty")
    context = resolve(options, identity_required=False)
    assert context.identities == []
    with pytest.raises(ContextError, match="create one with `muster keys generate"):
        _ = context.identity
    explicit = RepoOptions(
        repo=f"file://{tmp_path}/r", identity=tmp_path / "nope.txt", state_dir=tmp_path
    )
    with pytest.raises(ContextError, match="no identity at"):
        resolve(explicit, identity_required=False)


def test_explicit_identity_file(tmp_path: Path) -> None:
    identity = age.Identity.generate()
    age.write_identity(tmp_path / "key.txt", identity)
    options = RepoOptions(
        repo=f"file://{tmp_path}/r", identity=tmp_path / "key.txt", state_dir=tmp_path
    )
    assert resolve(options).identity == identity


def test_bad_identity_file_does_not_show_its_content(tmp_path: Path) -> None:
    secret = str(age.Identity.generate())
    path = tmp_path / "key.txt"
    path.write_text(f"# a comment\n{secret[:-3]}\n")  # a damaged key: the checksum fails
    with pytest.raises(ContextError) as error:
        load_keys(path)
    assert f"{path}, line 2" in message(error)
    assert secret[:20] not in message(error)


def test_identity_readable_by_others_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    identity = age.Identity.generate()
    path = tmp_path / "key.txt"
    age.write_identity(path, identity)
    path.chmod(0o644)
    assert load_keys(path) == [identity]
    assert f"chmod 600 {path}" in caplog.text
    assert str(identity) not in caplog.text


# -- ad hoc jobs ---------------------------------------------------------------------------


def test_ad_hoc_defaults(tmp_path: Path, state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getfqdn", lambda: "web1.example.org")
    monkeypatch.chdir(tmp_path)
    recipient = str(age.Identity.generate().recipient)
    options = RepoOptions(
        repo=f"file://{tmp_path}/repo",
        state_dir=state,
        sources=["data", str(tmp_path / "data"), "/etc"],
        recipients=[recipient],
    )
    context = resolve(options, sources=True)
    assert context.plan is None
    assert context.node == "web1.example.org"
    assert context.job.name == AD_HOC_JOB == "default"
    assert context.job.sources.paths == [str(tmp_path / "data"), "/etc"]  # absolute, once
    assert context.job.recipients == [recipient]
    assert context.job.storage == LocalTarget(path=f"{tmp_path}/repo")
    assert (context.repo.node, context.repo.job) == ("web1.example.org", "default")


def test_ad_hoc_backup_needs_paths(tmp_path: Path, state: Path) -> None:
    options = RepoOptions(repo=f"file://{tmp_path}/repo", state_dir=state)
    with pytest.raises(ContextError, match="name what to back up"):
        resolve(options, sources=True)
    assert resolve(options).job.sources.paths == []  # a reading command needs none


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"job": "Not Valid"}, "--job 'Not Valid': a job name is"),
        ({"node": "-bad"}, "--node '-bad': a node id is"),
        ({"recipients": ["age1nope"]}, "--recipient 'age1nope': not an age X25519 recipient"),
        ({"repo": "ftp://host/x"}, "unsupported repository URL"),
        ({"repo": "s3://bucket/p?colour=blue"}, "unknown parameter 'colour'"),
    ],
)
def test_ad_hoc_errors(tmp_path: Path, state: Path, options: dict, expected: str) -> None:
    options = {"repo": f"file://{tmp_path}/repo", **options}
    with pytest.raises(ContextError) as error:
        resolve(RepoOptions(state_dir=state, **options))
    assert expected in message(error)
    assert error.value.exit_code == 2


def test_missing_storage_credentials_are_a_context_error(
    tmp_path: Path, state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith(("OS_", "ST_")):
            monkeypatch.delenv(name)
    with pytest.raises(ContextError, match="set OS_PROJECT_NAME or OS_PROJECT_ID"):
        resolve(RepoOptions(repo="swift://backups/web1", state_dir=state))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("web1.example.org", "web1.example.org"),
        ("web 1 (prod).example.org", "web-1-prod-.example.org"),
        ("_underscore.first", "underscore.first"),
        ("ünïcode-host", "n-code-host"),
        ("...", "localhost"),
        ("x" * 300, "x" * 253),
    ],
)
def test_sanitise_node(name: str, expected: str) -> None:
    assert sanitise_node(name) == expected


def test_default_node_skips_localhost(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getfqdn", lambda: "localhost")
    monkeypatch.setattr(socket, "gethostname", lambda: "vm 7")
    assert default_node() == "vm-7"
    monkeypatch.setattr(socket, "getfqdn", lambda: "db2.example.org")
    assert default_node() == "db2.example.org"


# -- locations and cache keys --------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "url"),
    [
        (LocalTarget(path="/srv/backup/"), "file:///srv/backup"),
        (LocalTarget(path="/srv/backup", prefix="fleet"), "file:///srv/backup/fleet"),
        (SwiftTarget(container="c", prefix="p/q", proxy="http://u:pw@proxy"), "swift://c/p/q"),
        (
            S3Target(bucket="b", region="eu", endpoint="http://127.0.0.1:9000"),
            "s3://b?region=eu&endpoint=http://127.0.0.1:9000",
        ),
    ],
)
def test_target_url_is_safe_to_show(target: object, url: str) -> None:
    assert target_url(target) == url  # type: ignore[arg-type]


def test_cache_key_is_the_same_for_a_plan_and_a_url() -> None:
    from_plan = SwiftTarget(container="backups", prefix="prod")
    from_url = parse_repo_url("swift://backups/prod/?env_prefix=PROD")
    assert repository_key(from_plan, "web1", "etc") == repository_key(from_url, "web1", "etc")
    assert repository_key(from_plan, "web1", "etc") != repository_key(from_plan, "web2", "etc")


# -- the command line ----------------------------------------------------------------------


def test_backup_without_plan_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["backup", "--state-dir", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert f"Error: no plan at {tmp_path}/plan.json; pass --repo URL" in result.stderr


def test_state_dir_from_environment(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["snapshots"], env={"MUSTER_STATE_DIR": str(tmp_path)})
    assert result.exit_code == 2
    assert f"no plan at {tmp_path}/plan.json" in result.stderr


def test_backup_path_must_exist(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["backup", "--repo", f"file://{tmp_path}/r", str(tmp_path / "missing")]
    )
    assert result.exit_code == 2
    assert "does not exist" in result.stderr


def test_keys_generate_is_in_the_keys_group() -> None:
    result = CliRunner().invoke(cli, ["keys", "--help"])
    assert "generate-signing-key" in result.stdout
    assert "generate " in result.stdout


# -- formatting ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (1024**2 - 1, "1.0 MiB"),
        (int(1.2 * 1024**3), "1.2 GiB"),
        (5 * 1024**7, "5120.0 EiB"),
    ],
)
def test_human_size(size: int, text: str) -> None:
    assert human_size(size) == text


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.04, "0.0 s"), (59.94, "59.9 s"), (75, "1m15s"), (3725, "1h02m05s")]
)
def test_human_duration(seconds: float, text: str) -> None:
    assert human_duration(seconds) == text


def record(files: int, directories: int, size: int, chain: int = 0) -> SnapshotRecord:
    return SnapshotRecord.model_validate(
        {
            "id": "20260101T000000Z-abcdef",
            "node": "web1",
            "job": "etc",
            "started": ISSUED,
            "finished": ISSUED,
            "full": chain == 0,
            "chain": chain,
            "paths": ["/etc"],
            "catalog": {"name": "c", "size": 1, "sha256": "x"},
            "recipients": [str(age.Identity.generate().recipient)],
            "stats": {"files": files, "directories": directories, "bytes": size},
            "agent_version": "0",
        }
    )


def progress_console() -> Console:
    return Console(file=io.StringIO(), force_terminal=True, width=200)


def test_progress_counts_bytes_against_the_expected_totals() -> None:
    progress = TransferProgress(progress_console(), "web1/etc full", 9, 4096)
    with progress:
        progress.update(3, 1024)
        task = progress._progress.tasks[0]
        assert (task.total, task.completed) == (4096, 1024)
        assert progress.detail().startswith("3/9 files  1.0 KiB/4.0 KiB  ")


def test_progress_without_parent_is_indeterminate() -> None:
    progress = TransferProgress(progress_console(), "web1/etc", None, None)
    with progress:
        progress.update(7, 100)
        assert progress._progress.tasks[0].total is None
        assert progress.detail().startswith("7 files  100 B  ")
