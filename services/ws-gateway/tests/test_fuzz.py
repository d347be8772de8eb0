"""Fuzzing (hypothesis, a small budget for the normal run): whatever a client or a backend sends, the
native decoders (JSON and protobuf), the typed-command parser, a bare session and the server API answer
with a protocol error (close) or an error reply, never with an exception of another kind."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tsunagu_ws_gateway import server_api
from tsunagu_ws_gateway.core import commands as cmd
from tsunagu_ws_gateway.protocol import codes
from tsunagu_ws_gateway.protocol.codes import ProtocolError, ReplyError
from tsunagu_ws_gateway.protocol.json_frames import JSON
from tsunagu_ws_gateway.protocol.protobuf_frames import PROTOBUF
from tsunagu_ws_gateway.protocol.wire import centrifuge_client_pb2 as pb

from .bare import bare_gateway, bare_session, frame
from .conftest import make_token

BUDGET = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
fields = st.sampled_from(
    ["channel", "data", "token", "recover", "epoch", "offset", "since", "limit", "reverse", "flag", "join_leave",
     "idempotency_key", "method", "subs", "user", "client", "session", "disconnect", "channels", "tags", "pattern"]
)  # fmt: skip
requests = st.dictionaries(fields, json_values | st.text(max_size=300), max_size=6)
commands = st.builds(
    lambda method, request, command_id: {"id": command_id, method: request},
    st.sampled_from(cmd.METHODS),
    requests,
    st.integers(min_value=0, max_value=2**32 - 1),
)


def _parsed(decoded: list[dict[str, Any]], codec: Any) -> None:
    for command in decoded:
        method = next((m for m in cmd.METHODS if m in command), None)
        if method is None or not isinstance(command[method], dict):
            continue
        with contextlib.suppress(ReplyError, ProtocolError):
            cmd.parse(method, command[method], codec.payload, codec.rpc_data)


@BUDGET
@given(st.binary(max_size=512) | st.lists(commands, max_size=4).map(lambda cs: frame(*cs)))
def test_json_frames_decode_and_parse_or_say_why(raw: bytes) -> None:
    try:
        decoded = JSON.decode_commands(raw, 1 << 30)
    except ProtocolError:
        return
    _parsed(decoded, JSON)


def _protobuf_frame(commands: list[dict[str, Any]], junk: bytes) -> bytes:
    out = b""
    for command in commands:
        message = pb.Command(id=command["id"] % 2**32)
        method = next(iter(set(command) - {"id"}))
        request = command[method]
        target = getattr(message, method)
        for name, value in request.items():
            descriptor = target.DESCRIPTOR.fields_by_name.get(name)
            if descriptor is None or descriptor.message_type is not None or descriptor.is_repeated:
                continue
            if isinstance(value, str) and descriptor.type == descriptor.TYPE_BYTES:
                value = value.encode()
            try:
                setattr(target, name, value)
            except (TypeError, ValueError):
                continue
        target.SetInParent()
        body = message.SerializeToString()
        out += bytes([len(body)]) + body if len(body) < 128 else b""
    return out + junk


@BUDGET
@given(st.binary(max_size=512) | st.builds(_protobuf_frame, st.lists(commands, max_size=3), st.binary(max_size=8)))
def test_protobuf_frames_decode_and_parse_or_say_why(raw: bytes) -> None:
    try:
        decoded = PROTOBUF.decode_commands(raw, 1 << 30)
    except ProtocolError:
        return
    _parsed(decoded, PROTOBUF)


@BUDGET
@given(st.lists(commands, min_size=1, max_size=4))
def test_a_session_answers_any_command_or_closes_with_a_code(sent: list[dict[str, Any]]) -> None:
    async def run() -> None:
        gateway = bare_gateway()
        session, out = bare_session(gateway)
        await session.handle_frame(frame({"id": 1, "connect": {"token": make_token("ann", ["chat:*", "*"])}}), JSON)
        try:
            await session.handle_frame(frame(*sent), JSON)
        except ProtocolError as exc:
            assert 3000 <= exc.disconnect.code < 5000 or exc.disconnect.code == 1009
        for reply in out.take():
            assert "error" not in reply or reply["error"]["code"] != 100, reply  # no bug of ours
        await session.end(out.closing or codes.CONNECTION_CLOSED)

    asyncio.run(run())


@BUDGET
@given(st.sampled_from([*server_api.METHODS, "batch"]), st.dictionaries(fields, json_values, max_size=6))
def test_the_server_api_answers_any_body_with_a_result_or_an_error(method: str, body: dict[str, Any]) -> None:
    async def run() -> dict[str, Any]:
        gateway = bare_gateway(api_key="k")
        handler = server_api.batch if method == "batch" else server_api.METHODS[method]
        return await server_api.answer_call(handler, gateway, body)

    answer = asyncio.run(run())
    assert set(answer) in ({"result"}, {"error"}), answer
    if "error" in answer:
        assert answer["error"]["code"] != 100, answer  # a bad body is the caller's fault, not a bug of ours
    orjson.dumps(answer)
    json.dumps(answer, default=str)
