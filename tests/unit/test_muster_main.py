"""`muster`'s error handling: kombu's connection error is recognised without importing kombu
up front (a backup never loads it), and every other error is left alone."""

import click
import pytest
from kombu.exceptions import OperationalError

from muster import cli


@click.command()
@click.argument("kind")
def failing(kind: str) -> None:
    if kind == "broker":
        raise OperationalError("[Errno 111] Connection refused")
    raise RuntimeError("something else")


@pytest.fixture
def failing_command(monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "failing", f"{__name__}:failing")


def test_an_unreachable_broker_is_a_message_and_exit_3(failing_command, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["muster", "failing", "broker"])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 3
    assert "cannot reach the message broker" in capsys.readouterr().err


def test_other_errors_are_not_taken_for_the_broker(failing_command, monkeypatch):
    monkeypatch.setattr("sys.argv", ["muster", "failing", "other"])
    with pytest.raises(RuntimeError, match="something else"):
        cli.main()
