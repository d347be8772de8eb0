"""JSON-RPC 2.0 (https://www.jsonrpc.org/specification), sans I/O: messages in, requests out, and
responses, errors and notifications back as bytes. Nothing here raises on client input: malformed
input becomes an error response (-32700 parse error, -32600 invalid request, -32602 invalid params).

Gateway errors (the native protocol's codes, docs/protocol.md) map into the range the specification
leaves to servers: native 100..199 -> -32000 - (code - 100), native 400..499 -> -32000 - (code - 400)
(so 103 permission denied is -32003 and 441 bad signature is -32041); `data.code` carries the native
code. A connection ended by the server (bad token, too many requests) is -32099 with `data.disconnect`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
from tsunagu_core.broker import Publication

from tsunagu_ws_gateway.protocol import json_frames

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
DISCONNECTED = -32099

NOTIFICATION_METHOD = "subscription"


@dataclass(frozen=True, slots=True)
class RpcError:
    code: int
    message: str
    data: Any = None


@dataclass(slots=True)
class Request:
    """A well-formed request; `notification` requests (no id) get no response."""

    method: str
    params: list[Any] | dict[str, Any] = field(default_factory=dict)
    id: Any = None
    notification: bool = False


@dataclass(slots=True)
class Invalid:
    """An entry that is not a request: answered with `error` (id null unless one could be read)."""

    error: RpcError
    id: Any = None


@dataclass(slots=True)
class Message:
    entries: list[Request | Invalid]
    batch: bool


def _valid_id(value: Any) -> bool:
    return value is None or isinstance(value, str) or (isinstance(value, int | float) and not isinstance(value, bool))


def _entry(value: Any) -> Request | Invalid:
    if not isinstance(value, dict):
        return Invalid(RpcError(INVALID_REQUEST, "Invalid Request: a request must be a JSON object"))
    request_id = value.get("id")
    if not _valid_id(request_id):
        return Invalid(RpcError(INVALID_REQUEST, "Invalid Request: id must be a string, a number or null"))
    if value.get("jsonrpc") != "2.0":
        return Invalid(RpcError(INVALID_REQUEST, 'Invalid Request: "jsonrpc" must be "2.0"'), request_id)
    method = value.get("method")
    if not isinstance(method, str) or not method:
        return Invalid(RpcError(INVALID_REQUEST, "Invalid Request: method must be a non-empty string"), request_id)
    params = value.get("params", {})
    if not isinstance(params, list | dict):
        return Invalid(RpcError(INVALID_REQUEST, "Invalid Request: params must be an array or an object"), request_id)
    return Request(method=method, params=params, id=request_id, notification="id" not in value)


def decode(message: bytes | str, max_batch: int) -> Message | RpcError:
    """One WebSocket message: a request or a batch of them, or the error that answers it as a whole."""
    try:
        value = orjson.loads(message)
    except orjson.JSONDecodeError as exc:
        return RpcError(PARSE_ERROR, f"Parse error: {exc}")
    if isinstance(value, list):
        if not value:
            return RpcError(INVALID_REQUEST, "Invalid Request: empty batch")
        if len(value) > max_batch:
            return RpcError(INVALID_REQUEST, f"Invalid Request: more than {max_batch} requests in one batch")
        return Message([_entry(item) for item in value], batch=True)
    return Message([_entry(value)], batch=False)


def params_of(request: Request, names: tuple[str, ...], required: int) -> dict[str, Any] | RpcError:
    """The params by name (an object, or an array in the order of `names`); the first `required` are needed."""
    params = request.params
    if isinstance(params, list):
        if len(params) > len(names):
            return RpcError(INVALID_PARAMS, f"Invalid params: {request.method} takes at most {len(names)}")
        named = dict(zip(names, params, strict=False))
    else:
        unknown = sorted(set(params) - set(names))
        if unknown:
            return RpcError(INVALID_PARAMS, f"Invalid params: unknown {', '.join(unknown)}")
        named = dict(params)
    missing = [name for name in names[:required] if name not in named]
    if missing:
        return RpcError(INVALID_PARAMS, f"Invalid params: {request.method} needs {', '.join(missing)}")
    return named


def gateway_error(native_code: int, message: str) -> RpcError:
    """A native error reply as a JSON-RPC server error (see the module docstring)."""
    offset = native_code % 100 if native_code >= 100 else 0
    return RpcError(-32000 - offset, message, {"code": native_code})


def result_response(request_id: Any, result: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "result": result}


def error_response(request_id: Any, error: RpcError) -> dict[str, Any]:
    body: dict[str, Any] = {"code": error.code, "message": error.message}
    if error.data is not None:
        body["data"] = error.data
    return {"jsonrpc": "2.0", "id": request_id, "error": body}


def encode(value: Any) -> bytes:
    """A response, a batch of them, or a notification; embeds orjson fragments (publication data)."""
    return orjson.dumps(value)


def notification(method: str, params: Any) -> bytes:
    return orjson.dumps({"jsonrpc": "2.0", "method": method, "params": params})


def publication(channel: str, pub: Publication) -> dict[str, Any]:
    return {"channel": channel, "offset": pub.offset, "data": json_frames.json_data(pub.data)}


def publication_notification(channel: str, pub: Publication) -> bytes:
    """A publication for every JSON-RPC subscriber of the channel: the subscription id is the channel,
    so the same bytes serve them all."""
    return notification(NOTIFICATION_METHOD, {"subscription": channel, "result": publication(channel, pub)})
