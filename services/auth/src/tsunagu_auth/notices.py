"""Zero Trust style notices on each user's own channel (`user:#alice`): a new login, a new factor, an
ended session. The user's other sessions hear of it through the stock SDK ("was this you?").

Published straight to the broker, as the platform's services publish their channels (the gateway's
namespace `user` only lets its user subscribe and nobody publish). The channel keeps a day of history,
so a tab that reconnects recovers the notices it missed. A notice that cannot be published is logged and
dropped: it never fails the login it tells of.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any

import orjson
from prometheus_client import Counter
from tsunagu_core.broker import Broker, PublishOptions

from tsunagu_auth.store import Session

log = logging.getLogger("tsunagu.auth.notices")

NOTICES = Counter("tsunagu_auth_notices_total", "Notices published on users' own channels", ["type", "outcome"])
OPTIONS = PublishOptions(history_size=50, history_ttl=86400.0, meta_ttl=864000.0)

_BROWSERS = (("Edg/", "Edge"), ("Firefox/", "Firefox"), ("HeadlessChrome/", "Headless Chrome"), ("Chrome/", "Chrome"))
_SYSTEMS = (("Android", "Android"), ("iPhone", "iOS"), ("iPad", "iOS"), ("Windows", "Windows"), ("Mac OS X", "macOS"))


def device(user_agent: str) -> str:
    """ "Chrome on Linux", "Firefox on Windows", "python-httpx", or "unknown device": enough for a person to
    tell two sessions apart (the full user agent is shown next to it)."""
    if not user_agent:
        return "unknown device"
    browser = next((name for marker, name in _BROWSERS if marker in user_agent), None)
    if browser is None and "Safari/" in user_agent and "Version/" in user_agent:
        browser = "Safari"
    system = next((name for marker, name in _SYSTEMS if marker in user_agent), None)
    if system is None and "Linux" in user_agent:
        system = "Linux"
    if browser is None:
        match = re.match(r"[\w.\-]+", user_agent)
        return match.group(0) if match else "unknown device"
    return f"{browser} on {system}" if system else browser


def session_summary(session: Session) -> dict[str, Any]:
    return {
        "id": session.id,
        "ip": session.ip,
        "user_agent": session.user_agent,
        "device": device(session.user_agent),
        "acr": session.acr,
        "created_at": session.created_at,
    }


class Notices:
    def __init__(self, broker: Broker | None, namespace: str) -> None:
        self.broker = broker if namespace else None
        self.namespace = namespace
        self._tasks: set[asyncio.Task[None]] = set()

    def channel(self, user: str) -> str:
        return f"{self.namespace}:#{user}"

    def tell(self, user: str, kind: str, *, session: Session | None = None, **details: Any) -> None:
        """In the background: a login never waits for its notice."""
        if self.broker is None or len(self._tasks) >= 1000:
            return
        body: dict[str, Any] = {"type": kind, "time": int(time.time() * 1000), **details}
        if session is not None:
            body["session"] = session_summary(session)
        task = asyncio.create_task(self._publish(user, kind, body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, user: str, kind: str, body: dict[str, Any]) -> None:
        assert self.broker is not None
        try:
            await self.broker.publish(self.channel(user), orjson.dumps(body), OPTIONS)
            NOTICES.labels(kind, "ok").inc()
        except Exception as exc:
            NOTICES.labels(kind, "failed").inc()
            log.warning("notice %s for %s not published: %r", kind, user, exc)

    async def flush(self, timeout: float = 5.0) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
