"""Rates: commands per connection, and connects per gateway process."""

from __future__ import annotations

import time

from tsunagu_ws_gateway.protocol import codes
from tsunagu_ws_gateway.protocol.codes import ProtocolError


class TokenBucket:
    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.capacity = burst
        self.tokens = burst
        self.updated = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class CommandRate:
    """Commands per second of one connection, burst 2 s, as Centrifugo limits them: a command over the
    rate is refused on its own (error 111) and the others go on; a client that keeps sending into the
    closed limit for more than a burst's worth is disconnected (3013)."""

    def __init__(self, per_second: float) -> None:
        self.per_second = per_second
        self.bucket = TokenBucket(per_second, 2 * per_second)
        self.refused_in_a_row = 0

    def admit(self) -> bool:
        """True: carry the command out; False: refuse it with 111. Raises ProtocolError(3013)."""
        if self.bucket.take():
            self.refused_in_a_row = 0
            return True
        self.refused_in_a_row += 1
        if self.refused_in_a_row > self.bucket.capacity:
            raise ProtocolError(codes.TOO_MANY_REQUESTS_DISCONNECT)
        return False

    @property
    def detail(self) -> str:
        return f"more than {self.per_second:g} commands a second"


class ConnectRate:
    """Connects one gateway process admits per second, over every protocol: a token bucket of `burst`
    refilled at `per_second`. What it protects is the node itself in a reconnect storm (a replica died and
    its clients all come here at once): each connect costs a token check, a revocation look-up and the
    subscriptions it brings, and taking them all at once would stall the clients already here. A connect
    over the rate is cheap to refuse and the SDK comes back after its (jittered) backoff. 0: no limit."""

    def __init__(self, per_second: float, burst: int) -> None:
        self.per_second = per_second
        self.bucket = TokenBucket(per_second, burst) if per_second > 0 else None

    def admit(self) -> bool:
        return self.bucket is None or self.bucket.take()
