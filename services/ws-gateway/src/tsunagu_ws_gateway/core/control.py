"""The server API's cluster-wide commands (disconnect, unsubscribe, subscribe) as this node carries them
out: they arrive on the broker's control channel (hub.py) and apply to the registry's sessions, of any
protocol."""

from __future__ import annotations

from typing import Any

from tsunagu_ws_gateway.core.gateway import Gateway
from tsunagu_ws_gateway.core.session import Session
from tsunagu_ws_gateway.protocol import codes


def control_handler(gateway: Gateway) -> Any:
    async def on_command(command: dict[str, Any]) -> None:
        kind = command.get("kind")
        user, client = str(command.get("user", "")), str(command.get("client") or "")
        sessions = gateway.registry.matching(user, client, str(command.get("session") or ""))
        if kind == "disconnect":
            code, reason = command.get("code", codes.FORCE_DISCONNECT.code), command.get("reason")
            disconnect = codes.Disconnect(
                code if isinstance(code, int) else codes.FORCE_DISCONNECT.code,
                str(reason) if reason is not None else codes.FORCE_DISCONNECT.reason,
            )
            gateway.registry.disconnect(sessions, disconnect)
        elif kind in ("unsubscribe", "subscribe"):
            channel = str(command.get("channel", ""))
            for session in sessions:
                if not isinstance(session, Session):
                    continue
                if kind == "unsubscribe":
                    await session.server_unsubscribe(channel)
                else:
                    await session.server_subscribe(channel)

    return on_command
