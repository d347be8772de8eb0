import json

import pytest
from tsunagu_sim_engine.aoi import CellTracker, cell_channel, cell_of
from tsunagu_sim_engine.codec import HEADER, decode, dequantize, encode, quantize
from tsunagu_sim_engine.kinds import Entity


def test_quantization_rounds_to_hundredths_and_headings_to_hundredths_of_a_degree() -> None:
    q = quantize(Entity(1.23456, -7.891, 0.004, 359.999, {"g": "wave"}))
    assert q == (123, -789, 0, 0, '{"g":"wave"}')
    back = dequantize(q)
    assert (back.x, back.y, back.extra) == (pytest.approx(1.23), pytest.approx(-7.89), {"g": "wave"})
    # Sub-quantum jitter is the same quantized state: nothing to send.
    assert quantize(Entity(1.2301, 2.0)) == quantize(Entity(1.2349, 2.0))
    assert quantize(Entity(1.2301, 2.0)) != quantize(Entity(1.2361, 2.0))
    # Far outside int32 range is clamped, not wrapped.
    assert quantize(Entity(1e12, -1e12))[:2] == (2**31 - 1, -(2**31 - 1))


def test_json_and_binary_frames_carry_the_same_state() -> None:
    entities = {"alice": quantize(Entity(1.5, 2.25, 0.0, 90.0, {"g": "wave"})), "b7": quantize(Entity(-3.0, 4.0))}
    as_json = encode("json", "delta", "r1", 42, 1_700_000_000_123, entities, ["gone-one"])
    parsed = json.loads(as_json)
    assert parsed == {
        "type": "delta",
        "room": "r1",
        "tick": 42,
        "time": 1_700_000_000_123,
        "q": 0.01,
        "e": {"alice": [150, 225, 0, 9000, {"g": "wave"}], "b7": [-300, 400, 0, 0]},
        "gone": ["gone-one"],
    }
    binary = encode("binary", "delta", "r1", 42, 1_700_000_000_123, entities, ["gone-one"])
    assert binary[:2] == b"TS" and len(binary) < len(as_json)
    frame = decode(binary)
    assert frame["e"] == parsed["e"] and frame["gone"] == ["gone-one"]
    assert (frame["type"], frame["tick"], frame["time"]) == ("delta", 42, 1_700_000_000_123)
    empty = encode("binary", "keyframe", "r1", 1, 5, {})
    assert len(empty) == HEADER.size and decode(empty)["type"] == "keyframe"


def test_cells_and_their_channels() -> None:
    assert cell_of(9.99, -0.01, 10) == (0, -1)
    assert cell_channel("r", (0, -1)) == "sim:r.cell.0.-1"


def test_an_entity_on_a_border_does_not_flap_between_cells() -> None:
    tracker = CellTracker(size=10, margin=1)
    assert tracker.place("a", 9.5, 5) == (0, 0)
    # Jitter across the border at x=10 stays in cell (0, 0) while within the margin.
    for x in (10.2, 9.8, 10.9, 9.9, 10.5):
        assert tracker.place("a", x, 5) == (0, 0)
    assert tracker.place("a", 11.1, 5) == (1, 0)
    # And back: it stays in (1, 0) until it is more than the margin inside (0, 0).
    for x in (9.8, 10.3, 9.1):
        assert tracker.place("a", x, 5) == (1, 0)
    assert tracker.place("a", 8.9, 5) == (0, 0)
    # Without hysteresis the same walk would flap on every step.
    plain = CellTracker(size=10, margin=0)
    cells = {plain.place("b", x, 5) for x in (9.8, 10.2)}
    assert len(cells) == 2
    assert tracker.members() == {(0, 0): {"a"}}


def test_a_margin_of_half_a_cell_is_refused() -> None:
    with pytest.raises(ValueError):
        CellTracker(size=10, margin=5)
