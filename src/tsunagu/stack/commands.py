"""What `stack up`, `down`, `status` and `env` do; each prints one line per component and returns the exit code."""

from __future__ import annotations

import contextlib
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO

from tsunagu.devpki import ensure_dev_pki
from tsunagu.stack import COMPONENTS, ENGINE_ENV, FAILED, NOT_UP, OK, proc
from tsunagu.stack.apt import apt_install
from tsunagu.stack.base import Component
from tsunagu.stack.settings import (
    HOST,
    REDIS_SET_URLS,
    StackError,
    StackSettings,
    connection_env,
    tls_connection_env,
    tls_dir,
    turn_env,
)

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
    tail = proc.tail(log, error.log_offset)
    message = f"FAILED: {error.reason}"
    if tail and log is not None:
        message += f"; last log lines ({log}):"
    _line(component, message, tail)


def _port_conflict(component: Component) -> StackError | None:
    for field in component.port_fields:
        port = getattr(component.settings, field)
        if not proc.port_in_use(port):
            continue
        who = proc.port_user(port)
        variable = f"TSUNAGU_STACK_{field.upper()}"
        hint = f"; stop it or set {variable} to a free port"
        if component.service and any(name in who for name in component.exe_names):
            hint = (
                f"; if it is the system service of the Debian package, stop it with "
                f"`service {component.service} stop`, or set {variable} to a free port"
            )
        return StackError(f"port {HOST}:{port} is already in use by {who}, not by this stack{hint}")
    return None


def _wait_ready(component: Component, process: subprocess.Popen[bytes] | None, offset: int) -> None:
    deadline = time.monotonic() + component.settings.start_timeout
    launched = time.monotonic()
    while True:
        gone = ""
        if process is not None and process.poll() is not None:
            gone = f"exited with code {process.returncode} before answering"
        elif process is None and time.monotonic() - launched > 2 and component.running_pid() is None:
            gone = "the server process is gone"
        if gone:
            reason = proc.log_reason(component.log, offset)
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
            _wait_ready(component, None, proc.log_size(component.log))
            component.after_ready()
            _line(component, f"already running (pid {pid})")
            return True
        conflict = _port_conflict(component)
        if conflict is not None:
            raise conflict
        component.prepare()
        offset = proc.log_size(component.log)
        launched = True
        process = component.launch()
        _wait_ready(component, process, offset)
        component.after_ready()
        pid = component.running_pid()
        note = f", Maven fetch {component.fetch_seconds:.1f}s" if component.fetch_seconds else ""
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
    return OK if ok else FAILED


def cmd_down(settings: StackSettings, selected: list[Component], purge: bool) -> int:
    code = OK
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
            code = FAILED
        except Exception as error:
            _failure(component, StackError(f"{type(error).__name__}: {error}"))
            code = FAILED
    if purge and code == OK and len(selected) == len(COMPONENTS) and settings.dir.exists():
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
    return OK if all_up else NOT_UP


def cmd_env(settings: StackSettings, tls: bool = False, engines: bool = False, names: Sequence[str] = ()) -> int:
    env = tls_connection_env(settings) if tls else connection_env(settings)
    for name in names:
        if name in REDIS_SET_URLS:
            if tls:
                raise StackError(f"{name} listens without TLS: `stack env {name}` without --tls")
            env["TSUNAGU_REDIS_URL"] = REDIS_SET_URLS[name](settings)
        elif name == "turn":
            env.update(turn_env(settings))
    if engines:
        env.update(ENGINE_ENV)
    for key, value in env.items():
        print(f"export {key}={shlex.quote(value)}")
    return OK
