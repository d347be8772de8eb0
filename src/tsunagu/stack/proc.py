"""Processes, ports, pid files and logs: what the components are started, found, probed and stopped with."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from tsunagu.stack.settings import HOST, StackError

LOG_TAIL_LINES = 12
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def is_root() -> bool:
    return os.geteuid() == 0


def write_if_changed(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def which(name: str, *extra: str) -> str | None:
    """A program on PATH, else the first of `extra` that is executable (sbin is not on every PATH)."""
    found = shutil.which(name)
    if found:
        return found
    for candidate in extra:
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def traversable_by_others(path: Path) -> bool:
    """Whether every existing directory on the way to `path` lets other users pass (o+x)."""
    for ancestor in [path, *path.parents]:
        if ancestor.exists() and not ancestor.stat().st_mode & stat.S_IXOTH:
            return False
    return True


# --- processes ---------------------------------------------------------------------------------


def _proc_state(pid: int) -> str | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[-1].split()[0]


def alive(pid: int) -> bool:
    state = _proc_state(pid)
    return state is not None and state not in ("Z", "X")


def cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        return " ".join(raw.split())
    except OSError:
        return ""


def exe_name(pid: int) -> str | None:
    try:
        return Path(os.readlink(f"/proc/{pid}/exe")).name
    except OSError:
        return None


def read_pid(path: Path) -> int | None:
    try:
        first = path.read_text().split("\n", 1)[0].strip()
        return int(first) if first else None
    except (OSError, ValueError):
        return None


def terminate(pid: int, grace: float) -> str:
    """SIGTERM, then SIGKILL to its process group after `grace` seconds; says which it took."""
    started = time.monotonic()
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    while time.monotonic() - started < grace:
        if not alive(pid):
            return f"stopped (pid {pid}, {time.monotonic() - started:.1f}s)"
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return f"killed (pid {pid} ignored SIGTERM for {grace:.0f}s)"


# --- ports -------------------------------------------------------------------------------------


def connect(port: int, timeout: float) -> socket.socket:
    return socket.create_connection((HOST, port), timeout=timeout)


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return True
    return False


def free_port() -> int:
    """A port nothing listens on now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


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
                        return pid, cmdline(pid)[:120]
    return None


def port_user(port: int) -> str:
    """Who listens on `port`, for an error message: `pid N (command line)`, or "another process"."""
    owner = port_owner(port)
    return f"pid {owner[0]} ({owner[1]})" if owner else "another process"


# --- logs and tools ----------------------------------------------------------------------------


def log_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def tail(path: Path | None, offset: int = 0, lines: int = LOG_TAIL_LINES) -> list[str]:
    """The last non-empty lines a log got since `offset`, without colours, each cut to 240 characters."""
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


def log_reason(path: Path, offset: int) -> str:
    """The most telling line a failed process wrote to its log since `offset` (an exception, else an error)."""
    lines = tail(path, offset, lines=400)
    for pattern in (r"(Exception|Error): ", r"\b(FATAL|PANIC|ERROR|Error|error)\b"):
        for line in lines:
            if re.search(pattern, line) and not line.startswith(("\tat ", "    at ")):
                text = line.strip()
                return text if len(text) <= 200 else text[:197] + "..."
    return ""


def reason_line(text: str | bytes | None) -> str:
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


def run(
    command: Sequence[str],
    *,
    what: str,
    timeout: float,
    cwd: Path | None = None,
    log: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion; failure is a StackError naming `what` with the command's last line."""
    offset = log_size(log) if log is not None else 0
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
        detail = reason_line(result.stderr) or reason_line(result.stdout) or f"exit code {result.returncode}"
        raise StackError(f"{what} failed: {detail}", log, offset)
    return result
