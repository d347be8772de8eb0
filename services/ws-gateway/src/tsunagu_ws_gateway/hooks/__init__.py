"""The backend decides: Centrifugo-compatible proxy hooks.

Where a proxy is configured, the gateway asks the application's backend instead of deciding from token
claims: `connect` (a client without a token), `refresh` (an expiring connection, server side),
`subscribe`, `publish` and `sub_refresh` (per namespace), and `rpc` (methods without a route). The
requests and answers are Centrifugo's (proto/centrifugal/centrifugo/proxy.proto), over HTTP (JSON) or
gRPC (backends.py), so a backend written for Centrifugo answers unchanged.

An answer can refuse (`error`: an error reply with the backend's code; `disconnect`: the connection is
closed with its code), or allow and shape what happens: the user and its info, channels to subscribe
the client to, subscription info and data, a publication's new data and tags, expiry times. A backend
that gives no usable answer (down, slow, a bad answer) is never taken for a yes: the client is refused
with error 100 (temporary, so the SDK retries), or, where the proxy says `fallback: permissions`, the
namespace's own permissions decide as if no proxy were configured.

The hooks are steps of the core's one admission path (core/admission.py) and of the session's command
handling (core/session.py); every protocol that lets clients in or carries their commands goes through
them. Each call is timed and counted per hook (`tsunagu_gateway_proxy_*`) and traced, its trace context
passed to the backend.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from opentelemetry import trace
from prometheus_client import Counter, Histogram
from tsunagu_core.telemetry import inject_trace_headers, tracer

from tsunagu_ws_gateway.centrifugo import proxy_pb2 as pb
from tsunagu_ws_gateway.config import GatewaySettings, ProxyEndpoint
from tsunagu_ws_gateway.filters import TagsFilter, compile_filter
from tsunagu_ws_gateway.hooks.backends import Backend, BackendUnavailable, backend_for, http_client
from tsunagu_ws_gateway.protocol import codes
from tsunagu_ws_gateway.protocol.codes import Disconnect, ErrorCode, ProtocolError, ReplyError

log = logging.getLogger("tsunagu.gateway.hooks")
_tracer = tracer("tsunagu.gateway.hooks")

PROXY_SECONDS = Histogram(
    "tsunagu_gateway_proxy_seconds",
    "Time a backend took to answer a proxy hook",
    ["hook", "transport"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
PROXY_CALLS = Counter(
    "tsunagu_gateway_proxy_calls_total",
    "Proxy hook calls by outcome (ok, error, disconnect, unavailable, timeout)",
    ["hook", "transport", "outcome"],
)
PROXY_FALLBACKS = Counter(
    "tsunagu_gateway_proxy_fallbacks_total",
    "Proxy hook calls decided by the namespace's permissions because the backend could not be asked",
    ["hook"],
)


class HookError(ReplyError):
    """The backend refused with an error of its own (code and message as it gave them)."""

    def __init__(self, error: ErrorCode, temporary: bool = False) -> None:
        super().__init__(error)
        self.temporary = temporary


class HookUnavailable(ReplyError):
    """The backend could not be asked: error 100, temporary (the SDK retries)."""

    def __init__(self, hook: str, detail: str) -> None:
        super().__init__(codes.INTERNAL, f"the {hook} backend is unavailable: {detail}")
        self.temporary = True


@dataclass(frozen=True, slots=True)
class Caller:
    """The connection a hook asks about: the common part of every proxy request."""

    client: str
    transport: str  # "websocket"
    protocol: str  # the client's encoding: "json" or "protobuf"
    user: str = ""
    meta: bytes = b""  # from the connect answer (or the token's `meta` claim), sent with every later call
    handshake_headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names
    emulated_headers: Mapping[str, str] = field(default_factory=dict)  # the connect command's `headers`


@dataclass(frozen=True, slots=True)
class ConnectAttempt:
    """What a client sent with its connect command, for the connect hook."""

    data: bytes = b""
    name: str = ""
    version: str = ""
    channels: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class SubscriptionPreset:
    """What a backend decided about one subscription; None: the namespace's option stays."""

    info: bytes = b""
    data: bytes = b""
    expires_at: float | None = None
    presence: bool | None = None
    join_leave: bool | None = None
    recovery: bool | None = None
    positioning: bool | None = None
    server_tags_filter: TagsFilter | None = None


@dataclass(frozen=True, slots=True)
class ConnectVerdict:
    user: str
    expires_at: float | None
    info: bytes
    data: bytes
    meta: bytes
    subs: Mapping[str, SubscriptionPreset]


@dataclass(frozen=True, slots=True)
class RefreshVerdict:
    expired: bool
    expires_at: float | None
    info: bytes | None


@dataclass(frozen=True, slots=True)
class PublishVerdict:
    data: bytes
    skip_history: bool
    tags: Mapping[str, str]
    idempotency_key: str


def _is_json(data: bytes) -> bool:
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return True


