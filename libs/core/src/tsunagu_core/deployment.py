"""What a deployment told it is production (`TSUNAGU_ENV=production`) checks: development secrets in
its settings, and whether an address is loopback.

The development secrets themselves belong to `tsunagu run` (src/tsunagu/cli.py, which must start
without importing this package); they are public, so a production deployment that still holds one
refuses to start, and `tsunagu run` refuses to serve them on a non-loopback interface unless told so.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from typing import Any


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


def development_secrets_in(settings: Any, secrets: Collection[str]) -> list[str]:
    """The environment variables of a pydantic-settings object that hold one of `secrets`."""
    prefix = str(settings.model_config.get("env_prefix", ""))
    found = []
    for name in type(settings).model_fields:
        for path, text in _strings(getattr(settings, name), f"{prefix}{name}".upper()):
            if text in secrets:
                found.append(path)
    return found
