"""Redis: the stack's server (plaintext and TLS-only ports), and PrivateRedis, a server of a test's own."""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from tsunagu.stack import proc
from tsunagu.stack.base import Component, tls_connect
from tsunagu.stack.settings import HOST, StackError, connection_env
from tsunagu.stack.templates import redis_conf, redis_server_conf


def redis_server() -> str | None:
    return proc.which("redis-server", "/usr/bin/redis-server")


def _pong(sock: socket.socket) -> bool:
    sock.sendall(b"*1\r\n$4\r\nPING\r\n")
    return sock.recv(64).startswith(b"+PONG")


def ping(port: int, timeout: float) -> bool:
    """Whether a Redis on 127.0.0.1:`port` answers PING."""
    try:
        with proc.connect(port, timeout) as sock:
            return _pong(sock)
    except OSError:
        return False


class Redis(Component):
    name = "redis"
    port_fields = ("redis_port", "redis_tls_port")
    service = "redis-server"
    exe_names = ("redis-server", "redis-check-rdb", "redis-check-aof")

    @property
    def port(self) -> int:
        return self.settings.redis_port

    def detail(self) -> str:
        return connection_env(self.settings)["TSUNAGU_REDIS_URL"]

    def missing_packages(self) -> list[str]:
        return [] if redis_server() else ["redis-server"]

    def marker(self) -> str:
        return str(self.home / "redis.conf")

    def prepare(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        proc.write_if_changed(self.home / "redis.conf", redis_conf(self.settings))

    def command(self) -> list[str]:
        return [redis_server() or "redis-server", str(self.home / "redis.conf")]

    def probe(self, timeout: float) -> bool:
        if not ping(self.port, timeout):
            return False
        try:
            with tls_connect(self.settings, self.settings.redis_tls_port, timeout) as tls:
                return _pong(tls)
        except OSError:  # ssl.SSLError included
            return False


# Servers a test started and did not stop are killed when its interpreter exits: none outlives the run.
_started: set[PrivateRedis] = set()


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_started):
        server.kill()


class PrivateRedis:
    """A redis-server of one test's own, on a free port with its files in `directory`: for the tests that
    kill or restart Redis, which must never touch the shared one.

        with PrivateRedis(tmp_path, appendonly=True) as server:
            client = redis.Redis.from_url(server.url)
            client.set("k", "v")
            server.kill()     # kill -9: no shutdown, no last write
            server.restart()  # the same port and data: with the append-only file, "k" is back

    `appendonly`: keep an append-only file (fsync every second; `config=["appendfsync always"]` for
    every write); without it nothing is saved, so a restart starts empty. `config`: more redis.conf
    directives, one a line. `sentinel`: run it as a Redis Sentinel (its `sentinel ...` lines in `config`).
    The server stops when the block ends, or at `stop()`.
    """

    def __init__(
        self,
        directory: Path,
        *,
        appendonly: bool = False,
        config: Sequence[str] = (),
        port: int | None = None,
        start_timeout: float = 20.0,
        sentinel: bool = False,
    ) -> None:
        self.directory = Path(directory)
        self.sentinel = sentinel
        self.appendonly = appendonly
        self.config = tuple(config)
        self.port = port or proc.free_port()
        self.start_timeout = start_timeout
        self.conf = self.directory / "redis.conf"
        self.data = self.directory / "data"
        self.log = self.directory / "redis.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self.running and self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> PrivateRedis:
        """Start the server (if it is not running) and wait until it answers PING."""
        if self.running:
            return self
        binary = redis_server()
        if binary is None:
            raise StackError("redis-server not found: install package redis-server (`tsunagu stack up redis` does)")
        if proc.port_in_use(self.port):
            # else PING would be answered by whoever holds it
            raise StackError(f"port {HOST}:{self.port} is already in use by {proc.port_user(self.port)}")
        self.data.mkdir(parents=True, exist_ok=True)
        proc.write_if_changed(
            self.conf, redis_server_conf(self.port, self.data, appendonly=self.appendonly, extra=self.config)
        )
        offset = proc.log_size(self.log)
        with self.log.open("ab") as log:
            self._process = subprocess.Popen(
                [binary, str(self.conf), *(["--sentinel"] if self.sentinel else [])],
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _started.add(self)
        deadline = time.monotonic() + self.start_timeout
        while True:
            code = self._process.poll()
            if code is None and ping(self.port, 1.0):
                return self
            if code is not None:
                self._process = None
                _started.discard(self)
                # Redis says what it refused in its last lines (a config line and why, a port in use)
                reason = "; ".join(proc.tail(self.log, offset, lines=3)) or "no output"
                raise StackError(f"redis-server exited with code {code} before answering: {reason}", self.log, offset)
            if time.monotonic() >= deadline:
                self.kill()
                late = f"redis-server not answering on {HOST}:{self.port} after {self.start_timeout:.0f}s"
                raise StackError(late, self.log, offset)
            time.sleep(0.05)

    def kill(self) -> None:
        """kill -9 the server (and an append-only-file rewrite it forked): no shutdown, nothing more written."""
        if self._process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, signal.SIGKILL)
        self._process.wait()
        self._process = None
        _started.discard(self)

    def restart(self) -> PrivateRedis:
        """kill -9, then start again on the same port with the same data directory."""
        self.kill()
        return self.start()

    def stop(self, grace: float = 10.0) -> None:
        """A clean shutdown (SIGTERM: Redis flushes its append-only file), kill -9 after `grace` seconds."""
        if self._process is None:
            return
        if self._process.poll() is None:
            proc.terminate(self._process.pid, grace)
        self.kill()

    def __enter__(self) -> PrivateRedis:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
