"""Development secrets, and what a deployment told it is production (`TSUNAGU_ENV=production`) refuses.

`tsunagu run` fills in the development secrets below when nothing else is configured; they are
public (they are in this file), so a production deployment that still holds one refuses to start,
and `tsunagu run` refuses to serve them on a non-loopback interface unless told so explicitly.
Standard library only: the CLI imports this module before any service.
"""

from __future__ import annotations

# Not `typing.TYPE_CHECKING`: the CLI imports this module, and importing typing costs its start-up.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any

DEVELOPMENT_TOKEN_SECRET = "tsunagu-development-secret-do-not-use-in-production"
DEVELOPMENT_API_KEY = "tsunagu-development-api-key"
DEVELOPMENT_INTERNAL_TOKEN = "tsunagu-development-internal-token"
# The demo's users: two, so two browser tabs can chat and see each other's avatar.
DEVELOPMENT_USERS = {"alice": "alice-development-password", "bob": "bob-development-password"}

DEVELOPMENT_SECRETS = frozenset(
    {DEVELOPMENT_TOKEN_SECRET, DEVELOPMENT_API_KEY, DEVELOPMENT_INTERNAL_TOKEN, *DEVELOPMENT_USERS.values()}
)


def is_loopback(host: str) -> bool:
    """Whether a listen address is reachable from this machine only (`0.0.0.0`, `::` and names are not)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, f"{path}.{key}")
    elif isinstance(value, list | tuple | set | frozenset):
        for n, item in enumerate(value):
            yield from _strings(item, f"{path}[{n}]")
    elif hasattr(value, "model_dump"):
        yield from _strings(value.model_dump(), path)


def development_secrets_in(settings: Any) -> list[str]:
    """The environment variables of a pydantic-settings object that hold a development secret."""
    prefix = str(settings.model_config.get("env_prefix", ""))
    found = []
    for name in type(settings).model_fields:
        for path, text in _strings(getattr(settings, name), f"{prefix}{name}".upper()):
            if text in DEVELOPMENT_SECRETS:
                found.append(path)
    return found
