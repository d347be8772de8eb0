"""MLLP framing (what a sender's bytes become) and the ACKs it is answered with, read back with python-hl7."""

from __future__ import annotations

import asyncio

import hl7
import pytest
from tsunagu_stream_ingest.mllp import (
    HEAD_KEPT,
    Frame,
    FrameReader,
    ack_code_of,
    build_ack,
    encode_frame,
)

VT, FS, CR = b"\x0b", b"\x1c", b"\r"
MAX = 2048

ADT = (
    "MSH|^~\\&|MONITOR|ICU|TSUNAGU|HOSP|20250102030405||ADT^A01^ADT_A01|CTRL-1|P|2.5.1\r"
    "EVN|A01|20250102030405\r"
    "PID|1||P123^^^HOSP^MR||Doe^John||19700101|M\r"
    "PV1|1|I|ICU^12^A\r"
)


def message(n: int, size: int = 0) -> bytes:
    """A message with control id `n`, padded with an NTE segment to `size` bytes when asked."""
    text = ADT.replace("CTRL-1", f"CTRL-{n}").encode()
    if size:
        pad = size - len(text) - len(b"NTE|1||\r")
        text += b"NTE|1||" + b"x" * pad + b"\r"
        assert len(text) == size
    return text


async def frames_of(chunks: list[bytes], max_bytes: int = MAX) -> tuple[list[Frame], FrameReader]:
    """Feed `chunks` one read at a time (the reader consumes each before the next arrives)."""
    stream = asyncio.StreamReader()
    reader = FrameReader(stream, max_bytes)
    frames: list[Frame] = []

    async def read_all() -> None:
        while (frame := await reader.read_frame()) is not None:
            frames.append(frame)

    task = asyncio.create_task(read_all())
    for chunk in chunks:
        stream.feed_data(chunk)
        for _ in range(3):
            await asyncio.sleep(0)
    stream.feed_eof()
    async with asyncio.timeout(5):
        await task
    return frames, reader


async def test_blocks_arrive_whole_however_the_bytes_are_split() -> None:
    stream = encode_frame(message(1)) + b"\r\n" + encode_frame(message(2)) + encode_frame(message(3)) + b"\n"
    for chunks in (
        [stream],  # all in one read
        [bytes([b]) for b in stream],  # one byte per read: every END split between FS and CR
        [stream[:50], stream[50:51], stream[51:]],
    ):
        frames, reader = await frames_of(chunks)
        assert [f.data for f in frames] == [message(1), message(2), message(3)]
        assert all(f.framed and not f.oversize and f.size == len(f.data) for f in frames)
        assert reader.dropped == 0 and reader.pending == 0


@pytest.mark.parametrize("split", [0, 1, 2])
async def test_a_message_of_exactly_the_limit_is_not_oversize(split: int) -> None:
    body = message(1, size=MAX)
    framed = encode_frame(body)
    # split = 1: VT + message + FS in one read and the CR in the next (the case an off-by-one missed)
    chunks = [framed] if split == 0 else [framed[:-split], framed[-split:]]
    frames, _ = await frames_of(chunks)
    assert frames == [Frame(body, MAX)]


@pytest.mark.parametrize("chunked", [False, True])
async def test_an_oversize_block_is_reported_with_its_size_and_head_and_the_next_block_is_fine(chunked: bool) -> None:
    big = message(1, size=HEAD_KEPT * 3)
    stream = encode_frame(big) + encode_frame(message(2))
    chunks = [stream[i : i + 1000] for i in range(0, len(stream), 1000)] if chunked else [stream]
    frames, _ = await frames_of(chunks, max_bytes=HEAD_KEPT)
    assert len(frames) == 2
    oversize, after = frames
    assert oversize.oversize and oversize.framed
    assert oversize.size == len(big)
    assert oversize.data == big[:HEAD_KEPT] or oversize.data == big[: HEAD_KEPT - 1]
    assert oversize.data.startswith(b"MSH|^~\\&|MONITOR|ICU")
    assert after == Frame(message(2), len(message(2)))


async def test_unframed_bytes_are_marked_and_kept_whole() -> None:
    unframed = message(1, size=HEAD_KEPT + 500)  # longer than the head kept of an oversize block
    frames, _ = await frames_of([unframed + FS + CR + encode_frame(message(2))], max_bytes=HEAD_KEPT * 2)
    assert frames[0] == Frame(unframed, len(unframed), framed=False)
    assert frames[1].data == message(2)


