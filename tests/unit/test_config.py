import pytest

from broker.config import DEFAULT_BROKER_URL, MusterSettings
from broker.errors import InvalidMessage


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path):
    for name in ("MUSTER_BROKER_URL", "MUSTER_HEARTBEAT", "MUSTER_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(MusterSettings, "default_file", tmp_path / "absent.yaml")


def test_default_broker_is_the_muster_dns_name():
    assert MusterSettings.load().broker_url == DEFAULT_BROKER_URL == "amqp://muster/"


def test_precedence_is_flag_then_environment_then_file(monkeypatch, tmp_path):
    config = tmp_path / "agent.yaml"
    config.write_text("broker_url: amqp://from-file/\nheartbeat: 7\n")
    assert MusterSettings.load(config).broker_url == "amqp://from-file/"
    monkeypatch.setenv("MUSTER_BROKER_URL", "amqp://from-env/")
    settings = MusterSettings.load(config)
    assert (settings.broker_url, settings.heartbeat) == ("amqp://from-env/", 7)
    assert MusterSettings.load(config, broker_url="amqp://flag/").broker_url == "amqp://flag/"


def test_muster_config_names_the_file(monkeypatch, tmp_path):
    config = tmp_path / "elsewhere.yaml"
    config.write_text("broker_url: amqp://a/;amqp://b/\n")
    monkeypatch.setenv("MUSTER_CONFIG", str(config))
    assert MusterSettings.load().broker_urls == ["amqp://a/", "amqp://b/"]


def test_errors_name_the_setting_and_missing_files(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("heartbeat: often\nbroker_uri: amqp://typo/\n")
    with pytest.raises(InvalidMessage, match="heartbeat") as error:
        MusterSettings.load(config)
    assert "broker_uri" in str(error.value)
    with pytest.raises(InvalidMessage, match="does not exist"):
        MusterSettings.load(tmp_path / "missing.yaml")


def test_environment_names_match_in_any_case_and_only_settings(monkeypatch):
    monkeypatch.setenv("muster_heartbeat", "9")
    monkeypatch.setenv("MUSTER_LOG_LEVEL", "debug")  # a CLI option, not a setting
    assert MusterSettings.load().heartbeat == 9


def test_a_file_that_is_not_a_mapping_is_refused(tmp_path):
    config = tmp_path / "list.yaml"
    config.write_text("- broker_url\n")
    with pytest.raises(InvalidMessage, match="mapping"):
        MusterSettings.load(config)
    config.write_text("")  # an empty file is no settings at all
    assert MusterSettings.load(config).broker_url == DEFAULT_BROKER_URL
