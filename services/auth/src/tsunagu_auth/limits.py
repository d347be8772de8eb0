"""Login throttling that parallel guesses cannot outrun and that nobody can use to lock a victim out.

What is counted, per window (`TSUNAGU_AUTH_LOGIN_WINDOW`):
- per (client IP, username): at `login_max_failures` failed logins that pair is refused (429 with
  Retry-After) until the window ends. Only the guesser's own address is shut out: the user logs in
  from anywhere else as usual.
- per client IP: at `login_max_failures_per_ip` failures that address is refused for every username
  (one address spraying many accounts).
- per username, from all addresses: past `login_user_slowdown_after` failures, logins for that user are
  slowed down (a delay before the password is checked, doubling up to `login_user_max_delay`), never
  refused; addresses that logged in as that user before (within 30 days) are not slowed.
This is OWASP's advice against brute force without account lock-out (Authentication Cheat Sheet):
throttle by source, slow down by account, and never let a third party lock an account.

Check and count are one atomic step (a Lua script in Redis, one synchronous step in memory): an attempt
is counted as pending before its password is checked, and a limit counts failures plus pending
attempts, so N parallel guesses get at most the limit through. When only pending attempts fill a limit
(parallel logins, not failures) the answer is 429 with `Retry-After: 1`. A success clears its pair's
failures. The client IP is the one `TSUNAGU_TRUSTED_PROXIES` leads to (tsunagu_core.proxies).
"""

from __future__ import annotations

import abc
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from tsunagu_core.config import CoreSettings
from tsunagu_core.dependency import NothingToConnect
from tsunagu_core.redis_store import RedisStore

# One hash tag: every key of an attempt lands in one Redis Cluster slot (the script touches several).
PREFIX = "tsunagu:auth:{login}:"
KNOWN_TTL = 30 * 86400.0
# The first slowed-down attempt waits this long; each further failure doubles it.
FIRST_DELAY = 0.25

REFUSED, BUSY, ADMITTED = 0, 1, 2
# How a pending attempt ended: a wrong password, a right one, or neither (the store failed).
Outcome = Literal["failed", "ok", "abandoned"]

# KEYS: the limited hashes, the counted hashes, the known marker. ARGV: number of limited keys, window
# in ms, the limits. A hash holds f (failures) and p (pending attempts). Returns {outcome, wait ms,
# failures + pending of the last counted key, known marker present}.
_ADMIT = """
local limited = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local wait, busy = 0, false
for i = 1, limited do
  local f = tonumber(redis.call('hget', KEYS[i], 'f') or '0')
  local p = tonumber(redis.call('hget', KEYS[i], 'p') or '0')
  local limit = tonumber(ARGV[2 + i])
  if f >= limit then
    local ttl = redis.call('pttl', KEYS[i])
    if ttl < 0 then ttl = window end
    if ttl > wait then wait = ttl end
  elseif f + p >= limit then
    busy = true
  end
end
if wait > 0 then return {0, wait, 0, 0} end
if busy then return {1, 1000, 0, 0} end
local count = 0
for i = 1, #KEYS - 1 do
  redis.call('hincrby', KEYS[i], 'p', 1)
  if redis.call('pttl', KEYS[i]) < 0 then redis.call('pexpire', KEYS[i], window) end
  count = tonumber(redis.call('hget', KEYS[i], 'f') or '0') + tonumber(redis.call('hget', KEYS[i], 'p'))
end
return {2, 0, count, redis.call('exists', KEYS[#KEYS])}
"""

# KEYS: the hashes of the attempt; ARGV: failed | ok | abandoned, window ms, index of the pair key
# (cleared on success), known-marker key, its ttl ms.
_FINISH = """
local failed = ARGV[1] == 'failed'
for i = 1, #KEYS do
  if redis.call('exists', KEYS[i]) == 1 then
    if redis.call('hincrby', KEYS[i], 'p', -1) < 0 then redis.call('hset', KEYS[i], 'p', 0) end
    if failed then redis.call('hincrby', KEYS[i], 'f', 1) end
  elseif failed then
    redis.call('hset', KEYS[i], 'f', 1)
    redis.call('pexpire', KEYS[i], ARGV[2])
  end
end
if ARGV[1] == 'ok' then
  redis.call('hdel', KEYS[tonumber(ARGV[3])], 'f')
  redis.call('set', ARGV[4], '1', 'PX', ARGV[5])
end
return 1
"""


@dataclass(frozen=True, slots=True)
class Admission:
    """What the limiter says about one attempt: refused for `retry_after` seconds, or let through
    after `delay` seconds."""

    retry_after: float | None = None
    delay: float = 0.0


class Counters(NothingToConnect, abc.ABC):
    @abc.abstractmethod
    async def admit(
        self, limited: Sequence[tuple[str, int]], counted: Sequence[str], known: str, window: float
    ) -> tuple[int, float, int, bool]:
        """Atomically: REFUSED with the seconds until a limit frees, BUSY when pending attempts fill
        one, else ADMITTED with every key's attempt pending, the failures + pending attempts of the
        last key, and whether `known` is set."""

    @abc.abstractmethod
    async def finish(self, keys: Sequence[str], outcome: Outcome, *, window: float, clear: str, known: str) -> None:
        """End pending attempts: count a failure, or (ok) clear `clear`'s failures and set `known`."""


