"""The Ansible roles (ansible/): ansible-lint is clean, and a real run deploys Muster.

The agent, rule engine and reporter roles run on localhost (`connection: local`) into a
temporary root (`muster_root`), installing Muster from a wheel built here into a virtualenv
under that root, with its dependencies from the package index as on a real node. systemd is
not driven (`muster_manage_service: false`, CI has no running systemd): the unit files are
checked by their contents and, where `systemd-analyze` exists, by `systemd-analyze verify`
and its offline security analysis. A second run must change nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from agent.storage.credentials import read_env_file
from broker.agent_config import AgentSettings
from broker.reporter_config import ReporterSettings
from broker.rules import RuleEngineSettings
from broker.signing import generate_signing_key, public_pem

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ANSIBLE = REPO / "ansible"
BIN = Path(sys.executable).parent
VENV = "/opt/muster"  # the roles' default muster_venv, under the temporary root
UNITS = ("muster-agent", "muster-ruleengine", "muster-reporter")
SERVICE_USER = "daemon"  # exists on Debian; the test must not add users to the machine
SOURCES = ("setup.cfg", "pyproject.toml", "README.md", "LICENSE")
PACKAGES = ("muster", "broker", "agent", "ruleengine", "reporter")
RECAP = re.compile(r"^localhost\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)")


@dataclass
class Run:
    output: str
    seconds: float
    ok: int
    changed: int
    failed: int


@dataclass
class Deployment:
    root: Path
    keys: Path
    secrets: list[str]
    runs: list[Run]
    playbook: Path

    def path(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")


def tool_env(home: Path) -> dict[str, str]:
    """Ansible's own files (temp, caches) under `home`, not in ~/.ansible."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        ANSIBLE_HOME=str(home),
        ANSIBLE_LOCAL_TEMP=str(home / "tmp"),
        ANSIBLE_ROLES_PATH=str(ANSIBLE / "roles"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_RETRY_FILES_ENABLED="0",
        ANSIBLE_CONFIG=str(home / "none.cfg"),  # no ansible.cfg from the working directory
    )
    return env


def build_wheel(into: Path) -> Path:
    """`pip wheel --no-deps` of a copy of the sources: builds leave nothing in the checkout."""
    tree = into / "src"
    tree.mkdir(parents=True)
    for name in SOURCES:
        shutil.copy2(REPO / name, tree / name)
    for package in PACKAGES:
        shutil.copytree(
            REPO / package, tree / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(into), str(tree)],
        check=True,
        capture_output=True,
    )
    (wheel,) = into.glob("muster-*.whl")
    return wheel


def playbook(root: Path, wheel: Path, keys: Path, swift_password: str, mongo_password: str) -> str:
    play = {
        "name": "Muster into a temporary root",
        "hosts": "localhost",
        "connection": "local",
        "gather_facts": False,
        "vars": {
            "ansible_python_interpreter": sys.executable,
            "muster_root": str(root),
            "muster_wheel": str(wheel),
            "muster_python": sys.executable,
            "muster_manage_service": False,
            "muster_create_service_user": False,
            "muster_service_user": SERVICE_USER,
            "muster_service_group": SERVICE_USER,
            "muster_agent_ruleengine_pubkey": str(keys / "ruleengine.key.pub"),
            "muster_agent_labels": {"tier": "web", "dc": "ams"},
            "muster_agent_node": "web1.example.org",
            "muster_agent_settings": {"facts_interval": 600, "stop_timeout": 45},
            "muster_agent_credentials": {
                "swift": {
                    "OS_AUTH_URL": "https://keystone.example.org/v3",
                    "OS_USERNAME": "backup",
                    "OS_PASSWORD": swift_password,
                },
                "s3": {"AWS_ACCESS_KEY_ID": "AKIA1", "AWS_SECRET_ACCESS_KEY": swift_password},
            },
            "muster_ruleengine_rules_src": str(keys / "rules.yaml"),
            "muster_ruleengine_signing_key_src": str(keys / "ruleengine.key"),
            "muster_reporter_mongo_url": f"mongodb://muster:{mongo_password}@db.example.org/",
            "muster_reporter_metrics_port": 9555,
        },
        "roles": ["muster_agent", "muster_ruleengine", "muster_reporter"],
    }
    return yaml.safe_dump([play], sort_keys=False)


