"""The client's address behind trusted proxies (`TSUNAGU_TRUSTED_PROXIES`).

`X-Forwarded-For` is read from the right: each proxy appends the address it received the request
from, so the hops a trusted proxy added are true and anything further left may be forged by the
client. The client is the first hop, from the right, that is not a trusted proxy. A request whose
socket peer is not trusted is its own client, whatever headers it sends. uvicorn's own rewriting
of the client address is off (`proxy_headers=False` where the CLI serves), so the scope's client
is always the socket's peer.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

from tsunagu_core.config import ConfigError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_HOPS = 32


def parse_networks(values: Iterable[str], variable: str) -> tuple[Network, ...]:
    """Addresses or CIDRs to networks; a bad one is a ConfigError naming the variable."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ConfigError(f"{variable}: {value!r} is not an IP address or CIDR") from None
    return tuple(networks)


def address_in(address: str, networks: Iterable[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks)


class TrustedProxies:
    def __init__(self, proxies: Iterable[str]) -> None:
        self.networks = parse_networks(proxies, "TSUNAGU_TRUSTED_PROXIES")

    def client_ip(self, scope: Mapping[str, Any]) -> str:
        """The client's address of an ASGI scope (HTTP or WebSocket)."""
        client = scope.get("client")
        peer = str(client[0]) if client else ""
        if not self.networks or not address_in(peer, self.networks):
            return peer
        hops: list[str] = []
        for name, value in scope.get("headers", ()):
            if name == b"x-forwarded-for":
                hops += [hop.strip() for hop in value.decode("latin-1").split(",")]
        hops = [hop for hop in hops if hop][-MAX_HOPS:]
        for hop in reversed(hops):
            if not address_in(hop, self.networks):
                return hop if _is_address(hop) else peer
        return hops[0] if hops else peer


def _is_address(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True
