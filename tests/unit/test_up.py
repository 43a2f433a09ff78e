"""`muster up`: its settings, the embedded demo's rules, nodes and checks (no servers)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from kombu import Producer

from broker.codec import decode
from broker.connection import (
    QUEUE_HEADER,
    REASON_HEADER,
    BatchPublisher,
    ContractConsumer,
    acknowledge,
    connect,
)
from broker.errors import InvalidMessage
from broker.rules import load_rules
from broker.signing import sign_plan
from broker.topology import DEAD_QUEUE, EVENTS, RULEENGINE_QUEUE, declare, plan_queue
from broker.up_config import UpSettings
from muster.cli import cli
from muster.embedded import (
    BROKER_URL,
    DemoFailed,
    RestoreCase,
    SimulatedAgent,
    Workdir,
    agent_settings,
    check_content,
    healthy,
    standard_tools_script,
)
from muster.mongo import MongoUnavailable, find_secantusd
from muster.sample import NODES, RESTORED_FILE, generate
from ruleengine.compile import plan_for
from tests.examples import plan


@pytest.fixture
def workdir(tmp_path: Path) -> Workdir:
    work = Workdir(tmp_path / "work")
    work.prepare()
    return work


def test_each_simulated_node_gets_a_plan_of_its_own_for_its_own_data(workdir: Workdir):
    rules = load_rules(workdir.rules)  # the shipped template, filled in, is valid
    plans = {}
    for node in NODES:
        agent = SimulatedAgent(agent_settings(node, workdir), node)  # not started
        facts = agent.facts()
        assert facts.hostname == node.hostname and facts.labels == node.labels
        plans[node.node] = plan_for(rules, node.node, facts)
    assert len({plan.content_hash() for plan in plans.values()}) == len(NODES)
    for node in NODES:
        (job,) = plans[node.node].jobs
        assert job.sources.paths == [str(node.data_dir(workdir.path))]
        assert job.storage.kind == "local" and job.storage.path == str(workdir.storage)
        assert job.schedule.every is not None and job.schedule.every <= 15  # a demo's pace
    assert plans["db1"].jobs[0].hooks.pre  # matched through its OpenStack metadata


def test_the_sample_data_is_the_same_on_every_run(tmp_path: Path):
    node = NODES[0]
    first = generate(node, tmp_path / "a")
    second = generate(node, tmp_path / "b")
    assert first == second and RESTORED_FILE in first
    on_disk = (tmp_path / "a" / "nodes" / node.node / node.data / RESTORED_FILE).read_bytes()
    assert on_disk == first[RESTORED_FILE]
    assert generate(NODES[1], tmp_path / "a") != first


def test_up_settings_take_both_processes_keys_flag_over_env_over_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    config = tmp_path / "up.yaml"
    config.write_text(
        "broker_url: amqp://file/\nrules: /file/rules.yaml\nsigning_key: /file/key.pem\n"
        "mongo_url: mongodb://file/\ndatabase: fromfile\nbatch_size: 10\nreload_interval: 7\n"
    )
    monkeypatch.setenv("MUSTER_MONGO_URL", "mongodb://env/")
    monkeypatch.setenv("MUSTER_BATCH_SIZE", "20")
    settings = UpSettings.load(config, batch_size=30, rules=None)
    assert settings.broker_url == "amqp://file/" and settings.rules == Path("/file/rules.yaml")
    assert settings.mongo_url == "mongodb://env/" and settings.database == "fromfile"
    assert settings.batch_size == 30 and settings.reload_interval == 7


def test_up_settings_require_the_rules_and_refuse_unknown_keys(tmp_path: Path):
    config = tmp_path / "up.yaml"
    config.write_text("signing_key: /k.pem\n")
    with pytest.raises(InvalidMessage, match="rules"):
        UpSettings.load(config)
    config.write_text("rules: /r.yaml\nsigning_key: /k.pem\nrulez: 1\n")
    with pytest.raises(InvalidMessage, match="rulez"):
        UpSettings.load(config)


def test_healthy_needs_a_successful_backup_and_restore_test_on_every_node():
    def node(verify: str | None) -> dict:
        test = {"status": verify} if verify else None
        return {"jobs": [{"last_success": {"status": "success"}, "last_restore_test": test}]}

    assert healthy([node("success"), node("success")], 2)
    assert not healthy([node("success"), node(None)], 2)
    assert not healthy([node("success"), node("failure")], 2)
    assert not healthy([node("success"), {"jobs": []}], 2)  # a node without a plan yet
    two_jobs = {"jobs": node("success")["jobs"] + node("failure")["jobs"]}
    assert not healthy([node("success"), two_jobs], 2)


def test_a_restored_file_that_differs_or_is_missing_fails_the_demo(tmp_path: Path):
    path = tmp_path / "file"
    with pytest.raises(DemoFailed, match="is not there"):
        check_content(path, b"original", "muster restore")
    path.write_bytes(b"damaged")
    with pytest.raises(DemoFailed, match="differs"):
        check_content(path, b"original", "muster restore")
    path.write_bytes(b"original")
    check_content(path, b"original", "muster restore")


def test_the_standard_tools_commands_name_this_file_and_quote_paths(tmp_path: Path):
    work = Workdir(tmp_path / "a work dir")
    node = NODES[0]
    case = RestoreCase(node, "www", node.data_dir(work.path) / RESTORED_FILE, b"", work)
    script = standard_tools_script(case, "20261126T000000Z-abcdef", tmp_path / "dest")
    assert f"KEY='{node.state_dir(work.path)}/identity.txt'" in script
    assert f"REPO='{work.storage}/demo/{node.node}/www'" in script
    assert "SNAP=20261126T000000Z-abcdef" in script
    assert 'tar -x -p -f - -C "$DEST" "${FILE#/}"' in script


def test_a_missing_secantusd_says_how_to_get_one(tmp_path: Path):
    with pytest.raises(MongoUnavailable, match="not an executable"):
        find_secantusd(tmp_path / "secantusd-py")


def test_embedded_only_options_need_embedded():
    result = CliRunner().invoke(cli, ["up", "--keep-running"])
    assert result.exit_code == 2 and "go with --embedded" in result.output


def test_on_the_memory_transport_an_invalid_message_is_dead_lettered_with_its_reason():
    """`--embedded` runs the contract's consumers on kombu's memory transport: the topology
    declares there (queue arguments ignored) and bad input still reaches muster.dead."""
    with connect([BROKER_URL]) as connection:
        declare(connection)
        channel = connection.channel()
        for queue in (DEAD_QUEUE, RULEENGINE_QUEUE):
            queue(channel).purge()
        Producer(channel).publish(
            b"not json", exchange=EVENTS.name, routing_key="announce.n1", content_encoding="binary"
        )
        handled: list = []
        consumer = ContractConsumer(connection.clone(), [RULEENGINE_QUEUE], handled.append)
        thread = threading.Thread(target=consumer.run, daemon=True)
        thread.start()
        try:
            letter = None
            deadline = time.monotonic() + 10
            while letter is None and time.monotonic() < deadline:
                letter = DEAD_QUEUE(channel).get(no_ack=True)
                time.sleep(0.05)
        finally:
            consumer.should_stop = True
            thread.join(10)
    assert letter is not None and handled == []
    assert letter.headers[REASON_HEADER].startswith("message is not UTF-8 JSON")
    assert letter.headers[QUEUE_HEADER] == RULEENGINE_QUEUE.name


def test_on_the_memory_transport_the_rule_engine_publisher_delivers_without_confirms():
    """The memory transport has no publisher confirms: the rule engine's batch publisher
    must still deliver a plan to the node's queue, and a batch confirms at once."""
    signed = sign_plan(plan("web1"), Ed25519PrivateKey.generate())
    with connect([BROKER_URL]) as connection:
        declare(connection)
        queue = plan_queue("web1")(connection.channel())
        queue.declare()
        queue.purge()
        publisher = BatchPublisher(connection)
        try:
            publisher.publish(signed)
            assert publisher.confirm(timeout=1) == set()
        finally:
            publisher.reset()
        delivered = queue.get(no_ack=True)
    assert delivered is not None and decode(delivered.body).id == signed.id


def test_on_the_memory_transport_a_batch_acknowledgement_settles_every_delivery():
    """The memory transport ignores `multiple`: acknowledging a batch must still settle all
    of it, or the unacknowledged rest holds the prefetch and the consumer stalls."""
    with connect([BROKER_URL]) as connection:
        declare(connection)
        queue = plan_queue("ack-test")
        channel = connection.channel()
        queue(channel).declare()
        queue(channel).purge()
        for number in range(3):
            Producer(channel).publish({"n": number}, exchange="", routing_key=queue.name)
        reader = connection.channel()
        reader.basic_qos(0, 2, False)
        deliveries = [queue(reader).get() for _ in range(3)]
        acknowledge(deliveries)
        assert reader.qos.can_consume()  # with one still unacknowledged it could not


def test_embedded_brings_its_own_servers_and_refuses_theirs():
    result = CliRunner().invoke(cli, ["up", "--embedded", "--mongo-url", "mongodb://x/"])
    assert result.exit_code == 2 and "brings its own broker" in result.output
