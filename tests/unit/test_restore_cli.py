"""`muster restore`, `ls`, `versions`, `find`, `verify` and `forget` through click's CliRunner,
on local `file://` repositories made with `muster backup`. The source trees live in tmp
directories, so restoring in place stays inside them too."""

from __future__ import annotations

import io
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result
from rich.console import Console

from agent import age, restore_cli
from agent.actions.restore import run_restore
from agent.archive import Archive
from agent.context import RepoOptions, resolve
from agent.display import TransferProgress
from agent.repository import Repository
from agent.restore_cli import plan_restore, repo_archive
from muster.cli import cli

NODE = "web1"


class Setup:
    """A source tree, a repository and a state directory holding the node's identity."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.source = tmp / "src"
        self.state = tmp / "state"
        self.repo = tmp / "repo"
        self.state.mkdir()
        age.write_identity(self.state / "identity.txt", age.Identity.generate())
        (self.source / "sub" / "deeper").mkdir(parents=True)
        (self.source / "a.txt").write_text("alpha\n")
        (self.source / "sub" / "b.txt").write_text("bravo\n" * 100)
        (self.source / "sub" / "deeper" / "c.bin").write_bytes(os.urandom(70_000))
        (self.source / "link").symlink_to("a.txt")

    @property
    def options(self) -> list[str]:
        return ["--repo", f"file://{self.repo}", "--node", NODE, "--state-dir", str(self.state)]

    def run(self, command: str, *args: str | Path, input: str | None = None) -> Result:
        argv = [command, *self.options, *map(str, args)]
        return CliRunner().invoke(cli, argv, input=input)

    def backup(self) -> dict:
        result = CliRunner().invoke(cli, ["backup", "--json", *self.options, str(self.source)])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    def json(self, command: str, *args: str | Path) -> dict | list:
        return json.loads(ok(self.run(command, "--json", *args)).stdout)

    def age_snapshot(self, snapshot_id: str, days: int) -> None:
        """Make a snapshot look `days` older than it is (its record is plain JSON)."""
        path = self.repo / NODE / "default" / "snapshots" / f"{snapshot_id}.json"
        record = json.loads(path.read_text())
        for name in ("started", "finished"):
            moment = datetime.fromisoformat(record[name].replace("Z", "+00:00"))
            record[name] = (moment - timedelta(days=days)).isoformat()
        path.write_text(json.dumps(record))


def ok(result: Result) -> Result:
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}"
    return result


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


@pytest.fixture
def backed_up(setup: Setup) -> Setup:
    setup.backup()
    return setup


# -- restore in place ------------------------------------------------------------------------


def test_deleted_file_comes_back_in_place(backed_up: Setup) -> None:
    target = backed_up.source / "sub" / "b.txt"
    target.unlink()
    (snapshot,) = backed_up.json("snapshots")
    result = ok(backed_up.run("restore", target))
    assert target.read_text() == "bravo\n" * 100
    assert result.stdout.splitlines()[:3] == [
        f"restored in place from {NODE}/default in file://{backed_up.repo}",
        f"  {target}  from {snapshot['id']} ({restore_cli.when(_record(backed_up, 0))})",
        "  files      1 (600 B)",
    ]
    assert "  errors     0" in result.stdout
    assert result.stderr == ""


def test_relative_paths_start_at_the_current_directory(
    backed_up: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil_tree = backed_up.source / "sub"
    for path in sorted(shutil_tree.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    monkeypatch.chdir(backed_up.source)
    data = backed_up.json("restore", "sub")
    assert list(data["snapshots"]) == [str(shutil_tree)]
    assert (shutil_tree / "deeper" / "c.bin").stat().st_size == 70_000
    assert (data["files"], data["bytes"]) == (2, 70_600)


def test_existing_files_are_refused_without_a_terminal(backed_up: Setup) -> None:
    changed = backed_up.source / "a.txt"
    changed.write_text("mine\n")
    (backed_up.source / "sub" / "b.txt").unlink()
    result = backed_up.run("restore", backed_up.source)
    assert result.exit_code == 1
    assert changed.read_text() == "mine\n"  # untouched
    assert (backed_up.source / "sub" / "b.txt").read_text() == "bravo\n" * 100  # restored
    assert "refused to replace 1 existing file (no terminal to ask on):" in result.stderr
    assert f"  {changed}\n" in result.stderr
    assert "pass --overwrite to replace them, or --to DIR" in result.stderr
    assert "  refused    1 existing (on stderr)" in result.stdout
    assert "  files      1 (600 B)" in result.stdout  # the refused file is not counted
    assert "  unchanged  2 " in result.stdout  # c.bin and the symlink


def test_refusals_in_json(backed_up: Setup) -> None:
    changed = backed_up.source / "a.txt"
    changed.write_text("mine\n")
    result = backed_up.run("restore", "--json", backed_up.source)
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    (snapshot,) = backed_up.json("snapshots")
    assert data == {
        "root": "/",
        "snapshots": {
            str(backed_up.source): {"id": snapshot["id"], "started": snapshot["started"]}
        },
        "files": 0,
        "bytes": 0,
        "unchanged": sorted(
            str(backed_up.source / name) for name in ("link", "sub/b.txt", "sub/deeper/c.bin")
        ),
        "kept": [],
        "refused": [str(changed)],
        "errors": [],
    }
    assert changed.read_text() == "mine\n"


def test_overwrite_replaces(backed_up: Setup) -> None:
    changed = backed_up.source / "a.txt"
    changed.write_text("mine\n")
    (backed_up.source / "link").unlink()
    (backed_up.source / "link").symlink_to("elsewhere")
    result = ok(backed_up.run("restore", "--overwrite", backed_up.source))
    assert changed.read_text() == "alpha\n"
    assert os.readlink(backed_up.source / "link") == "a.txt"
    assert "  files      3 (69.0 KiB)" in result.stdout
    assert "unchanged" not in result.stdout


def test_unchanged_files_are_left_alone(backed_up: Setup) -> None:
    before = {p: p.stat().st_ino for p in backed_up.source.rglob("*") if p.is_file()}
    result = ok(backed_up.run("restore", backed_up.source))
    assert "  files      0 (0 B)" in result.stdout
    assert "  unchanged  4 (already as in the backup, left alone)" in result.stdout
    assert {p: p.stat().st_ino for p in before} == before


# -- restore elsewhere -----------------------------------------------------------------------


def test_restore_to_another_directory(backed_up: Setup) -> None:
    (backed_up.source / "a.txt").write_text("mine\n")
    out = backed_up.tmp / "out"
    result = ok(backed_up.run("restore", "--to", out, backed_up.source / "a.txt"))
    assert out.joinpath(*backed_up.source.parts[1:], "a.txt").read_text() == "alpha\n"
    assert (backed_up.source / "a.txt").read_text() == "mine\n"
    assert result.stdout.startswith(f"restored under {out} from")

    # a second time: the same content is there; a changed file is refused
    ok(backed_up.run("restore", "--to", out, backed_up.source / "a.txt"))
    out.joinpath(*backed_up.source.parts[1:], "a.txt").write_text("edited\n")
    refused = backed_up.run("restore", "--to", out, backed_up.source / "a.txt")
    assert refused.exit_code == 1
    assert "pass --overwrite to replace them\n" in refused.stderr  # no --to hint: it has one


def test_restore_to_follows_no_symlink(backed_up: Setup) -> None:
    out = backed_up.tmp / "out"
    escape = backed_up.tmp / "escape"
    escape.mkdir()
    out.mkdir()
    (out / backed_up.source.parts[1]).symlink_to(escape)  # a trap on the way down
    result = backed_up.run("restore", "--to", out, backed_up.source / "a.txt")
    assert result.exit_code == 1
    assert "is not a directory we may enter" in result.stderr
    assert list(escape.iterdir()) == []


# -- which snapshot --------------------------------------------------------------------------


def _record(setup: Setup, index: int):  # type: ignore[no-untyped-def]
    from agent.storage import open_storage, parse_repo_url

    storage = open_storage(parse_repo_url(f"file://{setup.repo}"))
    return Repository(storage, NODE, "default").snapshots()[index]


def test_each_path_from_the_newest_snapshot_holding_it(backed_up: Setup) -> None:
    first = _record(backed_up, 0)
    gone = backed_up.source / "a.txt"
    gone.unlink()
    (backed_up.source / "new.txt").write_text("new\n")
    second = backed_up.backup()
    (backed_up.source / "new.txt").unlink()
    data = backed_up.json("restore", gone, backed_up.source / "new.txt")
    assert {path: s["id"] for path, s in data["snapshots"].items()} == {
        str(gone): first.id,
        str(backed_up.source / "new.txt"): second["id"],
    }
    assert gone.read_text() == "alpha\n"


def test_at_forms(backed_up: Setup) -> None:
    first = _record(backed_up, 0).id
    (backed_up.source / "a.txt").write_text("second version\n")
    second = backed_up.backup()["id"]
    backed_up.age_snapshot(first, days=3)
    out = backed_up.tmp / "out"
    restored = out.joinpath(*backed_up.source.parts[1:], "a.txt")
    three_days_ago = (datetime.now(UTC) - timedelta(days=2, hours=12)).astimezone()
    cases = {
        first: "alpha\n",
        first[:-2]: "alpha\n",  # the start of an id
        second: "second version\n",
        "2 days ago": "alpha\n",
        "36 hours ago": "alpha\n",
        three_days_ago.strftime("%Y-%m-%d %H:%M"): "alpha\n",
        datetime.now().strftime("%Y-%m-%d"): "second version\n",  # a date: its end
        "now": "second version\n",
    }
    for when, content in cases.items():
        args = ["--overwrite", "--to", out, "--at", when, backed_up.source / "a.txt"]
        data = backed_up.json("restore", *args)
        assert restored.read_text() == content, when
        (chosen,) = data["snapshots"].values()
        assert chosen["id"] == (first if "alpha" in content else second)
    assert backed_up.json("ls", "--at", "2 days ago", backed_up.source)["snapshot"]["id"] == first


def test_at_errors(backed_up: Setup) -> None:
    bad = backed_up.run("restore", "--at", "last tuesday", backed_up.source)
    assert bad.exit_code == 2
    assert "cannot read 'last tuesday' as a time" in bad.stderr
    early = backed_up.run("restore", "--at", "2001-01-01", backed_up.source)
    assert early.exit_code == 1
    assert "no snapshot before 2001-01-01" in early.stderr
    unknown = backed_up.run("restore", "--at", "19990101T000000Z-000000", backed_up.source)
    assert unknown.exit_code == 1
    assert "0 snapshots match" in unknown.stderr


def test_path_in_no_snapshot(backed_up: Setup) -> None:
    missing = backed_up.source / "never.txt"
    result = backed_up.run("restore", missing)
    assert result.exit_code == 1
    assert f"Error: not in any snapshot: {missing} (try `muster find NAME`)" in result.stderr
    assert "Traceback" not in result.output
    assert not missing.exists()


def test_restore_needs_a_path(backed_up: Setup) -> None:
    result = backed_up.run("restore")
    assert result.exit_code == 2
    assert "Missing argument 'PATH...'" in result.stderr


def test_restore_before_any_backup(setup: Setup) -> None:
    result = setup.run("restore", setup.source)
    assert result.exit_code == 1
    assert f"no snapshots yet for {NODE}/default" in result.stderr


def test_restore_needs_the_identity(backed_up: Setup) -> None:
    other = backed_up.tmp / "other.txt"
    age.write_identity(other, age.Identity.generate())
    result = backed_up.run("restore", "--identity", other, "--to", backed_up.tmp / "o", "/")
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "AGE-SECRET-KEY" not in result.output


# -- the terminal ----------------------------------------------------------------------------


@pytest.fixture
def three_changed(backed_up: Setup, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    monkeypatch.setattr(restore_cli, "interactive", lambda: True)
    (backed_up.source / "link").unlink()
    changed = [backed_up.source / "a.txt", backed_up.source / "sub" / "b.txt"]
    changed.append(backed_up.source / "sub" / "deeper" / "c.bin")
    for path in changed:
        path.write_text("mine\n")
    return changed


def contents(paths: list[Path]) -> list[str]:
    return ["mine" if path.read_bytes() == b"mine\n" else "backup" for path in paths]


@pytest.mark.parametrize(
    ("answers", "expected", "kept"),
    [
        ("y\nn\ny\n", ["backup", "mine", "backup"], 1),
        ("n\na\n", ["mine", "backup", "backup"], 1),
        ("y\nq\n", ["backup", "mine", "mine"], 2),
        ("\n\n\n", ["mine", "mine", "mine"], 3),  # the default keeps
        ("maybe\ny\ny\ny\n", ["backup", "backup", "backup"], 0),  # asked again
    ],
)
def test_terminal_asks_per_file(
    backed_up: Setup, three_changed: list[Path], answers: str, expected: list[str], kept: int
) -> None:
    result = ok(backed_up.run("restore", backed_up.source, input=answers))
    assert contents(three_changed) == expected
    assert "3 existing files differ from the backup" in result.stderr
    assert f"replace {three_changed[0]} (5 B, modified " in result.stderr
    assert "with the backup's 6 B, modified" in result.stderr
    assert os.readlink(backed_up.source / "link") == "a.txt"  # missing: no question
    if kept:
        assert f"  kept       {kept} existing (you chose to keep them)" in result.stdout
    assert f"  files      {3 - kept} " in result.stdout


def test_terminal_is_not_asked_with_overwrite_or_json(
    backed_up: Setup, three_changed: list[Path]
) -> None:
    ok(backed_up.run("restore", "--overwrite", backed_up.source, input=""))
    assert contents(three_changed) == ["backup"] * 3
    for path in three_changed:
        path.write_text("mine\n")
    result = backed_up.run("restore", "--json", backed_up.source, input="")
    assert result.exit_code == 1
    assert len(json.loads(result.stdout)["refused"]) == 3
    assert contents(three_changed) == ["mine"] * 3


def test_interactive_means_both_ends_are_terminals(monkeypatch: pytest.MonkeyPatch) -> None:
    class Fake(io.StringIO):
        def __init__(self, tty: bool) -> None:
            super().__init__()
            self.tty = tty

        def isatty(self) -> bool:
            return self.tty

    for stdin, stdout, expected in [(1, 1, True), (1, 0, False), (0, 1, False)]:
        monkeypatch.setattr("sys.stdin", Fake(bool(stdin)))
        monkeypatch.setattr("sys.stdout", Fake(bool(stdout)))
        assert restore_cli.interactive() is expected


def test_restore_progress_counts_bytes() -> None:
    console = Console(file=io.StringIO(), force_terminal=True, width=200)
    with TransferProgress(console, "restoring", 4, 8192) as progress:
        progress.update(1, 2048)
        task = progress._progress.tasks[0]
        assert (task.total, task.completed) == (8192, 2048)
        assert progress.detail().startswith("1/4 files  2.0 KiB/8.0 KiB  ")


def test_restore_shows_progress_on_a_terminal(
    backed_up: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    screen = io.StringIO()

    def console(stderr: bool = False, **options: object) -> Console:
        if stderr:
            return Console(file=screen, force_terminal=True, width=120)
        return Console(**options)  # type: ignore[arg-type]

    monkeypatch.setattr(restore_cli, "Console", console)
    monkeypatch.setattr(TransferProgress, "INTERVAL", 0.0)
    monkeypatch.setattr(restore_cli, "PROGRESS_MIN_FILES", 3)
    out = backed_up.tmp / "out"
    result = ok(backed_up.run("restore", "--to", out, backed_up.source))
    assert "restoring" in screen.getvalue() and "/3 files" in screen.getvalue()
    assert "  files      3 (69.0 KiB)" in result.stdout
    screen.truncate(0)
    monkeypatch.setattr(restore_cli, "PROGRESS_MIN_FILES", 4)  # small restores: no bar
    ok(backed_up.run("restore", "--overwrite", "--to", out, backed_up.source))
    assert screen.getvalue() == ""


# -- planning --------------------------------------------------------------------------------


def _archive(setup: Setup) -> Archive:
    return repo_archive(resolve(RepoOptions(repo=f"file://{setup.repo}", node=NODE,
                                        state_dir=setup.state)))  # fmt: skip


def test_plan_counts_what_will_be_written(backed_up: Setup) -> None:
    with _archive(backed_up) as archive:
        empty = plan_restore(archive, [str(backed_up.source)], backed_up.tmp / "none", None)
        assert (empty.files, empty.bytes) == (3, 6 + 600 + 70_000)
        assert empty.existing == {} and empty.conflicts == []
        (backed_up.source / "a.txt").write_text("mine\n")
        here = plan_restore(archive, [str(backed_up.source)], Path("/"), None)
        assert (here.files, here.bytes) == (3, 70_606)
        assert [entry.path for entry, _ in here.conflicts] == [str(backed_up.source / "a.txt")]
        assert len(here.unchanged) == 3  # b.txt, c.bin, the symlink
        blind = plan_restore(archive, [str(backed_up.source)], Path("/"), None, existing=False)
        assert (blind.existing, blind.unchanged, blind.conflicts) == ({}, set(), [])


def test_a_lone_hard_link_is_restored_as_a_file(setup: Setup) -> None:
    first, second = setup.source / "first", setup.source / "second"
    first.write_text("shared\n")
    os.link(first, second)
    setup.backup()
    second.unlink()
    data = setup.json("restore", second)  # without `first`: a file of its own
    assert (data["files"], data["bytes"]) == (1, 7)
    assert second.read_text() == "shared\n"
    second.write_text("edited\n")
    refused = setup.run("restore", "--json", second)
    assert refused.exit_code == 1
    data = json.loads(refused.stdout)
    assert (data["files"], data["bytes"], data["refused"]) == (0, 0, [str(second)])
    with _archive(setup) as archive:
        plan = plan_restore(archive, [str(setup.source)], Path("/"), None)
        assert plan.files == 4  # the three of the setup, and `first`; `second` links to it


# -- catalogs are read once ------------------------------------------------------------------


def test_restore_fetches_each_catalog_once(
    backed_up: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    (backed_up.source / "a.txt").write_text("changed\n")
    backed_up.backup()
    fresh = backed_up.tmp / "fresh-state"  # no catalog cache: every catalog from storage
    fresh.mkdir()
    (fresh / "identity.txt").write_bytes((backed_up.state / "identity.txt").read_bytes())
    (fresh / "identity.txt").chmod(0o600)
    fetched: list[str] = []
    original = Repository.get

    def counting(self: Repository, name: str):  # type: ignore[no-untyped-def]
        fetched.append(name)
        return original(self, name)

    monkeypatch.setattr(Repository, "get", counting)
    (backed_up.source / "sub" / "b.txt").unlink()
    argv = ["restore", "--repo", f"file://{backed_up.repo}", "--node", NODE]
    result = CliRunner().invoke(cli, [*argv, "--state-dir", str(fresh), str(backed_up.source)])
    assert result.exit_code == 0, result.output
    catalogs = [name for name in fetched if name.startswith("catalogs/")]
    assert len(catalogs) == len(set(catalogs)) == 1
    assert (backed_up.source / "sub" / "b.txt").exists()


# -- ls --------------------------------------------------------------------------------------


def test_ls_table(backed_up: Setup) -> None:
    result = ok(backed_up.run("ls", backed_up.source))
    (snapshot,) = backed_up.json("snapshots")
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert lines[0].startswith(f"{backed_up.source} in {NODE}/default, snapshot {snapshot['id']}")
    row = next(line for line in lines if line.rstrip().endswith(" a.txt"))
    assert row.split()[:3] == ["-rw-r--r--", _owner(backed_up.source / "a.txt"), "6"]
    assert any(line.rstrip().endswith(" link -> a.txt") for line in lines)
    assert any(
        line.split()[0] == "drwxr-xr-x" and line.rstrip().endswith(" sub/") for line in lines
    )
    assert any(line.split()[0] == "lrwxrwxrwx" for line in lines)


def _owner(path: Path) -> str:
    import grp
    import pwd

    info = path.stat()
    return f"{pwd.getpwuid(info.st_uid).pw_name}:{grp.getgrgid(info.st_gid).gr_name}"


def test_ls_lists_implied_directories(backed_up: Setup) -> None:
    above = backed_up.source.parent
    result = ok(backed_up.run("ls", above.parent))
    implied = ["d?????????", above.name + "/"]
    assert any(line.split() == implied for line in result.stdout.splitlines())
    source = backed_up.json("ls", above)["entries"]  # the source itself has an entry
    assert [(e["name"], e["type"], e["implied"]) for e in source] == [("src", "dir", False)]
    data = backed_up.json("ls", "/")
    assert data["directory"] == "/"
    assert data["entries"] == [
        {"name": backed_up.source.parts[1], "path": "/" + backed_up.source.parts[1],
         "type": "dir", "implied": True}
    ]  # fmt: skip


def test_ls_json(backed_up: Setup) -> None:
    data = backed_up.json("ls", backed_up.source / "sub")
    assert data["directory"] == str(backed_up.source / "sub")
    assert [(e["name"], e["type"], e["implied"]) for e in data["entries"]] == [
        ("b.txt", "file", False),
        ("deeper", "dir", False),
    ]
    entry = data["entries"][0]
    assert entry["path"] == str(backed_up.source / "sub" / "b.txt")
    assert (entry["size"], entry["mode"]) == (600, "0644")
    assert entry["sha256"] and entry["mtime"].endswith("Z")
    assert set(entry) >= {"user", "group", "uid", "gid", "link"}
    assert "volume" not in entry and "location" not in entry


def test_ls_of_a_file_and_of_nothing(backed_up: Setup) -> None:
    data = backed_up.json("ls", backed_up.source / "a.txt")
    assert [e["name"] for e in data["entries"]] == ["a.txt"]
    missing = backed_up.run("ls", backed_up.source / "nope")
    assert missing.exit_code == 1
    assert f"nothing at {backed_up.source}/nope in snapshot" in missing.stderr
    assert "muster find NAME" in missing.stderr


def test_ls_empty_directory(setup: Setup) -> None:
    (setup.source / "empty").mkdir()
    setup.backup()
    assert setup.json("ls", setup.source / "empty")["entries"] == []


# -- versions --------------------------------------------------------------------------------


def test_versions(backed_up: Setup) -> None:
    first = backed_up.json("snapshots")[0]["id"]
    second = backed_up.backup()["id"]
    (backed_up.source / "a.txt").write_text("changed!\n")
    third = backed_up.backup()["id"]
    data = backed_up.json("versions", backed_up.source / "a.txt")
    assert [(v["first_seen"]["id"], v["last_seen"]["id"], v["size"]) for v in data] == [
        (first, second, 6),
        (third, third, 9),
    ]
    assert data[0]["type"] == "file" and len(data[0]["sha256"]) == 64
    table = ok(backed_up.run("versions", backed_up.source / "a.txt")).stdout
    assert table.startswith(f"2 versions of {backed_up.source}/a.txt in {NODE}/default\n")
    assert first in table and second in table and third in table
    assert data[1]["sha256"][:12] in table


def test_versions_of_a_path_in_no_snapshot(backed_up: Setup) -> None:
    result = backed_up.run("versions", backed_up.source / "nope")
    assert result.exit_code == 1
    assert f"{backed_up.source}/nope is in no snapshot of {NODE}/default" in result.stderr
    as_json = backed_up.run("versions", "--json", backed_up.source / "nope")
    assert as_json.exit_code == 1 and json.loads(as_json.stdout) == []


# -- find ------------------------------------------------------------------------------------


def test_find(backed_up: Setup) -> None:
    first = backed_up.json("snapshots")[0]["id"]
    (backed_up.source / "sub" / "b.txt").unlink()
    second = backed_up.backup()["id"]
    data = backed_up.json("find", "*.txt")
    assert [(m["path"], m["first_seen"]["id"], m["last_seen"]["id"]) for m in data] == [
        (str(backed_up.source / "a.txt"), first, second),
        (str(backed_up.source / "sub" / "b.txt"), first, first),
    ]
    assert data[1]["size"] == 600
    table = ok(backed_up.run("find", "b.txt")).stdout
    assert table.startswith(f"1 path matching 'b.txt' in {NODE}/default\n")
    assert f"{backed_up.source}/sub/b.txt" in table and "600 B" in table
    whole = backed_up.json("find", f"{backed_up.source}/sub/*")  # '*' spans '/' too
    assert [m["path"].rsplit("/", 1)[1] for m in whole] == ["b.txt", "deeper", "c.bin"]


def test_find_nothing(backed_up: Setup) -> None:
    result = ok(backed_up.run("find", "zzz"))
    assert result.stdout == ""
    assert "nothing matches 'zzz' in web1/default; for part of a name: '*zzz*'" in result.stderr
    assert backed_up.json("find", "zzz") == []


# -- verify ----------------------------------------------------------------------------------


def test_verify(backed_up: Setup) -> None:
    (snapshot,) = backed_up.json("snapshots")
    result = ok(backed_up.run("verify"))
    assert result.stdout.splitlines()[:3] == [
        f"verify of snapshot {snapshot['id']} of {NODE}/default in file://{backed_up.repo}: ok",
        "  files     3 checked (69.0 KiB), 0 failed",
        "  volumes   1 tested",
    ]
    data = backed_up.json("verify", "--all", "--snapshot", snapshot["id"])
    assert data["ok"] is True and data["snapshot"] == snapshot["id"]
    assert (data["files_checked"], data["files_failed"], data["coverage"]) == (3, 0, 1.0)
    assert data["failures"] == [] and len(data["volumes_tested"]) == 1
    assert set(data) >= {"bytes_checked", "duration", "stopped", "failed_files"}


def test_verify_sample(backed_up: Setup) -> None:
    assert backed_up.json("verify", "--sample", "1")["files_checked"] == 1
    both = backed_up.run("verify", "--sample", "1", "--all")
    assert both.exit_code == 2 and "--sample and --all exclude each other" in both.stderr
    zero = backed_up.run("verify", "--sample", "0")
    assert zero.exit_code == 2
    bad = backed_up.run("verify", "--max-duration", "soon")
    assert bad.exit_code == 2 and "not a duration: 'soon'" in bad.stderr
    assert backed_up.json("verify", "--max-duration", "10m")["stopped"] is False


def test_verify_reports_damage(backed_up: Setup) -> None:
    (volume,) = (backed_up.repo / NODE / "default" / "volumes").rglob("*.age")
    data = bytearray(volume.read_bytes())
    data[len(data) // 2] ^= 1
    volume.write_bytes(bytes(data))
    result = backed_up.run("verify", "--all")
    assert result.exit_code == 1
    assert ": FAILED" in result.stdout.splitlines()[0]
    name = str(volume.relative_to(backed_up.repo / NODE / "default"))
    assert "1 failure:" in result.stderr
    assert f"  {name}: " in result.stderr
    assert "what next:" in result.stderr
    as_json = backed_up.run("verify", "--all", "--json")
    assert as_json.exit_code == 1
    assert json.loads(as_json.stdout)["failed_files"][name]


# -- plans: verify's sample and forget's retention -------------------------------------------


def write_plan(setup: Setup, **job: object) -> Path:
    plan = {
        "node": NODE,
        "issued": "2026-01-02T03:04:05Z",
        "jobs": [
            {
                "name": "files",
                "storage": {"kind": "local", "path": str(setup.repo)},
                "sources": {"paths": [str(setup.source)]},
                **job,
            }
        ],
    }
    path = setup.tmp / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def planned(setup: Setup, plan: Path, *args: str) -> Result:
    argv = [args[0], "--plan", str(plan), "--state-dir", str(setup.state), *args[1:]]
    return CliRunner().invoke(cli, argv)


def test_verify_sample_comes_from_the_plan(setup: Setup) -> None:
    plan = write_plan(setup, restore_test={"sample": 2})
    ok(planned(setup, plan, "backup"))
    data = json.loads(ok(planned(setup, plan, "verify", "--json")).stdout)
    assert data["files_checked"] == 2
    restored = ok(planned(setup, plan, "restore", "--json", str(setup.source / "a.txt")))
    assert json.loads(restored.stdout)["unchanged"] == [str(setup.source / "a.txt")]


def test_forget(setup: Setup) -> None:
    plan = write_plan(setup, retention={"keep_last": 1})
    ids = [json.loads(ok(planned(setup, plan, "backup", "--json")).stdout)["id"] for _ in "abc"]
    dry = json.loads(ok(planned(setup, plan, "forget", "--dry-run", "--json")).stdout)
    assert dry["dry_run"] is True
    assert [s["id"] for s in dry["forgotten"]] == ids[:2]
    assert [(s["id"], s["reasons"]) for s in dry["kept"]] == [(ids[2], ["last snapshot"])]
    assert dry["retention"]["keep_last"] == 1
    assert dry["deleted_objects"] and dry["freed_bytes"] > 0
    listed = json.loads(ok(planned(setup, plan, "snapshots", "--json")).stdout)
    assert [s["id"] for s in listed] == ids  # nothing deleted

    table = ok(planned(setup, plan, "forget")).stdout
    for snapshot_id in ids:
        assert snapshot_id in table
    assert "last snapshot" in table
    assert "2 of 3 snapshots forgotten; deleted " in table
    listed = json.loads(ok(planned(setup, plan, "snapshots", "--json")).stdout)
    assert [s["id"] for s in listed] == ids[2:]
    again = json.loads(ok(planned(setup, plan, "forget", "--json")).stdout)
    assert (again["forgotten"], again["deleted_objects"], again["freed_bytes"]) == ([], [], 0)


def test_forget_dry_run_text(setup: Setup) -> None:
    plan = write_plan(setup, retention={"keep_daily": 1})
    for _ in "ab":
        ok(planned(setup, plan, "backup"))
    text = ok(planned(setup, plan, "forget", "--dry-run")).stdout
    assert "1 of 2 snapshots would be forgotten; would delete " in text
    assert "(dry run: nothing was deleted)" in text
    assert "daily snapshot" in text and "forget" in text


def test_forget_with_empty_retention(backed_up: Setup) -> None:
    text = ok(backed_up.run("forget")).stdout
    assert "nothing forgotten: every keep_* rule of web1/default's retention is 0" in text
    assert "(1 kept)" in text and "ad hoc job (--repo) has no retention" in text
    data = backed_up.json("forget")
    assert data["forgotten"] == [] and data["deleted_objects"] == []
    assert [s["reasons"] for s in data["kept"]] == [["policy is empty"]]
    plan = write_plan(backed_up)
    text = ok(planned(backed_up, plan, "forget")).stdout
    assert "set keep_daily, keep_weekly and the like" in text


def test_forget_needs_no_identity(backed_up: Setup) -> None:
    (backed_up.state / "identity.txt").unlink()
    ok(backed_up.run("forget"))


# -- a bug found underneath ------------------------------------------------------------------


def test_hard_link_to_a_file_left_in_place_keeps_the_backups_content(setup: Setup) -> None:
    first, second = setup.source / "first", setup.source / "second"
    first.write_bytes(b"A" * 512)
    os.link(first, second)
    setup.backup()
    second.unlink()
    first.unlink()
    first.write_text("local\n")  # a different file now stands at the link's target
    result = setup.run("restore", setup.source)
    assert result.exit_code == 1  # `first` is refused
    assert first.read_text() == "local\n"
    assert second.read_bytes() == b"A" * 512


def test_run_restore_does_not_count_files_it_left_in_place(backed_up: Setup) -> None:
    (backed_up.source / "a.txt").write_text("mine\n")
    with _archive(backed_up) as archive:
        outcome = run_restore(
            archive, [str(backed_up.source / "a.txt")], Path("/"), overwrite=lambda _: False
        )
    assert (backed_up.source / "a.txt").read_text() == "mine\n"
    assert (outcome.files, outcome.bytes) == (0, 0)
