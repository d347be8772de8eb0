"""PostgreSQL: one cluster initialised in the state directory, run as the `postgres` user when we are root,
with the `tsunagu` role (password over TCP) and `tsunagu_tls` (client certificate over TLS only)."""

from __future__ import annotations

import hashlib
import os
import pwd
import subprocess
import time
from pathlib import Path

from tsunagu.devpki import DevPki
from tsunagu.stack import proc
from tsunagu.stack.base import Component, copy_tls
from tsunagu.stack.settings import (
    HOST,
    PG_DATABASE,
    PG_PASSWORD,
    PG_TLS_USER,
    PG_USER,
    StackError,
    postgres_dsn,
    tls_dir,
)
from tsunagu.stack.templates import postgres_conf, postgres_hba, postgres_ident


def postgres_bindir() -> Path | None:
    """The newest /usr/lib/postgresql/<major>/bin that has a server."""
    found: list[tuple[int, Path]] = []
    for path in Path("/usr/lib/postgresql").glob("*/bin"):
        if (path / "postgres").exists() and path.parent.name.isdigit():
            found.append((int(path.parent.name), path))
    return max(found)[1] if found else None


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
        pid = proc.read_pid(self.data / "postmaster.pid")
        if pid is not None and self._ours(pid):
            return pid
        return None

    def _as_postgres(self, command: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *command] if proc.is_root() else command

    def _postgres_user(self) -> pwd.struct_passwd | None:
        if not proc.is_root():
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
            proc.run(
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
        copy_tls(self.settings, self.home / "tls", owner)
        for name, text in (("pg_hba.conf", postgres_hba()), ("pg_ident.conf", postgres_ident())):
            proc.write_if_changed(self.home / name, text)
            if owner is not None:
                os.chown(self.home / name, owner.pw_uid, owner.pw_gid)
        conf = self.data / "tsunagu.conf"
        proc.write_if_changed(conf, postgres_conf(self.settings, socket_dir, self.home))
        main_conf = self.data / "postgresql.conf"
        include = "include_if_exists = 'tsunagu.conf'"
        if include not in main_conf.read_text():
            with main_conf.open("a") as handle:
                handle.write(f"\n# added by `tsunagu stack`\n{include}\n")
        if owner is not None:
            os.chown(conf, owner.pw_uid, owner.pw_gid)

    def launch(self) -> subprocess.Popen[bytes] | None:
        timeout = self.settings.start_timeout
        proc.run(
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
        pid = proc.read_pid(self.data / "postmaster.pid")
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
        return proc.run(command, what="creating the tsunagu role and database", timeout=60, cwd=self.home).stdout

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
        proc.run(
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
        proc.run(
            [self.bin("psql"), "-X", "-tAc", "SELECT 1", tls_dsn],
            what=f"logging in as {PG_TLS_USER} over TLS with the client certificate",
            timeout=30,
            cwd=self.home,
        )

    def stop(self, pid: int) -> str:
        started = time.monotonic()
        proc.run(
            self._as_postgres([self.bin("pg_ctl"), "stop", "-D", str(self.data), "-m", "fast", "-w", "-t", "60"]),
            what="pg_ctl stop",
            timeout=90,
            cwd=self.home,
            log=self.log,
        )
        return f"stopped (pid {pid}, {time.monotonic() - started:.1f}s)"