def _raw(data: bytes, b64: str) -> bytes:
    """A payload of an answer: `data` (raw JSON) or, when set, `b64data` (base64)."""
    if b64:
        try:
            return base64.b64decode(b64, validate=True)
        except ValueError:
            raise BackendUnavailable("answered a b64 field that is not base64") from None
    return bytes(data)


def _expiry(expire_at: int) -> float | None:
    return float(expire_at) if expire_at > 0 else None


def _preset(options: Any) -> SubscriptionPreset:
    """A subscription preset of a SubscribeOptions (connect's subs) or SubscribeResult (subscribe)."""
    override: Any = options.override if options.HasField("override") else None

    def overridden(name: str) -> bool | None:
        if override is None or not override.HasField(name):
            return None
        return bool(getattr(override, name).value)

    tags_filter = None
    if options.HasField("server_tags_filter"):
        try:
            tags_filter = compile_filter(MessageToDict(options.server_tags_filter, preserving_proto_field_name=True))
        except ReplyError as exc:
            raise BackendUnavailable(f"answered a bad server_tags_filter ({exc.detail})") from None
    return SubscriptionPreset(
        info=_raw(options.info, options.b64info),
        data=_raw(options.data, options.b64data),
        expires_at=_expiry(options.expire_at),
        presence=overridden("presence"),
        join_leave=overridden("join_leave"),
        recovery=overridden("force_recovery"),
        positioning=overridden("force_positioning"),
        server_tags_filter=tags_filter,
    )