def run_playbook(path: Path, env: dict[str, str]) -> Run:
    started = time.monotonic()
    result = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", "localhost,", "--diff", str(path)],
        cwd=path.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    seconds = time.monotonic() - started
    output = result.stdout + result.stderr
    recap = [m for line in output.splitlines() if (m := RECAP.match(line))]
    assert result.returncode == 0 and recap, f"ansible-playbook failed:\n{output[-6000:]}"
    ok, changed, _unreachable, failed = (int(n) for n in recap[-1].groups())
    print(f"ansible-playbook: ok={ok} changed={changed} in {seconds:.1f} s")
    return Run(output, seconds, ok, changed, failed)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    base = tmp_path_factory.mktemp("ansible")
    root, keys = base / "root", base / "keys"
    keys.mkdir()
    key = generate_signing_key(keys / "ruleengine.key")
    (keys / "ruleengine.key.pub").write_bytes(public_pem(key.public_key()))
    shutil.copy2(REPO / "examples" / "rules.yaml", keys / "rules.yaml")
    started = time.monotonic()
    wheel = build_wheel(base / "wheel")
    print(f"wheel {wheel.name} built in {time.monotonic() - started:.1f} s")
    swift_password, mongo_password = f"swift-{uuid.uuid4().hex}", f"mongo-{uuid.uuid4().hex}"
    play = base / "site.yml"
    play.write_text(playbook(root, wheel, keys, swift_password, mongo_password))
    env = tool_env(base / "ansible-home")
    runs = [run_playbook(play, env), run_playbook(play, env)]
    private = (keys / "ruleengine.key").read_text().splitlines()[1]  # a line of the key itself
    return Deployment(root, keys, [swift_password, mongo_password, private], runs, play)


