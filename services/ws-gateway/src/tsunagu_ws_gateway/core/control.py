"""The server API's cluster-wide commands (disconnect, unsubscribe, subscribe) as this node carries them
out: they arrive on the broker's control channel (hub.py) and apply to the registry's sessions, of any
protocol."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from tsunagu_ws_gateway.core.gateway import Gateway
from tsunagu_ws_gateway.core.session import Session
from tsunagu_ws_gateway.protocol import codes

log = logging.getLogger("tsunagu.gateway.control")


def control_handler(gateway: Gateway) -> Any:
    tasks: set[asyncio.Task[None]] = set()

    def run(work: Coroutine[Any, Any, None], what: str) -> None:
        task = asyncio.create_task(work, name=what)
        tasks.add(task)
        task.add_done_callback(done)

    def done(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("%s failed: %r", task.get_name(), task.exception())

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
            # Not awaited here: this runs inside the broker's delivery loop, and a subscribe waits for the
            # broker to confirm its own subscription, which that same loop delivers (a Redis broker then
            # stalled every channel's fan-out for 5 s and failed the subscribe).
            channel = str(command.get("channel", ""))
            for session in sessions:
                if isinstance(session, Session):
                    act = session.server_subscribe if kind == "subscribe" else session.server_unsubscribe
                    run(act(channel), f"server {kind} of {session.id} to {channel}")

    return on_command
