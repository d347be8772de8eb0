"""Error, unsubscribe and disconnect codes, numbered as the Centrifugo client protocol numbers them,
so that stock SDKs react to them correctly (docs/protocol.md lists them with their meaning)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ErrorCode:
    code: int
    message: str


INTERNAL = ErrorCode(100, "internal server error")
UNAUTHORIZED = ErrorCode(101, "unauthorized")
UNKNOWN_CHANNEL = ErrorCode(102, "unknown channel")
PERMISSION_DENIED = ErrorCode(103, "permission denied")
METHOD_NOT_FOUND = ErrorCode(104, "method not found")
ALREADY_SUBSCRIBED = ErrorCode(105, "already subscribed")
LIMIT_EXCEEDED = ErrorCode(106, "limit exceeded")
BAD_REQUEST = ErrorCode(107, "bad request")
NOT_AVAILABLE = ErrorCode(108, "not available")
TOKEN_EXPIRED = ErrorCode(109, "token expired")
EXPIRED = ErrorCode(110, "expired")
TOO_MANY_REQUESTS = ErrorCode(111, "too many requests")
UNRECOVERABLE_POSITION = ErrorCode(112, "unrecoverable position")
# Ours, in the range Centrifugo leaves to applications (>= 400): signed publications.
SIGNATURE_REQUIRED = ErrorCode(440, "signature required")
BAD_SIGNATURE = ErrorCode(441, "bad signature")
SIGNATURE_EXPIRED = ErrorCode(442, "signature expired")
SIGNATURE_REPLAYED = ErrorCode(443, "signature replayed")


@dataclass(frozen=True, slots=True)
class Disconnect:
    """A close code and reason; 3000-3499 tell the client to reconnect, 3500-3999 not to."""

    code: int
    reason: str

    @property
    def reconnect(self) -> bool:
        return not (3500 <= self.code < 4000)


CONNECTION_CLOSED = Disconnect(3000, "connection closed")
SHUTDOWN = Disconnect(3001, "shutdown")
SERVER_ERROR = Disconnect(3004, "internal server error")
CONNECTION_EXPIRED = Disconnect(3005, "connection expired")
SUBSCRIPTION_EXPIRED = Disconnect(3006, "subscription expired")
SLOW = Disconnect(3008, "slow")
WRITE_ERROR = Disconnect(3009, "write error")
INSUFFICIENT_STATE = Disconnect(3010, "insufficient state")
FORCE_RECONNECT = Disconnect(3011, "force reconnect")
NO_PONG = Disconnect(3012, "no pong")
TOO_MANY_REQUESTS_DISCONNECT = Disconnect(3013, "too many requests")
# The node sheds connects over its admission rate: the same reconnect-later code, its own reason.
TOO_MANY_CONNECTS = Disconnect(3013, "too many connects")
INVALID_TOKEN = Disconnect(3500, "invalid token")
TOKEN_REVOKED = Disconnect(3500, "token revoked")
BAD_REQUEST_DISCONNECT = Disconnect(3501, "bad request")
STALE = Disconnect(3502, "stale")
FORCE_DISCONNECT = Disconnect(3503, "force disconnect")
CONNECTION_LIMIT = Disconnect(3504, "connection limit")
CHANNEL_LIMIT = Disconnect(3505, "channel limit")
PERMISSION_DENIED_DISCONNECT = Disconnect(3507, "permission denied")
MESSAGE_SIZE_LIMIT = Disconnect(1009, "message too big")

# Unsubscribe push codes: below 2500 the client stays unsubscribed, from 2500 it resubscribes.
UNSUBSCRIBE_SERVER = 2000
UNSUBSCRIBE_INSUFFICIENT_STATE = 2500


class ProtocolError(Exception):
    """The peer broke the protocol; the connection is closed with `disconnect`."""

    def __init__(self, disconnect: Disconnect, detail: str = "") -> None:
        super().__init__(detail or disconnect.reason)
        self.disconnect = disconnect


class ReplyError(Exception):
    """A command failed; the client gets an error reply and the connection stays."""

    # The error is temporary (the SDK retries the command): a backend that could not be asked, say.
    temporary = False

    def __init__(self, error: ErrorCode, detail: str = "") -> None:
        super().__init__(detail or error.message)
        self.error = error
        self.detail = detail
