"""Gateway settings (`TSUNAGU_GATEWAY_*`), including per-namespace channel options."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict
from tsunagu_core.broker import ClientInfo, PublishOptions
from tsunagu_core.config import ServiceSettings

# Who may do something in a namespace: nobody, anyone (also without a token), any user with a valid
# token, or only users whose token's `channels` claim has a pattern matching the channel.
Access = Literal["none", "anonymous", "authenticated", "claim"]


class CertificateIdentity(BaseModel):
    """Who a client certificate stands for (client-certificate authentication instead of a JWT)."""

    model_config = {"extra": "forbid"}

    match: str = Field(min_length=1, description="glob over the certificate's names, e.g. `device-*`")
    user: str = Field("{name}", min_length=1)
    channels: list[str] = Field(default_factory=list)


class RpcRoute(BaseModel):
    """One client RPC method: where it goes and who may call it."""

    model_config = {"extra": "forbid"}

    url: str = Field(min_length=1, description="the backend endpoint the call is POSTed to, as is")
    # Who may call it: anyone, any authenticated user, or users whose token's `channels` claim matches
    # `rpc:<method>` ("claim", the default), or nobody.
    allow: Access = "claim"
    # A channel template filled from the call's data (`mqtt:{topic}`): the caller must also be allowed to
    # publish to it, as if it published there.
    publish_to: str = ""

    @model_validator(mode="before")
    @classmethod
    def _not_a_bare_url(cls, value: Any) -> Any:
        if isinstance(value, str):
            # The shape before the allow-list (method -> URL): say what replaces it instead of a type error.
            raise ValueError(f'a route is an object now, e.g. {{"url": "{value}", "allow": "claim"}}, not a bare URL')
        return value


class ProxyEndpoint(BaseModel):
    """A backend the gateway asks before it decides (a proxy, in Centrifugo's words): Centrifugo's proxy
    requests as JSON POSTed to an `http(s)://` URL, or as calls of its `CentrifugoProxy` gRPC service at
    `grpc://host:port` (proto/centrifugal/centrifugo/proxy.proto), so existing backends answer unchanged."""

    model_config = {"extra": "forbid"}

    endpoint: str = Field(pattern=r"^(https?|grpc)://", description="`http(s)://...` (JSON) or `grpc://host:port`")
    timeout: float = Field(1.0, gt=0, le=60, description="seconds the backend may take; past it, the fallback")
    # Headers of the client's WebSocket handshake passed on (HTTP headers, or gRPC metadata), by name.
    http_headers: list[str] = Field(default_factory=list)
    # Headers a client put in its connect command's `headers` (browsers cannot set handshake headers):
    # client-controlled, so passed on only when named here.
    emulated_headers: list[str] = Field(default_factory=list)
    # Sent with every call (a credential of the gateway towards the backend, for instance).
    static_headers: dict[str, str] = Field(default_factory=dict)
    # Payloads as `b64data` (base64) instead of `data` (JSON); payloads that are not JSON always go as b64data.
    binary_encoding: bool = False
    # When the backend cannot be asked (down, slow, an answer that is not one): "refuse" the client
    # (error 100, temporary: the SDK retries), or, for subscribe and publish, decide by the namespace's
    # own permissions ("permissions": the token's claims, as without a proxy). Never "let in".
    fallback: Literal["refuse", "permissions"] = "refuse"

    @property
    def transport(self) -> str:
        return "grpc" if self.endpoint.startswith("grpc://") else "http"


WebhookEvent = Literal["connect", "disconnect", "subscribe", "unsubscribe", "document_changed"]


class WebhookEndpoint(BaseModel):
    """An HTTP endpoint of the application that gets the platform's events (webhooks.py)."""

    model_config = {"extra": "forbid"}

    url: str = Field(pattern=r"^https?://")
    events: list[WebhookEvent] = Field(min_length=1)
    # Standard Webhooks secrets (`whsec_<base64>`); several during a rotation, each signs every delivery.
    secrets: list[str] = Field(min_length=1)
    timeout: float = Field(5.0, gt=0, le=60)
    first_backoff: float = Field(0.5, gt=0, le=60)
    max_backoff: float = Field(30.0, gt=0, le=3600)
    # Past this many seconds after the event, an undelivered one goes to the dead-letter topic.
    retry_for: float = Field(3600.0, gt=0)

    @field_validator("secrets")
    @classmethod
    def _secrets_are_keys(cls, value: list[str]) -> list[str]:
        from standardwebhooks import Webhook

        for secret in value:
            try:
                Webhook(secret)
            except Exception as exc:  # binascii.Error, EmptyWebhookSecretError
                raise ValueError(f"a webhook secret must be `whsec_` and base64 ({type(exc).__name__})") from None
        return value


class ChannelOptions(BaseModel):
    model_config = {"extra": "forbid", "populate_by_name": True}

    allow_subscribe: Access = "claim"
    allow_publish: Access = "claim"
    allow_history: Access = "claim"
    allow_presence: Access = "claim"
    history_size: int = Field(100, ge=0, le=100_000)
    history_ttl: float = Field(600.0, ge=0)
    # Every subscriber is recoverable (Centrifugo's `force_recovery`, also accepted under that name).
    recovery: bool = Field(True, validation_alias=AliasChoices("recovery", "force_recovery"))
    # "stream": a recovering subscriber gets every publication it missed; "cache": only the latest one
    # (the channel holds a state, each publication replacing the last).
    recovery_mode: Literal["stream", "cache"] = "stream"
    # Subscribers get the stream position (offset, epoch) without recovering.
    force_positioning: bool = False
    # A client may ask for positioning or recovery itself (the SDKs' `positioned`/`recoverable` options);
    # a client allowed to read the channel's history may anyway, as in Centrifugo.
    allow_positioning: bool = False
    allow_recovery: bool = False
    # Subscribers may filter publications by their tags (the SDKs' `tagsFilter`).
    allow_tags_filter: bool = False
    # Delta formats subscribers may ask for (the SDKs' `delta: "fossil"`): each publication then reaches
    # them as a fossil delta against the previous one they got, the first after subscribing in full.
    allowed_delta_types: list[Literal["fossil"]] = Field(default_factory=list)
    presence: bool = False
    join_leave: bool = False
    # Backends that decide instead of the permissions above (names in TSUNAGU_GATEWAY_PROXIES).
    subscribe_proxy: str = ""
    publish_proxy: str = ""
    sub_refresh_proxy: str = ""
    # Publications must be signed by the publisher's registered Ed25519 key (docs/protocol.md).
    signed: bool = False
    # Client publications go to this forwarder (forwarding.py: "sim-input", "mqtt-command") as events
    # on Kafka for a service, instead of to subscribers.
    forward: Literal["", "sim-input", "mqtt-command"] = ""
    # Every publication is recorded in the audit log (Kafka `tsunagu.audit`), with its signature if any.
    audit: bool = False
    # Every channel names its users after `#` (`webrtc:call-7#ann,bob`): one that does not is refused (103),
    # so nobody but the parties can read or write it (WebRTC signaling).
    user_limited: bool = False
    # Clients may publish here themselves; off for channels a service writes (collab's documents, where
    # allow_publish is the permission to write the document through /collab, not to publish raw).
    client_publish: bool = True
    # Step-up: subscribe, publish, history and presence need a token whose `acr` is at least this (auth:
    # 2 after a one-time code, 3 after a passkey); a connection refreshed with a stronger token continues.
    min_acr: int = Field(0, ge=0, le=3)

    @property
    def meta_ttl(self) -> float:
        """How long a stream's position outlives its history, so a late recovery still learns it missed some."""
        return max(86400.0, self.history_ttl * 10)

    def publish_options(
        self,
        *,
        idempotency_key: str | None,
        idempotency_ttl: float,
        keep_history: bool = True,
        info: ClientInfo | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> PublishOptions:
        return PublishOptions(
            history_size=self.history_size if keep_history else 0,
            history_ttl=self.history_ttl,
            meta_ttl=self.meta_ttl,
            idempotency_key=idempotency_key,
            idempotency_ttl=idempotency_ttl,
            info=info,
            tags=dict(tags or {}),
        )


DEFAULT_NAMESPACES: dict[str, ChannelOptions] = {
    # Channels without a namespace, e.g. "news".
    "": ChannelOptions(),
    "chat": ChannelOptions(presence=True, join_leave=True),
    # Kafka feeds from stream-ingest; subscribers may take fossil deltas (a feed's records look alike).
    "stream": ChannelOptions(allow_publish="none", history_size=10, history_ttl=300, allowed_delta_types=["fossil"]),
    # Device telemetry from mqtt-bridge; a client publish is a command to the device (mqtt-bridge).
    "mqtt": ChannelOptions(history_size=10, history_ttl=300, forward="mqtt-command"),
    # Room state from sim-engine; clients publish inputs to sim:<room>.input for the engine.
    "sim": ChannelOptions(history_size=0, recovery=False, forward="sim-input", allowed_delta_types=["fossil"]),
    # Yjs documents at /collab/{doc}: read = may subscribe, write = may publish to collab:{doc}.
    "collab": ChannelOptions(history_size=1000, history_ttl=3600, client_publish=False),
    # Services' answers to one user's forwarded requests: replies:<kind>#<user>.
    "replies": ChannelOptions(allow_subscribe="authenticated", allow_publish="none", history_size=100, history_ttl=300),
    # Each user's own notices from auth (a new login, a new factor, an ended session): user:#<user>.
    "user": ChannelOptions(allow_subscribe="authenticated", allow_publish="none", history_size=50, history_ttl=86400),
    # Finance/medical records: every publication signed by its author and kept in the audit log.
    "ledger": ChannelOptions(signed=True, audit=True),
    # Socket.IO rooms at /socket.io/ (socketio_namespace): room "lobby" is channel "sio:lobby".
    "sio": ChannelOptions(),
    # WebRTC signaling between the users a channel names (docs/webrtc.md): offers, answers and ICE candidates
    # kept a minute, so a party that subscribes late still gets what was sent before.
    "webrtc": ChannelOptions(
        allow_subscribe="authenticated",
        allow_publish="authenticated",
        allow_history="authenticated",
        history_size=100,
        history_ttl=60,
        user_limited=True,
    ),
    # Ephemeral signals such as typing indicators: nothing kept, nothing to recover.
    "typing": ChannelOptions(history_size=0, recovery=False),
    # HL7 v2 messages received by stream-ingest's MLLP listener, by type and patient or location.
    "hl7": ChannelOptions(allow_publish="none", history_size=1000, history_ttl=86400),
    # FHIR subscription notifications, one channel per subscription id (fhir/ endpoints relay them).
    "fhir": ChannelOptions(allow_publish="none", history_size=1000, history_ttl=86400),
}


# What the demo web app shows; the channels match the embedded demo feeds (stream-ingest, sim-engine) and
# `tsunagu run`'s demo devices (a thermostat answering `mqtt.request` on its command topic, a rover).
WEB_DEMO: dict[str, Any] = {
    "chat_rooms": ["chat:lobby", "chat:random"],
    "typing_prefix": "typing:",
    "editor_doc": "demo",
    "ticker_prefix": "stream:demo.ticker.",
    "ticker_symbols": ["TSU", "NGU", "KFK"],
    "iot_channels": ["mqtt:demo/telemetry"],
    "device": {
        "name": "demo-thermostat",
        "command_topic": "demo/thermostat/set",
        "state_channel": "mqtt:demo/thermostat/state",
    },
    "world_room": "world",
    # `tsunagu run`'s demo rover (a `tsunagu device-agent`): the Device view calls it over WebRTC.
    "devices": [
        {
            "device": "demo-rover",
            "command_topic": "demo/rover/set",
            "telemetry_topic": "demo/rover/telemetry",
            "ack_topic": "demo/rover/acks",
        }
    ],
}


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TSUNAGU_GATEWAY_", extra="ignore")

    port: int = Field(8080, ge=1, le=65535, description="TCP port to listen on.")
    workers: Annotated[int, Field(ge=0, le=256)] | Literal["auto"] = Field(
        1,
        description="Processes of `tsunagu serve ws-gateway` sharing its port (SO_REUSEPORT; `--workers` overrides):"
        " `auto` or 0 is one per CPU this container may use (affinity, cgroup `cpu.max`). More than 1 needs"
        " `TSUNAGU_BROKER=redis`; `/metrics` then has every worker's series with a `worker` label and `/readyz` is"
        " ready when every worker is (docs/deploy.md).",
    )
    token_hmac_secret: str = Field(
        "", description="HS256 secret for connection and subscription tokens (development; auth's JWKS later)."
    )
    token_public_key: str = Field(
        "", description="PEM public key (RSA or Ed25519) that verifies tokens signed by auth."
    )
    token_jwks_url: str = Field(
        "", description="auth's JWKS URL (`http://auth:8081/.well-known/jwks.json`): verify tokens by their `kid`."
    )
    token_audience: str = Field("", description="Required `aud` claim of tokens; empty: not checked.")
    token_issuer: str = Field("", description="Required `iss` claim of tokens (auth's issuer); empty: not checked.")
    token_allow_no_exp: bool = Field(
        False, description="Accept tokens without `exp` (they never expire); off: `exp` is required."
    )
    token_jwks_refresh_interval: float = Field(
        300.0,
        gt=0,
        le=86400,
        description="Seconds after which the JWKS is fetched again: a key removed there stops working.",
    )
    allow_anonymous: bool = Field(False, description="Accept connections without a token (user id empty).")
    client_cert_identities: list[CertificateIdentity] = Field(
        default_factory=list,
        description='JSON list of `{"match", "user", "channels"}`: a client connecting over TLS with a certificate'
        " from `TSUNAGU_SERVER_TLS_CLIENT_CA_FILE` and no token is this user when `match` (a glob) matches one of"
        " the certificate's names (URI SANs, DNS SANs, CN); `{name}` in `user` and `channels` is that name.",
    )
    api_client_certs: list[str] = Field(
        default_factory=list,
        description="JSON list of globs: backends whose client certificate has a matching name may call the server"
        " API without `X-API-Key`.",
    )
    api_key: str = Field("", description="`X-API-Key` of the server API at `/api/*`; empty: the API is off.")
    namespaces: dict[str, ChannelOptions] = Field(
        default_factory=lambda: dict(DEFAULT_NAMESPACES),
        description='JSON object: namespace name (`""` for none) to channel options; see docs/protocol.md.',
    )
    ping_interval: float = Field(25.0, gt=0, le=600, description="Seconds between server pings.")
    pong_timeout: float = Field(10.0, gt=0, le=600, description="Seconds to wait for a pong before closing (3012).")
    connect_timeout: float = Field(10.0, gt=0, le=600, description="Seconds a socket may stay without connecting.")
    max_frame_bytes: int = Field(65536, ge=256, description="Largest client frame; larger closes with 1009.")
    max_commands_per_frame: int = Field(
        256,
        ge=2,
        description="Commands carried out from one frame; those after them get error 111. Stock SDKs send connect"
        " and every subscription made before it in one frame, so this must exceed `MAX_CHANNELS_PER_CLIENT`.",
    )
    send_buffer_bytes: int = Field(
        2 * 1024 * 1024, ge=1024, description="Bytes queued for one client before it is disconnected as slow (3008)."
    )
    max_channels_per_client: int = Field(128, ge=1, description="Subscriptions one connection may hold (106).")
    ws_per_message_deflate: bool = Field(
        True,
        description="Negotiate permessage-deflate with WebSocket clients that offer it (no server context"
        " takeover, window bits as `WS_DEFLATE_WINDOW_BITS` both ways; a client that cannot be told its window"
        " size gets no compression). Off: no WebSocket is compressed.",
    )
    ws_deflate_window_bits: int = Field(
        12,
        ge=9,
        le=15,
        description="permessage-deflate window, 2^N bytes: the largest the gateway compresses with and the"
        " largest it lets a client compress with (`client_max_window_bits`), which bounds the decompressor"
        " each compressing client keeps (docs/protocol.md#compression).",
    )
    http_stream_gzip: bool = Field(
        True,
        description="gzip uni_sse and uni_http_stream responses for clients whose `Accept-Encoding` takes it"
        " (browsers, `curl --compressed`): one compressor per stream, flushed after every write.",
    )
    sse_retry_ms: int = Field(
        0,
        ge=0,
        le=3_600_000,
        description="The `retry:` field uni_sse streams begin with: milliseconds an EventSource waits before it"
        " reconnects after its stream ends. 0: not sent (the browser's own default, ~3 s).",
    )
    commands_per_second: float = Field(
        200.0,
        gt=0,
        description="Sustained commands per second per connection (burst: 2 s worth); commands over it get error"
        " 111, and a client that goes on sending a burst's worth more is disconnected with 3013.",
    )
    allowed_origins: list[str] = Field(
        default_factory=list,
        description="JSON list of `Origin` values (globs: `https://*.example.com`, `*` for any) browsers may"
        " connect from, on every transport; empty: the gateway's own origin only. Clients without `Origin`"
        " (not browsers) are not affected.",
    )
    max_connections: int = Field(
        50_000, ge=0, description="Open client sockets on one node; more are refused (HTTP 503). 0: no limit."
    )
    max_connections_per_ip: int = Field(
        1_000, ge=0, description="Open client sockets from one IP address (HTTP 429 beyond). 0: no limit."
    )
    connect_rate: float = Field(
        2_000.0,
        ge=0,
        description="Connects admitted per second by one gateway process, any protocol (token bucket); one over"
        " it is shed before its credential is checked: closed with 3013 (reconnect later), which stock SDKs answer"
        " by reconnecting with backoff. Counted in `tsunagu_gateway_connects_shed_total`. 0: no limit.",
    )
    connect_burst: int = Field(
        2_000, ge=1, description="Connects admitted at once above `CONNECT_RATE` (the token bucket's size)."
    )
    max_connections_per_user: int = Field(
        100, ge=0, description="Connections of one user on one node, any protocol (3504 beyond). 0: no limit."
    )
    max_request_bytes: int = Field(
        1024 * 1024, ge=1024, description="Largest HTTP request body of the server API and GraphQL (413 beyond)."
    )
    collab_max_message_bytes: int = Field(
        2 * 1024 * 1024, ge=1024, description="Largest y-websocket message on `/collab` (4413 beyond)."
    )
    collab_max_documents_per_connection: int = Field(
        64, ge=1, description="Documents one Hocuspocus socket on `/collab` may have open (more are refused)."
    )
    collab_max_document_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1024,
        description="Largest document `/collab` clients may grow (updates past it are dropped).",
    )
    idempotency_ttl: float = Field(300.0, gt=0, description="Seconds a publish idempotency key is remembered.")
    outbox_idempotency_ttl: float = Field(
        86400.0,
        gt=0,
        description="Seconds the idempotency key of a `$publish` (the offline outbox) is remembered: a resend after"
        " a lost reply is applied once if it comes within this time. Each key is about 100 bytes in Redis.",
    )
    rpc_routes: dict[str, RpcRoute] = Field(
        default_factory=dict,
        description='JSON object: client RPC method to its route, e.g. `{"mqtt.request": {"url":'
        ' "http://mqtt-bridge:8085/mqtt.request", "publish_to": "mqtt:{topic}"}}`: the call is POSTed to `url`'
        " as is, if the caller passes `allow` and, with `publish_to`, may publish to that channel. Methods not"
        " listed: 104.",
    )
    rpc_timeout: float = Field(5.0, gt=0, le=120, description="Seconds an RPC backend may take before error 100.")
    proxies: dict[str, ProxyEndpoint] = Field(
        default_factory=dict,
        description='JSON object: name to a backend the gateway asks, `{"endpoint": "http://app/centrifugo/connect"'
        ' | "grpc://app:10001", "timeout", "http_headers", "emulated_headers", "static_headers", "binary_encoding",'
        ' "fallback"}` (Centrifugo\'s proxy requests, docs/protocol.md); used by CONNECT_PROXY, REFRESH_PROXY,'
        " RPC_PROXY and the namespaces' `subscribe_proxy`, `publish_proxy`, `sub_refresh_proxy`.",
    )
    connect_proxy: str = Field(
        "", description="Proxy (in PROXIES) that lets in clients that connect without a token; empty: none."
    )
    refresh_proxy: str = Field(
        "", description="Proxy that extends expiring connections on the server side (clients are not asked to refresh)."
    )
    rpc_proxy: str = Field("", description="Proxy that answers the RPC methods not in RPC_ROUTES; empty: 104 for them.")
    grpc_api_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Port of the server API over gRPC (Centrifugo's `CentrifugoApi`, proto/centrifugal/centrifugo/"
        "api.proto; the key of API_KEY in `authorization: apikey <KEY>` metadata), on the service's host; 0: off."
        " Plaintext gRPC: keep it inside the cluster (a NetworkPolicy, or the mesh's mTLS).",
    )
    webhooks: dict[str, WebhookEndpoint] = Field(
        default_factory=dict,
        description='JSON object: name to an endpoint that gets the platform\'s events, `{"url", "events": ["connect",'
        ' "disconnect", "subscribe", "unsubscribe", "document_changed"], "secrets": ["whsec_..."], "timeout",'
        ' "first_backoff", "max_backoff", "retry_for"}`: signed, retried with backoff, dead-lettered after `retry_for`'
        " seconds (docs/protocol.md).",
    )
    collab_url: str = Field(
        "http://127.0.0.1:8083", description="Base URL of the collab service (documents for `/collab/{doc}`)."
    )
    command_timeout: float = Field(
        10.0, gt=0, le=3600, description="Seconds a forwarded device command may wait for its device (mqtt-bridge)."
    )
    signature_window: float = Field(
        30.0, gt=0, le=3600, description="Seconds a signed publication's `ts` may differ from the gateway's clock."
    )
    socketio_namespace: str = Field(
        "sio", description='Channel namespace of Socket.IO rooms: room "lobby" is channel "<namespace>:lobby".'
    )
    socketio_volatile_backlog: int = Field(
        64, ge=1, description="Packets queued to a Socket.IO client beyond which its volatile events are dropped."
    )
    presence_ttl: float = Field(60.0, gt=1, description="Seconds a presence entry lives without being refreshed.")
    web_enabled: bool = Field(
        True, description="Serve the demo web app at `/` (and `/web/config.json`, `/web/services`)."
    )
    web_auth_url: str = Field(
        "http://127.0.0.1:8081", description="auth's base URL as browsers reach it (the web app logs in there)."
    )
    web_service_urls: dict[str, str] = Field(
        default_factory=lambda: {
            "auth": "http://127.0.0.1:8081",
            "collab": "http://127.0.0.1:8083",
            "stream-ingest": "http://127.0.0.1:8084",
            "mqtt-bridge": "http://127.0.0.1:8085",
            "sim-engine": "http://127.0.0.1:8086",
        },
        description="JSON object: service name to base URL whose `/readyz` tells the web app it runs.",
    )
    web_demo: dict[str, Any] = Field(
        default_factory=lambda: dict(WEB_DEMO),
        description="JSON object merged into `/web/config.json`: the demo's rooms, document, symbols, channels.",
    )
    fhir_binding_token_ttl: float = Field(
        300.0, gt=0, le=86400, description="Seconds a FHIR `$get-ws-binding-token` token (and its binding) lives."
    )
    fhir_heartbeat_period: float = Field(
        60.0, gt=0, le=3600, description="Seconds without a notification after which `/fhir/ws` sends a heartbeat."
    )
    fhir_notify_secret: str = Field(
        "", description="Bearer secret FHIR servers may use on `POST /fhir/notify` (the `X-API-Key` works too)."
    )
    fhir_websocket_url: str = Field(
        "", description="`websocket-url` of binding tokens; empty: `/fhir/ws` on the host the client asked."
    )

    @model_validator(mode="after")
    def _a_frame_holds_every_subscription(self) -> GatewaySettings:
        if self.max_commands_per_frame <= self.max_channels_per_client:
            raise ValueError(
                f"TSUNAGU_GATEWAY_MAX_COMMANDS_PER_FRAME={self.max_commands_per_frame} must exceed"
                f" TSUNAGU_GATEWAY_MAX_CHANNELS_PER_CLIENT={self.max_channels_per_client}: stock SDKs send connect"
                " and every subscription made before it in one frame"
            )
        return self

    @model_validator(mode="after")
    def _proxies_exist(self) -> GatewaySettings:
        uses = {"CONNECT_PROXY": self.connect_proxy, "REFRESH_PROXY": self.refresh_proxy, "RPC_PROXY": self.rpc_proxy}
        for name, options in self.namespaces.items():
            for hook in ("subscribe_proxy", "publish_proxy", "sub_refresh_proxy"):
                uses[f"namespace {name!r} {hook}"] = getattr(options, hook)
        for use, proxy in uses.items():
            if proxy and proxy not in self.proxies:
                raise ValueError(f"{use} names proxy {proxy!r}, which TSUNAGU_GATEWAY_PROXIES does not define")
        for use, proxy in uses.items():
            if (
                proxy
                and self.proxies[proxy].fallback != "refuse"
                and not use.endswith(("subscribe_proxy", "publish_proxy"))
            ):
                raise ValueError(f"{use} {proxy!r}: only subscribe and publish have permissions to fall back on")
        return self

    @field_validator("namespaces")
    @classmethod
    def _namespaces_are_names(cls, value: dict[str, ChannelOptions]) -> dict[str, ChannelOptions]:
        for name in value:
            if ":" in name:
                raise ValueError(f"namespace {name!r} must not contain ':'")
        return value
