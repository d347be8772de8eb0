"""`tsunagu stack up|down|status|env [COMPONENT...]`: the real local infrastructure on 127.0.0.1.

Redis, Mosquitto (MQTT), PostgreSQL and Prometheus run from their Debian packages (installed with apt when
missing), Kafka in KRaft mode from the Apache jars fetched once with Maven into the cache directory. Each
component runs as a detached process on a config generated here, with its config, data, log and pid file
under one state directory (`.stack/` by default), so the stack never depends on the system services that
the Debian packages would start.

`up` is idempotent and waits until each component really answers (a Redis PING, an MQTT CONNACK, a
PostgreSQL login, Prometheus /-/ready, a Kafka metadata request); `down` stops them and keeps the data;
`status` tells which answer; `env` prints the variables that point the services at the stack.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import logging
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tsunagu.devpki import CLIENT_NAME, DevPki, ensure_dev_pki

HOST = "127.0.0.1"
COMPONENTS = ("redis", "kafka", "postgres", "mqtt", "prometheus")
ALIASES = {"mosquitto": "mqtt", "postgresql": "postgres", "pg": "postgres", "prom": "prometheus"}
PG_USER = "tsunagu"
PG_PASSWORD = "tsunagu"
PG_DATABASE = "tsunagu"
# A role that logs in only over TLS, with the development client certificate (pg_ident maps its CN).
PG_TLS_USER = "tsunagu_tls"

# Every service's /metrics, scraped by the stack's Prometheus (ws-gateway runs a second replica on 8090).
SCRAPE_TARGETS: dict[str, tuple[int, ...]] = {
    "ws-gateway": (8080, 8090),
    "auth": (8081,),
    "presence": (8082,),
    "collab": (8083,),
    "stream-ingest": (8084,),
    "mqtt-bridge": (8085,),
    "sim-engine": (8086,),
    "audit-log": (8087,),
}

# Kafka's own jars come from Maven Central; Kafka pulls slf4j-api 1.7.36, so the binding is log4j-slf4j-impl.
LOG4J_VERSION = "2.24.3"
MAVEN_TIMEOUT = 900.0
STOP_GRACE = {"kafka": 30.0}
DEFAULT_STOP_GRACE = 15.0
LOG_TAIL_LINES = 12
# librdkafka's connection errors while Kafka boots go here instead of our stderr
_QUIET = logging.getLogger("tsunagu.stack.kafka")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class StackError(Exception):
    """A component that cannot be brought up or down: `reason` is one line, `log` the file to show the tail of."""

    def __init__(self, reason: str, log: Path | None = None, log_offset: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.log = log
        self.log_offset = log_offset


class StackSettings(BaseSettings):
    """Where `tsunagu stack` keeps its state and which loopback ports the infrastructure listens on."""

    model_config = SettingsConfigDict(env_prefix="TSUNAGU_STACK_", extra="ignore")

    dir: Path = Field(
        Path(".stack"),
        description="State directory holding every component's config, data, log and pid file "
        "(relative paths are taken from the current directory).",
    )
    cache_dir: Path = Field(
        Path("~/.cache/tsunagu"),
        description="Cache for downloads shared by every state directory: the Kafka jars fetched with Maven.",
    )
    redis_port: int = Field(6379, ge=1, le=65535, description="Redis port on 127.0.0.1.")
    kafka_port: int = Field(9092, ge=1, le=65535, description="Kafka broker (bootstrap) port on 127.0.0.1.")
    kafka_controller_port: int = Field(
        9093, ge=1, le=65535, description="Kafka KRaft controller port on 127.0.0.1 (internal to the broker)."
    )
    mqtt_port: int = Field(1883, ge=1, le=65535, description="Mosquitto MQTT port on 127.0.0.1.")
    redis_tls_port: int = Field(
        6380, ge=1, le=65535, description="Redis TLS-only port on 127.0.0.1 (client certificate required)."
    )
    kafka_tls_port: int = Field(
        9094, ge=1, le=65535, description="Kafka SSL listener on 127.0.0.1 (client certificate required)."
    )
    mqtt_tls_port: int = Field(
        8883, ge=1, le=65535, description="Mosquitto TLS-only listener on 127.0.0.1 (client certificate required)."
    )
    postgres_port: int = Field(5432, ge=1, le=65535, description="PostgreSQL port on 127.0.0.1.")
    prometheus_port: int = Field(9090, ge=1, le=65535, description="Prometheus web and API port on 127.0.0.1.")
    kafka_version: str = Field(
        "4.1.1",
        pattern=r"^\d+\.\d+\.\d+$",
        description="Apache Kafka version whose jars are fetched from Maven Central (run in KRaft mode).",
    )
    start_timeout: float = Field(
        90.0, gt=0, le=3600, description="Seconds `stack up` waits for each component to answer before failing."
    )

    @field_validator("dir", "cache_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @model_validator(mode="after")
    def _distinct_ports(self) -> StackSettings:
        seen: dict[int, str] = {}
        for name in (
            "redis_port",
            "kafka_port",
            "kafka_controller_port",
            "mqtt_port",
            "postgres_port",
            "prometheus_port",
            "redis_tls_port",
            "kafka_tls_port",
            "mqtt_tls_port",
        ):
            port = getattr(self, name)
            if port in seen:
                raise ValueError(f"TSUNAGU_STACK_{name.upper()} and TSUNAGU_STACK_{seen[port].upper()} are both {port}")
            seen[port] = name
        return self


def load_settings() -> StackSettings:
    """Settings from the environment; a bad value becomes one StackError line naming the variable."""
    try:
        return StackSettings()
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = error.get("loc") or ()
            given = error.get("input")
            if loc:
                variable = f"TSUNAGU_STACK_{loc[0]}".upper()
                shown = f"={given!r}" if isinstance(given, str | int | float) else ""
                problems.append(f"{variable}{shown}: {error['msg']}")
            else:
                problems.append(str(error["msg"]).removeprefix("Value error, "))
        raise StackError("invalid configuration: " + "; ".join(problems)) from None


def postgres_dsn(settings: StackSettings) -> str:
    return f"postgresql://{PG_USER}:{PG_PASSWORD}@{HOST}:{settings.postgres_port}/{PG_DATABASE}"


def tls_dir(settings: StackSettings) -> Path:
    """The development PKI of this state directory (`devpki`: ca.crt, server/ and client/ pairs)."""
    return settings.dir / "tls"


def tls_connection_env(settings: StackSettings) -> dict[str, str]:
    """The variables that point services at the TLS-only side of this stack, with mTLS everywhere:
    the client certificate for Redis, Kafka, PostgreSQL and Mosquitto, the server certificate (and
    client CA) for the services' own ports."""
    pki = DevPki(tls_dir(settings))
    return {
        "TSUNAGU_REDIS_URL": f"rediss://{HOST}:{settings.redis_tls_port}/0",
        "TSUNAGU_KAFKA_BOOTSTRAP": f"{HOST}:{settings.kafka_tls_port}",
        "TSUNAGU_KAFKA_SECURITY_PROTOCOL": "SSL",
        "TSUNAGU_MQTT_URL": f"mqtts://{HOST}:{settings.mqtt_tls_port}",
        "TSUNAGU_POSTGRES_DSN": f"postgresql://{PG_TLS_USER}@{HOST}:{settings.postgres_port}/{PG_DATABASE}"
        "?sslmode=verify-full",
        "TSUNAGU_PROMETHEUS_URL": f"http://{HOST}:{settings.prometheus_port}",
        "TSUNAGU_TLS_CA_FILE": str(pki.ca_cert),
        "TSUNAGU_TLS_CERT_FILE": str(pki.client_cert),
        "TSUNAGU_TLS_KEY_FILE": str(pki.client_key),
        "TSUNAGU_SERVER_TLS_CERT_FILE": str(pki.server_cert),
        "TSUNAGU_SERVER_TLS_KEY_FILE": str(pki.server_key),
        "TSUNAGU_SERVER_TLS_CLIENT_CA_FILE": str(pki.ca_cert),
    }


