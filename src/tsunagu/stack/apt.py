"""Debian packages installed with apt-get, without letting them start their own services."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from tsunagu.stack import proc
from tsunagu.stack.settings import StackError

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
    if not proc.is_root():
        raise StackError(f"{names} not installed, and installing needs root: run `sudo apt-get install -y {names}`")
    if shutil.which("apt-get") is None:
        raise StackError(f"{names} not installed and apt-get is missing: install {names} with the package manager")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    wait = ["-o", f"DPkg::Lock::Timeout={APT_LOCK_TIMEOUT}"]
    with _apt_lock, _apt_process_lock(), _no_service_autostart():
        print(f"{'install':<11} {'apt-get':<15} {names} ...", flush=True)
        if not _apt_updated:
            proc.run(["apt-get", *wait, "update"], what="apt-get update", timeout=900, env=env)
            _apt_updated = True
        proc.run(
            ["apt-get", *wait, "install", "-y", "--no-install-recommends", *packages],
            what=f"apt-get install {names}",
            timeout=1800,
            env=env,
        )