class Hooks:
    """Every proxy hook of one gateway, with the backends they call (one HTTP client, one gRPC channel
    per endpoint)."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.proxies: Mapping[str, ProxyEndpoint] = settings.proxies
        self.connect_proxy = settings.connect_proxy
        self.refresh_proxy = settings.refresh_proxy
        self.rpc_proxy = settings.rpc_proxy
        self._http = http_client() if settings.proxies else None
        self._backends: dict[str, Backend] = {}

    def _backend(self, name: str) -> Backend:
        backend = self._backends.get(name)
        if backend is None:
            assert self._http is not None
            backend = self._backends[name] = backend_for(self.proxies[name].endpoint, self._http)
        return backend

    async def close(self) -> None:
        for backend in self._backends.values():
            await backend.close()
        self._backends.clear()
        if self._http is not None:
            await self._http.aclose()

    # the calls

    def _headers(self, proxy: ProxyEndpoint, caller: Caller) -> dict[str, str]:
        headers = dict(proxy.static_headers)
        for name in proxy.emulated_headers:
            value = caller.emulated_headers.get(name.lower())
            if value is not None:
                headers[name.lower()] = value
        # A handshake header the client really sent wins over the same name in its connect command.
        for name in proxy.http_headers:
            value = caller.handshake_headers.get(name.lower())
            if value is not None:
                headers[name.lower()] = value
        return inject_trace_headers(headers)

    async def _ask(self, hook: str, name: str, method: str, request: Message, caller: Caller) -> Message:
        """The backend's answer, or HookError / ProtocolError for its refusals and BackendUnavailable."""
        proxy = self.proxies[name]
        backend = self._backend(name)
        started = time.perf_counter()
        with _tracer.start_as_current_span(f"proxy {hook}", kind=trace.SpanKind.CLIENT) as span:
            span.set_attribute("tsunagu.proxy.hook", hook)
            span.set_attribute("tsunagu.proxy.transport", backend.transport)
            span.set_attribute("tsunagu.client", caller.client)
            try:
                response = await backend.call(method, request, self._headers(proxy, caller), proxy.timeout)
            except BackendUnavailable as exc:
                outcome = "timeout" if exc.timeout else "unavailable"
                PROXY_CALLS.labels(hook, backend.transport, outcome).inc()
                span.set_status(trace.StatusCode.ERROR, str(exc))
                log.warning("%s proxy %r (%s): %s", hook, name, proxy.endpoint, exc)
                raise
            finally:
                PROXY_SECONDS.labels(hook, backend.transport).observe(time.perf_counter() - started)
            answer: Any = response
            if answer.HasField("disconnect"):
                PROXY_CALLS.labels(hook, backend.transport, "disconnect").inc()
                raise ProtocolError(
                    Disconnect(answer.disconnect.code, answer.disconnect.reason), "the backend disconnected"
                )
            if answer.HasField("error"):
                PROXY_CALLS.labels(hook, backend.transport, "error").inc()
                error = answer.error
                raise HookError(ErrorCode(error.code, error.message), temporary=error.temporary)
            if not answer.HasField("result"):
                # An empty answer is no yes: allowing is said with a `result`, even an empty one.
                PROXY_CALLS.labels(hook, backend.transport, "unavailable").inc()
                log.warning(
                    "%s proxy %r (%s) answered neither result, error nor disconnect", hook, name, proxy.endpoint
                )
                raise BackendUnavailable("answered neither result, error nor disconnect")
            PROXY_CALLS.labels(hook, backend.transport, "ok").inc()
            return response

    def _payload(self, name: str, data: bytes) -> dict[str, Any]:
        """`data` (JSON) or `b64data`, as the proxy's encoding and the payload allow."""
        if not data:
            return {}
        if self.proxies[name].binary_encoding or not _is_json(data):
            return {"b64data": base64.b64encode(data).decode()}
        return {"data": data}

    def _encoding(self, name: str) -> str:
        return "binary" if self.proxies[name].binary_encoding else "json"

    def _common(self, name: str, caller: Caller) -> dict[str, Any]:
        return {
            "client": caller.client,
            "transport": caller.transport,
            "protocol": caller.protocol,
            "encoding": self._encoding(name),
        }

    # connect and refresh

    async def connect(self, caller: Caller, attempt: ConnectAttempt) -> ConnectVerdict:
        name = self.connect_proxy
        request = pb.ConnectRequest(
            **self._common(name, caller),
            **self._payload(name, attempt.data),
            name=attempt.name,
            version=attempt.version,
            channels=list(attempt.channels),
        )
        try:
            response: Any = await self._ask("connect", name, "Connect", request, caller)
            result = response.result
            subs = {channel: SubscriptionPreset() for channel in result.channels}
            subs |= {channel: _preset(options) for channel, options in result.subs.items()}
            return ConnectVerdict(
                user=result.user,
                expires_at=_expiry(result.expire_at),
                info=_raw(result.info, result.b64info),
                data=_raw(result.data, result.b64data),
                meta=bytes(result.meta),
                subs=subs,
            )
        except BackendUnavailable as exc:
            raise HookUnavailable("connect", str(exc)) from None

    async def refresh(self, caller: Caller) -> RefreshVerdict:
        name = self.refresh_proxy
        request = pb.RefreshRequest(**self._common(name, caller), user=caller.user, meta=caller.meta)
        try:
            response: Any = await self._ask("refresh", name, "Refresh", request, caller)
            result = response.result
            info = _raw(result.info, result.b64info) if (result.info or result.b64info) else None
            return RefreshVerdict(result.expired, _expiry(result.expire_at), info)
        except BackendUnavailable as exc:
            raise HookUnavailable("refresh", str(exc)) from None

    # channels

    async def subscribe(self, name: str, caller: Caller, channel: str, data: bytes) -> SubscriptionPreset | None:
        """The backend's preset for the subscription; None: it could not be asked and the proxy falls back
        to the namespace's permissions."""
        request = pb.SubscribeRequest(
            **self._common(name, caller), **self._payload(name, data), user=caller.user, channel=channel,
            meta=caller.meta,
        )  # fmt: skip
        try:
            response: Any = await self._ask("subscribe", name, "Subscribe", request, caller)
            return _preset(response.result)
        except BackendUnavailable as exc:
            self._fall_back("subscribe", name, exc)
            return None

    async def publish(self, name: str, caller: Caller, channel: str, data: bytes) -> PublishVerdict | None:
        """What to publish (the backend may rewrite data and tags); None: fall back to the permissions."""
        request = pb.PublishRequest(
            **self._common(name, caller), **self._payload(name, data), user=caller.user, channel=channel,
            meta=caller.meta,
        )  # fmt: skip
        try:
            response: Any = await self._ask("publish", name, "Publish", request, caller)
            result = response.result
            rewritten = _raw(result.data, result.b64data)
            return PublishVerdict(
                data=rewritten or data,
                skip_history=result.skip_history,
                tags=dict(result.tags),
                idempotency_key=result.idempotency_key,
            )
        except BackendUnavailable as exc:
            self._fall_back("publish", name, exc)
            return None

    async def sub_refresh(self, name: str, caller: Caller, channel: str) -> RefreshVerdict:
        request = pb.SubRefreshRequest(
            **self._common(name, caller), user=caller.user, channel=channel, meta=caller.meta
        )
        try:
            response: Any = await self._ask("sub_refresh", name, "SubRefresh", request, caller)
            result = response.result
            info = _raw(result.info, result.b64info) if (result.info or result.b64info) else None
            return RefreshVerdict(result.expired, _expiry(result.expire_at), info)
        except BackendUnavailable as exc:
            raise HookUnavailable("sub_refresh", str(exc)) from None

    async def rpc(self, caller: Caller, method: str, data: bytes) -> bytes:
        name = self.rpc_proxy
        request = pb.RPCRequest(
            **self._common(name, caller), **self._payload(name, data), user=caller.user, method=method,
            meta=caller.meta,
        )  # fmt: skip
        try:
            response: Any = await self._ask("rpc", name, "RPC", request, caller)
            return _raw(response.result.data, response.result.b64data)
        except BackendUnavailable as exc:
            raise HookUnavailable("rpc", str(exc)) from None

    def _fall_back(self, hook: str, name: str, exc: BackendUnavailable) -> None:
        """Returns when the proxy falls back to the namespace's permissions; raises otherwise."""
        if self.proxies[name].fallback != "permissions":
            raise HookUnavailable(hook, str(exc)) from None
        PROXY_FALLBACKS.labels(hook).inc()
