"""What every component shares: where it lives, how its process is found, started, probed and stopped,
and the TLS files of the development PKI it listens with."""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import ssl
import subprocess
import time
from pathlib import Path

from tsunagu.devpki import DevPki
from tsunagu.stack import proc
from tsunagu.stack.settings import HOST, StackSettings, tls_dir

STOP_GRACE = {"kafka": 30.0}
DEFAULT_STOP_GRACE = 15.0


class Component:
    """One piece of infrastructure: how to configure, start, probe and stop it from the state directory."""

    name = ""
    service = ""  # the Debian service that may hold the port (hint in errors)
    exe_names: tuple[str, ...] = ()
    port_fields: tuple[str, ...] = ()  # the StackSettings ports it listens on

    # The server drops root for a user of its own, which must reach its files in `home`.
    runs_as_own_user = False

    def __init__(self, settings: StackSettings) -> None:
        self.settings = settings
        self.home = settings.dir / self.name
        # seconds `prepare` spent downloading (the Kafka jars), shown by `up`
        self.fetch_seconds = 0.0
        if self.runs_as_own_user and proc.is_root() and not proc.traversable_by_others(settings.dir):
            # That user cannot reach a state directory under a private parent (`mktemp -d`, a home
            # directory): the component then lives in /var/tmp, one directory per state directory, and
            # `down --purge` still removes it.
            digest = hashlib.sha256(str(self.home).encode()).hexdigest()[:12]
            self.home = Path("/var/tmp") / f"tsunagu-{self.name}-{digest}"
        self.log = self.home / f"{self.name}.log"
        self.pidfile = self.home / f"{self.name}.pid"

    # -- addresses
    @property
    def port(self) -> int:
        raise NotImplementedError

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def detail(self) -> str:
        return ""

    # -- installation
    def missing_packages(self) -> list[str]:
        raise NotImplementedError

    # -- identity
    def marker(self) -> str:
        """A string in the command line of this component's process, and of no other state directory's."""
        raise NotImplementedError

    def _ours(self, pid: int) -> bool:
        return proc.alive(pid) and self.marker() in proc.cmdline(pid)

    def running_pid(self) -> int | None:
        pid = proc.read_pid(self.pidfile)
        if pid is not None and self._ours(pid):
            return pid
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and entry.name != str(os.getpid()):
                pid = int(entry.name)
                if proc.exe_name(pid) in self.exe_names and self._ours(pid):
                    with contextlib.suppress(OSError):
                        self.pidfile.write_text(f"{pid}\n")
                    return pid
        return None

    # -- lifecycle
    def prepare(self) -> None:
        """Write the config, create the data directory; may take long (first Kafka run)."""

    def command(self) -> list[str]:
        raise NotImplementedError

    def launch(self) -> subprocess.Popen[bytes] | None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            log.write(f"--- tsunagu stack up {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n".encode())
            log.flush()
            process = subprocess.Popen(
                self.command(),
                cwd=self.home,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pidfile.write_text(f"{process.pid}\n")
        return process

    def probe(self, timeout: float) -> bool:
        """True when the component answers a real request."""
        raise NotImplementedError

    def after_ready(self) -> None:
        """Idempotent setup once the component answers (the PostgreSQL role and database)."""

    def stop(self, pid: int) -> str:
        return proc.terminate(pid, STOP_GRACE.get(self.name, DEFAULT_STOP_GRACE))


def tls_client_context(settings: StackSettings) -> ssl.SSLContext:
    """How a service of this stack connects to its TLS ports: the dev CA and client certificate."""
    pki = DevPki(tls_dir(settings))
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return context


def tls_connect(settings: StackSettings, port: int, timeout: float) -> ssl.SSLSocket:
    """A handshaken TLS connection to a TLS-only port (the server checks our client certificate)."""
    sock = proc.connect(port, timeout)
    try:
        return tls_client_context(settings).wrap_socket(sock, server_hostname=HOST)
    except BaseException:
        sock.close()
        raise


def copy_tls(settings: StackSettings, target: Path, owner: pwd.struct_passwd | None) -> Path:
    """The CA and the server pair copied into `target` for a server that runs as another user and
    insists on owning its key (PostgreSQL, Mosquitto)."""
    pki = DevPki(tls_dir(settings))
    target.mkdir(parents=True, exist_ok=True)
    for source, name, mode in (
        (pki.ca_cert, "ca.crt", 0o644),
        (pki.server_cert, "tls.crt", 0o644),
        (pki.server_key, "tls.key", 0o600),
    ):
        path = target / name
        proc.write_if_changed(path, source.read_text())
        path.chmod(mode)
        if owner is not None:
            os.chown(path, owner.pw_uid, owner.pw_gid)
    if owner is not None:
        os.chown(target, owner.pw_uid, owner.pw_gid)
    return target