async def test_a_start_byte_inside_a_block_drops_what_came_before_it() -> None:
    # A sender gave up on a block half-way and sent the next one; or noise came before the start byte.
    cut_off = VT + message(1)[:40]
    noise = b"GET / HTTP/1.1\r\n"
    frames, reader = await frames_of([cut_off, encode_frame(message(2)), noise + encode_frame(message(3))])
    assert [f.data for f in frames] == [message(2), message(3)]
    assert all(f.framed for f in frames)
    assert reader.dropped == len(cut_off) + len(noise)


async def test_a_start_byte_during_an_oversize_block_abandons_it() -> None:
    stream = VT + b"MSH|" + b"y" * (MAX * 3) + encode_frame(message(2))
    frames, reader = await frames_of([stream[i : i + 700] for i in range(0, len(stream), 700)])
    assert [f.data for f in frames] == [message(2)]
    assert reader.dropped == MAX * 3 + 5


async def test_a_block_cut_off_by_the_end_of_the_stream_is_not_a_message() -> None:
    frames, reader = await frames_of([encode_frame(message(1)) + VT + message(2)[:30]])
    assert [f.data for f in frames] == [message(1)]
    assert reader.pending == 31


def test_aa_acknowledges_the_control_id_in_the_senders_terms() -> None:
    ack = hl7.parse(build_ack("AA", hl7.parse(ADT)).decode())
    msh, msa = ack.segment("MSH"), ack.segment("MSA")
    assert (str(msa(1)), str(msa(2))) == ("AA", "CTRL-1")
    assert str(msh(9)) == "ACK^A01^ACK" and str(msh(12)) == "2.5.1"
    # The receiver becomes the sender and the other way round.
    assert [str(msh(n)) for n in (3, 4, 5, 6)] == ["TSUNAGU", "HOSP", "MONITOR", "ICU"]
    assert str(msh(10)) and str(msh(10)) != "CTRL-1"
    with pytest.raises(KeyError):
        ack.segment("ERR")


def test_ar_carries_the_reason_the_table_0357_code_and_where() -> None:
    reason = "PID-3 patient identifier is missing | see ^spec^\r\nplease"
    raw = build_ack("AR", hl7.parse(ADT), reason=reason, error_code="101", error_location="PID^1^3")
    ack = hl7.parse(raw.decode())
    msa, err = ack.segment("MSA"), ack.segment("ERR")
    assert str(msa(1)) == "AR" and str(msa(2)) == "CTRL-1"
    shown = "PID-3 patient identifier is missing | see ^spec^ please"  # control characters become a space
    assert ack.unescape(str(msa(3))) == shown
    assert [str(err(2)(1)(n)) for n in (1, 2, 3)] == ["PID", "1", "3"]
    assert str(err(3)(1)(1)) == "101" and str(err(3)(1)(3)) == "HL70357"
    assert ack.unescape(str(err(3)(1)(2))) == shown
    assert str(err(4)) == "E"
    assert ack.unescape(str(err(8))) == shown
    assert ack_code_of(encode_frame(raw)) == ("AR", "CTRL-1")


def test_a_long_reason_is_cut_to_something_a_sender_logs() -> None:
    ack = hl7.parse(build_ack("AE", hl7.parse(ADT), reason="x" * 1000, error_code="207").decode())
    assert len(str(ack.segment("MSA")(3))) == 200


def test_without_a_usable_msh_the_ack_still_names_the_control_id() -> None:
    # An MSH too short for python-hl7's create_ack, and one with separators in the sender's name.
    short = hl7.parse("MSH|^~\\&|PUMP|WARD|||20250101||ADT^A01|C-77")
    raw = build_ack("AR", short, reason="too short", error_code="101", control_id="C-77", sender=("PU|MP", "W^ARD"))
    ack = hl7.parse(raw.decode())
    assert ack_code_of(raw) == ("AR", "C-77")
    assert str(ack.segment("MSH")(5)) == "PUMP" and str(ack.segment("MSH")(6)) == "WARD"
    assert str(ack.segment("MSH")(9)) == "ACK"
    nothing = hl7.parse(build_ack("AR", None, reason="no MSH", error_code="100").decode())
    assert str(nothing.segment("MSA")(1)) == "AR" and str(nothing.segment("MSA")(2)) == ""
