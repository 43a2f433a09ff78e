"""An incremental backup's start-up is part of its time (issue #3): `muster backup` and the
benchmark's `bench.muster_step backup` must not import what only other commands use.
Imports are asserted, never timings."""

import subprocess
import sys
from pathlib import Path

from agent.actions.keys import generate_identity

# Loaded only by restore, verify, forget, the daemon, the broker's own commands, the Swift
# and S3 backends, or a plan written as YAML.
NOT_FOR_BACKUP = (
    "agent.actions.forget",
    "agent.actions.restore",
    "agent.actions.verify",
    "agent.archive",
    "agent.daemon",
    "agent.extract",
    "agent.fetch",
    "agent.restore_cli",
    "agent.storage.s3",
    "agent.storage.swift",
    "agent.tarread",
    "boto3",
    "botocore",
    "broker.cli",
    "broker.connection",
    "broker.signing",
    "kombu.connection",
    "kombu.messaging",
    "pymongo",
    "reporter",
    "requests",
    "ruleengine",
    "swiftclient",
    "yaml",
)


def python_output(code: str) -> str:
    """What a fresh interpreter prints running `code` (which must succeed)."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def loaded_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running `code`."""
    return set(python_output(code + "\nimport sys\nprint('\\n'.join(sorted(sys.modules)))").split())


def unwanted(loaded: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in loaded if any(m == n or m.startswith(n + ".") for n in names))


def test_muster_backup_command_loads_nothing_of_the_other_commands() -> None:
    loaded = loaded_after("import muster.cli\nmuster.cli.cli.get_command(None, 'backup')")
    assert "agent.actions.backup" in loaded  # the check sees imports
    assert unwanted(loaded, (*NOT_FOR_BACKUP, "kombu", "amqp")) == []


def test_muster_keys_still_has_both_generate_commands() -> None:
    """The keys group is built on demand (agent.cli's module __getattr__)."""
    loaded = loaded_after(
        "import muster.cli\ngroup = muster.cli.cli.get_command(None, 'keys')\n"
        "assert {'generate', 'generate-signing-key'} <= set(group.commands), group.commands"
    )
    assert "broker.cli" in loaded


def test_a_local_backup_run_loads_nothing_of_the_other_commands(tmp_path: Path) -> None:
    """A whole benchmark backup step (import, run, result) against a local repository:
    no restore or verify code, no broker, no cloud storage client, no CLI toolkit."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "file").write_text("data\n")
    generate_identity(tmp_path / "key")
    argv = [
        "backup",
        *("--repo", f"file://{tmp_path}/repo", "--state", str(tmp_path / "state")),
        *("--identity", str(tmp_path / "key"), "--source", str(tmp_path / "src")),
        *("--result", str(tmp_path / "result.json")),
    ]
    loaded = loaded_after(f"from bench.muster_step import main\nassert main({argv!r}) == 0")
    assert "agent.actions.backup" in loaded and "agent.storage.local" in loaded
    assert unwanted(loaded, (*NOT_FOR_BACKUP, "click", "rich", "kombu")) == []


def test_muster_exits_with_its_objects_frozen_so_the_exit_collects_no_garbage() -> None:
    """The last collection at interpreter exit walks every object still alive; `muster`
    freezes them first, whichever way its command ends (here: --version's SystemExit)."""
    code = (
        "import atexit, gc, sys\n"
        "atexit.register(lambda: print('frozen', gc.get_freeze_count()))\n"
        "sys.argv = ['muster', '--version']\n"
        "from muster.cli import main\n"
        "main()\n"
    )
    assert int(python_output(code).split("frozen")[-1]) > 1000


def test_a_command_is_loaded_frozen_and_pydantic_only_with_it() -> None:
    """`muster` loads a command's modules with collections off and freezes them; the CLI's
    own module does not import pydantic, so the heavy part is all inside that window."""
    code = (
        "import gc, sys\n"
        "import muster.cli\n"
        "print('before', 'pydantic' in sys.modules, gc.get_freeze_count())\n"
        "muster.cli.cli.get_command(None, 'backup')\n"
        "print('after', 'pydantic' in sys.modules, gc.get_freeze_count(), gc.isenabled())\n"
    )
    before, after = (line.split() for line in python_output(code).splitlines())
    assert before == ["before", "False", "0"]
    assert after[1] == "True" and int(after[2]) > 10000 and after[3] == "True"