def connection_env(settings: StackSettings) -> dict[str, str]:
    """The variables services and tests read to reach this stack."""
    return {
        "TSUNAGU_REDIS_URL": f"redis://{HOST}:{settings.redis_port}/0",
        "TSUNAGU_KAFKA_BOOTSTRAP": f"{HOST}:{settings.kafka_port}",
        "TSUNAGU_MQTT_URL": f"mqtt://{HOST}:{settings.mqtt_port}",
        "TSUNAGU_POSTGRES_DSN": postgres_dsn(settings),
        "TSUNAGU_PROMETHEUS_URL": f"http://{HOST}:{settings.prometheus_port}",
    }


# --------------------------------------------------------------------------- generated configuration


def redis_conf(settings: StackSettings) -> str:
    data = settings.dir / "redis"
    pki = DevPki(tls_dir(settings))
    return "\n".join(
        [
            "# generated by `tsunagu stack`; rewritten at every `up`",
            f"bind {HOST}",
            f"port {settings.redis_port}",
            "protected-mode yes",
            "daemonize no",
            'logfile ""',
            f"dir {data}",
            'save ""',
            "appendonly no",
            # TLS-only beside the plaintext port; a client certificate from the dev CA is required
            f"tls-port {settings.redis_tls_port}",
            f"tls-cert-file {pki.server_cert}",
            f"tls-key-file {pki.server_key}",
            f"tls-ca-cert-file {pki.ca_cert}",
            "tls-auth-clients yes",
            # the config path in the process title lets `stack` recognise its own redis-server
            'proc-title-template "{title} {listen-addr} {server-mode} {config-file}"',
            "",
        ]
    )


def mosquitto_conf(
    settings: StackSettings, user: str | None = None, tls: Path | None = None, data: Path | None = None
) -> str:
    """`tls`: a directory with Mosquitto's own copies of ca.crt, tls.crt and tls.key (readable by its user);
    `data`: its persistence directory (default: mqtt/data in the state directory)."""
    data = data or settings.dir / "mqtt" / "data"
    lines = [
        "# generated by `tsunagu stack`; rewritten at every `up`",
        "allow_anonymous true",
        f"listener {settings.mqtt_port} {HOST}",
    ]
    if tls is not None:
        lines += [
            # TLS-only; the client certificate's CN becomes the MQTT username
            f"listener {settings.mqtt_tls_port} {HOST}",
            f"cafile {tls / 'ca.crt'}",
            f"certfile {tls / 'tls.crt'}",
            f"keyfile {tls / 'tls.key'}",
            "require_certificate true",
            "use_identity_as_username true",
        ]
    lines += [
        "persistence true",
        f"persistence_location {data}/",
        "autosave_interval 60",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
    ]
    if user:
        lines.append(f"user {user}")
    return "\n".join(lines) + "\n"


def postgres_conf(settings: StackSettings, socket_dir: Path, home: Path) -> str:
    """`home`: the cluster's directory, holding its TLS copies (tls/) and the hba/ident files written beside."""
    tls = home / "tls"
    return "\n".join(
        [
            "# generated by `tsunagu stack`; rewritten at every `up`, included from postgresql.conf",
            f"listen_addresses = '{HOST}'",
            f"port = {settings.postgres_port}",
            f"unix_socket_directories = '{socket_dir}'",
            "ssl = on",
            f"ssl_cert_file = '{tls / 'tls.crt'}'",
            f"ssl_key_file = '{tls / 'tls.key'}'",
            f"ssl_ca_file = '{tls / 'ca.crt'}'",
            f"hba_file = '{home / 'pg_hba.conf'}'",
            f"ident_file = '{home / 'pg_ident.conf'}'",
            "max_connections = 200",
            "fsync = on",
            "log_destination = 'stderr'",
            "logging_collector = off",
            "log_line_prefix = '%m [%p] '",
            "",
        ]
    )


def postgres_hba() -> str:
    """Peer login for the superuser on the socket; the TLS role only over TLS with its certificate."""
    return "\n".join(
        [
            "# generated by `tsunagu stack`; rewritten at every `up`",
            "local all all peer",
            f"hostssl all {PG_TLS_USER} 127.0.0.1/32 cert map=tsunagu",
            f"hostssl all {PG_TLS_USER} ::1/128 cert map=tsunagu",
            f"host all {PG_TLS_USER} 0.0.0.0/0 reject",
            f"host all {PG_TLS_USER} ::/0 reject",
            "host all all 127.0.0.1/32 scram-sha-256",
            "host all all ::1/128 scram-sha-256",
            "",
        ]
    )


def postgres_ident() -> str:
    return f"# generated by `tsunagu stack`\ntsunagu {CLIENT_NAME} {PG_TLS_USER}\n"


