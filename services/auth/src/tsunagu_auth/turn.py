"""Short-lived TURN credentials, in the TURN REST API's scheme (draft-uberti-behave-turn-rest, which coturn
implements as `use-auth-secret`): the username is `<expiry unix time>:<user>` and the password the base64 of
HMAC-SHA1 over it with the secret auth shares with the TURN server. The TURN server checks both without
asking auth, and refuses a username whose time has passed, so a credential cannot outlive its `ttl`."""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class IceServers:
    secret: str
    turn_uris: tuple[str, ...]
    stun_uris: tuple[str, ...]
    ttl: float

    @property
    def configured(self) -> bool:
        return bool(self.secret and self.turn_uris)

    def credentials(self, user: str, now: float) -> dict[str, Any]:
        """What a WebRTC client needs: the TURN username and password, and `iceServers` as
        RTCPeerConnection takes them (STUN first, then TURN with the credential)."""
        expires = int(now + self.ttl)
        username = f"{expires}:{user}"
        digest = hmac.new(self.secret.encode(), username.encode(), hashlib.sha1).digest()
        credential = base64.b64encode(digest).decode()
        servers: list[dict[str, Any]] = []
        if self.stun_uris:
            servers.append({"urls": list(self.stun_uris)})
        servers.append({"urls": list(self.turn_uris), "username": username, "credential": credential})
        return {
            "username": username,
            "credential": credential,
            "ttl": int(self.ttl),
            "expires_at": expires,
            "uris": list(self.turn_uris),
            "iceServers": servers,
        }
