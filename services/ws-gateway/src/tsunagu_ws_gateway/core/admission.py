"""The one admission function: every transport and protocol lets a client in through `Admission.admit`.

    peer + credential (a token, or none: then the client certificate, the connect hook's backend, or
    anonymity) -> origin, draining -> the node's connect rate -> grant -> revocation check -> per-user
    limit -> Admitted or one `Refused` with its kind (core/refusals.py), which each protocol renders its own way.

`screen` is the part that needs no credential (origin, draining); transports run it at the handshake,
before they accept a socket, and `admit` runs it again. The node's and the IP's connection limits are the
registry's, counted when a socket opens (registry.open).
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from prometheus_client import Counter as Metric

from tsunagu_ws_gateway.certificates import grant_for
from tsunagu_ws_gateway.channels import Principal, acr_level
from tsunagu_ws_gateway.config import GatewaySettings
from tsunagu_ws_gateway.core.limits import ConnectRate
from tsunagu_ws_gateway.core.refusals import Refusal, Refused
from tsunagu_ws_gateway.core.registry import REFUSALS, Registry
from tsunagu_ws_gateway.core.transport import Peer
from tsunagu_ws_gateway.hooks import Caller, ConnectAttempt, Hooks, HookUnavailable, SubscriptionPreset
from tsunagu_ws_gateway.protocol.codes import ProtocolError, ReplyError
from tsunagu_ws_gateway.revocations import RevocationList
from tsunagu_ws_gateway.tokens import ConnectionGrant, TokenVerifier

log = logging.getLogger("tsunagu.gateway.admission")
SHED = Metric(
    "tsunagu_gateway_connects_shed_total", "Connects refused over the node's connect rate (3013)", ["protocol"]
)

ANONYMOUS = ConnectionGrant(user="")


@dataclass(frozen=True, slots=True)
class Admitted:
    grant: ConnectionGrant
    # False for an anonymous client (no token, no certificate): "authenticated" access is not for it.
    authenticated: bool
    # How: "token", "certificate", "backend" (the connect hook) or "anonymous".
    credential: str
    # From the connect hook's backend: data for the connect reply, the connection's meta (sent with every
    # later hook call) and how to subscribe the client to the channels it chose.
    data: bytes = b""
    meta: bytes = b""
    subs: Mapping[str, SubscriptionPreset] = field(default_factory=dict)

    @property
    def principal(self) -> Principal:
        grant = self.grant
        return Principal(
            grant.user, grant.channel_patterns, authenticated=self.authenticated, acr=acr_level(grant.claims)
        )


class Admission:
    def __init__(
        self,
        settings: GatewaySettings,
        verifier: TokenVerifier,
        revoked: RevocationList,
        registry: Registry,
        hooks: Hooks | None = None,
    ) -> None:
        self.settings = settings
        self.verifier = verifier
        self.revoked = revoked
        self.registry = registry
        self.hooks = hooks or Hooks(settings)
        self.connect_rate = ConnectRate(settings.connect_rate, settings.connect_burst)

    # without a credential

    def origin_allowed(self, peer: Peer) -> bool:
        """No Origin (not a browser): allowed. Otherwise it must match `allowed_origins` (globs such as
        `https://*.example.com`, or `*`), or, when that list is empty, be this host's own origin."""
        if peer.origin is None:
            return True
        allowed = self.settings.allowed_origins
        if allowed:
            origin = peer.origin.lower()
            return any(fnmatch.fnmatchcase(origin, pattern.lower()) for pattern in allowed)
        return peer.same_origin()

    def screen(self, peer: Peer, protocol: str = "") -> None:
        try:
            if self.registry.draining:
                raise Refused(Refusal.DRAINING, "the gateway is shutting down: reconnect")
            if not self.origin_allowed(peer):
                raise Refused(Refusal.ORIGIN, f"origin {peer.origin!r} is not allowed")
        except Refused as refused:
            REFUSALS.labels(refused.refusal.name.lower(), protocol).inc()
            raise

    # with one

    async def grant(
        self, peer: Peer, token: str, protocol: str = "", *, caller: Caller | None = None,
        attempt: ConnectAttempt | None = None,
    ) -> Admitted:  # fmt: skip
        """Credential -> grant -> revocation check, without the connection policy (an HTTP request
        that opens nothing, a token refresh). `caller` and `attempt` are what the connect hook's backend
        is told of a client without a token (without them, only what the handshake showed)."""
        try:
            return await self._grant(peer, token, caller, attempt)
        except Refused as refused:
            REFUSALS.labels(refused.refusal.name.lower(), protocol).inc()
            raise

    async def admit(
        self, peer: Peer, token: str, protocol: str = "", *, caller: Caller | None = None,
        attempt: ConnectAttempt | None = None,
    ) -> Admitted:  # fmt: skip
        """Everything: who the client is, that it is not revoked, and that this node takes it now."""
        self.screen(peer, protocol)
        # Before the credential: a shed connect must cost (nearly) nothing, or shedding protects nothing.
        if not self.connect_rate.admit():
            SHED.labels(protocol).inc()
            REFUSALS.labels(Refusal.CONNECT_RATE.name.lower(), protocol).inc()
            raise Refused(
                Refusal.CONNECT_RATE, f"more than {self.connect_rate.per_second:g} connects a second: reconnect later"
            )
        admitted = await self.grant(peer, token, protocol, caller=caller, attempt=attempt)
        user = admitted.grant.user
        limit = self.settings.max_connections_per_user
        if user and limit and self.registry.user_sessions(user) >= limit:
            REFUSALS.labels(Refusal.USER_LIMIT.name.lower(), protocol).inc()
            raise Refused(Refusal.USER_LIMIT, f"user {user!r} has {limit} connections open")
        return admitted

    async def _grant(self, peer: Peer, token: str, caller: Caller | None, attempt: ConnectAttempt | None) -> Admitted:
        backend: tuple[bytes, bytes, Mapping[str, SubscriptionPreset]] | None = None
        if token:
            try:
                grant = await self.verifier.verify_connection(token)
            except ProtocolError as exc:
                raise Refused(Refusal.INVALID_TOKEN, str(exc), exc.disconnect) from None
            except ReplyError as exc:
                raise Refused(Refusal.TOKEN_EXPIRED, exc.detail or exc.error.message, error=exc) from None
            credential = "token"
        elif (certified := self._certificate_grant(peer)) is not None:
            grant, credential = certified, "certificate"
        elif self.hooks.connect_proxy:
            grant, backend = await self._ask_backend(peer, caller, attempt)
            credential = "backend"
        elif self.settings.allow_anonymous:
            return Admitted(ANONYMOUS, authenticated=False, credential="anonymous")
        else:
            raise Refused(Refusal.NO_CREDENTIAL)
        try:
            revoked = await self.revoked.refuses(grant)
        except ProtocolError:
            raise Refused(Refusal.UNAVAILABLE, "revocations cannot be checked now: reconnect later") from None
        if revoked:
            raise Refused(Refusal.REVOKED)
        if backend is not None:
            data, meta, subs = backend
            # The backend may let a client in anonymously (no user): then "authenticated" access is not its.
            return Admitted(grant, bool(grant.user), credential, data=data, meta=meta, subs=subs)
        return Admitted(grant, authenticated=True, credential=credential)

    async def _ask_backend(
        self, peer: Peer, caller: Caller | None, attempt: ConnectAttempt | None
    ) -> tuple[ConnectionGrant, tuple[bytes, bytes, Mapping[str, SubscriptionPreset]]]:
        """The connect hook: the backend says who the client is (or refuses it)."""
        if caller is None:
            caller = Caller(client="", transport="websocket", protocol="json", handshake_headers=peer.headers)
        try:
            verdict = await self.hooks.connect(caller, attempt or ConnectAttempt())
        except HookUnavailable as exc:
            raise Refused(Refusal.BACKEND_UNAVAILABLE, exc.detail, error=exc) from None
        except ReplyError as exc:
            raise Refused(Refusal.BACKEND_REFUSED, exc.error.message, error=exc) from None
        except ProtocolError as exc:
            raise Refused(Refusal.BACKEND_REFUSED, exc.disconnect.reason, exc.disconnect) from None
        grant = ConnectionGrant(
            user=verdict.user,
            expires_at=verdict.expires_at,
            info=verdict.info,
            server_subs=tuple(verdict.subs),
        )
        return grant, (verdict.data, verdict.meta, verdict.subs)

    def _certificate_grant(self, peer: Peer) -> ConnectionGrant | None:
        if peer.certificate is None or not self.settings.client_cert_identities:
            return None
        return grant_for(self.settings.client_cert_identities, peer.certificate)
