"""Why a connection is not let in: one typed refusal, with what each kind of transport answers."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from tsunagu_ws_gateway.protocol import codes
from tsunagu_ws_gateway.protocol.codes import Disconnect, ReplyError


@dataclass(frozen=True, slots=True)
class Kind:
    name: str
    disconnect: Disconnect  # what a socket that is already open is closed with (native codes)
    status: int  # what an HTTP request or a WebSocket handshake is answered with


class Refusal(Enum):
    INVALID_TOKEN = Kind("invalid token", codes.INVALID_TOKEN, 401)
    # No token, no certificate an identity takes, anonymous clients off (native: 3501, as Centrifugo).
    NO_CREDENTIAL = Kind("a connection token is required", codes.BAD_REQUEST_DISCONNECT, 401)
    TOKEN_EXPIRED = Kind("token expired", codes.INVALID_TOKEN, 401)  # native: error 109, not a close
    REVOKED = Kind("token revoked", codes.TOKEN_REVOKED, 401)
    ORIGIN = Kind("origin not allowed", codes.Disconnect(1008, "origin not allowed"), 403)
    DRAINING = Kind("shutting down", codes.SHUTDOWN, 503)
    NODE_LIMIT = Kind("connection limit", codes.CONNECTION_LIMIT, 503)
    IP_LIMIT = Kind("connection limit", codes.CONNECTION_LIMIT, 429)
    USER_LIMIT = Kind("connection limit", codes.CONNECTION_LIMIT, 429)
    # Over the node's connect rate (core/limits.py ConnectRate): try again later, with backoff.
    CONNECT_RATE = Kind("too many connects", codes.TOO_MANY_CONNECTS, 503)
    UNAVAILABLE = Kind("internal server error", codes.SERVER_ERROR, 503)  # the revocation store did not answer
    # The connect hook's backend said no (with an error of its own, or a disconnect), or could not be asked.
    BACKEND_REFUSED = Kind("refused by the backend", codes.PERMISSION_DENIED_DISCONNECT, 403)
    BACKEND_UNAVAILABLE = Kind("internal server error", codes.SERVER_ERROR, 503)


class Refused(Exception):
    """The one way admission says no: `refusal` is what kind of no, `detail` tells the client why.

    `error`: the native protocol answers the connect command with this error reply instead of closing (an
    expired token, a backend's refusal with an error, a backend that could not be asked)."""

    def __init__(
        self,
        refusal: Refusal,
        detail: str = "",
        disconnect: Disconnect | None = None,
        error: ReplyError | None = None,
    ) -> None:
        super().__init__(detail or refusal.value.name)
        self.refusal = refusal
        self.detail = detail or refusal.value.name
        self.disconnect = disconnect or refusal.value.disconnect
        self.error = error

    @property
    def status(self) -> int:
        return self.refusal.value.status
