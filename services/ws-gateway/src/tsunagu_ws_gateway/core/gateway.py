"""What every session on this node shares."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from tsunagu_core.nonces import MemoryNonceRegistry
from tsunagu_core.wire.events_pb2 import Revocation

from tsunagu_ws_gateway.channels import ChannelPolicy
from tsunagu_ws_gateway.config import GatewaySettings
from tsunagu_ws_gateway.core.admission import Admission
from tsunagu_ws_gateway.core.registry import Registry
from tsunagu_ws_gateway.events import EventEmitter
from tsunagu_ws_gateway.forwarding import Forwarder
from tsunagu_ws_gateway.hooks import Hooks
from tsunagu_ws_gateway.hub import Node
from tsunagu_ws_gateway.protocol import codes
from tsunagu_ws_gateway.revocations import RevocationList
from tsunagu_ws_gateway.rpc import RpcRouter
from tsunagu_ws_gateway.signatures import SignatureVerifier
from tsunagu_ws_gateway.tokens import TokenVerifier

log = logging.getLogger("tsunagu.gateway")


class Gateway:
    def __init__(
        self,
        settings: GatewaySettings,
        node: Node,
        verifier: TokenVerifier,
        policy: ChannelPolicy,
        events: EventEmitter,
        rpc: RpcRouter,
        revoked: RevocationList,
        signatures: SignatureVerifier | None = None,
        forwarders: Mapping[str, Forwarder] | None = None,
        registry: Registry | None = None,
    ) -> None:
        self.settings = settings
        self.node = node
        self.broker = node.broker
        self.verifier = verifier
        self.policy = policy
        self.events = events
        self.rpc = rpc
        self.revoked = revoked
        self.signatures = signatures or SignatureVerifier(MemoryNonceRegistry(), settings.signature_window)
        self.forwarders = forwarders or {}
        self.registry = registry or Registry(settings)
        # The backend's say (proxy hooks): at admission, and in the sessions' commands.
        self.hooks = Hooks(settings)
        self.admission = Admission(settings, verifier, revoked, self.registry, self.hooks)
        node.census = self.registry.census

    def close_revoked(self, revocation: Revocation) -> None:
        """Close every session on this node, of any protocol, whose grant the revocation covers."""
        covered = self.registry.where(lambda s: s.grant is not None and self.revoked.revokes(s.grant))
        for session in covered:
            log.info("closing client %s of user %s: %s revoked", session.id, session.user, revocation.value)
        self.registry.disconnect(covered, codes.TOKEN_REVOKED)

    def disconnect(self, user: str, client: str, session_id: str, disconnect: codes.Disconnect) -> None:
        """The server API's disconnect, on this node."""
        self.registry.disconnect(self.registry.matching(user, client, session_id), disconnect)
