"""`muster up`: the embedded whole system end to end, and the real shape against the real
RabbitMQ, MongoDB-protocol server and Swift."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pymongo import MongoClient

from broker.signing import generate_signing_key, public_pem
from muster.embedded import DemoFailed, RestoreCase, Workdir, muster_restore
from muster.mongo import EmbeddedMongo, find_secantusd
from muster.sample import NODES, RESTORED_FILE, generate
from tests.services import SwiftCredentials

MUSTER = Path(sys.executable).parent / "muster"


def stopped(process: subprocess.Popen, timeout: float = 30) -> int:
    """SIGTERM, then the exit status; SIGKILL if it does not stop in time."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


# -- muster up --embedded ----------------------------------------------------------------------


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(word) for word in path.read_text().split()]


def gone(pid: int) -> bool:
    """Exited (a zombie left for process 1 to reap counts as exited)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "State:\tZ" in status


def start_up(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(MUSTER), "up", "--embedded", *args], stdout=out, stderr=subprocess.STDOUT
        )
    return process, log


def wait_for_line(process: subprocess.Popen, log: Path, text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        output = log.read_text()
        if text in output:
            return output
        if process.poll() is not None:
            break
        time.sleep(0.2)
    stopped(process)
    raise AssertionError(f"no {text!r} in the output:\n{log.read_text()}")


def test_muster_up_embedded_runs_the_fleet_and_brings_a_lost_file_back(tmp_path: Path):
    workdir = tmp_path / "work"
    process, log = start_up(tmp_path, "--keep-running", "--workdir", str(workdir))
    output = wait_for_line(process, log, "Ctrl-C stops it", timeout=240)
    server = children(process.pid)
    assert server, "the embedded MongoDB-protocol server runs as a child"
    node = NODES[0]
    lost = node.data_dir(workdir) / RESTORED_FILE
    expected = generate(node, tmp_path / "expected")[RESTORED_FILE]
    assert f"✓ {lost} restored by muster restore, identical to the original" in output
    assert lost.read_bytes() == expected
    by_hand = workdir / "without-muster" / "restored" / lost.relative_to("/")
    assert f"✓ {by_hand} restored by age, zstd and tar, identical to the original" in output
    assert by_hand.read_bytes() == expected
    for other in NODES:
        assert f"{other.node} accepted its signed plan" in output
    assert "fleet: 3 nodes, 3 jobs" in output
    process.send_signal(signal.SIGINT)  # Ctrl-C
    assert process.wait(60) == 0, log.read_text()
    assert "every step passed" in log.read_text()
    assert all(gone(pid) for pid in server)


def test_sigterm_mid_run_stops_everything_and_fails(tmp_path: Path):
    process, log = start_up(tmp_path)
    wait_for_line(process, log, "accepted its signed plan", timeout=120)
    server = children(process.pid)
    assert stopped(process, timeout=60) == 130
    assert "every step passed" not in log.read_text()
    assert all(gone(pid) for pid in server)


def test_a_restore_that_fails_fails_the_demo(tmp_path: Path):
    """The demo's restore step is the real CLI: when it cannot restore (here: the node has
    no plan to take its defaults from), the demo stops with an error, and exits nonzero."""
    work = Workdir(tmp_path / "work")
    written = work.prepare()
    node = NODES[0]
    path = node.data_dir(work.path) / RESTORED_FILE
    case = RestoreCase(node, "www", path, written[node.node][RESTORED_FILE], work)
    with pytest.raises(DemoFailed, match="muster restore exited with 2"):
        muster_restore(case)


def test_muster_up_embedded_without_its_server_says_what_to_run(tmp_path: Path):
    result = subprocess.run(
        [str(MUSTER), "up", "--embedded", "--secantusd", str(tmp_path / "secantusd-py")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "is not an executable secantusd-py" in result.stderr


def test_the_embedded_mongodb_server_is_stopped_also_when_the_run_fails(tmp_path: Path):
    server = EmbeddedMongo(find_secantusd(), tmp_path / "secantusd.log")
    with pytest.raises(RuntimeError, match="a step failed"), server:
        process = server.process
        assert process is not None
        client: MongoClient = MongoClient(server.url, serverSelectionTimeoutMS=5000)
        assert client.admin.command("ping")["ok"] == 1
        client.close()
        raise RuntimeError("a step failed")
    assert process.poll() is not None


# -- muster up: the real shape --------------------------------------------------------------


@pytest.fixture
def central_files(
    tmp_path: Path, amqp_url: str, mongo_url: str, swift_credentials: SwiftCredentials
) -> Iterator[dict[str, str]]:
    """Rules giving one test node a Swift job, a signing key pair, and up.yaml."""
    node = f"up-{uuid.uuid4().hex[:10]}"
    key = generate_signing_key(tmp_path / "signing.pem")
    (tmp_path / "signing.pub").write_bytes(public_pem(key.public_key()))
    login = tmp_path / "swift.env"
    login.write_text(
        f"ST_AUTH={swift_credentials.auth_url}\nST_USER={swift_credentials.user}\n"
        f"ST_KEY={swift_credentials.key}\n"
    )
    login.chmod(0o600)
    source = tmp_path / "source"
    source.mkdir()
    (source / "hello.txt").write_text("hello\n")
    (tmp_path / "rules.yaml").write_text(
        f"""
