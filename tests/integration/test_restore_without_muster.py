"""THE contract: a Muster repository restores with age, zstd, GNU tar, jq and storage CLIs.

`run_backup` backs up a tree full of awkward things (an empty file, a 5 MiB file with a
volume of its own, a symlink, a hard link, names with spaces, unicode, a newline and
non-UTF-8 bytes, a path over 100 bytes, specific modes and times), then an incremental.
Then, for a local directory, Swift (`swift` CLI, with tempauth and with Keystone v3) and S3
(`aws` CLI on Swift's s3api), the
commands of docs/RESTORE-WITHOUT-MUSTER.md run in bash with the real binaries: list,
fetch, decrypt the catalog, grep it, find the volume, extract one file, extract whole
snapshots. The files must come back byte for byte, with their modes, times, link targets
and hard links.

The shell blocks below are those of the guide, character for character:
`test_the_guide_shows_exactly_these_commands` fails when the two drift apart. A missing
binary fails the tests (it is a broken install, `make deps` provides them all).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import textwrap
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import zstandard

from agent import age
from agent.actions import backup as backup_module
from agent.actions.backup import run_backup
from agent.repository import Repository
from agent.state import CatalogCache
from agent.storage import open_storage
from broker.plan import (
    CredentialRef,
    Job,
    LocalTarget,
    S3Target,
    Sources,
    StorageTarget,
    SwiftTarget,
)
from broker.snapshot import SnapshotRecord
from tests.services import KeystoneCredentials, S3Credentials, SwiftCredentials

pytestmark = pytest.mark.integration

GUIDE = Path(__file__).parents[2] / "docs" / "RESTORE-WITHOUT-MUSTER.md"
VENV_BIN = Path(sys.executable).parent  # swift and aws live in the project's venv
TOOLS = ("bash", "age", "zstd", "tar", "jq", "swift", "aws", "grep", "sort", "cut", "dirname")

NODE = "web1.example.org"
JOB = "files"
PREFIX = "muster"

# --- the guide's commands, character for character -------------------------------------

SWIFT_LOGIN = '-A "$ST_AUTH" -U "$ST_USER" -K "$ST_KEY"'  # the guide: drop it for Keystone
LIST = {
    "local": 'ls "$REPO/snapshots/"',
    "swift": 'swift -A "$ST_AUTH" -U "$ST_USER" -K "$ST_KEY" list "$CONTAINER" --prefix '
    '"$JOB/snapshots/"',
    "s3": 'aws --endpoint-url "$ENDPOINT" s3 ls "s3://$BUCKET/$JOB/snapshots/"',
}
# Fetch the object named $OBJ (relative to the job) to $REPO/$OBJ; a directory needs none.
FETCH = {
    "local": "",
    "swift": 'mkdir -p "$(dirname "$REPO/$OBJ")"\n'
    'swift -A "$ST_AUTH" -U "$ST_USER" -K "$ST_KEY" download "$CONTAINER" "$JOB/$OBJ" '
    '-o "$REPO/$OBJ"',
    "s3": 'aws --endpoint-url "$ENDPOINT" s3 cp --no-progress "s3://$BUCKET/$JOB/$OBJ" '
    '"$REPO/$OBJ"',
}
# With Keystone the guide's Swift commands run without the tempauth login, on OS_* variables.
for commands in (LIST, FETCH):
    commands["keystone"] = commands["swift"].replace(f" {SWIFT_LOGIN}", "")


def fetch_each(kind: str, names: str) -> str:
    """Step 2 and step 5: fetch every object of a list."""
    if not FETCH[kind]:
        return ""
    return f"for OBJ in {names}; do\n{textwrap.indent(FETCH[kind], '  ')}\ndone"


def fetch_record_and_catalog(kind: str) -> str:
    return fetch_each(kind, '"snapshots/$SNAP.json" "catalogs/$SNAP.jsonl.zst.age"')


def fetch_volume(kind: str) -> str:
    """Step 4: fetch the volume $VOL."""
    return f"OBJ=$VOL\n{FETCH[kind]}" if FETCH[kind] else ""


def fetch_volumes(kind: str) -> str:
    """Step 5: fetch every volume of $VOLS."""
    return fetch_each(kind, "$VOLS")


SHOW_RECORD = 'jq . "$REPO/snapshots/$SNAP.json"'
DECRYPT_CATALOG = 'age -d -i "$KEY" "$REPO/catalogs/$SNAP.jsonl.zst.age" | zstd -d > catalog.jsonl'
GREP = 'grep -a -F "$WORD" catalog.jsonl'
FIND_VOLUME = "VOL=$(jq -r --arg p \"$FILE\" 'select(.path == $p) | .volume' catalog.jsonl)"
FIND_VOLUME_WITHOUT_JQ = (
    'VOL=$(grep -a -F "\\"path\\": \\"$FILE\\", " catalog.jsonl'
    ' | grep -o \'"volume": "[^"]*"\' | cut -d \'"\' -f 4)'
)
MAKE_DEST = 'mkdir -p "$DEST"'
EXTRACT_ONE = 'age -d -i "$KEY" "$REPO/$VOL" | zstd -d | tar -x -p -f - -C "$DEST" "${FILE#/}"'
EXTRACT_HARDLINK = (
    "LINK=$(jq -r --arg p \"$FILE\" 'select(.path == $p) | .link' catalog.jsonl)\n"
    'age -d -i "$KEY" "$REPO/$VOL" | zstd -d | tar -x -p -f - -C "$DEST" "${LINK#/}" "${FILE#/}"'
)
LIST_VOLUMES = "VOLS=$(jq -r '.references[], .volumes[].name' \"$REPO/snapshots/$SNAP.json\")"
LIST_VOLUMES_WITHOUT_JQ = (
    "VOLS=$(grep -o 'volumes/[0-9]*T[0-9]*Z-[0-9a-f]*/[0-9]*\\.tar\\.zst\\.age' "
    '"$REPO/snapshots/$SNAP.json" | sort -u)'
)
DECRYPT_VOLUMES = 'for OBJ in $VOLS; do\n  age -d -i "$KEY" "$REPO/$OBJ"\ndone | zstd -d'
EXTRACT_ALL = f'{MAKE_DEST}\n{DECRYPT_VOLUMES} | tar -x -i -p -f - -C "$DEST"'
EXTRACT_DIRECTORY = f'{MAKE_DEST}\n{DECRYPT_VOLUMES} | tar -x -i -p -f - -C "$DEST" "${{FILE#/}}"'


def guide_blocks() -> list[str]:
    blocks = [
        SHOW_RECORD,
        DECRYPT_CATALOG,
        GREP,
        FIND_VOLUME,
        FIND_VOLUME_WITHOUT_JQ,
        f"{MAKE_DEST}\n{EXTRACT_ONE}",
        EXTRACT_HARDLINK,
        LIST_VOLUMES,
        LIST_VOLUMES_WITHOUT_JQ,
        EXTRACT_ALL,
        EXTRACT_DIRECTORY,
    ]
    blocks.append(f"remove\n`{SWIFT_LOGIN}`** from the `swift` commands")
    for kind in ("local", "swift", "s3"):
        blocks.append(LIST[kind])
    for kind in ("swift", "s3"):
        blocks += [fetch_record_and_catalog(kind), fetch_volume(kind), fetch_volumes(kind)]
    return blocks


# --- the tree ---------------------------------------------------------------------------

MIB = 1024 * 1024
ODD = "with space, ünïcødé\nand a newline.txt"
LONG = f"deep/{'d' * 60}/a-name-that-makes-the-member-name-longer-than-100-bytes.txt"
NOT_UTF8 = os.fsdecode(b"caf\xe9 in latin-1.txt")
HARD = "etc/hard"
CONFIG = "etc/app/config.ini"


def build_tree(src: Path) -> None:
    """Regular, empty, big, odd-named and deep files, links, modes and times."""
    files: list[tuple[str, bytes, int, int]] = [  # name, content, mode, mtime
        (CONFIG, b"[main]\nport = 8080\n", 0o640, 1_600_000_000),
        ("etc/app/empty", b"", 0o600, 1_500_000_000),
        ("bin/run.sh", b"#!/bin/sh\necho hello\n", 0o755, 1_400_000_000),
        ("big.bin", os.urandom(5 * MIB), 0o644, 1_650_000_000),
        ("data/part-1.bin", os.urandom(700 * 1024), 0o644, 1_610_000_000),
        ("data/part-2.bin", os.urandom(700 * 1024), 0o644, 1_620_000_000),
        (LONG, b"deep down\n", 0o444, 1_300_000_000),
        (ODD, b"odd name\n", 0o600, 1_200_000_000),
        (NOT_UTF8, b"latin-1\n", 0o644, 1_100_000_000),
    ]
    for name, content, mode, mtime in files:
        path = src / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        path.chmod(mode)
        os.utime(path, (mtime, mtime))
    os.link(src / CONFIG, src / HARD)
    os.symlink("app/config.ini", src / "etc/link")
    os.symlink("/nonexistent/target", src / "etc/dangling")
    (src / "etc/app").chmod(0o750)
    (src / "deep").chmod(0o700)
    directories = sorted(p for p in src.rglob("*") if p.is_dir() and not p.is_symlink())
    for number, directory in enumerate(reversed([src, *directories])):
        os.utime(directory, (1_234_000_000 + number, 1_234_000_000 + number))


def change_tree(src: Path) -> None:
    """What the incremental sees: one file changed, one added, one deleted."""
    (src / "bin/run.sh").write_bytes(b"#!/bin/sh\necho changed\n")
    (src / "bin/run.sh").chmod(0o750)
    os.utime(src / "bin/run.sh", (1_700_000_000, 1_700_000_000))
    (src / "etc/new.txt").write_bytes(b"added\n")
    (src / "etc/new.txt").chmod(0o604)
    os.utime(src / "etc/new.txt", (1_710_000_000, 1_710_000_000))
    (src / "data/part-2.bin").unlink()


@dataclass(frozen=True)
class Tree:
    """What a restore must reproduce: per relative path (bytes) its kind, mode, mtime in
    seconds and content hash (symlinks: their target), and which names are hard links."""

    entries: dict[bytes, tuple]
    links: frozenset[frozenset[bytes]]

    def files(self) -> dict[bytes, tuple]:
        return {path: entry for path, entry in self.entries.items() if entry[0] != "dir"}


def tree(root: Path) -> Tree:
    entries: dict[bytes, tuple] = {}
    inodes: dict[int, set[bytes]] = {}
    base = os.fsencode(root)

    def visit(path: bytes, relative: bytes) -> None:
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode):
            entries[relative] = ("symlink", os.readlink(path))
            return
        mode, mtime = stat.S_IMODE(info.st_mode), info.st_mtime_ns // 10**9
        if stat.S_ISDIR(info.st_mode):
            entries[relative] = ("dir", oct(mode), mtime)
            for name in sorted(os.listdir(path)):
                visit(os.path.join(path, name), os.path.join(relative, name))
            return
        with open(path, "rb") as file:
            digest = hashlib.sha256(file.read()).hexdigest()
        entries[relative] = ("file", oct(mode), mtime, digest)
        inodes.setdefault(info.st_ino, set()).add(relative)

    visit(base, b".")
    links = frozenset(frozenset(names) for names in inodes.values() if len(names) > 1)
    return Tree(entries, links)


def rel(name: str) -> bytes:
    return os.path.join(b".", os.fsencode(name))


# --- backing up -------------------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    node: age.Identity
    node_file: Path
    escrow: age.Identity
    escrow_file: Path


@pytest.fixture(scope="module", autouse=True)
def binaries() -> None:
    """A missing tool is a broken install, never a reason to skip."""
    path = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    missing = [tool for tool in TOOLS if shutil.which(tool, path=path) is None]
    assert not missing, (
        f"{missing} not installed: run `make deps` (tests/services/install-system.sh for "
        "age, zstd, jq; the test extra of setup.cfg for swift and aws)"
    )
    version = subprocess.run(["tar", "--version"], capture_output=True, text=True).stdout
    assert "GNU tar" in version, f"tar is not GNU tar: {version.splitlines()[:1]}"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    directory = tmp_path_factory.mktemp("keys")
    node, escrow = age.Identity.generate(), age.Identity.generate()
    age.write_identity(directory / "node.key", node)
    age.write_identity(directory / "escrow.key", escrow)
    return Keys(node, directory / "node.key", escrow, directory / "escrow.key")


def backup(
    target: StorageTarget, source: Path, keys: Keys, state: Path, volume_size: str = "1MiB"
) -> SnapshotRecord:
    job = Job(
        name=JOB,
        storage=target,
        sources=Sources(paths=[str(source)]),
        volume_size=volume_size,
        recipients=[str(keys.escrow.recipient)],
    )
    repo = Repository(open_storage(target), NODE, JOB)
    outcome = run_backup(job, repo, keys.node, CatalogCache(state, repr(target)), "test")
    assert outcome.warnings == []
    return outcome.record


def secret_file(directory: Path, values: dict[str, str]) -> str:
    path = directory / f"{uuid.uuid4().hex}.env"
    path.write_text("".join(f"{name}={value}\n" for name, value in values.items()))
    path.chmod(0o600)
    return str(path)


@dataclass
class Site:
    """One storage with a full and an incremental snapshot of its own tree."""

    kind: str
    variables: dict[str, str]  # step 0 of the guide for this storage, but SNAP and DEST
    remote: bool
    source: Path
    full: SnapshotRecord
    incremental: SnapshotRecord
    before: Tree  # the tree the full snapshot holds
    after: Tree  # the tree the incremental holds


def open_site(kind: str, request: pytest.FixtureRequest, directory: Path, keys: Keys) -> Site:
    job = f"{PREFIX}/{NODE}/{JOB}"
    if kind == "local":
        target: StorageTarget = LocalTarget(path=str(directory / "storage"), prefix=PREFIX)
        variables = {"REPO": str(directory / "storage" / job)}
    elif kind == "swift":
        swift: SwiftCredentials = request.getfixturevalue("swift_credentials")
        login = {"ST_AUTH": swift.auth_url, "ST_USER": swift.user, "ST_KEY": swift.key}
        container = f"restore-{uuid.uuid4().hex[:12]}"
        ref = CredentialRef(file=secret_file(directory, login))
        target = SwiftTarget(container=container, prefix=PREFIX, credentials=ref)
        variables = {**login, "CONTAINER": container, "JOB": job}
    elif kind == "keystone":
        keystone: KeystoneCredentials = request.getfixturevalue("keystone_credentials")
        login = {**keystone.os_env(), "OS_IDENTITY_API_VERSION": "3"}
        container = f"restore-{uuid.uuid4().hex[:12]}"
        ref = CredentialRef(file=secret_file(directory, login))
        target = SwiftTarget(container=container, prefix=PREFIX, credentials=ref)
        variables = {**login, "CONTAINER": container, "JOB": job}
    else:
        s3: S3Credentials = request.getfixturevalue("s3_credentials")
        login = {
            "AWS_ACCESS_KEY_ID": s3.access_key,
            "AWS_SECRET_ACCESS_KEY": s3.secret_key,
            "AWS_DEFAULT_REGION": s3.region,
        }
        bucket = f"restore-{uuid.uuid4().hex[:12]}"
        ref = CredentialRef(file=secret_file(directory, login))
        target = S3Target(
            bucket=bucket, prefix=PREFIX, credentials=ref, endpoint=s3.endpoint, region=s3.region
        )
        variables = {**login, "ENDPOINT": s3.endpoint, "BUCKET": bucket, "JOB": job}
    source = directory / "src"
    build_tree(source)
    full = backup(target, source, keys, directory / "state")
    before = tree(source)
    change_tree(source)
    time.sleep(1.1)  # ids sort by the second only: the guide's `sort -u` needs distinct ones
    incremental = backup(target, source, keys, directory / "state")
    return Site(kind, variables, kind != "local", source, full, incremental, before, tree(source))


@pytest.fixture(scope="module")
def sites() -> dict[str, Site]:
    return {}


@pytest.fixture(scope="module", params=["local", "swift", "s3", "keystone"])
def site(
    request: pytest.FixtureRequest,
    sites: dict[str, Site],
    tmp_path_factory: pytest.TempPathFactory,
    keys: Keys,
) -> Site:
    if request.param not in sites:
        directory = tmp_path_factory.mktemp(request.param)
        sites[request.param] = open_site(request.param, request, directory, keys)
    return sites[request.param]


@pytest.fixture(scope="module")
def local(
    request: pytest.FixtureRequest,
    sites: dict[str, Site],
    tmp_path_factory: pytest.TempPathFactory,
    keys: Keys,
) -> Site:
    if "local" not in sites:
        sites["local"] = open_site("local", request, tmp_path_factory.mktemp("local"), keys)
    return sites["local"]


# --- running the guide ------------------------------------------------------------------


@dataclass
class Shell:
    """bash with the guide's variables, in an empty working directory."""

    variables: dict[str, str]
    cwd: Path
    dest: Path

    def run(self, *blocks: str, **more: str) -> str:
        script = "\n".join(block for block in blocks if block)
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            env={**self.variables, **more},
            cwd=self.cwd,
            capture_output=True,
            check=False,
        )
        out = result.stdout.decode("utf-8", "replace")
        err = result.stderr.decode("utf-8", "replace")
        assert result.returncode == 0, (
            f"exit status {result.returncode} from\n{script}\n--- stdout\n{out}\n--- stderr\n{err}"
        )
        return result.stdout.decode("utf-8", "surrogateescape")

    def restored(self, source: Path) -> Path:
        """Where tar puts `source`: members are named without the leading '/'."""
        return self.dest / source.relative_to("/")


