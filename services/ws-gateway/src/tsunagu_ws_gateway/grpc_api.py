"""The server API over gRPC: Centrifugo's `CentrifugoApi` service (proto/centrifugal/centrifugo/api.proto),
so `cent`-style gRPC clients generated from Centrifugo's file call the gateway unchanged.

Each call is the HTTP API's method (server_api.py) on the same gateway: the request message is read as the
JSON body Centrifugo's HTTP API takes (payloads in `bytes` fields are raw JSON), the answer written back
into the response message. The cluster-wide commands (disconnect, unsubscribe, subscribe) go over the
broker's control channel, so they reach the connection on whichever replica holds it. The key is the HTTP
API's, in `authorization: apikey <KEY>` metadata, as Centrifugo's gRPC API takes it; a call without it
is UNAUTHENTICATED."""

from __future__ import annotations

import base64
import hmac
import logging
from typing import Any

import grpc
import orjson
from google.protobuf.message import Message

from tsunagu_ws_gateway.centrifugo import api_pb2, json_map
from tsunagu_ws_gateway.centrifugo.grpc_services import Handler, generic_handler, message_class, unary_methods
from tsunagu_ws_gateway.core.gateway import Gateway
from tsunagu_ws_gateway.protocol import codes
from tsunagu_ws_gateway.server_api import METHODS, ApiMethod, answer_call, batch

log = logging.getLogger("tsunagu.gateway.grpc_api")

API_SERVICE = api_pb2.DESCRIPTOR.services_by_name["CentrifugoApi"]
# gRPC method name -> the HTTP API's method.
SERVED: dict[str, ApiMethod] = {
    "Publish": METHODS["publish"],
    "Broadcast": METHODS["broadcast"],
    "Subscribe": METHODS["subscribe"],
    "Unsubscribe": METHODS["unsubscribe"],
    "Disconnect": METHODS["disconnect"],
    "Presence": METHODS["presence"],
    "PresenceStats": METHODS["presence_stats"],
    "History": METHODS["history"],
    "HistoryRemove": METHODS["history_remove"],
    "Channels": METHODS["channels"],
    "Info": METHODS["info"],
    "Batch": batch,
}


def _body(request: Message) -> dict[str, Any]:
    """The request as the HTTP API's JSON body: `b64data` becomes `data` when it holds JSON."""
    fields = json_map.to_json(request)
    if "b64data" in fields:
        try:
            fields["data"] = orjson.Fragment(base64.b64decode(fields.pop("b64data"), validate=True))
        except ValueError:
            raise _BadRequest("b64data is not base64") from None
    try:
        body: dict[str, Any] = orjson.loads(orjson.dumps(fields))
    except orjson.JSONDecodeError:
        raise _BadRequest(
            "data must be JSON (the HTTP API's payloads; b64data for other bytes is not served)"
        ) from None
    return body


class _BadRequest(Exception):
    pass


def _authorized(gateway: Gateway, context: grpc.aio.ServicerContext) -> bool:
    key = gateway.settings.api_key
    given = dict(context.invocation_metadata() or ()).get("authorization", "")
    given = given.removeprefix("apikey ") if isinstance(given, str) else ""
    return bool(key) and bool(given) and hmac.compare_digest(given.encode(), key.encode())


def _handler(gateway: Gateway, name: str, method: ApiMethod) -> Handler:
    response_class = message_class(unary_methods(API_SERVICE)[name].output_type)

    async def call(request: Message, context: grpc.aio.ServicerContext) -> Message:
        if not _authorized(gateway, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong `authorization: apikey <KEY>`")
        try:
            reply = await answer_call(method, gateway, _body(request))
        except _BadRequest as exc:
            reply = {"error": {"code": codes.BAD_REQUEST.code, "message": f"{codes.BAD_REQUEST.message}: {exc}"}}
        if name == "Batch":
            reply = reply.get("result", reply)
        # The results hold JSON fragments (publications' data, client infos): rendered, then read back.
        plain = orjson.loads(orjson.dumps(reply))
        return json_map.from_json(plain, response_class())

    return call


async def start(gateway: Gateway, host: str, port: int) -> grpc.aio.Server:
    server = grpc.aio.server()
    handlers = {name: _handler(gateway, name, method) for name, method in SERVED.items()}
    server.add_generic_rpc_handlers((generic_handler(API_SERVICE, handlers),))
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    log.info("gRPC server API on %s:%d", host, port)
    return server
