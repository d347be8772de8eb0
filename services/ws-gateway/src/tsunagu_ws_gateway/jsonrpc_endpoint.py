"""`GET /rpc`: JSON-RPC 2.0 over WebSocket, on top of an ordinary client session (adapter.py).

Methods: `auth(token)` (unless the socket came with `?token=`), `subscribe(channel)` -> subscription
id (the channel), `unsubscribe(subscription)`, `publish(channel, data)`, `history(channel, limit)`,
`presence(channel)`, `rpc(method, data)`. Publications arrive as notifications
`subscription {subscription, result: {channel, offset, data}}`; a subscription the server ends is
announced as `unsubscribed {subscription, code, reason}`. Error codes: protocol/jsonrpc.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from tsunagu_ws_gateway.adapter import Bridge, BridgeCodec, MessageOutbox, Reply, finish, refuse, start_writer
from tsunagu_ws_gateway.protocol import codes, jsonrpc
from tsunagu_ws_gateway.protocol.codes import ProtocolError
from tsunagu_ws_gateway.protocol.jsonrpc import Request, RpcError
from tsunagu_ws_gateway.session import Gateway

log = logging.getLogger("tsunagu.gateway.jsonrpc")

CODEC = BridgeCodec("jsonrpc", jsonrpc.publication_notification)
UNAUTHORIZED = jsonrpc.gateway_error(codes.UNAUTHORIZED.code, "unauthorized: call auth first or pass ?token=")

Handler = Callable[["JsonRpcConnection", dict[str, Any]], Awaitable[Any]]


class Failed(Exception):
    def __init__(self, error: RpcError) -> None:
        super().__init__(error.message)
        self.error = error


def _native_error(reply: Reply) -> RpcError | None:
    error = reply.get("error")
    if error is None:
        return None
    return jsonrpc.gateway_error(int(error.get("code", 100)), str(error.get("message", "")))


class JsonRpcConnection:
    def __init__(self, gateway: Gateway, websocket: WebSocket) -> None:
        self.gateway = gateway
        self.outbox = MessageOutbox(websocket, gateway.settings.send_buffer_bytes)
        self.bridge = Bridge(
            gateway,
            CODEC,
            deliver=self.deliver,
            close=self.outbox.close,
            on_unsubscribe=self.on_unsubscribe,
        )
        # While a batch runs, its publications wait here so that they follow the batch's response.
        self.held: list[bytes] | None = None

    def deliver(self, frame: bytes) -> None:
        if self.held is not None:
            self.held.append(frame)
        else:
            self.outbox.send(frame)

    def on_unsubscribe(self, channel: str, code: int, reason: str) -> None:
        params = {"subscription": channel, "code": code, "reason": reason}
        self.deliver(jsonrpc.notification("unsubscribed", params))

    async def native(
        self, method: str, request: dict[str, Any], on_reply: Callable[[Reply], None] | None = None
    ) -> Any:
        if not self.bridge.connected:
            raise Failed(UNAUTHORIZED)
        reply = await self.bridge.call(method, request, on_reply)
        error = _native_error(reply)
        if error is not None:
            raise Failed(error)
        return reply.get(method, {})

    # one message

    async def handle_message(self, message: bytes | str) -> None:
        decoded = jsonrpc.decode(message, self.gateway.settings.max_commands_per_frame)
        if isinstance(decoded, RpcError):
            self.outbox.send(jsonrpc.encode(jsonrpc.error_response(None, decoded)))
            return
        if not decoded.batch:
            response = await self.handle_entry(decoded.entries[0], immediate=True)
            if response is not None:
                self.outbox.send(jsonrpc.encode(response))
            return
        self.held = []
        try:
            responses = []
            for entry in decoded.entries:
                response = await self.handle_entry(entry, immediate=False)
                if response is not None:
                    responses.append(response)
                if self.outbox.closing is not None:
                    break
        finally:
            held, self.held = self.held, None
        if responses:
            self.outbox.send(jsonrpc.encode(responses))
        for frame in held:
            self.outbox.send(frame)

    async def handle_entry(self, entry: Request | jsonrpc.Invalid, *, immediate: bool) -> dict[str, Any] | None:
        if isinstance(entry, jsonrpc.Invalid):
            return jsonrpc.error_response(entry.id, entry.error)
        handler = METHODS.get(entry.method)
        if handler is None:
            error = RpcError(jsonrpc.METHOD_NOT_FOUND, f"Method not found: {entry.method}")
            return None if entry.notification else jsonrpc.error_response(entry.id, error)
        names, required, function = handler
        params = jsonrpc.params_of(entry, names, required)
        try:
            if isinstance(params, RpcError):
                raise Failed(params)
            if entry.method == "subscribe" and immediate and not entry.notification:
                # The response must be queued before the publications buffered while subscribing.
                request_id = entry.id

                def respond(reply: Reply) -> None:
                    if "error" not in reply:
                        channel = params["channel"] if isinstance(params, dict) else ""
                        self.outbox.send(jsonrpc.encode(jsonrpc.result_response(request_id, channel)))

                await self.subscribe(params, respond)
                return None
            result = await function(self, params)
        except Failed as exc:
            return None if entry.notification else jsonrpc.error_response(entry.id, exc.error)
        except ProtocolError as exc:
            disconnect = exc.disconnect
            if entry.method == "auth" and disconnect.code == codes.INVALID_TOKEN.code:
                # A wrong token does not end the socket here: the client may authenticate again.
                error = jsonrpc.gateway_error(codes.UNAUTHORIZED.code, str(exc))
                return None if entry.notification else jsonrpc.error_response(entry.id, error)
            data = {"disconnect": disconnect.code, "reason": disconnect.reason}
            self.outbox.send(
                jsonrpc.encode(jsonrpc.error_response(entry.id, RpcError(jsonrpc.DISCONNECTED, str(exc), data)))
            )
            self.outbox.close(disconnect)
            return None
        return None if entry.notification else jsonrpc.result_response(entry.id, result)

    # methods

    async def auth(self, params: dict[str, Any]) -> Any:
        token = params["token"]
        if not isinstance(token, str) or not token:
            raise Failed(RpcError(jsonrpc.INVALID_PARAMS, "Invalid params: token must be a non-empty string"))
        if self.bridge.connected:
            raise Failed(jsonrpc.gateway_error(codes.BAD_REQUEST.code, "bad request: already authenticated"))
        reply = await self.bridge.call("connect", {"token": token})
        error = _native_error(reply)
        if error is not None:
            raise Failed(error)
        result = reply["connect"]
        return {"client": result["client"], "user": self.bridge.session.user, "node": result.get("node", "")}

    async def subscribe(self, params: dict[str, Any], on_reply: Callable[[Reply], None] | None = None) -> Any:
        channel = _channel(params)
        request: dict[str, Any] = {"channel": channel}
        since = params.get("since")
        if since is not None:
            if not isinstance(since, dict) or not isinstance(since.get("epoch"), str):
                raise Failed(RpcError(jsonrpc.INVALID_PARAMS, "Invalid params: since must be {offset, epoch}"))
            request.update(recover=True, epoch=since["epoch"], offset=int(since.get("offset") or 0))
        if isinstance(params.get("token"), str):
            request["token"] = params["token"]
        await self.native("subscribe", request, on_reply)
        return channel

    async def unsubscribe(self, params: dict[str, Any]) -> Any:
        channel = params["subscription"]
        if not isinstance(channel, str) or not channel:
            raise Failed(RpcError(jsonrpc.INVALID_PARAMS, "Invalid params: subscription must be a string"))
        subscribed = channel in self.bridge.session.subscriptions
        await self.native("unsubscribe", {"channel": channel})
        return subscribed

    async def publish(self, params: dict[str, Any]) -> Any:
        return await self.native("publish", {"channel": _channel(params), "data": params["data"]})

    async def history(self, params: dict[str, Any]) -> Any:
        channel = _channel(params)
        limit = params.get("limit", 0)
        if not isinstance(limit, int) or isinstance(limit, bool):
            raise Failed(RpcError(jsonrpc.INVALID_PARAMS, "Invalid params: limit must be an integer"))
        result = await self.native("history", {"channel": channel, "limit": limit})
        publications = [
            {"channel": channel, "offset": pub.get("offset", 0), "data": pub.get("data")}
            for pub in result.get("publications", [])
        ]
        return {"publications": publications, "offset": result.get("offset", 0), "epoch": result.get("epoch", "")}

    async def presence(self, params: dict[str, Any]) -> Any:
        result = await self.native("presence", {"channel": _channel(params)})
        return result.get("presence", {})

    async def rpc(self, params: dict[str, Any]) -> Any:
        method = params["method"]
        if not isinstance(method, str):
            raise Failed(RpcError(jsonrpc.INVALID_PARAMS, "Invalid params: method must be a string"))
        result = await self.native("rpc", {"method": method, "data": params.get("data")})
        return result.get("data")


def _channel(params: dict[str, Any]) -> str:
    channel = params.get("channel")
    if not isinstance(channel, str) or not channel:
        raise Failed(RpcError(jsonrpc.INVALID_PARAMS, "Invalid params: channel must be a non-empty string"))
    return channel


METHODS: dict[str, tuple[tuple[str, ...], int, Handler]] = {
    "auth": (("token",), 1, JsonRpcConnection.auth),
    "subscribe": (("channel", "since", "token"), 1, JsonRpcConnection.subscribe),
    "unsubscribe": (("subscription",), 1, JsonRpcConnection.unsubscribe),
    "publish": (("channel", "data"), 2, JsonRpcConnection.publish),
    "history": (("channel", "limit"), 1, JsonRpcConnection.history),
    "presence": (("channel",), 1, JsonRpcConnection.presence),
    "rpc": (("method", "data"), 1, JsonRpcConnection.rpc),
}


async def jsonrpc_endpoint(websocket: WebSocket) -> None:
    gateway: Gateway = websocket.app.state.gateway
    if await refuse(websocket, gateway):
        return
    await websocket.accept()
    connection = JsonRpcConnection(gateway, websocket)
    outbox = connection.outbox
    start_writer(outbox)
    settings = gateway.settings
    try:
        token = websocket.query_params.get("token")
        if token:
            try:
                reply = await connection.bridge.call("connect", {"token": token})
            except ProtocolError as exc:
                outbox.close(exc.disconnect)
            else:
                if "error" in reply:
                    outbox.close(codes.INVALID_TOKEN)
        while outbox.closing is None:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            data = message.get("text")
            if data is None:
                data = message.get("bytes") or b""
            if len(data) > settings.max_frame_bytes:
                outbox.close(codes.MESSAGE_SIZE_LIMIT)
                break
            await connection.handle_message(data)
    except asyncio.CancelledError:
        if outbox.closing is not codes.SLOW:
            raise
    except WebSocketDisconnect:
        pass
    finally:
        await finish(outbox, connection.bridge)
