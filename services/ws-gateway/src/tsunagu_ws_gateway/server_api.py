"""`POST /api/<method>`: the server API in the shape of Centrifugo's HTTP API, so `cent` and
existing backends publish without changes. Answers are HTTP 200 with `{"result": ...}` or
`{"error": {"code", "message"}}`, never a 500 (a field of the wrong type is error 107, a failure of ours
100); a wrong or missing `X-API-Key` (unless an allowed client certificate) is HTTP 401, a body over
`max_request_bytes` 413."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from tsunagu_core.broker import BrokerError, StreamPosition

from tsunagu_ws_gateway.certificates import api_certificate
from tsunagu_ws_gateway.core.commands import encode, position_of
from tsunagu_ws_gateway.core.gateway import Gateway
from tsunagu_ws_gateway.protocol import codes, json_frames
from tsunagu_ws_gateway.protocol.codes import ReplyError
from tsunagu_ws_gateway.transports.http import BodyTooLarge, read_body

log = logging.getLogger("tsunagu.gateway.server_api")

ApiMethod = Callable[[Gateway, dict[str, Any]], Awaitable[dict[str, Any]]]


def _channel(body: dict[str, Any]) -> str:
    channel = body.get("channel")
    if not isinstance(channel, str) or not channel:
        raise ReplyError(codes.BAD_REQUEST, "channel is required")
    return channel


def _user(body: dict[str, Any]) -> str:
    user = body.get("user")
    if not isinstance(user, str) or not user:
        raise ReplyError(codes.BAD_REQUEST, "user is required")
    return user


async def publish(gateway: Gateway, body: dict[str, Any]) -> dict[str, Any]:
    channel = _channel(body)
    options = gateway.policy.options(channel)
    if "data" not in body:
        raise ReplyError(codes.BAD_REQUEST, "data is required")
    key = body.get("idempotency_key")
    tags = body.get("tags") or {}
    if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
        raise ReplyError(codes.BAD_REQUEST, "tags must map strings to strings")
    if key is not None and (not isinstance(key, str) or len(key) > 128):
        raise ReplyError(codes.BAD_REQUEST, "idempotency_key must be a string of at most 128 characters")
    result = await gateway.broker.publish(
        channel,
        encode(json_frames.encode_data, body["data"]),
        options.publish_options(
            idempotency_key=f"api/{key}" if key else None,
            idempotency_ttl=gateway.settings.idempotency_ttl,
            keep_history=not body.get("skip_history"),
            tags=tags,
        ),
    )
    return {"offset": result.offset, "epoch": result.epoch} if result.offset else {}


async def broadcast(gateway: Gateway, body: dict[str, Any]) -> dict[str, Any]:
    channels = body.get("channels")
    if not isinstance(channels, list) or not channels:
        raise ReplyError(codes.BAD_REQUEST, "channels must be a non-empty list")
    responses = []
    for channel in channels:
        responses.append(await answer_call(publish, gateway, {**body, "channel": channel}))
    return {"responses": responses}


async def history(gateway: Gateway, body: dict[str, Any]) -> dict[str, Any]:
    channel = _channel(body)
    options = gateway.policy.options(channel)
    if options.history_size == 0:
        raise ReplyError(codes.NOT_AVAILABLE, "this channel keeps no history")
    limit = body.get("limit", 0)
    if not isinstance(limit, int) or isinstance(limit, bool):
        raise ReplyError(codes.BAD_REQUEST, "limit must be an integer")
    since = body.get("since")
    position: StreamPosition | None = position_of(since, "since") if since is not None else None
    limit = options.history_size if limit < 0 else min(limit, options.history_size)
    result = await gateway.broker.history(channel, since=position, limit=limit, reverse=bool(body.get("reverse")))
    return {
        "publications": [json_frames.publication(p) for p in result.publications],
        "epoch": result.position.epoch,
        "offset": result.position.offset,
    }


async def history_remove(gateway: Gateway, body: dict[str, Any]) -> dict[str, Any]:
    await gateway.broker.remove_history(_channel(body))
    return {}


async def presence(gateway: Gateway, body: dict[str, Any]) -> dict[str, Any]:
    channel = _channel(body)
    if not gateway.policy.options(channel).presence:
        raise ReplyError(codes.NOT_AVAILABLE, "presence is off in this namespace")
    return json_frames.presence_result(await gateway.broker.presence(channel))


async def presence_stats(gateway: Gateway, body: dict[str, Any]) -> dict[str, Any]:
    channel = _channel(body)
    if not gateway.policy.options(channel).presence:
        raise ReplyError(codes.NOT_AVAILABLE, "presence is off in this namespace")
    stats = await gateway.broker.presence_stats(channel)
    return {"num_clients": stats.num_clients, "num_users": stats.num_users}


async def disconnect(gateway: Gateway, body: dict[str, Any]) -> dict[str, Any]:
    command: dict[str, Any] = {"kind": "disconnect", "user": _user(body)}
    for field in ("client", "session"):
        if isinstance(body.get(field), str):
            command[field] = body[field]
    spec = body.get("disconnect") or {}
    if not isinstance(spec, dict):
        raise ReplyError(codes.BAD_REQUEST, "disconnect must be an object {code, reason}")
    code, reason = spec.get("code", codes.FORCE_DISCONNECT.code), spec.get("reason", codes.FORCE_DISCONNECT.reason)
    if not isinstance(code, int) or isinstance(code, bool) or not 3000 <= code < 5000 or not isinstance(reason, str):
        raise ReplyError(codes.BAD_REQUEST, "disconnect.code must be an integer from 3000 to 4999, reason a string")
    command["code"], command["reason"] = code, reason[:120]
    await gateway.node.broadcast_control(command)
    return {}


async def unsubscribe(gateway: Gateway, body: dict[str, Any]) -> dict[str, Any]:
    command = {"kind": "unsubscribe", "user": _user(body), "channel": _channel(body)}
    if isinstance(body.get("client"), str):
        command["client"] = body["client"]
    await gateway.node.broadcast_control(command)
    return {}


async def subscribe(gateway: Gateway, body: dict[str, Any]) -> dict[str, Any]:
    channel = _channel(body)
    gateway.policy.options(channel)
    command = {"kind": "subscribe", "user": _user(body), "channel": channel}
    if isinstance(body.get("client"), str):
        command["client"] = body["client"]
    await gateway.node.broadcast_control(command)
    return {}


async def channels(gateway: Gateway, body: dict[str, Any]) -> dict[str, Any]:
    """Channels with subscribers on this node (numbers per channel)."""
    pattern = body.get("pattern") or ""
    if not isinstance(pattern, str):
        raise ReplyError(codes.BAD_REQUEST, "pattern must be a string")
    found = {
        name: {"num_clients": len(state.subscribers)}
        for name, state in gateway.node.channels.items()
        if not name.startswith("__tsunagu") and (not pattern or _match(pattern, name))
    }
    return {"channels": found}


def _match(pattern: str, name: str) -> bool:
    import fnmatch

    return fnmatch.fnmatchcase(name, pattern)


async def info(gateway: Gateway, body: dict[str, Any]) -> dict[str, Any]:
    node = gateway.node
    nodes = {node.id: node.heartbeat()} | dict(node.nodes)
    return {
        "nodes": [
            {
                "uid": node_id,
                "name": data.get("name", ""),
                "num_clients": data.get("num_clients", 0),
                "num_users": data.get("num_users", 0),
                "num_channels": data.get("num_channels", 0),
                "num_subs": data.get("num_subs", 0),
            }
            for node_id, data in nodes.items()
        ]
    }


METHODS: dict[str, ApiMethod] = {
    "publish": publish,
    "broadcast": broadcast,
    "history": history,
    "history_remove": history_remove,
    "presence": presence,
    "presence_stats": presence_stats,
    "disconnect": disconnect,
    "unsubscribe": unsubscribe,
    "subscribe": subscribe,
    "channels": channels,
    "info": info,
}


async def answer_call(method: ApiMethod, gateway: Gateway, body: dict[str, Any]) -> dict[str, Any]:
    try:
        return {"result": await method(gateway, body)}
    except ReplyError as exc:
        message = f"{exc.error.message}: {exc.detail}" if exc.detail else exc.error.message
        return {"error": {"code": exc.error.code, "message": message}}
    except BrokerError as exc:
        return {"error": {"code": codes.INTERNAL.code, "message": str(exc)}}
    except Exception:
        log.exception("server API call failed")
        return {"error": {"code": codes.INTERNAL.code, "message": codes.INTERNAL.message}}


async def batch(gateway: Gateway, body: dict[str, Any]) -> dict[str, Any]:
    commands = body.get("requests") or body.get("commands")
    if not isinstance(commands, list):
        raise ReplyError(codes.BAD_REQUEST, "requests must be a list")
    replies = []
    for command in commands:
        if not isinstance(command, dict) or len(command) != 1:
            replies.append({"error": {"code": codes.BAD_REQUEST.code, "message": "one method per request"}})
            continue
        ((name, params),) = command.items()
        method = METHODS.get(name)
        if method is None or not isinstance(params, dict):
            replies.append({"error": {"code": codes.METHOD_NOT_FOUND.code, "message": f"unknown method {name!r}"}})
            continue
        answer = await answer_call(method, gateway, params)
        # Each batch reply carries its result under the method's name, as Centrifugo's batch does.
        replies.append({name: answer["result"]} if "result" in answer else answer)
    return {"replies": replies}


def build_router() -> APIRouter:
    router = APIRouter(prefix="/api", tags=["server api"])

    @router.post("/{method}")
    async def call(method: str, request: Request) -> Response:
        gateway: Gateway = request.app.state.gateway
        api_key = gateway.settings.api_key
        if not api_key and not gateway.settings.api_client_certs:
            return JSONResponse(
                {"error": "the server API is off: set TSUNAGU_GATEWAY_API_KEY (or _API_CLIENT_CERTS)"}, status_code=503
            )
        given = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("apikey ")
        # Both non-empty: compare_digest(b"", b"") is true, and a gateway without a key must not open
        # the API to a request without one. A backend with an allowed client certificate needs no key.
        keyed = bool(api_key) and bool(given) and hmac.compare_digest(given.encode(), api_key.encode())
        if not keyed and not api_certificate(gateway.settings, request.scope):
            return JSONResponse({"error": "missing or wrong X-API-Key"}, status_code=401)
        try:
            body = orjson.loads(await read_body(request, gateway.settings.max_request_bytes) or b"{}")
        except BodyTooLarge as exc:
            return JSONResponse({"error": str(exc)}, status_code=413)
        except orjson.JSONDecodeError as exc:
            return JSONResponse({"error": f"body is not JSON: {exc}"}, status_code=400)
        if not isinstance(body, dict):
            return JSONResponse({"error": "body must be a JSON object"}, status_code=400)
        if method == "batch":
            answer = await answer_call(batch, gateway, body)
            return Response(orjson.dumps(answer.get("result", answer)), media_type="application/json")
        handler = METHODS.get(method)
        if handler is None:
            return JSONResponse({"error": f"unknown method {method!r}"}, status_code=404)
        return Response(orjson.dumps(await answer_call(handler, gateway, body)), media_type="application/json")

    return router
