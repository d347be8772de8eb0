"""A bare session, frames in and frames out: no server, no socket (tests/bare.py)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from tsunagu_ws_gateway.core import commands as cmd
from tsunagu_ws_gateway.protocol import codes
from tsunagu_ws_gateway.protocol.codes import ProtocolError
from tsunagu_ws_gateway.protocol.json_frames import JSON
from tsunagu_ws_gateway.protocol.protobuf_frames import PROTOBUF

from .bare import bare_gateway, bare_session, frame
from .conftest import make_token


async def test_connect_subscribe_publish_and_the_publication_comes_back() -> None:
    gateway = bare_gateway()
    session, out = bare_session(gateway)
    await session.handle_frame(frame({"id": 1, "connect": {"token": make_token("ann", ["chat:*"])}}), JSON)
    [connected] = out.take()
    assert connected["id"] == 1 and connected["connect"]["client"] == session.id
    assert gateway.registry.clients[session.id] is session
    await session.handle_frame(frame({"id": 2, "subscribe": {"channel": "chat:a"}}), JSON)
    [subscribed] = out.take()
    epoch = subscribed["subscribe"]["epoch"]
    assert subscribed == {"id": 2, "subscribe": {"recoverable": True, "positioned": True, "epoch": epoch}}  # 0 omitted
    await session.handle_frame(frame({"id": 3, "publish": {"channel": "chat:a", "data": {"text": "hi"}}}), JSON)
    got = out.take()
    push = next(g for g in got if "push" in g)
    assert push["push"]["channel"] == "chat:a" and push["push"]["pub"]["data"] == {"text": "hi"}
    assert {"id": 3, "publish": {"offset": 1, "epoch": epoch}} in got
    await session.end(codes.CONNECTION_CLOSED)
    assert session.id not in gateway.registry.clients and "chat:a" not in gateway.node.channels


@pytest.mark.parametrize(
    ("command", "field"),
    [
        ({"history": {"channel": "chat:a", "since": {"offset": "abc", "epoch": "e"}}}, "since.offset"),
        ({"subscribe": {"channel": "chat:b", "recover": True, "epoch": "e", "offset": [1, 2]}}, "offset"),
        ({"history": {"channel": "chat:a", "limit": "ten"}}, "limit"),
        ('{"publish": {"channel": "chat:a", "data": ' + "[" * 1000 + "1" + "]" * 1000 + "}}", "data"),
        ({"subscribe": {"channel": "chat:a\n"}}, "channel"),
        ({"publish": {"channel": 7, "data": 1}}, "channel"),
    ],
)
async def test_poison_input_is_error_107_and_the_session_goes_on(command: dict[str, Any] | str, field: str) -> None:
    gateway = bare_gateway()
    session, out = bare_session(gateway)
    await session.handle_frame(frame({"id": 1, "connect": {"token": make_token("ann", ["chat:*"])}}), JSON)
    out.take()
    raw = '{"id": 2, ' + command[1:] if isinstance(command, str) else frame({"id": 2, **command})
    await session.handle_frame(raw, JSON)
    [reply] = out.take()
    assert reply["id"] == 2 and reply["error"]["code"] == 107 and field.split(".")[0] in reply["error"]["message"]
    await session.handle_frame(frame({"id": 3, "ping": {}}), JSON)
    assert out.take() == [{"id": 3, "ping": {}}] and out.closing is None


async def test_a_protobuf_session_and_a_malformed_frame() -> None:
    session, _ = bare_session(bare_gateway(), PROTOBUF)
    with pytest.raises(ProtocolError) as refused:
        await session.handle_frame(b"\x05\xff\xff", PROTOBUF)
    assert refused.value.disconnect.code == 3501


async def test_typed_commands_and_an_expired_subscription_token() -> None:
    gateway = bare_gateway(pong_timeout=0.1)
    session, out = bare_session(gateway)
    await session.execute(1, cmd.Connect(token=make_token("ann", [])))
    out.take()
    sub_token = make_token("ann", None, ttl=-60, channel="chat:private")
    await session.execute(2, cmd.Subscribe("chat:private", token=sub_token))
    # expired by more than the leeway: refused at once (109)
    assert out.take()[0]["error"]["code"] == 109
    sub_token = make_token("ann", None, ttl=2, channel="chat:private")
    await session.execute(3, cmd.Subscribe("chat:private", token=sub_token))
    assert "subscribe" in out.take()[0]
    session.subscriptions["chat:private"].expires_at = time.time() - 1  # as if two seconds had passed
    session.on_tick(time.monotonic())
    for _ in range(100):
        if "chat:private" not in session.subscriptions:
            break
        await asyncio.sleep(0.01)
    [push] = out.take()
    assert push["push"]["unsubscribe"] == {"code": 2501, "reason": "subscription expired"}