def kafka_server_properties(settings: StackSettings) -> str:
    port, controller, tls_port = settings.kafka_port, settings.kafka_controller_port, settings.kafka_tls_port
    pki = DevPki(tls_dir(settings))
    return "\n".join(
        [
            "# generated by `tsunagu stack`; rewritten at every `up`",
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@{HOST}:{controller}",
            f"listeners=PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{controller},SSL://{HOST}:{tls_port}",
            f"advertised.listeners=PLAINTEXT://{HOST}:{port},SSL://{HOST}:{tls_port}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SSL:SSL",
            # the SSL listener: PEM key and chain from the development PKI, client certificates required
            "ssl.keystore.type=PEM",
            f"ssl.keystore.location={pki.server_pem}",
            "ssl.truststore.type=PEM",
            f"ssl.truststore.location={pki.ca_cert}",
            "ssl.client.auth=required",
            f"log.dirs={settings.dir / 'kafka' / 'data'}",
            "offsets.topic.replication.factor=1",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "num.partitions=3",
            "group.initial.rebalance.delay.ms=0",
            "auto.create.topics.enable=true",
            "",
        ]
    )


def kafka_pom(kafka_version: str) -> str:
    def dependency(group: str, artifact: str, version: str) -> str:
        return (
            f"    <dependency><groupId>{group}</groupId><artifactId>{artifact}</artifactId>"
            f"<version>{version}</version></dependency>"
        )

    return "\n".join(
        [
            '<project xmlns="http://maven.apache.org/POM/4.0.0">',
            "  <!-- generated by `tsunagu stack`: the runtime jars of an Apache Kafka broker -->",
            "  <modelVersion>4.0.0</modelVersion>",
            "  <groupId>dev.tsunagu</groupId>",
            "  <artifactId>kafka-runtime</artifactId>",
            f"  <version>{kafka_version}</version>",
            "  <packaging>pom</packaging>",
            "  <dependencies>",
            dependency("org.apache.kafka", "kafka_2.13", kafka_version),
            dependency("org.apache.logging.log4j", "log4j-slf4j-impl", LOG4J_VERSION),
            dependency("org.apache.logging.log4j", "log4j-core", LOG4J_VERSION),
            "  </dependencies>",
            "</project>",
            "",
        ]
    )


def kafka_log4j2_properties() -> str:
    return "\n".join(
        [
            "# generated by `tsunagu stack`: Kafka logs INFO to stdout, which is kafka.log",
            "status = warn",
            "appender.console.type = Console",
            "appender.console.name = STDOUT",
            "appender.console.layout.type = PatternLayout",
            "appender.console.layout.pattern = [%d] %p %m (%c)%n",
            "rootLogger.level = INFO",
            "rootLogger.appenderRef.stdout.ref = STDOUT",
            "logger.controller.name = org.apache.kafka.controller",
            "logger.controller.level = INFO",
            "logger.request.name = kafka.request.logger",
            "logger.request.level = WARN",
            "",
        ]
    )


def prometheus_yml(settings: StackSettings) -> str:
    lines = [
        "# generated by `tsunagu stack`; rewritten at every `up`",
        "global:",
        "  scrape_interval: 5s",
        "  evaluation_interval: 15s",
        "scrape_configs:",
        "  - job_name: prometheus",
        "    static_configs:",
        f"      - targets: ['{HOST}:{settings.prometheus_port}']",
    ]
    for service, ports in SCRAPE_TARGETS.items():
        targets = ", ".join(f"'{HOST}:{port}'" for port in ports)
        lines += [
            f"  - job_name: tsunagu-{service}",
            "    metrics_path: /metrics",
            "    static_configs:",
            f"      - targets: [{targets}]",
            "        labels:",
            f"          service: {service}",
        ]
    return "\n".join(lines) + "\n"


def kafka_cluster_id() -> str:
    """A Kafka cluster id as `StorageTool random-uuid` makes one: 16 random bytes, URL-safe base64."""
    while True:
        value = base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")
        if not value.startswith("-"):
            return value


# --------------------------------------------------------------------------- processes and ports


def _is_root() -> bool:
    return os.geteuid() == 0


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _proc_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[0]


def _alive(pid: int) -> bool:
    state = _proc_state(pid)
    return state is not None and state not in ("Z", "X")


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        return " ".join(raw.split())
    except OSError:
        return ""


def _exe_name(pid: int) -> str | None:
    try:
        return Path(os.readlink(f"/proc/{pid}/exe")).name
    except OSError:
        return None


def _read_pid(path: Path) -> int | None:
    try:
        first = path.read_text().split("\n", 1)[0].strip()
        return int(first) if first else None
    except (OSError, ValueError):
        return None


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return True
    return False


def _listening_inodes(port: int) -> set[str]:
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    return inodes


def port_owner(port: int) -> tuple[int, str] | None:
    """(pid, command line) of the process listening on a TCP port, when /proc lets us see it."""
    inodes = _listening_inodes(port)
    if not inodes:
        return None
    targets = {f"socket:[{inode}]" for inode in inodes}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in targets:
                        pid = int(proc.name)
                        return pid, _cmdline(pid)[:120]
    return None


