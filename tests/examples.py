"""One valid instance of every contract message, for tests that need real traffic."""

from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.messages import (
    Alert,
    Announce,
    Facts,
    Keepalive,
    Message,
    RunResult,
    RunStats,
    RunStatus,
)
from broker.plan import Plan
from broker.signing import sign_plan

RECIPIENT = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p"


def facts(hostname: str = "web1") -> Facts:
    return Facts.model_validate(
        {
            "hostname": hostname,
            "fqdn": f"{hostname}.example.org",
            "addresses": ["10.0.0.5/24", "fd00::5/64"],
            "os": {"family": "debian", "name": "Debian GNU/Linux", "version": "12"},
            "cloud": {"provider": "openstack", "project": "web", "metadata": {"role": "web"}},
            "labels": {"tier": "frontend"},
        }
    )


def plan(node: str = "web1", issued: datetime | None = None) -> Plan:
    return Plan.model_validate(
        {
            "node": node,
            "issued": issued or datetime.now(UTC),
            "jobs": [
                {
                    "name": "etc",
                    "storage": {"kind": "swift", "container": "backups", "prefix": "prod"},
                    "sources": {"paths": ["/etc"], "excludes": ["*.swp"]},
                    "schedule": {"cron": "15 2 * * *", "splay": "30m"},
                    "retention": {"keep_daily": 7, "keep_weekly": 4},
                    "recipients": [RECIPIENT],
                    "hooks": {"pre": [{"command": "sync", "timeout": "1m"}]},
                }
            ],
        }
    )


def every_message(node: str = "web1", key: Ed25519PrivateKey | None = None) -> list[Message]:
    now = datetime.now(UTC)
    signing_key = key or Ed25519PrivateKey.generate()
    return [
        Announce(node=node, facts=facts(node), agent_version="0.1.0", recipient=RECIPIENT),
        Keepalive(node=node, plan_hash="sha256:00", uptime=12.5, running=["etc"]),
        sign_plan(plan(node), signing_key),
        RunStatus(node=node, job="etc", run_id="r1", kind="backup", files_done=3, bytes_done=99),
        RunResult(
            node=node,
            job="etc",
            run_id="r1",
            kind="backup",
            status="success",
            started=now - timedelta(seconds=30),
            finished=now,
            snapshot="20261126T020000Z",
            stats=RunStats(files=120, bytes_read=4096, bytes_stored=1024, volumes=1),
        ),
        Alert(
            key=f"keepalive:{node}",
            kind="keepalive",
            state="open",
            severity="critical",
            source="reporter",
            node=node,
            summary=f"{node} silent for 300 s",
        ),
    ]
