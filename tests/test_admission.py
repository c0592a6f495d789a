"""DiskAdmissionFilter: KVBM's frequency rule, lazy decay under a fake clock, capacity cap, disabled mode."""
from __future__ import annotations

import random

import pytest

from kvbm.policies.admission import DiskAdmissionFilter


class FakeClock:
    """A settable monotonic clock in seconds."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_first_sight_then_hit_admits(clock: FakeClock) -> None:
    f = DiskAdmissionFilter(clock=clock)
    h = random.Random(1).randrange(2**64)
    assert f.admit(h) is False  # first sighting: frequency 1
    assert f.frequency(h) == 1
    assert f.admit(h) is False  # asking again is not a hit
    f.record_hit(h)
    assert f.frequency(h) == 2
    assert f.admit(h) is True


def test_hits_double(clock: FakeClock) -> None:
    f = DiskAdmissionFilter(clock=clock)
    f.record_hit(5)  # an unknown block starts at 1
    for expected in (2, 4, 8, 16):
        f.record_hit(5)
        assert f.frequency(5) == expected


def test_decay_by_one_per_step_and_drop_at_zero(clock: FakeClock) -> None:
    f = DiskAdmissionFilter(decay_seconds=600, clock=clock)
    f.record_hit(7)
    f.record_hit(7)
    f.record_hit(7)  # 4
    clock.now += 599.9
    assert f.frequency(7) == 4  # same step
    clock.now += 0.2
    assert f.frequency(7) == 3
    assert f.admit(7) is True
    clock.now += 600
    assert f.frequency(7) == 2 and f.admit(7) is True
    clock.now += 600
    assert f.frequency(7) == 1 and f.admit(7) is False
    clock.now += 600 * 5
    assert f.frequency(7) == 0
    assert len(f) == 0  # dropped at zero
    assert f.admit(7) is False and f.frequency(7) == 1  # seen again: a fresh first sighting


def test_steps_are_global_not_per_entry(clock: FakeClock) -> None:
    """Decay ticks every decay_seconds from the filter's start, as a periodic sweep would."""
    f = DiskAdmissionFilter(decay_seconds=100, clock=clock)
    clock.now += 99
    f.record_hit(1)
    f.record_hit(1)  # 2, one second before the first step
    clock.now += 1
    assert f.frequency(1) == 1


def test_hit_after_partial_decay_doubles_decayed_value(clock: FakeClock) -> None:
    f = DiskAdmissionFilter(decay_seconds=10, clock=clock)
    for _ in range(4):
        f.record_hit(9)  # 8
    clock.now += 30  # 3 steps: 5
    f.record_hit(9)
    assert f.frequency(9) == 10
    clock.now += 10
    assert f.frequency(9) == 9


def test_capacity_evicts_least_recently_seen(clock: FakeClock) -> None:
    f = DiskAdmissionFilter(max_entries=3, clock=clock)
    for h in (1, 2, 3):
        f.record_hit(h)
    f.record_hit(1)  # 1 becomes the most recently seen (frequency 2)
    f.admit(4)  # a fourth entry pushes out the least recently seen: 2
    assert len(f) == 3
    assert f.frequency(2) == 0
    assert (f.frequency(1), f.frequency(3), f.frequency(4)) == (2, 1, 1)


def test_randomized_against_model(clock: FakeClock) -> None:
    """Many operations against an eagerly decayed dict; the lazy filter must agree at every step."""
    rng = random.Random(42)
    f = DiskAdmissionFilter(decay_seconds=50, max_entries=10_000, clock=clock)
    model: dict[int, int] = {}
    step = 0
    start = clock.now
    keys = [rng.randrange(2**64) for _ in range(60)]
    for _ in range(5000):
        clock.now += rng.choice([0, 0, 0, 1, 7, 30, 120])
        new_step = int((clock.now - start) // 50)
        for _ in range(new_step - step):
            model = {k: v - 1 for k, v in model.items() if v > 1}
        step = new_step
        k = rng.choice(keys)
        if rng.random() < 0.5:
            model[k] = min(2 * model[k], 2**30) if k in model else 1
            f.record_hit(k)
        else:
            expected = model.get(k, 0) >= 2
            model.setdefault(k, 1)
            assert f.admit(k) is expected
        probe = rng.choice(keys)
        assert f.frequency(probe) == model.get(probe, 0)


def test_disabled_admits_everything_and_keeps_nothing(clock: FakeClock) -> None:
    f = DiskAdmissionFilter(clock=clock, enabled=False)
    assert all(f.admit(h) for h in range(100))
    f.record_hit(3)
    assert len(f) == 0 and f.frequency(3) == 0


def test_frequency_is_capped(clock: FakeClock) -> None:
    f = DiskAdmissionFilter(clock=clock)
    for _ in range(200):
        f.record_hit(1)
    assert f.frequency(1) == 2**30


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"decay_seconds": 0}, ValueError, r"decay_seconds must be a finite, positive number, got 0"),
    ({"decay_seconds": float("inf")}, ValueError, r"decay_seconds"),
    ({"max_entries": 0}, ValueError, r"max_entries must be a positive integer, got 0"),
    ({"max_entries": 1.5}, ValueError, r"max_entries"),
    ({"clock": 5}, TypeError, r"clock must be a callable"),
])
def test_bad_arguments(kwargs: dict, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        DiskAdmissionFilter(**kwargs)
