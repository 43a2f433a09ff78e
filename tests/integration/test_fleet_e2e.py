"""The whole fleet end to end on the real servers (RabbitMQ, MongoDB protocol, Swift).

Three nodes, each a real `muster agent run` with its own state directory, labels and data,
announce themselves to a real `muster ruleengine run`; the rules give each a different plan;
each backs up to Swift, runs its restore tests and reports to a real `muster reporter run`.
`muster status` then shows three healthy nodes; a file deleted on a node comes back with a
bare `muster restore PATH` (the node's plan says where its backups are), and the same file
comes back from Swift with only `swift`, `age`, `zstd` and GNU `tar`.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.messages import RunResult
from tests.fleetrun import FleetRun
from tests.integration.test_restore_without_muster import (
    DECRYPT_CATALOG,
    EXTRACT_ONE,
    FIND_VOLUME_WITHOUT_JQ,
    MAKE_DEST,
    fetch_record_and_catalog,
    fetch_volume,
    guide_shell,
)
from tests.processes import MUSTER, Daemon, clean_environ, wait_for
from tests.services import SwiftCredentials

pytestmark = pytest.mark.integration

# role -> (job, the directory it backs up, files in it)
ROLES: dict[str, tuple[str, str, dict[str, bytes]]] = {
    "web": ("www", "srv/www", {"index.html": b"<h1>hello</h1>\n", "app.js": os.urandom(40_000)}),
    "db": ("dumps", "var/dumps", {"base.sql": b"CREATE TABLE t (id int);\n" * 200}),
    "files": ("home", "home/alice", {"notes.txt": b"remember the milk\n", "x.tmp": b"scratch"}),
}


def rules(fleet: FleetRun, container: str) -> str:
    """One rule per role, on this run's nodes only; the db rule dumps in a pre hook, the
    files rule excludes *.tmp: three different plans."""
    data = fleet.root / "data"
    return f"""
defaults:
  storage: {{kind: swift, container: {container}, prefix: fleet}}
  schedule: {{every: 4s}}
  retention: {{keep_last: 20}}
  restore_test: {{every: 4s, sample: 10}}
rules:
  - name: web
    match: {{labels: {{fleet: "{fleet.tag}", role: web}}}}
    jobs:
      www: {{sources: {{paths: [{data}/web/srv/www]}}}}
  - name: db
    match: {{labels: {{fleet: "{fleet.tag}", role: db}}}}
    jobs:
      dumps:
        sources: {{paths: [{data}/db/var/dumps]}}
        hooks: {{pre: [{{command: "date > {data}/db/var/dumps/dumped-at.txt"}}]}}
  - name: files
    match: {{labels: {{fleet: "{fleet.tag}", role: files}}}}
    jobs:
      home: {{sources: {{paths: [{data}/files/home/alice], excludes: ["*.tmp"]}}}}
