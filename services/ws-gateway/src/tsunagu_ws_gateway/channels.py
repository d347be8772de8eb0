"""Channel names, namespaces and who may do what in them."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tsunagu_ws_gateway.config import Access, ChannelOptions
from tsunagu_ws_gateway.protocol.codes import BAD_REQUEST, PERMISSION_DENIED, UNKNOWN_CHANNEL, ReplyError

_VALID_CHANNEL = re.compile(r"[\w\-:.@/#,=+!~$]{1,255}")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is asking: a user id ("" when anonymous) and the channel patterns their token grants."""

    user: str
    channel_patterns: Sequence[str] = ()
    authenticated: bool = False
    # The token's `acr` as a number (auth: 1 password, 2 one-time code, 3 passkey); namespaces' min_acr.
    acr: int = 0


def namespace_of(channel: str) -> str:
    return channel.split(":", 1)[0] if ":" in channel else ""


class ChannelPolicy:
    def __init__(self, namespaces: Mapping[str, ChannelOptions]) -> None:
        self.namespaces = dict(namespaces)

    def options(self, channel: str) -> ChannelOptions:
        if not _VALID_CHANNEL.fullmatch(channel):
            raise ReplyError(BAD_REQUEST, f"invalid channel name {channel[:64]!r}")
        options = self.namespaces.get(namespace_of(channel))
        if options is None:
            raise ReplyError(UNKNOWN_CHANNEL, f"no namespace {namespace_of(channel)!r} is configured")
        return options

    def check(self, access: Access, channel: str, who: Principal, *, granted_by_token: bool = False) -> None:
        """Raise 103 unless `who` may act on `channel` under `access`; a subscription token grants it."""
        # Also asked for names that are no channel (`rpc:<method>` against the token's patterns).
        options = self.namespaces.get(namespace_of(channel))
        needed = options.min_acr if options is not None else 0
        if who.acr < needed:
            raise ReplyError(
                PERMISSION_DENIED,
                f"step-up required: this namespace needs acr {needed}, the connection has {who.acr};"
                " verify a second factor at auth, then refresh the connection",
            )
        if granted_by_token:
            return
        if options is not None and options.user_limited and "#" not in channel:
            namespace = namespace_of(channel)
            detail = f"channels of namespace {namespace!r} name their users: {namespace}:<name>#<user>,<user>"
            raise ReplyError(PERMISSION_DENIED, detail)
        if not _user_may_use(channel, who.user):
            raise ReplyError(PERMISSION_DENIED)
        if access == "anonymous":
            return
        if access == "authenticated" and who.authenticated:
            return
        if (
            access == "claim"
            and who.authenticated
            and any(fnmatch.fnmatchcase(channel, pattern) for pattern in who.channel_patterns)
        ):
            return
        raise ReplyError(PERMISSION_DENIED)

    def allows(self, access: Access, channel: str, who: Principal) -> bool:
        try:
            self.check(access, channel, who)
        except ReplyError:
            return False
        return True


def acr_level(claims: Mapping[str, object]) -> int:
    """The `acr` claim as a number ("2" -> 2); absent or not a number: 0."""
    try:
        return int(str(claims.get("acr", 0)))
    except ValueError:
        return 0


def _user_may_use(channel: str, user: str) -> bool:
    """User-limited channels: `chat:dialog#42,43` is only for users 42 and 43."""
    if "#" not in channel:
        return True
    allowed = channel.rsplit("#", 1)[1].split(",")
    return bool(user) and user in allowed
