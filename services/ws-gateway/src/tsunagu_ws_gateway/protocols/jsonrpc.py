"""`GET /rpc`: JSON-RPC 2.0 over WebSocket, on an ordinary client session (protocols/base.py).

Methods: `auth(token)` (unless the socket came with `?token=` or a client certificate an identity
takes), `subscribe(channel)` -> subscription id (the channel), `unsubscribe(subscription)`,
`publish(channel, data)`, `history(channel, limit)`, `presence(channel)`, `rpc(method, data)`.
Publications arrive as notifications `subscription {subscription, result: {channel, offset, data}}`;
a subscription the server ends is announced as `unsubscribed {subscription, code, reason}`.
Error codes: protocol/jsonrpc.py.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.websockets import WebSocket
from tsunagu_core.broker import StreamPosition

from tsunagu_ws_gateway.core import commands as cmd
from tsunagu_ws_gateway.core.gateway import Gateway
from tsunagu_ws_gateway.core.refusals import Refusal, Refused
from tsunagu_ws_gateway.core.replies import Reply
from tsunagu_ws_gateway.core.transport import Connection
from tsunagu_ws_gateway.protocol import codes, json_frames, jsonrpc
from tsunagu_ws_gateway.protocol.codes import Disconnect, ProtocolError
from tsunagu_ws_gateway.protocol.jsonrpc import Request, RpcError
from tsunagu_ws_gateway.protocols.base import AdapterRenderer, AdapterSession
from tsunagu_ws_gateway.transports.websocket import serve_websocket

log = logging.getLogger("tsunagu.gateway.jsonrpc")

RENDERER = AdapterRenderer("jsonrpc", jsonrpc.publication_notification)
UNAUTHORIZED = jsonrpc.gateway_error(codes.UNAUTHORIZED.code, "unauthorized: call auth first or pass ?token=")
# Refusals a client may answer with another `auth` (the socket stays open).
CREDENTIAL_REFUSALS = (Refusal.INVALID_TOKEN, Refusal.NO_CREDENTIAL, Refusal.TOKEN_EXPIRED, Refusal.REVOKED)

Handler = Callable[["JsonRpcConnection", dict[str, Any]], Awaitable[Any]]


class Failed(Exception):
    def __init__(self, error: RpcError) -> None:
        super().__init__(error.message)
        self.error = error


def _native_error(reply: Reply) -> RpcError | None:
    if reply.error is None:
        return None
    return jsonrpc.gateway_error(reply.error.code, reply.error.message)


class JsonRpcConnection:
    def __init__(self, gateway: Gateway, connection: Connection, token: str) -> None:
        self.gateway = gateway
        self.outbox = connection.transport
        self.max_frame_bytes = gateway.settings.max_frame_bytes
        self.token = token
        self.adapter = AdapterSession(
            gateway,
            connection,
            RENDERER,
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

    async def native(self, command: cmd.Command, on_reply: Callable[[Reply], None] | None = None) -> Mapping[str, Any]:
        if not self.adapter.connected:
            raise Failed(UNAUTHORIZED)
        reply = await self.adapter.call(command, on_reply)
        error = _native_error(reply)
        if error is not None:
            raise Failed(error)
        return reply.result

    # the socket loop's handler

    async def on_open(self) -> None:
        peer = self.adapter.session.connection.peer
        if not self.token and (peer.certificate is None or not self.gateway.settings.client_cert_identities):
            return  # the client authenticates with `auth`
        try:
            await self.adapter.connect(self.token)
        except Refused as refused:
            self.outbox.close(refused.disconnect)

    def on_too_large(self, size: int) -> None:
        return

    async def on_close(self, disconnect: Disconnect) -> None:
        await self.adapter.end(disconnect)

    async def on_frame(self, message: bytes | str) -> None:
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
                    if reply.ok:
                        channel = params["channel"] if isinstance(params, dict) else ""
                        self.outbox.send(jsonrpc.encode(jsonrpc.result_response(request_id, channel)))

                await self.subscribe(params, respond)
                return None
            result = await function(self, params)
        except Failed as exc:
            return None if entry.notification else jsonrpc.error_response(entry.id, exc.error)
        except Refused as refused:
            if refused.refusal in CREDENTIAL_REFUSALS:
                # A wrong token does not end the socket here: the client may authenticate again.
                error = jsonrpc.gateway_error(codes.UNAUTHORIZED.code, f"unauthorized: {refused.detail}")
                return None if entry.notification else jsonrpc.error_response(entry.id, error)
            self._disconnected(entry, refused.disconnect, refused.detail)
            return None
        except ProtocolError as exc:
            self._disconnected(entry, exc.disconnect, str(exc))
            return None
        return None if entry.notification else jsonrpc.result_response(entry.id, result)

    def _disconnected(self, entry: Request, disconnect: Disconnect, detail: str) -> None:
        data = {"disconnect": disconnect.code, "reason": disconnect.reason}
        self.outbox.send(jsonrpc.encode(jsonrpc.error_response(entry.id, RpcError(jsonrpc.DISCONNECTED, detail, data))))
        self.outbox.close(disconnect)

    # methods

    async def auth(self, params: dict[str, Any]) -> Any:
        token = params["token"]
        if not isinstance(token, str) or not token:
            raise Failed(RpcError(jsonrpc.INVALID_PARAMS, "Invalid params: token must be a non-empty string"))
        if self.adapter.connected:
            raise Failed(jsonrpc.gateway_error(codes.BAD_REQUEST.code, "bad request: already authenticated"))
        reply = await self.adapter.connect(token)
        error = _native_error(reply)
        if error is not None:
            raise Failed(error)
        result = reply.result
        return {"client": result["client"], "user": self.adapter.user, "node": result.get("node", "")}

    async def subscribe(self, params: dict[str, Any], on_reply: Callable[[Reply], None] | None = None) -> Any:
        channel = _channel(params)
        since = params.get("since")
        position = None
        if since is not None:
            offset = since.get("offset") or 0 if isinstance(since, dict) else None
            if not isinstance(since, dict) or not isinstance(since.get("epoch"), str) or not _natural(offset):
                raise Failed(RpcError(jsonrpc.INVALID_PARAMS, "Invalid params: since must be {offset, epoch}"))
            position = StreamPosition(int(offset or 0), since["epoch"])
        token = params.get("token")
        command = cmd.Subscribe(channel, token=token if isinstance(token, str) else "", since=position)
        await self.native(command, on_reply)
        return channel

    async def unsubscribe(self, params: dict[str, Any]) -> Any:
        channel = params["subscription"]
        if not isinstance(channel, str) or not channel:
            raise Failed(RpcError(jsonrpc.INVALID_PARAMS, "Invalid params: subscription must be a string"))
        subscribed = channel in self.adapter.session.subscriptions
        await self.native(cmd.Unsubscribe(channel))
        return subscribed

    async def publish(self, params: dict[str, Any]) -> Any:
        channel = _channel(params)
        try:
            data = cmd.encode(json_frames.encode_data, params["data"])
        except Exception as exc:
            raise Failed(RpcError(jsonrpc.INVALID_PARAMS, f"Invalid params: {exc}")) from None
        return dict(await self.native(cmd.Publish(channel, data)))

    async def history(self, params: dict[str, Any]) -> Any:
        channel = _channel(params)
        limit = params.get("limit", 0)
        if not isinstance(limit, int) or isinstance(limit, bool):
            raise Failed(RpcError(jsonrpc.INVALID_PARAMS, "Invalid params: limit must be an integer"))
        result = await self.native(cmd.History(channel, limit=limit))
        publications = [jsonrpc.publication(channel, pub) for pub in result.get("publications", [])]
        return {"publications": publications, "offset": result.get("offset", 0), "epoch": result.get("epoch", "")}

    async def presence(self, params: dict[str, Any]) -> Any:
        result = await self.native(cmd.Presence(_channel(params)))
        return json_frames.presence_result(result.get("presence", {}))["presence"]

    async def rpc(self, params: dict[str, Any]) -> Any:
        method = params["method"]
        if not isinstance(method, str) or not method:
            raise Failed(RpcError(jsonrpc.INVALID_PARAMS, "Invalid params: method must be a string"))
        result = await self.native(cmd.Rpc(method, params.get("data")))
        return result.get("data")


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


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
    token = websocket.query_params.get("token", "")
    await serve_websocket(websocket, "jsonrpc", lambda connection: JsonRpcConnection(gateway, connection, token))
