"""`tsunagu run`'s demo rover, the Device view's device: what its commands do to what it reports."""

from __future__ import annotations

import pytest

from tsunagu.demo_device import ROVER_SPEED_LIMIT, Rover


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_rover_drives_where_it_is_told_and_reports_it() -> None:
    clock = Clock()
    rover = Rover(clock)
    rover.command({"speed": 1.5})
    clock.now += 2
    assert rover.sample()["x"] == 3.0 and rover.sample()["y"] == 0.0
    rover.command({"turn": 90})
    clock.now += 1
    sample = rover.sample()
    assert (sample["x"], sample["y"], sample["heading"]) == (3.0, 1.5, 90.0)
    rover.command({"stop": True})
    clock.now += 5
    assert rover.sample()["y"] == 1.5 and rover.sample()["speed"] == 0.0
    assert sample["commands"] == 2 and rover.sample()["battery"] < 100


@pytest.mark.parametrize("speed", [99, -99])
def test_the_rover_keeps_to_its_speed_limit(speed: float) -> None:
    rover = Rover(Clock())
    rover.command({"speed": speed})
    assert abs(rover.sample()["speed"]) == ROVER_SPEED_LIMIT


def test_a_command_the_rover_cannot_read_is_reported_not_obeyed() -> None:
    rover = Rover(Clock())
    rover.command("faster")
    assert "send an object" in rover.sample()["error"]
    rover.command({"speed": True})  # a boolean is not a speed
    sample = rover.sample()
    assert sample["speed"] == 0.0 and "error" not in sample
