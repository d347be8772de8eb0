"""uvicorn for the CLI: servers that share one process and loop, started and stopped together."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import signal
import socket
import sys
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any

import uvicorn
from tsunagu_core.config import CoreSettings
from tsunagu_core.tls import ServerTls, merge_server_options, uvicorn_options

# Which service a log line of uvicorn's comes from: `tsunagu run` has eight servers in one process.
_SERVING = contextvars.ContextVar("tsunagu_serving", default="")


class _NameTheService(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        name = _SERVING.get()
        if name and not getattr(record, "tsunagu_named", False):
            record.msg = f"[{name}] {record.msg}"
            record.tsunagu_named = True
        return True


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signals to us, so several can share one process and loop,
    and a drained process exits 0 instead of re-raising SIGTERM."""

    def __init__(self, config: uvicorn.Config, name: str = "") -> None:
        super().__init__(config)
        self.name = name
        # A socket already listening on the configured address (`tsunagu serve` binds before importing).
        self.listener: socket.socket | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        _SERVING.set(self.name)
        if sockets is None and self.listener is not None:
            sockets = [self.listener]
        await super().serve(sockets)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # The app says goodbye its own way first (the gateway: Centrifugo's `shutdown` disconnect, which
        # tells clients to reconnect, where uvicorn would close each WebSocket with a bare 1012).
        drain = getattr(getattr(self.config.app, "state", None), "drain", None)
        if drain is not None:
            for server in self.servers:  # no new connection meanwhile (SO_REUSEPORT: siblings get them)
                server.close()
            try:
                await drain()
            except Exception:
                logging.getLogger("uvicorn.error").exception("draining %s failed", self.name or "the app")
        await super().shutdown(sockets)


def event_loop(core: CoreSettings, preferred: str = "asyncio") -> str:
    """The loop `TSUNAGU_EVENT_LOOP` names, or with `auto` the one a service prefers (services.py)."""
    return preferred if core.event_loop == "auto" else core.event_loop


def run_loop(loop: str, main: Coroutine[Any, Any, int]) -> int:
    """Run `main` to its end on `loop` (`asyncio` or `uvloop`)."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def uvicorn_config(
    app: object, host: str, port: int, core: CoreSettings, server_tls: ServerTls | None
) -> uvicorn.Config:
    # A service may ask for server options of its own (the gateway: its WebSocket protocol class, the
    # largest WebSocket message); TLS keeps them (merge_server_options).
    own: dict[str, object] = getattr(getattr(app, "state", None), "server_options", None) or {}
    options = merge_server_options(own, uvicorn_options(server_tls) if server_tls is not None else {})
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        lifespan="on",
        # The scope's client is the socket's peer: X-Forwarded-For is read only from the proxies of
        # TSUNAGU_TRUSTED_PROXIES (tsunagu_core.proxies), and the TLS peer lookup needs the real address.
        proxy_headers=False,
        timeout_graceful_shutdown=int(core.shutdown_grace),
        **options,
    )


def metrics_server(
    core: CoreSettings, host: str, server_tls: ServerTls | None, listener: socket.socket | None = None
) -> EmbeddedServer:
    """`/metrics` on TSUNAGU_METRICS_PORT, apart from the API (so a NetworkPolicy can open it alone);
    `listener`: a socket already listening there (a worker's, shared with its siblings)."""
    from tsunagu_core.lifecycle import metrics_app

    config = uvicorn_config(metrics_app(), host, core.metrics_port, core, server_tls)
    config.lifespan = "off"
    server = EmbeddedServer(config, "metrics")
    server.listener = listener
    return server


async def serve_all(servers: Sequence[EmbeddedServer], server_tls: ServerTls | None = None, reload: float = 0) -> int:
    """Serve until SIGINT/SIGTERM; with `server_tls`, a rotated certificate is loaded every `reload` seconds."""
    if len(servers) > 1:
        logging.getLogger("uvicorn.error").addFilter(_NameTheService())
    loop = asyncio.get_running_loop()
    watcher = asyncio.create_task(server_tls.watch(reload)) if server_tls is not None else None

    def stop() -> None:
        for server in servers:
            server.should_exit = True

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop)
    results = await asyncio.gather(*(server.serve() for server in servers), return_exceptions=True)
    if watcher is not None:
        watcher.cancel()
    failed = [r for r in results if isinstance(r, BaseException)]
    for server in servers:
        if not server.started:
            failed.append(RuntimeError(f"{server.config.host}:{server.config.port} did not start"))
    for error in failed:
        print(f"tsunagu: {error}", file=sys.stderr)
    return 1 if failed else 0
