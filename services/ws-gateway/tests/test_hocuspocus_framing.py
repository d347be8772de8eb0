"""Hocuspocus v2 framing (protocol/hocuspocus.py): the bytes @hocuspocus/provider 2.x sends, as its
OutgoingMessages encode them, decoded; what the gateway sends, as the provider's MessageReceiver reads it."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tsunagu_ws_gateway.protocol import hocuspocus as hp
from tsunagu_ws_gateway.protocol import yprotocol as yp

NAME = b"\x05notes"  # var-string "notes"


def test_provider_messages_decode() -> None:
    # AuthenticationMessage: name, Auth (2), Token (0), var-string token
    assert hp.decode(NAME + b"\x02\x00\x03abc") == hp.AuthMessage("notes", "abc")
    # SyncStepOneMessage of an empty Y.Doc: name, Sync (0), SyncStep1 (0), var-bytes state vector [0]
    assert hp.decode(NAME + b"\x00\x00\x01\x00") == hp.DocumentMessage("notes", yp.SyncMessage(yp.SYNC_STEP1, b"\x00"))
    # UpdateMessage: name, Sync (0), Update (2), var-bytes update
    update = b"\x01\x01\x07\x00\x04\x01\x04text\x01a\x00"
    frame = NAME + b"\x00\x02" + bytes((len(update),)) + update
    assert hp.decode(frame) == hp.DocumentMessage("notes", yp.SyncMessage(yp.SYNC_UPDATE, update))
    # AwarenessMessage: name, Awareness (1), var-bytes awareness update (1 client: id 7, clock 2, state)
    awareness = b"\x01\x07\x02" + yp.write_var_string('{"user":"ann"}')
    message = hp.decode(NAME + b"\x01" + yp.write_var_bytes(awareness))
    assert isinstance(message, hp.DocumentMessage) and isinstance(message.message, yp.AwarenessMessage)
    assert message.message.entries == (yp.AwarenessEntry(7, 2, '{"user":"ann"}'),)
    # QueryAwarenessMessage, CloseMessage, StatelessMessage
    assert hp.decode(NAME + b"\x03") == hp.DocumentMessage("notes", yp.QueryAwarenessMessage())
    assert hp.decode(NAME + b"\x07") == hp.CloseMessage("notes")
    assert hp.decode(NAME + b"\x05\x02hi") == hp.StatelessMessage("notes", "hi")
    assert hp.decode(NAME + b"\x06\x02hi") == hp.StatelessMessage("notes", "hi", broadcast=True)
    # "sync reply" (4) is a sync message that asks for no SyncStep1 back
    assert hp.decode(NAME + b"\x04\x01\x02\x00\x00") == hp.DocumentMessage(
        "notes", yp.SyncMessage(yp.SYNC_STEP2, b"\x00\x00"), reply=True
    )
    # names are UTF-8 of any length (var-uint length)
    long_name = "ドキュメント-" + "x" * 200
    assert hp.decode(hp.auth_token(long_name, "t")) == hp.AuthMessage(long_name, "t")


def test_server_messages_are_what_the_provider_reads() -> None:
    # writeAuthenticated: Auth (2), Authenticated (2), scope; writePermissionDenied: Auth (2), 1, reason
    assert hp.authenticated("notes", read_only=False) == NAME + b"\x02\x02\x0aread-write"
    assert hp.authenticated("notes", read_only=True) == NAME + b"\x02\x02\x08readonly"
    assert hp.permission_denied("notes", "no") == NAME + b"\x02\x01\x02no"
    # writeSyncStatus: SyncStatus (8), 1 stored | 0 not (the provider reads it with readVarInt: 1 and 0 alike)
    assert hp.sync_status("notes", True) == NAME + b"\x08\x01"
    assert hp.sync_status("notes", False) == NAME + b"\x08\x00"
    # the fan-out's y-websocket messages with the name in front
    assert hp.prefix("notes") + yp.sync_update(b"\x00\x00") == NAME + b"\x00\x02\x02\x00\x00"


@pytest.mark.parametrize(
    ("frame", "document", "needle"),
    [
        (b"", None, "empty message"),
        (b"\x09abc", None, "no document name"),  # name longer than the frame
        (b"\x02\xff\xfe", None, "UTF-8"),
        (NAME, "notes", "truncated var-uint"),  # a name and nothing else
        (NAME + b"\x09", "notes", "unknown message type 9"),
        (NAME + b"\x00\x07\x00", "notes", "unknown sync message type 7"),
        (NAME + b"\x00\x02\x05ab", "notes", "truncated payload"),
        (NAME + b"\x02\x01\x02no", "notes", "auth messages of type 0"),  # a client does not deny
        (NAME + b"\x07\x00", "notes", "trailing bytes"),
        (NAME + b"\x03\x00", "notes", "trailing bytes"),
        (NAME + b"\x01\x03\x09\x01\x02", "notes", "awareness update announces 9 clients"),
    ],
)
def test_malformed_frames_name_their_document(frame: bytes, document: str | None, needle: str) -> None:
    with pytest.raises(hp.HocuspocusError) as error:
        hp.decode(frame)
    assert error.value.document == document
    assert error.value.code == yp.CLOSE_BAD_MESSAGE
    assert needle in str(error.value)
    if document is not None:
        assert f"document {document!r}" in str(error.value)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.binary(max_size=256)
    | st.builds(lambda name, body: hp.prefix(name) + body, st.text(max_size=20), st.binary(max_size=64))
)
def test_any_bytes_decode_or_say_why(raw: bytes) -> None:
    try:
        message = hp.decode(raw)
    except hp.HocuspocusError as error:
        assert str(error) and error.code in (yp.CLOSE_BAD_MESSAGE, yp.CLOSE_TOO_LARGE)
        return
    assert raw.startswith(hp.prefix(message.document))
