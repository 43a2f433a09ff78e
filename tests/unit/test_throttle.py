import os

import pytest

from agent.throttle import Throttle


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_a_burst_of_one_second_passes_then_the_rate_holds():
    clock = Clock()
    throttle = Throttle(1000, clock, clock.sleep)
    throttle(1000)
    assert clock.slept == []
    for _ in range(10):
        throttle(500)
    assert clock.now == pytest.approx(5.0)  # 5,000 bytes beyond the burst at 1,000 B/s


def test_idle_time_earns_at_most_one_second_of_burst():
    clock = Clock()
    throttle = Throttle(1000, clock, clock.sleep)
    clock.now = 3600.0
    throttle(3000)
    assert sum(clock.slept) == pytest.approx(2.0)


def test_a_limit_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        Throttle(0)


def test_processes_forked_after_it_draw_from_one_bucket():
    """A backup's worker processes upload in parallel: the limit is for all of them."""
    clock = Clock()
    throttle = Throttle(1000, clock, clock.sleep)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        throttle(1000)  # spends the whole burst
        os._exit(0)
    os.waitpid(pid, 0)
    throttle(500)
    assert clock.slept == [pytest.approx(0.5)]
