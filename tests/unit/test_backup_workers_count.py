"""How many worker processes a backup forks: the environment, else the usable cores."""

from __future__ import annotations

import os

import pytest

from agent.actions.backup import default_workers


@pytest.mark.parametrize("cores", [{0}, {0, 1, 2}, {1, 5}])
def test_one_per_usable_core_by_default(monkeypatch: pytest.MonkeyPatch, cores: set[int]) -> None:
    """The cores this process may use (its affinity), not all the machine has."""
    monkeypatch.delenv("MUSTER_BACKUP_WORKERS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: cores)
    assert default_workers() == len(cores)


def test_the_environment_sets_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MUSTER_BACKUP_WORKERS", " 3 ")
    assert default_workers() == 3


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_a_bad_value_says_what_to_set(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("MUSTER_BACKUP_WORKERS", value)
    with pytest.raises(ValueError, match=r"MUSTER_BACKUP_WORKERS=.*1 or more"):
        default_workers()