def _tail(path: Path | None, offset: int = 0, lines: int = LOG_TAIL_LINES) -> list[str]:
    if path is None:
        return []
    try:
        with path.open("rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            start = max(offset if offset <= size else 0, size - 65536)
            handle.seek(start)
            text = handle.read().decode(errors="replace")
    except OSError:
        return []
    kept = [_ANSI.sub("", line).rstrip() for line in text.splitlines()]
    kept = [line for line in kept if line.strip()]
    return [line if len(line) <= 240 else line[:237] + "..." for line in kept[-lines:]]


def _reason_line(text: str | bytes | None) -> str:
    """The line that says what went wrong: the first error line of a tool's output, else its last line."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    lines = [_ANSI.sub("", line).strip() for line in (text or "").splitlines()]
    lines = [line for line in lines if line and line not in ("[ERROR]", "ERROR:")]
    for line in lines:
        if re.match(r"^(\[ERROR\]|\[FATAL\]|(ERROR|FATAL|Error|error)\b)", line):
            return line
        if line.startswith(("initdb:", "pg_ctl:")):
            return line
    return lines[-1] if lines else ""


def _run(
    command: Sequence[str],
    *,
    what: str,
    timeout: float,
    cwd: Path | None = None,
    log: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion; failure is a StackError naming `what` with the command's last line."""
    offset = log.stat().st_size if log is not None and log.exists() else 0
    try:
        result = subprocess.run(
            list(command),
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            start_new_session=True,
        )
    except FileNotFoundError:
        raise StackError(f"{what}: {command[0]} not found", log, offset) from None
    except subprocess.TimeoutExpired:
        raise StackError(f"{what}: no answer after {timeout:.0f}s", log, offset) from None
    if log is not None and (result.stdout or result.stderr):
        with log.open("a") as handle:
            handle.write(result.stdout + result.stderr)
    if result.returncode != 0:
        detail = _reason_line(result.stderr) or _reason_line(result.stdout) or f"exit code {result.returncode}"
        raise StackError(f"{what} failed: {detail}", log, offset)
    return result


# --------------------------------------------------------------------------- installation


_apt_lock = threading.Lock()
_apt_updated = False
# Other tsunagu processes (`python -m tsunagu.browser` next to `tsunagu stack up`) install too: apt's own
# locks make the second one fail at once instead of waiting, and both would share policy-rc.d.
APT_PROCESS_LOCK = Path("/var/lock/tsunagu-apt.lock")
# ... and apt run by anyone else (unattended upgrades) is waited for this long.
APT_LOCK_TIMEOUT = "600"


@contextlib.contextmanager
def _apt_process_lock() -> Iterator[None]:
    APT_PROCESS_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with APT_PROCESS_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def _no_service_autostart() -> Iterator[None]:
    """While apt installs, the Debian packages must not start their own daemons on our ports."""
    policy = Path("/usr/sbin/policy-rc.d")
    if policy.exists():
        yield
        return
    policy.write_text("#!/bin/sh\n# written by `tsunagu stack` while it runs apt-get\nexit 101\n")
    policy.chmod(0o755)
    try:
        yield
    finally:
        policy.unlink(missing_ok=True)


def apt_install(packages: Sequence[str]) -> None:
    """Install Debian packages in one apt-get call (after one `apt-get update` per run)."""
    global _apt_updated
    names = " ".join(packages)
    if not _is_root():
        raise StackError(f"{names} not installed, and installing needs root: run `sudo apt-get install -y {names}`")
    if shutil.which("apt-get") is None:
        raise StackError(f"{names} not installed and apt-get is missing: install {names} with the package manager")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    wait = ["-o", f"DPkg::Lock::Timeout={APT_LOCK_TIMEOUT}"]
    with _apt_lock, _apt_process_lock(), _no_service_autostart():
        print(f"{'install':<11} {'apt-get':<15} {names} ...", flush=True)
        if not _apt_updated:
            _run(["apt-get", *wait, "update"], what="apt-get update", timeout=900, env=env)
            _apt_updated = True
        _run(
            ["apt-get", *wait, "install", "-y", "--no-install-recommends", *packages],
            what=f"apt-get install {names}",
            timeout=1800,
            env=env,
        )


def _which(name: str, *extra: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for candidate in extra:
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _traversable_by_others(path: Path) -> bool:
    """Whether every existing directory on the way to `path` lets other users pass (o+x)."""
    for ancestor in [path, *path.parents]:
        if ancestor.exists() and not ancestor.stat().st_mode & stat.S_IXOTH:
            return False
    return True


def postgres_bindir() -> Path | None:
    """The newest /usr/lib/postgresql/<major>/bin that has a server."""
    found: list[tuple[int, Path]] = []
    for path in Path("/usr/lib/postgresql").glob("*/bin"):
        if (path / "postgres").exists() and path.parent.name.isdigit():
            found.append((int(path.parent.name), path))
    return max(found)[1] if found else None


# --------------------------------------------------------------------------- components


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
        if self.runs_as_own_user and _is_root() and not _traversable_by_others(settings.dir):
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
        return _alive(pid) and self.marker() in _cmdline(pid)

    def running_pid(self) -> int | None:
        pid = _read_pid(self.pidfile)
        if pid is not None and self._ours(pid):
            return pid
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit() and proc.name != str(os.getpid()):
                pid = int(proc.name)
                if _exe_name(pid) in self.exe_names and self._ours(pid):
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
            proc = subprocess.Popen(
                self.command(),
                cwd=self.home,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pidfile.write_text(f"{proc.pid}\n")
        return proc

    def probe(self, timeout: float) -> bool:
        """True when the component answers a real request."""
        raise NotImplementedError

    def after_ready(self) -> None:
        """Idempotent setup once the component answers (the PostgreSQL role and database)."""

    def stop(self, pid: int) -> str:
        grace = STOP_GRACE.get(self.name, DEFAULT_STOP_GRACE)
        started = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        while time.monotonic() - started < grace:
            if not _alive(pid):
                return f"stopped (pid {pid}, {time.monotonic() - started:.1f}s)"
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        return f"killed (pid {pid} ignored SIGTERM for {grace:.0f}s)"


def _connect(port: int, timeout: float) -> socket.socket:
    return socket.create_connection((HOST, port), timeout=timeout)


def _tls_client_context(settings: StackSettings) -> ssl.SSLContext:
    """How a service of this stack connects to its TLS ports: the dev CA and client certificate."""
    pki = DevPki(tls_dir(settings))
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return context


def _tls_connect(settings: StackSettings, port: int, timeout: float) -> ssl.SSLSocket:
    """A handshaken TLS connection to a TLS-only port (the server checks our client certificate)."""
    sock = _connect(port, timeout)
    try:
        return _tls_client_context(settings).wrap_socket(sock, server_hostname=HOST)
    except BaseException:
        sock.close()
        raise


def _copy_tls(settings: StackSettings, target: Path, owner: pwd.struct_passwd | None) -> Path:
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
        _write(path, source.read_text())
        path.chmod(mode)
        if owner is not None:
            os.chown(path, owner.pw_uid, owner.pw_gid)
    if owner is not None:
        os.chown(target, owner.pw_uid, owner.pw_gid)
    return target


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

    def binary(self) -> str | None:
        return _which("redis-server", "/usr/bin/redis-server")

    def missing_packages(self) -> list[str]:
        return [] if self.binary() else ["redis-server"]

    def marker(self) -> str:
        return str(self.home / "redis.conf")

    def prepare(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        _write(self.home / "redis.conf", redis_conf(self.settings))

    def command(self) -> list[str]:
        return [self.binary() or "redis-server", str(self.home / "redis.conf")]

    def probe(self, timeout: float) -> bool:
        try:
            with _connect(self.port, timeout) as sock:
                sock.sendall(b"*1\r\n$4\r\nPING\r\n")
                if not sock.recv(64).startswith(b"+PONG"):
                    return False
            with _tls_connect(self.settings, self.settings.redis_tls_port, timeout) as tls:
                tls.sendall(b"*1\r\n$4\r\nPING\r\n")
                return tls.recv(64).startswith(b"+PONG")
        except OSError:  # ssl.SSLError included
            return False


class Mqtt(Component):
    name = "mqtt"
    port_fields = ("mqtt_port", "mqtt_tls_port")
    service = "mosquitto"
    exe_names = ("mosquitto",)
    runs_as_own_user = True  # mosquitto drops root; it reads its TLS files (and persists) as that user

    @property
    def port(self) -> int:
        return self.settings.mqtt_port

    def detail(self) -> str:
        return connection_env(self.settings)["TSUNAGU_MQTT_URL"]

    def binary(self) -> str | None:
        return _which("mosquitto", "/usr/sbin/mosquitto")

    def missing_packages(self) -> list[str]:
        return [] if self.binary() else ["mosquitto"]

    def marker(self) -> str:
        return str(self.home / "mosquitto.conf")

    def prepare(self) -> None:
        data = self.home / "data"
        data.mkdir(parents=True, exist_ok=True)
        user: str | None = None
        owner: pwd.struct_passwd | None = None
        if _is_root():
            # run as root, mosquitto drops to its own user, which must own the persistence directory
            try:
                owner = pwd.getpwnam("mosquitto")
            except KeyError:
                user = "root"
            else:
                user = "mosquitto"
                for path in (data, *data.iterdir()):
                    os.chown(path, owner.pw_uid, owner.pw_gid)
        tls = _copy_tls(self.settings, self.home / "tls", owner)
        _write(self.home / "mosquitto.conf", mosquitto_conf(self.settings, user, tls, data))

    def command(self) -> list[str]:
        return [self.binary() or "mosquitto", "-c", str(self.home / "mosquitto.conf")]

    def probe(self, timeout: float) -> bool:
        client_id = b"tsunagu-stack-probe"
        variable = b"\x00\x04MQTT\x04\x02\x00\x0a"  # MQTT 3.1.1, clean session, keep-alive 10 s
        payload = len(client_id).to_bytes(2, "big") + client_id
        connect = bytes([0x10, len(variable) + len(payload)]) + variable + payload
        try:
            with _connect(self.port, timeout) as sock:
                sock.sendall(connect)
                answer = sock.recv(4)
                with contextlib.suppress(OSError):
                    sock.sendall(b"\xe0\x00")  # DISCONNECT
                if answer != b"\x20\x02\x00\x00":
                    return False
            with _tls_connect(self.settings, self.settings.mqtt_tls_port, timeout) as tls:
                tls.sendall(connect)
                answer = tls.recv(4)
                with contextlib.suppress(OSError):
                    tls.sendall(b"\xe0\x00")
                return answer == b"\x20\x02\x00\x00"
        except OSError:
            return False


class Prometheus(Component):
    name = "prometheus"
    port_fields = ("prometheus_port",)
    service = "prometheus"
    exe_names = ("prometheus",)

    @property
    def port(self) -> int:
        return self.settings.prometheus_port

    def detail(self) -> str:
        return connection_env(self.settings)["TSUNAGU_PROMETHEUS_URL"]

    def binary(self) -> str | None:
        return _which("prometheus", "/usr/bin/prometheus")

    def missing_packages(self) -> list[str]:
        return [] if self.binary() else ["prometheus"]

    def marker(self) -> str:
        return f"--config.file={self.home / 'prometheus.yml'}"

    def prepare(self) -> None:
        (self.home / "data").mkdir(parents=True, exist_ok=True)
        _write(self.home / "prometheus.yml", prometheus_yml(self.settings))

    def command(self) -> list[str]:
        return [
            self.binary() or "prometheus",
            f"--config.file={self.home / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.home / 'data'}",
            f"--web.listen-address={self.address}",
            "--web.enable-lifecycle",
        ]

    def probe(self, timeout: float) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.address}/-/ready", timeout=timeout) as response:
                return int(response.status) == 200
        except (OSError, urllib.error.URLError, ValueError):
            return False


class Kafka(Component):
    name = "kafka"
    port_fields = ("kafka_port", "kafka_controller_port")
    exe_names = ("java",)

    def __init__(self, settings: StackSettings) -> None:
        super().__init__(settings)
        self.fetch_seconds = 0.0

    @property
    def port(self) -> int:
        return self.settings.kafka_port

    def detail(self) -> str:
        return f"bootstrap {self.address}"

    @property
    def dist(self) -> Path:
        return self.settings.cache_dir / f"kafka-{self.settings.kafka_version}"

    @property
    def libs(self) -> Path:
        return self.dist / "libs"

    def missing_packages(self) -> list[str]:
        missing = []
        if not _which("java", "/usr/bin/java"):
            missing.append("default-jre-headless")
        if not _which("mvn", "/usr/bin/mvn"):
            missing.append("maven")
        return missing

    def marker(self) -> str:
        return str(self.home / "server.properties")

    def _java(self) -> list[str]:
        return [
            _which("java", "/usr/bin/java") or "java",
            f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
            "-Djava.awt.headless=true",
            "-cp",
            f"{self.libs}/*",
        ]

    def ensure_jars(self) -> None:
        """The Kafka runtime jars in the cache, fetched once with Maven; a marker file says they are complete."""
        marker = self.dist / ".complete"
        pom = kafka_pom(self.settings.kafka_version)
        digest = hashlib.sha256(pom.encode()).hexdigest()
        jar = self.libs / f"kafka_2.13-{self.settings.kafka_version}.jar"
        if marker.exists() and marker.read_text().strip() == digest and jar.exists():
            return
        self.dist.mkdir(parents=True, exist_ok=True)
        with (self.dist / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if marker.exists() and marker.read_text().strip() == digest and jar.exists():
                return
            started = time.monotonic()
            marker.unlink(missing_ok=True)
            shutil.rmtree(self.libs, ignore_errors=True)
            (self.dist / "pom.xml").write_text(pom)
            mvn = _which("mvn", "/usr/bin/mvn") or "mvn"
            fetch_log = self.dist / "maven.log"
            fetch_log.write_text("")
            _run(
                [
                    mvn,
                    "-q",
                    "-B",
                    "-Dstyle.color=never",
                    "-f",
                    str(self.dist / "pom.xml"),
                    "dependency:copy-dependencies",
                    f"-DoutputDirectory={self.libs}",
                    "-DincludeScope=runtime",
                ],
                what=f"fetching the Kafka {self.settings.kafka_version} jars with Maven",
                timeout=MAVEN_TIMEOUT,
                cwd=self.dist,
                log=fetch_log,
            )
            if not jar.exists():
                raise StackError(f"Maven finished but {jar} is missing", fetch_log)
            marker.write_text(digest + "\n")
            self.fetch_seconds = time.monotonic() - started

    def prepare(self) -> None:
        self.ensure_jars()
        self.home.mkdir(parents=True, exist_ok=True)
        properties = self.home / "server.properties"
        _write(properties, kafka_server_properties(self.settings))
        _write(self.home / "log4j2.properties", kafka_log4j2_properties())
        data = self.home / "data"
        if (data / "meta.properties").exists():
            return
        id_file = self.home / "cluster.id"
        cluster_id = id_file.read_text().strip() if id_file.exists() else ""
        if not cluster_id:
            cluster_id = kafka_cluster_id()
            id_file.write_text(cluster_id + "\n")
        self.log.touch()
        _run(
            [
                *self._java(),
                "kafka.tools.StorageTool",
                "format",
                "-t",
                cluster_id,
                "-c",
                str(properties),
                "--ignore-formatted",
            ],
            what="formatting the Kafka storage",
            timeout=120,
            cwd=self.home,
            log=self.log,
        )

    def command(self) -> list[str]:
        java = self._java()
        return [java[0], "-Xms256m", "-Xmx512m", *java[1:], "kafka.Kafka", str(self.home / "server.properties")]

    def probe(self, timeout: float) -> bool:
        try:
            _connect(self.port, min(timeout, 1.0)).close()
            _tls_connect(self.settings, self.settings.kafka_tls_port, min(timeout, 3.0)).close()
        except OSError:
            return False
        try:
            from confluent_kafka.admin import AdminClient
        except ImportError:
            raise StackError("confluent-kafka is not installed: cannot ask Kafka for metadata") from None
        config: dict[str, Any] = {"bootstrap.servers": self.address, "logger": _QUIET, "socket.timeout.ms": 3000}
        admin = AdminClient(config)
        try:
            metadata = admin.list_topics(timeout=timeout)
        except Exception:  # KafkaException: not answering metadata yet
            return False
        return bool(metadata.brokers)


class Postgres(Component):
    name = "postgres"
    port_fields = ("postgres_port",)
    service = "postgresql"
    exe_names = ("postgres",)

    runs_as_own_user = True

    @property
    def port(self) -> int:
        return self.settings.postgres_port

    def detail(self) -> str:
        return postgres_dsn(self.settings)

    @property
    def data(self) -> Path:
        return self.home / "data"

    def socket_dir(self) -> Path:
        preferred = self.home / "run"
        if len(str(preferred / f".s.PGSQL.{self.port}")) < 100:
            return preferred
        digest = hashlib.sha256(str(self.home).encode()).hexdigest()[:12]
        return Path("/tmp") / f"tsunagu-pg-{digest}"  # unix socket paths are limited to 107 bytes

    def bin(self, tool: str) -> str:
        bindir = postgres_bindir()
        if bindir is None:
            raise StackError("PostgreSQL server binaries not found under /usr/lib/postgresql (package postgresql)")
        return str(bindir / tool)

    def missing_packages(self) -> list[str]:
        return [] if postgres_bindir() else ["postgresql"]

    def marker(self) -> str:
        return str(self.data)

    def running_pid(self) -> int | None:
        pid = _read_pid(self.data / "postmaster.pid")
        if pid is not None and self._ours(pid):
            return pid
        return None

    def _as_postgres(self, command: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *command] if _is_root() else command

    def _postgres_user(self) -> pwd.struct_passwd | None:
        if not _is_root():
            return None
        try:
            return pwd.getpwnam("postgres")
        except KeyError:
            raise StackError("the `postgres` OS user is missing (it comes with package postgresql-common)") from None

    def prepare(self) -> None:
        owner = self._postgres_user()
        self.home.mkdir(parents=True, exist_ok=True)
        socket_dir = self.socket_dir()
        socket_dir.mkdir(parents=True, exist_ok=True)
        self.log.touch()
        if owner is not None:
            for path in (self.home, socket_dir, self.log):
                os.chown(path, owner.pw_uid, owner.pw_gid)
            check = subprocess.run(self._as_postgres(["test", "-w", str(self.home)]), check=False)
            if check.returncode != 0:
                raise StackError(
                    f"the postgres OS user cannot write {self.home} (a parent directory is not searchable by "
                    "others): set TSUNAGU_STACK_DIR to a directory it can reach"
                )
        if not (self.data / "PG_VERSION").exists():
            if self.data.exists() and any(self.data.iterdir()):
                raise StackError(f"{self.data} is not empty and has no PG_VERSION: remove it (`stack down --purge`)")
            _run(
                self._as_postgres(
                    [
                        self.bin("initdb"),
                        "-D",
                        str(self.data),
                        "-U",
                        "postgres",
                        "--auth-local=peer",
                        "--auth-host=scram-sha-256",
                        "--encoding=UTF8",
                        "--locale=C",
                        "--no-instructions",
                    ]
                ),
                what="initdb",
                timeout=300,
                cwd=self.home,
                log=self.log,
            )
        major = (self.data / "PG_VERSION").read_text().strip()
        bindir = postgres_bindir()
        if bindir is not None and bindir.parent.name != major:
            raise StackError(
                f"{self.data} was made by PostgreSQL {major}, this machine runs {bindir.parent.name}: "
                "remove it (`stack down --purge`) or install postgresql-" + major
            )
        _copy_tls(self.settings, self.home / "tls", owner)
        for name, text in (("pg_hba.conf", postgres_hba()), ("pg_ident.conf", postgres_ident())):
            _write(self.home / name, text)
            if owner is not None:
                os.chown(self.home / name, owner.pw_uid, owner.pw_gid)
        conf = self.data / "tsunagu.conf"
        _write(conf, postgres_conf(self.settings, socket_dir, self.home))
        main_conf = self.data / "postgresql.conf"
        include = "include_if_exists = 'tsunagu.conf'"
        if include not in main_conf.read_text():
            with main_conf.open("a") as handle:
                handle.write(f"\n# added by `tsunagu stack`\n{include}\n")
        if owner is not None:
            os.chown(conf, owner.pw_uid, owner.pw_gid)

    def launch(self) -> subprocess.Popen[bytes] | None:
        timeout = self.settings.start_timeout
        _run(
            self._as_postgres(
                [
                    self.bin("pg_ctl"),
                    "start",
                    "-D",
                    str(self.data),
                    "-l",
                    str(self.log),
                    "-w",
                    "-t",
                    str(int(timeout)),
                    "-s",
                ]
            ),
            what="pg_ctl start",
            timeout=timeout + 10,
            cwd=self.home,
            log=self.log,
        )
        pid = _read_pid(self.data / "postmaster.pid")
        if pid is not None:
            self.pidfile.write_text(f"{pid}\n")
        return None

    def probe(self, timeout: float) -> bool:
        try:
            result = subprocess.run(
                [self.bin("pg_isready"), "-q", "-h", HOST, "-p", str(self.port), "-t", str(max(1, int(timeout)))],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout + 5,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired, StackError):
            return False
        return result.returncode == 0

    def _psql(self, sql: str) -> str:
        command = self._as_postgres(
            [
                self.bin("psql"),
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                str(self.socket_dir()),
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-tAc",
                sql,
            ]
        )
        return _run(command, what="creating the tsunagu role and database", timeout=60, cwd=self.home).stdout

    def after_ready(self) -> None:
        self._psql(
            "DO $$BEGIN "
            f"IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{PG_USER}') THEN "
            f"CREATE ROLE {PG_USER} LOGIN CREATEDB PASSWORD '{PG_PASSWORD}'; "
            f"ELSE ALTER ROLE {PG_USER} LOGIN CREATEDB PASSWORD '{PG_PASSWORD}'; "
            "END IF; END$$;"
        )
        if not self._psql(f"SELECT 1 FROM pg_database WHERE datname = '{PG_DATABASE}'").strip():
            self._psql(f"CREATE DATABASE {PG_DATABASE} OWNER {PG_USER}")
        # The TLS role acts as tsunagu (member, inheriting), logging in by certificate only.
        self._psql(
            "DO $$BEGIN "
            f"IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{PG_TLS_USER}') THEN "
            f"CREATE ROLE {PG_TLS_USER} LOGIN; END IF; END$$;"
        )
        self._psql(f"GRANT {PG_USER} TO {PG_TLS_USER}")
        _run(
            [self.bin("psql"), "-X", "-tAc", "SELECT 1", f"{postgres_dsn(self.settings)}?connect_timeout=5"],
            what=f"logging in as {PG_USER} over TCP",
            timeout=30,
            cwd=self.home,
        )
        pki = DevPki(tls_dir(self.settings))
        tls_dsn = (
            f"postgresql://{PG_TLS_USER}@{HOST}:{self.port}/{PG_DATABASE}?sslmode=verify-full&connect_timeout=5"
            f"&sslrootcert={pki.ca_cert}&sslcert={pki.client_cert}&sslkey={pki.client_key}"
        )
        _run(
            [self.bin("psql"), "-X", "-tAc", "SELECT 1", tls_dsn],
            what=f"logging in as {PG_TLS_USER} over TLS with the client certificate",
            timeout=30,
            cwd=self.home,
        )

    def stop(self, pid: int) -> str:
        started = time.monotonic()
        _run(
            self._as_postgres([self.bin("pg_ctl"), "stop", "-D", str(self.data), "-m", "fast", "-w", "-t", "60"]),
            what="pg_ctl stop",
            timeout=90,
            cwd=self.home,
            log=self.log,
        )
        return f"stopped (pid {pid}, {time.monotonic() - started:.1f}s)"


COMPONENT_CLASSES: dict[str, Callable[[StackSettings], Component]] = {
    "redis": Redis,
    "kafka": Kafka,
    "postgres": Postgres,
    "mqtt": Mqtt,
    "prometheus": Prometheus,
}


def components(settings: StackSettings, names: Sequence[str] = ()) -> list[Component]:
    """The named components (all when none are named), in start order."""
    wanted = {ALIASES.get(name, name) for name in names}
    unknown = sorted(wanted - set(COMPONENTS))
    if unknown:
        raise StackError(f"unknown component {', '.join(unknown)}: choose from {' '.join(COMPONENTS)}")
    return [COMPONENT_CLASSES[name](settings) for name in COMPONENTS if not wanted or name in wanted]


# --------------------------------------------------------------------------- commands


_print_lock = threading.Lock()


def _line(component: Component, message: str, tail: Sequence[str] = (), stream: IO[str] | None = None) -> None:
    out = stream or sys.stdout
    with _print_lock:
        print(f"{component.name:<11} {component.address:<15} {message}", file=out)
        for entry in tail:
            print(f"    | {entry}", file=out)
        out.flush()


def _failure(component: Component, error: StackError) -> None:
    log = error.log
    tail = _tail(log, error.log_offset)
    message = f"FAILED: {error.reason}"
    if tail and log is not None:
        message += f"; last log lines ({log}):"
    _line(component, message, tail)


def _port_conflict(component: Component) -> StackError | None:
    for field in component.port_fields:
        port = getattr(component.settings, field)
        if not _port_in_use(port):
            continue
        owner = port_owner(port)
        who = f"pid {owner[0]} ({owner[1]})" if owner else "another process"
        variable = f"TSUNAGU_STACK_{field.upper()}"
        hint = f"; stop it or set {variable} to a free port"
        if owner and component.service and any(name in owner[1] for name in component.exe_names):
            hint = (
                f"; if it is the system service of the Debian package, stop it with "
                f"`service {component.service} stop`, or set {variable} to a free port"
            )
        return StackError(f"port {HOST}:{port} is already in use by {who}, not by this stack{hint}")
    return None


def _log_reason(path: Path, offset: int) -> str:
    """The most telling line a failed process wrote to its log since `offset` (an exception, else an error)."""
    lines = _tail(path, offset, lines=400)
    for pattern in (r"(Exception|Error): ", r"\b(FATAL|PANIC|ERROR|Error|error)\b"):
        for line in lines:
            if re.search(pattern, line) and not line.startswith(("\tat ", "    at ")):
                text = line.strip()
                return text if len(text) <= 200 else text[:197] + "..."
    return ""


def _log_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _wait_ready(component: Component, proc: subprocess.Popen[bytes] | None, offset: int) -> None:
    deadline = time.monotonic() + component.settings.start_timeout
    launched = time.monotonic()
    while True:
        gone = ""
        if proc is not None and proc.poll() is not None:
            gone = f"exited with code {proc.returncode} before answering"
        elif proc is None and time.monotonic() - launched > 2 and component.running_pid() is None:
            gone = "the server process is gone"
        if gone:
            reason = _log_reason(component.log, offset)
            raise StackError(f"{gone}: {reason}" if reason else gone, component.log, offset)
        remaining = deadline - time.monotonic()
        if component.probe(max(0.5, min(3.0, remaining))):
            return
        if time.monotonic() >= deadline:
            raise StackError(
                f"not answering on {component.address} after {component.settings.start_timeout:.0f}s",
                component.log,
                offset,
            )
        time.sleep(0.2)


def up_one(component: Component) -> bool:
    """Bring one component up and print its line; False when it does not answer."""
    started = time.monotonic()
    launched = False
    try:
        pid = component.running_pid()
        if pid is not None:
            _wait_ready(component, None, _log_size(component.log))
            component.after_ready()
            _line(component, f"already running (pid {pid})")
            return True
        conflict = _port_conflict(component)
        if conflict is not None:
            raise conflict
        component.prepare()
        fetched = getattr(component, "fetch_seconds", 0.0)
        offset = _log_size(component.log)
        launched = True
        proc = component.launch()
        _wait_ready(component, proc, offset)
        component.after_ready()
        pid = component.running_pid()
        note = f", Maven fetch {fetched:.1f}s" if fetched else ""
        _line(component, f"started (pid {pid}, {time.monotonic() - started:.1f}s{note})")
        return True
    except StackError as error:
        failure = error
    except Exception as error:  # never a traceback: one line naming what broke
        failure = StackError(f"{type(error).__name__}: {error}")
    if launched:
        # a process that did not come up is not left behind: the next `up` starts from clean
        with contextlib.suppress(Exception):
            pid = component.running_pid()
            if pid is not None:
                component.stop(pid)
                failure.reason += " (stopped it)"
            component.pidfile.unlink(missing_ok=True)
    _failure(component, failure)
    return False


def cmd_up(settings: StackSettings, selected: list[Component]) -> int:
    settings.dir.mkdir(parents=True, exist_ok=True)
    _, created = ensure_dev_pki(tls_dir(settings))
    if created:
        print(f"{'tls':<11} {'':<15} development CA and certificates written to {tls_dir(settings)}")
    failed: set[str] = set()
    missing = {c.name: c.missing_packages() for c in selected}
    packages = sorted({package for names in missing.values() for package in names})
    if packages:
        try:
            apt_install(packages)
        except StackError as error:
            for component in selected:
                if missing[component.name]:
                    _failure(
                        component, StackError(f"cannot install {' '.join(missing[component.name])}: {error.reason}")
                    )
                    failed.add(component.name)
        for component in selected:
            still = component.missing_packages()
            if component.name not in failed and still:
                _failure(component, StackError(f"package {' '.join(still)} installed but its program is missing"))
                failed.add(component.name)
    results: dict[str, bool] = {}

    def run(component: Component) -> None:
        results[component.name] = up_one(component)

    threads = [
        threading.Thread(target=run, args=(component,), name=f"stack-{component.name}", daemon=True)
        for component in selected
        if component.name not in failed
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ok = not failed and all(results.values())
    return 0 if ok else 1


def cmd_down(settings: StackSettings, selected: list[Component], purge: bool) -> int:
    code = 0
    for component in reversed(selected):
        try:
            pid = component.running_pid()
            message = "not running" if pid is None else component.stop(pid)
            component.pidfile.unlink(missing_ok=True)
            if purge and component.home.exists():
                shutil.rmtree(component.home)
                message += f"; purged {component.home}"
            _line(component, message)
        except StackError as error:
            _failure(component, error)
            code = 1
        except Exception as error:
            _failure(component, StackError(f"{type(error).__name__}: {error}"))
            code = 1
    if purge and code == 0 and len(selected) == len(COMPONENTS) and settings.dir.exists():
        shutil.rmtree(settings.dir)
        print(f"purged {settings.dir}")
    return code


def cmd_status(settings: StackSettings, selected: list[Component]) -> int:
    print(f"{'COMPONENT':<11} {'ADDRESS':<15} {'STATE':<5} {'PID':<8} DETAIL")
    all_up = True
    for component in selected:
        try:
            answering = component.probe(2.0)
        except StackError:
            answering = False
        pid = component.running_pid()
        detail = component.detail()
        if answering and pid is None:
            detail += " (answering, but not started from this state directory)"
        elif pid is not None and not answering:
            detail += " (process running, not answering)"
        all_up = all_up and answering
        state = "up" if answering else "down"
        print(f"{component.name:<11} {component.address:<15} {state:<5} {pid or '-'!s:<8} {detail}")
    print(f"state directory: {settings.dir}")
    return 0 if all_up else 3


def cmd_env(settings: StackSettings, tls: bool = False) -> int:
    env = tls_connection_env(settings) if tls else connection_env(settings)
    for key, value in env.items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tsunagu stack",
        description="The real local infrastructure on 127.0.0.1 (configured by TSUNAGU_STACK_* variables).",
    )
    parser.add_argument("action", choices=["up", "down", "status", "env"])
    parser.add_argument("components", nargs="*", metavar="COMPONENT", help=f"{' '.join(COMPONENTS)} (default: all)")
    parser.add_argument("--purge", action="store_true", help="down: also delete the data of the stopped components")
    parser.add_argument(
        "--tls", action="store_true", help="env: the TLS-only ports, mTLS with the development PKI (.stack/tls)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`tsunagu stack ...`; returns the exit code: 0 all good, 1 a component failed, 2 usage, 3 status not up."""
    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    try:
        settings = load_settings()
        if args.action == "env":
            return cmd_env(settings, args.tls)
        selected = components(settings, args.components)
        if args.action == "up":
            return cmd_up(settings, selected)
        if args.action == "down":
            return cmd_down(settings, selected, args.purge)
        return cmd_status(settings, selected)
    except StackError as error:
        print(f"tsunagu stack: {error.reason}", file=sys.stderr)
        return 2
    except (OSError, subprocess.SubprocessError) as error:
        print(f"tsunagu stack: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tsunagu stack: interrupted (components already started keep running)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