def shell_for(site: Site, keys: Keys, directory: Path, snapshot: SnapshotRecord) -> Shell:
    return shell_with(site.variables, site.remote, keys, directory, snapshot)


def shell_with(
    storage: dict[str, str], remote: bool, keys: Keys, directory: Path, snapshot: SnapshotRecord
) -> Shell:
    """`storage`: the guide's step-0 variables of one storage (REPO, or JOB and login)."""
    return guide_shell(storage, remote, keys.node_file, directory, snapshot.id)


def guide_shell(
    storage: dict[str, str], remote: bool, key_file: Path, directory: Path, snapshot: str
) -> Shell:
    """The guide's variables for restoring `snapshot` with the identity in `key_file`
    (also used by the fleet's end-to-end test, on a node's own key)."""
    work, dest = directory / "work", directory / "restore"
    work.mkdir()
    variables = {
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": str(directory),
        "LANG": "C.UTF-8",
        "AWS_CONFIG_FILE": str(directory / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(directory / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "KEY": str(key_file),
        "SNAP": snapshot,
        "DEST": str(dest),
        **storage,
    }
    if remote:
        variables["REPO"] = str(directory / "muster-restore")
    return Shell(variables, work, dest)


@pytest.fixture
def full(site: Site, keys: Keys, tmp_path: Path) -> Shell:
    return shell_for(site, keys, tmp_path, site.full)


def find_and_extract(shell: Shell, kind: str, path: Path, word: str) -> str:
    """Steps 2, 3 and 4 of the guide for one file; returns grep's output."""
    found = shell.run(
        fetch_record_and_catalog(kind),
        DECRYPT_CATALOG,
        GREP,
        FILE=str(path),
        WORD=word,
    )
    shell.run(
        FIND_VOLUME,
        fetch_volume(kind),
        MAKE_DEST,
        EXTRACT_ONE,
        FILE=str(path),
    )
    return found


def regular_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def local_target(directory: Path) -> LocalTarget:
    return LocalTarget(path=str(directory / "storage"), prefix=PREFIX)


def local_repo(directory: Path) -> dict[str, str]:
    return {"REPO": str(directory / "storage" / PREFIX / NODE / JOB)}


def small_backup(
    tmp_path: Path, keys: Keys, build: Callable[[Path], None], volume_size: str = "1MiB"
) -> tuple[Path, SnapshotRecord]:
    source = tmp_path / "src"
    source.mkdir()
    build(source)
    return source, backup(local_target(tmp_path), source, keys, tmp_path / "state", volume_size)


# --- the contract -----------------------------------------------------------------------


def test_the_guide_shows_exactly_these_commands() -> None:
    text = GUIDE.read_text()
    missing = [block for block in guide_blocks() if block not in text]
    assert not missing, "docs/RESTORE-WITHOUT-MUSTER.md lacks:\n\n" + "\n\n".join(missing)


def test_the_tree_is_as_awkward_as_promised(local: Site) -> None:
    """The backup really holds what the restores below are about."""
    before = local.before.entries
    assert len(local.full.volumes) >= 4
    big = [v for v in local.full.volumes if v.size > 5 * MIB]
    assert len(big) == 1 and big[0].members == 1  # the 5 MiB file has a volume of its own
    assert len(os.fsencode(local.source / LONG).lstrip(b"/")) > 100
    assert before[rel("etc/app/empty")][3] == hashlib.sha256(b"").hexdigest()
    assert local.before.links == {frozenset({rel(CONFIG), rel(HARD)})}
    assert rel(NOT_UTF8) in before and os.fsencode(NOT_UTF8) == b"caf\xe9 in latin-1.txt"
    assert local.incremental.references and not local.incremental.full


def test_list_snapshots(site: Site, full: Shell) -> None:
    listed = full.run(LIST[site.kind])
    assert f"{site.full.id}.json" in listed and f"{site.incremental.id}.json" in listed


def test_the_record_is_plain_json(site: Site, full: Shell) -> None:
    full.run(fetch_record_and_catalog(site.kind))
    shown = full.run(SHOW_RECORD)
    assert json.loads(shown) == site.full.model_dump(mode="json")


@pytest.mark.parametrize(
    ("name", "word"),
    [(ODD, "ünïcødé"), (LONG, "longer-than-100"), ("big.bin", "big.bin"), ("etc/app/empty", "em")],
    ids=["odd-name", "long-path", "big-file", "empty-file"],
)
def test_find_and_restore_one_file(site: Site, full: Shell, name: str, word: str) -> None:
    path = site.source / name
    found = find_and_extract(full, site.kind, path, word)
    assert f'"path": {json.dumps(str(path), ensure_ascii=False)}' in found
    restored = full.restored(site.source)
    assert regular_files(full.dest) == [restored / name]
    assert tree(restored).entries[rel(name)] == site.before.entries[rel(name)]


def test_restore_a_hard_link_with_its_target(site: Site, full: Shell) -> None:
    path = site.source / HARD
    full.run(
        fetch_record_and_catalog(site.kind),
        DECRYPT_CATALOG,
        FIND_VOLUME,
        fetch_volume(site.kind),
        MAKE_DEST,
        EXTRACT_HARDLINK,
        FILE=str(path),
    )
    restored = full.restored(site.source)
    assert (restored / HARD).read_bytes() == (restored / CONFIG).read_bytes()
    assert (restored / HARD).stat().st_ino == (restored / CONFIG).stat().st_ino


def test_restore_the_whole_full_snapshot(site: Site, full: Shell) -> None:
    full.run(fetch_record_and_catalog(site.kind), LIST_VOLUMES, fetch_volumes(site.kind))
    full.run(LIST_VOLUMES, EXTRACT_ALL)
    assert tree(full.restored(site.source)) == site.before


def test_restore_the_whole_incremental_snapshot(site: Site, keys: Keys, tmp_path: Path) -> None:
    shell = shell_for(site, keys, tmp_path, site.incremental)
    shell.run(fetch_record_and_catalog(site.kind), LIST_VOLUMES, fetch_volumes(site.kind))
    volumes = shell.run(LIST_VOLUMES, EXTRACT_ALL, 'echo "$VOLS"')
    expected = [*site.incremental.references, *(v.name for v in site.incremental.volumes)]
    assert volumes.split() == expected
    assert set(site.incremental.references) <= {v.name for v in site.full.volumes}
    restored = tree(shell.restored(site.source))
    # every file, link and symlink as in the incremental snapshot: changed, added, unchanged
    after = site.after.files()
    assert {path: restored.entries.get(path) for path in after} == after
    assert restored.entries[rel("bin/run.sh")] != site.before.entries[rel("bin/run.sh")]
    assert rel("etc/new.txt") in restored.entries
    # as the guide says: directory modes hold, times may not; deleted files come back
    for path, entry in site.after.entries.items():
        if entry[0] == "dir":
            assert restored.entries[path][:2] == entry[:2]
    assert rel("data/part-2.bin") in restored.entries


def test_restore_a_directory(local: Site, keys: Keys, tmp_path: Path) -> None:
    shell = shell_for(local, keys, tmp_path, local.full)
    shell.run(LIST_VOLUMES, EXTRACT_DIRECTORY, FILE=str(local.source / "etc"))
    restored = tree(shell.restored(local.source))
    etc = {p: e for p, e in local.before.entries.items() if p.startswith(b"./etc")}
    assert {p: e for p, e in restored.entries.items() if p.startswith(b"./etc")} == etc
    assert rel("big.bin") not in restored.entries


def test_without_jq(local: Site, keys: Keys, tmp_path: Path) -> None:
    shell = shell_for(local, keys, tmp_path, local.incremental)
    volumes = shell.run(LIST_VOLUMES_WITHOUT_JQ, 'echo "$VOLS"')
    assert volumes.split() == [
        *local.incremental.references,
        *(v.name for v in local.incremental.volumes),
    ]
    path = local.source / "big.bin"
    found = shell.run(DECRYPT_CATALOG, FIND_VOLUME_WITHOUT_JQ, 'echo "$VOL"', FILE=str(path))
    [big] = [v.name for v in local.full.volumes if v.size > 5 * MIB]
    assert found.strip() == big


def test_an_escrow_key_restores_too(local: Site, keys: Keys, tmp_path: Path) -> None:
    shell = shell_for(local, keys, tmp_path, local.full)
    shell.variables["KEY"] = str(keys.escrow_file)
    find_and_extract(shell, "local", local.source / ODD, "newline")
    restored = tree(shell.restored(local.source))
    assert restored.entries[rel(ODD)] == local.before.entries[rel(ODD)]


def test_one_file_by_ranged_read_as_format_md_says(keys: Keys, tmp_path: Path) -> None:
    """docs/FORMAT.md, "Fetching one file by ranged GET", followed to the letter for every
    catalog entry: only the bytes it names are read from the volume. One big volume, so
    that members start in later frames and later age chunks."""
    source, record = small_backup(tmp_path, keys, build_tree, volume_size="64MiB")
    before = tree(source)
    repo = Path(local_repo(tmp_path)["REPO"])
    [volume] = record.volumes
    catalog = (repo / record.catalog.name).read_bytes()
    plain = zstandard.ZstdDecompressor().stream_reader(
        io.BytesIO(age.decrypt_bytes(catalog, [keys.node])), read_across_frames=True
    )
    lines = plain.read().splitlines()
    assert len(lines) == len(before.entries)
    root = os.fsencode(source).lstrip(b"/")
    frames = set()
    for line in lines:
        entry = json.loads(line.decode("utf-8", "surrogateescape"))
        assert entry["volume"] == volume.name
        assert entry["chunk"] == volume.header_length + entry["frame"] // 65536 * 65552
        frames.add(entry["frame"])
        member = ranged_member(repo / volume.name, volume.size, entry, keys)
        name = os.fsencode(entry["path"]).lstrip(b"/")
        assert os.fsencode(member.name).rstrip(b"/") == name
        expected = before.entries[b"." + name[len(root) :]]
        assert member.mode == int(entry["mode"], 8)
        if entry["type"] == "file":
            assert member.mtime == entry["mtime_ns"] // 10**9 == expected[2]
            assert hashlib.sha256(member.data).hexdigest() == entry["sha256"] == expected[3]
        elif entry["type"] == "symlink":
            assert member.linkname == entry["link"] and os.fsencode(entry["link"]) == expected[1]
        elif entry["type"] == "hardlink":
            assert os.fsencode(member.linkname) == os.fsencode(entry["link"]).lstrip(b"/")
    assert len(frames) >= 3 and max(frames) > 5 * MIB // 2  # later frames, later chunks


@dataclass
class Member:
    name: str
    mode: int
    mtime: int
    linkname: str
    data: bytes


def ranged_member(volume: Path, size: int, entry: dict, keys: Keys) -> Member:
    frame, chunk, skip, span = entry["frame"], entry["chunk"], entry["skip"], entry["span"]
    first, last = frame // 65536, (frame + span - 1) // 65536
    header_length = chunk - first * 65552
    final = -(-(size - header_length) // 65552) - 1
    with volume.open("rb") as file:
        header = file.read(header_length)
        file.seek(chunk)
        ciphertext = file.read(min(header_length + (last + 1) * 65552, size) - chunk)
    key = age.open_header(header, [keys.node])
    plaintext = b"".join(
        key.decrypt_chunk(index, ciphertext[n * 65552 : (n + 1) * 65552], index == final)
        for n, index in enumerate(range(first, last + 1))
    )
    frames = plaintext[frame - first * 65536 :][:span]
    decompressed = zstandard.ZstdDecompressor().stream_reader(
        io.BytesIO(frames), read_across_frames=True
    )
    tar = io.BytesIO(decompressed.read()[skip:])
    with tarfile.open(fileobj=tar, mode="r|", encoding="utf-8", errors="surrogateescape") as t:
        info = t.next()
        assert info is not None
        data = t.extractfile(info).read() if info.isfile() else b""  # type: ignore[union-attr]
    return Member(info.name, info.mode, info.mtime, info.linkname, data)


# --- bugs found while writing this contract, kept as regression tests --------------------


def test_a_hard_link_keeps_the_tar_stream_aligned(keys: Keys, tmp_path: Path) -> None:
    """A hard-link member is a header alone (size 0): nothing may follow it but the next
    header. Padding for the linked file's size after it (fixed in 6a42d5d) shifted every
    later member off the 512-byte grid: GNU tar stopped with "Skipping to next header" and
    Python's tarfile ended the archive there without a word."""

    def build(source: Path) -> None:
        (source / "a.txt").write_bytes(b"19 bytes of data..\n")
        os.link(source / "a.txt", source / "b.txt")
        (source / "c.txt").write_bytes(b"after the link\n")

    _, record = small_backup(tmp_path, keys, build)
    shell = shell_with(local_repo(tmp_path), False, keys, tmp_path, record)
    listing = shell.run(LIST_VOLUMES, f"{DECRYPT_VOLUMES} | tar -t -i -f -")
    names = [line.rsplit("/", 1)[-1] for line in listing.splitlines()]
    assert names == ["", "a.txt", "b.txt", "c.txt"]


def test_a_hard_link_to_a_file_with_a_volume_of_its_own_restores_alone(
    keys: Keys, tmp_path: Path
) -> None:
    """FORMAT.md: a hard-link member only when its target is in the same volume. A file
    bigger than the volume size closes its own volume; a second name of it must then be
    stored again, not written as a link member into the next volume, where tar (and step
    4 of the guide) cannot find its target."""

    def build(source: Path) -> None:
        (source / "big-a").write_bytes(os.urandom(2 * MIB))
        os.link(source / "big-a", source / "big-b")

    source, record = small_backup(tmp_path, keys, build)
    shell = shell_with(local_repo(tmp_path), False, keys, tmp_path, record)
    find_and_extract(shell, "local", source / "big-b", "big-b")
    assert (shell.restored(source) / "big-b").read_bytes() == (source / "big-a").read_bytes()


def test_references_are_listed_oldest_first(
    keys: Keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step 5 of the guide extracts `references` in the record's order, oldest first, so
    that newer versions overwrite older ones. The record sorts them by name, i.e. by
    snapshot id, but ids sort by the second only: when two referenced snapshots started
    within the same second (their random tails decide), an old version of a file is
    extracted last and wins. Here the three runs get ids of one second, with the random
    tails in an unlucky order, as a quick succession of runs does half of the time."""
    second = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    tails = iter(["ffffff", "000000", "888888"])
    monkeypatch.setattr(backup_module, "new_snapshot_id", lambda when: f"{second}-{next(tails)}")
    source = tmp_path / "src"
    source.mkdir()
    (source / "kept").write_bytes(b"never changes\n")
    (source / "changed").write_bytes(b"version 1\n")
    os.utime(source / "changed", (1_600_000_000, 1_600_000_000))
    target = local_target(tmp_path)
    first = backup(target, source, keys, tmp_path / "state")
    (source / "changed").write_bytes(b"version 2, longer\n")
    os.utime(source / "changed", (1_700_000_000, 1_700_000_000))
    middle = backup(target, source, keys, tmp_path / "state")
    last = backup(target, source, keys, tmp_path / "state")  # nothing changed
    assert (middle.parent, last.parent) == (first.id, middle.id)
    assert set(last.references) == {first.volumes[0].name, middle.volumes[0].name}
    shell = shell_with(local_repo(tmp_path), False, keys, tmp_path, last)
    shell.run(LIST_VOLUMES, EXTRACT_ALL)
    assert (shell.restored(source) / "changed").read_bytes() == b"version 2, longer\n", (
        f"references {last.references} are not oldest first"
    )