class MemoryCounters(Counters):
    """One process (`tsunagu run`, tests): each call runs without a suspension point, so it is atomic."""

    def __init__(self) -> None:
        self.entries: dict[str, list[float]] = {}  # key -> [failures, pending, expires at]
        self.known: dict[str, float] = {}

    def _live(self, key: str, now: float) -> list[float] | None:
        entry = self.entries.get(key)
        if entry is not None and entry[2] <= now:
            del self.entries[key]
            return None
        return entry

    async def admit(
        self, limited: Sequence[tuple[str, int]], counted: Sequence[str], known: str, window: float
    ) -> tuple[int, float, int, bool]:
        now = time.monotonic()
        waits, busy = [], False
        for key, limit in limited:
            entry = self._live(key, now) or [0, 0, now + window]
            if entry[0] >= limit:
                waits.append(entry[2] - now)
            elif entry[0] + entry[1] >= limit:
                busy = True
        if waits:
            return REFUSED, max(waits), 0, False
        if busy:
            return BUSY, 1.0, 0, False
        count = 0
        for key in [*(key for key, _ in limited), *counted]:
            counter = self._live(key, now)
            if counter is None:
                counter = self.entries[key] = [0, 0, now + window]
            counter[1] += 1
            count = int(counter[0] + counter[1])
        self._prune(now)
        return ADMITTED, 0.0, count, self.known.get(known, 0.0) > now

    async def finish(self, keys: Sequence[str], outcome: Outcome, *, window: float, clear: str, known: str) -> None:
        now = time.monotonic()
        failed = outcome == "failed"
        for key in keys:
            entry = self._live(key, now)
            if entry is None:
                if failed:
                    self.entries[key] = [1, 0, now + window]
                continue
            entry[1] = max(0, entry[1] - 1)
            if failed:
                entry[0] += 1
        if outcome == "ok":
            entry = self._live(clear, now)
            if entry is not None:
                entry[0] = 0
            self.known[known] = now + KNOWN_TTL

    def _prune(self, now: float) -> None:
        if len(self.entries) > 100_000:
            for key in [k for k, (_, _, until) in self.entries.items() if until <= now]:
                del self.entries[key]
        if len(self.known) > 100_000:
            for key in [k for k, until in self.known.items() if until <= now]:
                del self.known[key]


class RedisCounters(RedisStore, Counters):
    def __init__(self, url: str) -> None:
        # (the keys share the `{login}` hash tag: one slot on Redis Cluster)
        RedisStore.__init__(self, url, socket_timeout=2.0, connect_timeout=2.0)
        self._admit = self.redis.register_script(_ADMIT)
        self._finish = self.redis.register_script(_FINISH)

    async def admit(
        self, limited: Sequence[tuple[str, int]], counted: Sequence[str], known: str, window: float
    ) -> tuple[int, float, int, bool]:
        keys = [*(key for key, _ in limited), *counted, known]
        args = [len(limited), _ms(window), *(limit for _, limit in limited)]
        outcome, wait, count, marked = await self._admit(keys=keys, args=args)
        return int(outcome), int(wait) / 1000, int(count), bool(int(marked))

    async def finish(self, keys: Sequence[str], outcome: Outcome, *, window: float, clear: str, known: str) -> None:
        args = [outcome, _ms(window), list(keys).index(clear) + 1, known, _ms(KNOWN_TTL)]
        await self._finish(keys=list(keys), args=args)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def create_counters(settings: CoreSettings) -> Counters:
    return RedisCounters(settings.redis_url) if settings.broker == "redis" else MemoryCounters()


class LoginLimiter:
    def __init__(
        self,
        counters: Counters,
        *,
        per_pair: int,
        per_ip: int,
        window: float,
        user_slowdown_after: int,
        user_max_delay: float,
        per_user: int | None = None,
    ) -> None:
        """`per_user`: also refuse the username from every address at that many failures (second factors:
        whoever gets there knows the password already, and six digits fall to a distributed guess)."""
        self.per_user = per_user
        self.counters = counters
        self.per_pair = per_pair
        self.per_ip = per_ip
        self.window = window
        self.user_slowdown_after = user_slowdown_after
        self.user_max_delay = user_max_delay

    @staticmethod
    def _keys(username: str, ip: str) -> tuple[str, str, str, str]:
        # An IP has no `|`: the pair key cannot be made to collide with another pair's.
        return (
            f"{PREFIX}pair:{ip}|{username}",
            f"{PREFIX}ip:{ip}",
            f"{PREFIX}user:{username}",
            f"{PREFIX}known:{ip}|{username}",
        )

    async def admit(self, username: str, ip: str) -> Admission:
        """Count the attempt as pending, or refuse it; call `finish` once the password was checked."""
        pair, address, user, known = self._keys(username, ip)
        limited = [(pair, self.per_pair), (address, self.per_ip)]
        if self.per_user is not None:
            limited.append((user, self.per_user))
        outcome, wait, user_attempts, is_known = await self.counters.admit(
            limited, [] if self.per_user is not None else [user], known, self.window
        )
        if outcome != ADMITTED:
            return Admission(retry_after=wait)
        excess = user_attempts - self.user_slowdown_after
        if excess <= 0 or is_known:
            return Admission()
        return Admission(delay=min(self.user_max_delay, FIRST_DELAY * 2 ** min(excess - 1, 16)))

    async def finish(self, username: str, ip: str, outcome: Outcome) -> None:
        pair, address, user, known = self._keys(username, ip)
        await self.counters.finish([pair, address, user], outcome, window=self.window, clear=pair, known=known)
