"""What the runtime starts, checks for readiness and closes: every bus, broker, store and registry."""

from __future__ import annotations

from typing import Protocol


class Dependency(Protocol):
    async def start(self) -> None: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


class NothingToConnect:
    """The lifecycle of a dependency held in this process: nothing to start, always ready, nothing to
    close. Abstract stores inherit it for their memory engines; their Redis and PostgreSQL engines
    override it."""

    async def start(self) -> None:
        return None

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None