def test_ansible_lint_is_clean(tmp_path: Path) -> None:
    """The production profile, on the roles and the example playbook (ansible/.ansible-lint)."""
    result = subprocess.run(
        [str(BIN / "ansible-lint"), "--nocolor"],
        cwd=ANSIBLE,
        env=tool_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"ansible-lint found problems:\n{output}"
    assert "Passed" in output and "production" in output, output


def test_first_run_deploys_and_second_run_changes_nothing(deployment: Deployment) -> None:
    first, second = deployment.runs
    assert first.failed == 0 and first.changed > 0
    assert second.failed == 0
    assert second.changed == 0, f"second run changed something:\n{second.output[-6000:]}"


def test_secrets_are_never_logged(deployment: Deployment) -> None:
    """Credential files, the signing key and the MongoDB URL, even with --diff."""
    for run in deployment.runs:
        for secret in deployment.secrets:
            assert secret not in run.output


def test_installed_muster_answers(deployment: Deployment) -> None:
    muster = deployment.path(VENV) / "bin" / "muster"
    version = subprocess.run([muster, "--version"], capture_output=True, text=True, check=True)
    assert "muster" in version.stdout and re.search(r"\d+\.\d+", version.stdout)
    usage = subprocess.run([muster, "--help"], capture_output=True, text=True, check=True)
    for command in ("agent", "ruleengine", "reporter", "restore"):
        assert command in usage.stdout
    # the wheel's copy, not the checkout: the venv imports Muster from its own site-packages
    where = subprocess.run(
        [deployment.path(VENV) / "bin" / "python", "-c", "import broker; print(broker.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=deployment.root,
    )
    assert str(deployment.path(VENV)) in where.stdout


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_agent_settings_key_and_credentials(deployment: Deployment) -> None:
    etc = deployment.path("/etc/muster")
    settings = AgentSettings.load(etc / "agent.yaml")
    assert settings.broker_url == "amqp://muster/"
    assert settings.node == "web1.example.org"
    assert settings.labels == {"tier": "web", "dc": "ams"}
    assert settings.trusted_keys == [Path("/etc/muster/ruleengine.pub")]  # the node's path
    assert settings.state_dir == Path("/var/lib/muster")
    assert settings.facts_interval == 600 and settings.stop_timeout == 45
    assert mode(etc / "agent.yaml") == 0o600
    pinned = (etc / "ruleengine.pub").read_bytes()
    assert pinned == (deployment.keys / "ruleengine.key.pub").read_bytes()
    assert b"PRIVATE" not in pinned
    swift, s3 = etc / "swift.env", etc / "s3.env"
    assert mode(swift) == 0o600 and mode(s3) == 0o600
    assert swift.stat().st_uid == 0
    assert read_env_file(swift) == {
        "OS_AUTH_URL": "https://keystone.example.org/v3",
        "OS_USERNAME": "backup",
        "OS_PASSWORD": deployment.secrets[0],
    }
    assert read_env_file(s3)["AWS_SECRET_ACCESS_KEY"] == deployment.secrets[0]


def test_node_identity_is_left_to_the_agent(deployment: Deployment) -> None:
    """The state directory exists, private, and empty: the agent makes its age identity on
    first start, on the node; the role neither creates nor fetches one."""
    state = deployment.path("/var/lib/muster")
    assert state.is_dir() and mode(state) == 0o700
    assert list(state.iterdir()) == []
    assert not any("AGE-SECRET-KEY" in p.read_text(errors="replace") for p in files(deployment))


def files(deployment: Deployment) -> list[Path]:
    return [p for p in deployment.path("/etc").rglob("*") if p.is_file()]


def test_central_settings_rules_and_signing_key(deployment: Deployment) -> None:
    etc = deployment.path("/etc/muster")
    engine = RuleEngineSettings.load(etc / "ruleengine.yaml")
    assert engine.rules == Path("/etc/muster/rules.yaml")
    assert engine.signing_key == Path("/etc/muster/ruleengine.key")
    assert (etc / "rules.yaml").read_bytes() == (REPO / "examples" / "rules.yaml").read_bytes()
    key = etc / "ruleengine.key"
    assert key.read_bytes() == (deployment.keys / "ruleengine.key").read_bytes()
    assert mode(key) == 0o600
    assert key.owner() == SERVICE_USER
    reporter = ReporterSettings.load(etc / "reporter.yaml")
    assert reporter.mongo_url == f"mongodb://muster:{deployment.secrets[1]}@db.example.org/"
    assert reporter.metrics_port == 9555
    assert mode(etc / "reporter.yaml") == 0o640 and (etc / "reporter.yaml").group() == SERVICE_USER


def unit(deployment: Deployment, name: str) -> dict[str, list[str]]:
    """KEY -> values of a unit file (every section together)."""
    entries: dict[str, list[str]] = {}
    text = deployment.path(f"/etc/systemd/system/{name}.service").read_text()
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            entries.setdefault(key, []).append(value)
    return entries


def test_agent_unit_runs_as_root_hardened(deployment: Deployment) -> None:
    agent = unit(deployment, "muster-agent")
    assert agent["ExecStart"] == [f"{VENV}/bin/muster agent run --config /etc/muster/agent.yaml"]
    assert agent["User"] == ["root"]
    text = deployment.path("/etc/systemd/system/muster-agent.service").read_text()
    assert "must read every file it backs up" in text
    for key, value in {
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "ProtectSystem": "full",
        "ProtectHome": "read-only",
        "Restart": "on-failure",
        "KillMode": "mixed",
        "TimeoutStopSec": "60",  # stop_timeout 45 + 15
        "UMask": "0077",
    }.items():
        assert agent.get(key) == [value], key
    assert agent["WantedBy"] == ["multi-user.target"]


@pytest.mark.parametrize("name", ["muster-ruleengine", "muster-reporter"])
def test_central_units_run_unprivileged_hardened(deployment: Deployment, name: str) -> None:
    entries = unit(deployment, name)
    process = name.removeprefix("muster-")
    assert entries["ExecStart"] == [
        f"{VENV}/bin/muster {process} run --config /etc/muster/{process}.yaml"
    ]
    assert entries["User"] == [SERVICE_USER] and entries["Group"] == [SERVICE_USER]
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
        "Restart": "on-failure",
    }.items():
        assert entries.get(key) == [value], key


def test_units_pass_systemd_analyze(deployment: Deployment, tmp_path: Path) -> None:
    """`systemd-analyze verify` on the rendered units (and an offline security score for the
    central ones). verify wants ExecStart to exist on this machine, so the copies checked
    here name the venv under the temporary root; nothing else differs."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        print("systemd-analyze is not installed here: unit files checked by content only")
        return
    for name in UNITS:
        text = deployment.path(f"/etc/systemd/system/{name}.service").read_text()
        copy = tmp_path / f"{name}.service"
        copy.write_text(text.replace(f"{VENV}/bin/", f"{deployment.path(VENV)}/bin/"))
        result = subprocess.run([analyze, "verify", copy], capture_output=True, text=True)
        assert result.returncode == 0 and not result.stderr.strip(), (
            f"systemd-analyze verify {name}:\n{result.stdout}{result.stderr}"
        )
        security = subprocess.run(
            [analyze, "security", "--offline=true", "--no-pager", copy],
            capture_output=True,
            text=True,
        )
        score = re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout)
        if score is None:  # an older systemd without offline analysis
            print(f"systemd-analyze security --offline: not available ({security.stderr[:200]})")
            continue
        print(f"{name}: exposure {score.group(1)}")
        if name != "muster-agent":  # root reading everything scores high by design
            assert float(score.group(1)) <= 3.0, security.stdout


def test_broken_rules_never_replace_deployed_ones(deployment: Deployment, tmp_path: Path) -> None:
    """The role checks a rules file with the installed `muster rules check` before the copy."""
    bad = deployment.keys / "broken-rules.yaml"
    bad.write_text("rules:\n  - name: x\n    match: all\n    jobs: {etc: {sourcez: {}}}\n")
    (play,) = yaml.safe_load(deployment.playbook.read_text())
    play["vars"]["muster_ruleengine_rules_src"] = str(bad)
    play["roles"] = ["muster_ruleengine"]
    path = tmp_path / "broken.yml"
    path.write_text(yaml.safe_dump([play]))
    result = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", "localhost,", str(path)],
        env=tool_env(tmp_path / "home"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert "sourcez" in output and "Deploy the rules file" in output, output[-3000:]
    deployed = deployment.path("/etc/muster/rules.yaml").read_bytes()
    assert deployed == (REPO / "examples" / "rules.yaml").read_bytes()
