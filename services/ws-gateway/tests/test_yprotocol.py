"""The y-protocols codec, without sockets: round trips, var-uint edges, and malformed frames."""

from __future__ import annotations

import contextlib
import random

import pytest
from pycrdt import Doc, Text, create_sync_message, create_update_message
from tsunagu_ws_gateway.protocol import yprotocol as yp


@pytest.mark.parametrize("value", [0, 1, 127, 128, 255, 16383, 16384, 2**21 - 1, 2**21, 2**32, 2**53 - 1])
def test_var_uint_round_trips_at_the_byte_boundaries(value: int) -> None:
    encoded = yp.write_var_uint(value)
    assert len(encoded) == max(1, (value.bit_length() + 6) // 7)
    reader = yp.Reader(encoded)
    assert reader.var_uint() == value
    assert reader.done()


def test_var_uint_rejects_negative_overlong_and_truncated() -> None:
    with pytest.raises(ValueError):
        yp.write_var_uint(-1)
    with pytest.raises(yp.YProtocolError, match="53 bits"):
        yp.Reader(b"\xff" * 9).var_uint()
    with pytest.raises(yp.YProtocolError, match="truncated"):
        yp.Reader(b"\x80\x80").var_uint()


def test_messages_round_trip_and_match_pycrdt_encoding() -> None:
    doc: Doc = Doc()
    text = doc.get("text", type=Text)
    text += "hello"
    update = doc.get_update()
    # pycrdt (like y-protocols) frames sync messages the same way
    assert yp.sync_step1(doc.get_state()) == create_sync_message(doc)
    assert yp.sync_update(update) == create_update_message(update)
    assert yp.decode_message(yp.sync_step1(doc.get_state())) == yp.SyncMessage(yp.SYNC_STEP1, doc.get_state())
    assert yp.decode_message(yp.sync_step2(update)) == yp.SyncMessage(yp.SYNC_STEP2, update)
    assert yp.decode_message(yp.sync_update(update)) == yp.SyncMessage(yp.SYNC_UPDATE, update)
    assert yp.decode_message(yp.query_awareness()) == yp.QueryAwarenessMessage()
    assert yp.decode_message(yp.permission_denied("read-only")) == yp.AuthMessage("read-only")
    entries = [yp.AwarenessEntry(2**40, 7, '{"user":{"name":"ann ✓"}}'), yp.AwarenessEntry(1, 0, "null")]
    encoded = yp.encode_awareness(entries)
    message = yp.decode_message(yp.awareness_message(encoded))
    assert message == yp.AwarenessMessage(encoded, tuple(entries))
    big = bytes(300_000)
    assert yp.decode_message(yp.sync_update(big)) == yp.SyncMessage(yp.SYNC_UPDATE, big)


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (b"", "empty"),
        (b"\x09", "unknown message type"),
        (b"\x00\x05\x00", "unknown sync"),
        (b"\x00\x02", "truncated var-uint"),
        (b"\x00\x02\x05ab", "truncated payload"),
        (b"\x00\x00\x01a\x00", "trailing"),
        (b"\x01\x03\x05\x01\x01", "announces|truncated"),
        (b"\x01\x04\x01\x01\x01\x01", "truncated"),
        (b"\x01\x05\x01\x01\x01\x01\xff", "UTF-8"),
        (b"\x02\x01", "unknown auth"),
        (b"\x00" + b"\xff" * 12, "53 bits"),
    ],
)
def test_malformed_frames_raise_a_clear_protocol_error(frame: bytes, match: str) -> None:
    with pytest.raises(yp.YProtocolError, match=match) as raised:
        yp.decode_message(frame)
    assert raised.value.code == yp.CLOSE_BAD_MESSAGE


def test_random_bytes_never_raise_anything_but_a_protocol_error() -> None:
    rng = random.Random(7)
    valid = [yp.sync_update(b"\x00\x00"), yp.awareness_message(yp.encode_awareness([yp.AwarenessEntry(1, 1, "{}")]))]
    for _ in range(5000):
        if rng.random() < 0.5:
            frame = bytes(rng.randrange(256) for _ in range(rng.randrange(12)))
        else:
            base = bytearray(rng.choice(valid))
            base[rng.randrange(len(base))] = rng.randrange(256)
            frame = bytes(base[: rng.randrange(len(base) + 1)])
        with contextlib.suppress(yp.YProtocolError):
            yp.decode_message(frame)