defaults:
  storage: {{kind: swift, container: up-{node}, prefix: fleet, credentials: {{file: {login}}}}}
  schedule: {{every: 2s}}
  retention: {{keep_last: 2}}
  restore_test: {{every: 3s, sample: 1}}
rules:
  - name: this-test
    match: {{labels: {{run: "{node}"}}}}
    jobs:
      data: {{sources: {{paths: [{source}]}}}}
"""
    )
    database = f"up_{uuid.uuid4().hex[:10]}"
    (tmp_path / "up.yaml").write_text(
        f"broker_url: {amqp_url}\nmongo_url: {mongo_url}\ndatabase: {database}\n"
        f"rules: {tmp_path / 'rules.yaml'}\nsigning_key: {tmp_path / 'signing.pem'}\n"
        "metrics_port: 0\nflush_interval: 0.2\nreload_interval: 3600\n"
    )
    yield {"node": node, "database": database}
    client: MongoClient = MongoClient(mongo_url)
    client.drop_database(database)
    client.close()


def test_muster_up_serves_a_real_agent_its_plan_and_stores_its_results(
    tmp_path: Path, amqp_url: str, mongo_url: str, central_files: dict[str, str]
):
    node = central_files["node"]
    base = {**os.environ, "MUSTER_CONFIG": str(tmp_path / "absent.yaml")}
    up = subprocess.Popen(
        [str(MUSTER), "up", "--config", str(tmp_path / "up.yaml")],
        env=base,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    agent_env = {
        **base,
        "MUSTER_BROKER_URL": amqp_url,
        "MUSTER_NODE": node,
        "MUSTER_STATE_DIR": str(tmp_path / "state"),
        "MUSTER_TRUSTED_KEYS": str(tmp_path / "signing.pub"),
        "MUSTER_LABELS": f"run={node}",
        "MUSTER_METADATA_URL": "",
        "MUSTER_CLOUD_INIT_PATH": str(tmp_path / "none"),
        "MUSTER_CONFIG_DRIVE_PATH": str(tmp_path / "none"),
        "MUSTER_KEEPALIVE_INTERVAL": "1",
    }
    agent = subprocess.Popen(
        [str(MUSTER), "agent", "run"],
        env=agent_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client: MongoClient = MongoClient(mongo_url, tz_aware=True)
    try:
        job = wait_for_job(client[central_files["database"]], f"{node}/data", timeout=90)
        assert job["last_success"]["status"] == "success"
        assert job["last_verify"]["status"] == "success"
        assert (tmp_path / "state" / "plan.json").is_file()
        assert client[central_files["database"]].nodes.find_one({"_id": node}) is not None
    finally:
        client.close()
        assert stopped(agent) == 0
        assert stopped(up) == 0
        log = up.stdout.read().decode() if up.stdout else ""
        print(log)
    assert "muster up: stopped" in log


def wait_for_job(database, job_id: str, timeout: float) -> dict:
    """The job's document once it holds a successful backup and restore test."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = database.jobs.find_one({"_id": job_id})
        if job and job.get("last_success") and (job.get("last_verify") or {}).get("status"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"no backup and restore test of {job_id} in MongoDB in {timeout} s")