"""


def make_data(root: Path) -> None:
    for role, (_, folder, files) in ROLES.items():
        directory = root / "data" / role / folder
        directory.mkdir(parents=True)
        for name, content in files.items():
            (directory / name).write_bytes(content)


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory,
    amqp_url: str,
    mongo_url: str,
    swift_credentials: SwiftCredentials,
) -> Iterator[tuple[FleetRun, dict[str, Daemon]]]:
    """Three nodes that have each backed up and passed a restore test."""
    run = FleetRun(tmp_path_factory.mktemp("fleet"), amqp_url, mongo_url)
    make_data(run.root)
    run.write_rules(rules(run, f"fleet-{run.tag}"))
    login = {
        "ST_AUTH": swift_credentials.auth_url,
        "ST_USER": swift_credentials.user,
        "ST_KEY": swift_credentials.key,
    }
    try:
        run.start()
        agents = {role: run.agent(role, **login) for role in ROLES}
        for daemon in agents.values():
            node = daemon.env["MUSTER_NODE"]
            for kind in ("backup", "verify"):
                wait_for(
                    lambda n=node, k=kind: run.listener.of(
                        RunResult, node=n, kind=k, status="success"
                    ),
                    90,
                    lambda: f"a successful run of every kind on every node\n{run.logs()}",
                )
        yield run, agents
        for role, daemon in agents.items():
            assert daemon.stop() == 0, f"{role}: {daemon.log[-3000:]}"
    finally:
        print(run.logs())  # shown by pytest when a test failed
        run.close()


def muster_status(fleet: FleetRun, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **clean_environ(),
        "MUSTER_CONFIG": str(fleet.root / "absent.yaml"),
        "MUSTER_MONGO_URL": fleet.reporter.env["MUSTER_MONGO_URL"],
        "MUSTER_DATABASE": fleet.database,
    }
    done = subprocess.run(
        [str(MUSTER), "status", *args], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    return done


def healthy(entry: dict[str, Any]) -> bool:
    """A node that reports, holds a plan with jobs, has no open alert and whose every job's
    last backup and last restore test succeeded."""
    jobs = entry["jobs"]
    return bool(
        entry["last_seen"]
        and not entry["unprotected"]
        and not entry["alerts"]
        and jobs
        and all(
            (job["last_backup"] or {}).get("status") == "success"
            and (job["last_restore_test"] or {}).get("status") == "success"
            for job in jobs
        )
    )


def test_three_nodes_get_three_plans_back_up_test_restores_and_show_healthy(fleet) -> None:
    run, agents = fleet
    plans = {
        role: json.loads((daemon.state / "plan.json").read_text())["plan"]
        for role, daemon in agents.items()
    }
    for role, plan in plans.items():
        (job,) = plan["jobs"]
        assert job["name"] == ROLES[role][0]
        assert job["storage"]["kind"] == "swift"
    assert plans["db"]["jobs"][0]["hooks"]["pre"], "the db plan dumps first"
    assert plans["files"]["jobs"][0]["sources"]["excludes"] == ["*.tmp"]

    nodes = {daemon.env["MUSTER_NODE"] for daemon in agents.values()}

    def all_healthy() -> list[dict[str, Any]]:
        shown = json.loads(muster_status(run, "--json").stdout)["nodes"]
        ours = [entry for entry in shown if entry["node"] in nodes]
        return ours if len(ours) == 3 and all(healthy(entry) for entry in ours) else []

    entries = wait_for(all_healthy, 60, lambda: muster_status(run, "--json").stdout)
    assert {entry["node"]: [j["job"] for j in entry["jobs"]] for entry in entries} == {
        daemon.env["MUSTER_NODE"]: [ROLES[role][0]] for role, daemon in agents.items()
    }
    table = muster_status(run).stdout
    assert all(node in table for node in nodes)
    # the excluded file was never backed up: the files node's restore test read one file
    files_node = agents["files"].env["MUSTER_NODE"]
    (first,) = run.listener.of(RunResult, node=files_node, kind="backup")[:1]
    assert first.stats.files == 1


def test_a_deleted_file_comes_back_with_a_bare_muster_restore(fleet) -> None:
    run, agents = fleet
    web = agents["web"]
    lost = run.root / "data" / "web" / "srv" / "www" / "index.html"
    original = lost.read_bytes()
    lost.unlink()
    done = subprocess.run(
        [str(MUSTER), "restore", str(lost)],
        env=web.env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert lost.read_bytes() == original


def test_the_same_file_comes_back_from_swift_with_only_standard_tools(
    fleet, swift_credentials: SwiftCredentials, tmp_path: Path
) -> None:
    run, agents = fleet
    web = agents["web"]
    node = web.env["MUSTER_NODE"]
    wanted = run.root / "data" / "web" / "srv" / "www" / "app.js"
    (backup,) = run.listener.of(RunResult, node=node, kind="backup", status="success")[:1]
    login = {
        "ST_AUTH": swift_credentials.auth_url,
        "ST_USER": swift_credentials.user,
        "ST_KEY": swift_credentials.key,
        "CONTAINER": f"fleet-{run.tag}",
        "JOB": f"fleet/{node}/www",
    }
    key = web.state / "identity.txt"
    shell = guide_shell(login, True, key, tmp_path, backup.snapshot or "")
    steps = [fetch_record_and_catalog("swift"), DECRYPT_CATALOG, FIND_VOLUME_WITHOUT_JQ]
    shell.run(*steps, fetch_volume("swift"), MAKE_DEST, EXTRACT_ONE, FILE=str(wanted))
    assert shell.restored(wanted).read_bytes() == wanted.read_bytes()
