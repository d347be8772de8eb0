"""`tsunagu serve ws-gateway --workers N`: N gateway processes on one port, under a supervisor.

One Python process uses one core; a gateway pod with a CPU limit of 8 would otherwise use one of them.
Each worker is a whole `tsunagu serve ws-gateway` with a listening socket of its own bound with
SO_REUSEPORT, so the kernel spreads new connections among the workers; they meet through the broker
(Redis) like replicas in separate pods. The supervisor binds nothing and imports none of the service
(the standard library only): it starts the workers, restarts one that dies (with backoff; one that
stops answering its control socket is killed first), and on SIGTERM/SIGINT tells every worker to drain
(stop accepting, send clients the `shutdown` disconnect that asks them to reconnect, close) and exits 0
once all have, or kills what is left after the grace period and exits 1. A worker that stops with a
configuration error (exit 2) stops the group with that code: every worker would fail alike.

Metrics and readiness through the shared port answer for every worker: tsunagu_core/workers.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from tsunagu_core.workers import SLOT_ENV, WorkerSlot, ask

# Set for a worker that replaces a dead one: it listens only once its app is built, so that its
# siblings keep the new connections meanwhile instead of the kernel queueing a share of them to it.
RESTART_ENV = "_TSUNAGU_WORKER_RESTART"
MAX_WORKERS = 256
CONFIG_ERROR = 2
# A worker that lived this long before dying is restarted at once; quicker deaths back off.
HEALTHY_AFTER = 10.0
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 10.0
# Liveness: a worker whose control socket does not answer this many checks in a row is killed.
CHECK_EVERY = 5.0
CHECK_TIMEOUT = 3.0
MISSED_CHECKS = 3
# Beyond TSUNAGU_SHUTDOWN_GRACE, for a worker's own exit after its connections are gone.
EXIT_SLACK = 5.0


def cpu_limit() -> int:
    """The CPUs this process may use: its affinity, capped by a cgroup CPU quota (a container's limit)."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota()
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs a cgroup's quota allows (`cpu.max` of cgroup v2, `cpu.cfs_quota_us` of v1); None: no quota."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for directory in (root / "cpu", root / "cpu,cpuacct"):
        try:
            quota_us = int((directory / "cpu.cfs_quota_us").read_text())
            period_us = int((directory / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota_us <= 0 else quota_us / period_us
    return None


def parse_workers(value: str, variable: str) -> int:
    """`auto` or 0: one per CPU (cpu_limit); else a count. Bad input: exit 2 with one line."""
    text = value.strip().lower()
    if text in ("auto", "0"):
        return cpu_limit()
    try:
        count = int(text)
    except ValueError:
        count = -1
    if not 0 < count <= MAX_WORKERS:
        print(f"tsunagu: {variable}={value!r}: a number of workers 1..{MAX_WORKERS}, 0 or `auto`", file=sys.stderr)
        raise SystemExit(CONFIG_ERROR)
    return count


def check_port(host: str, port: int) -> None:
    """Fail at once, with the address, when the port is taken (rather than each worker failing in turn).
    Without SO_REUSEPORT: a listener of any other process, even one sharing its port so, is refused
    here, where the workers' own sockets would quietly join its group."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            print(f"tsunagu serve: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
            raise SystemExit(1) from None


class _Worker:
    def __init__(self, slot: WorkerSlot) -> None:
        self.slot = slot
        self.process: asyncio.subprocess.Process | None = None
        self.started = 0.0
        self.restarts = 0


class Supervisor:
    def __init__(self, command: list[str], count: int, node_name: str, grace: float) -> None:
        self.command = command
        self.count = count
        self.node_name = node_name
        self.grace = grace
        self.stopping = asyncio.Event()
        self.exit_code = 0
        self.directory = Path(tempfile.mkdtemp(prefix="tsunagu-workers-"))
        self.workers = [_Worker(WorkerSlot(i, count, self.directory)) for i in range(count)]

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self.stopping.set)
        try:
            keepers = [asyncio.create_task(self._keep(worker)) for worker in self.workers]
            watchdog = asyncio.create_task(self._watch())
            await self.stopping.wait()
            watchdog.cancel()
            await self._drain()
            _, late = await asyncio.wait(keepers, timeout=self.grace + EXIT_SLACK)
            if late:  # a worker started as the drain began and outlived it
                for worker in self.workers:
                    if worker.process is not None and worker.process.returncode is None:
                        worker.process.kill()
                await asyncio.gather(*late, return_exceptions=True)
                self.exit_code = self.exit_code or 1
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)
        return self.exit_code

    async def _spawn(self, worker: _Worker) -> asyncio.subprocess.Process:
        env = dict(os.environ)
        env[SLOT_ENV] = worker.slot.encode()
        # Each worker is a replica of its own in events, logs and Kafka client ids.
        env["TSUNAGU_NODE_NAME"] = f"{self.node_name}-w{worker.slot.index}"
        if worker.restarts:
            env[RESTART_ENV] = "1"
        else:
            env.pop(RESTART_ENV, None)
        worker.started = time.monotonic()
        worker.process = await asyncio.create_subprocess_exec(*self.command, env=env)
        return worker.process

    async def _keep(self, worker: _Worker) -> None:
        delay = BACKOFF_FIRST
        while not self.stopping.is_set():
            process = await self._spawn(worker)
            if self.stopping.is_set():  # started while the drain began: it drains too
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
            code = await process.wait()
            if self.stopping.is_set():
                return
            lived = time.monotonic() - worker.started
            if code == CONFIG_ERROR:
                print(f"tsunagu: worker {worker.slot.index} stopped on its configuration: stopping", file=sys.stderr)
                self.exit_code = CONFIG_ERROR
                self.stopping.set()
                return
            delay = BACKOFF_FIRST if lived >= HEALTHY_AFTER else min(delay * 2, BACKOFF_MAX)
            how = f"signal {-code}" if code < 0 else f"code {code}"
            print(
                f"tsunagu: worker {worker.slot.index} (pid {process.pid}) exited with {how} after {lived:.1f}s;"
                f" restarting in {delay:.1f}s",
                file=sys.stderr,
                flush=True,
            )
            worker.restarts += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)

    async def _watch(self) -> None:
        """Kill a worker whose event loop no longer answers (it still holds its share of the port)."""
        missed = [0] * self.count
        while True:
            await asyncio.sleep(CHECK_EVERY)
            for worker in self.workers:
                index = worker.slot.index
                process = worker.process
                path = worker.slot.control_path()
                if process is None or process.returncode is not None or not path.exists():
                    missed[index] = 0  # not started yet, or restarting
                    continue
                answer = await ask(path, "ping", CHECK_TIMEOUT)
                missed[index] = 0 if answer == b"pong" else missed[index] + 1
                if missed[index] >= MISSED_CHECKS:
                    print(f"tsunagu: worker {index} (pid {process.pid}) does not answer: killing it", file=sys.stderr)
                    missed[index] = 0
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()

    async def _drain(self) -> None:
        running = [w.process for w in self.workers if w.process is not None and w.process.returncode is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        if not running:
            return
        await asyncio.wait([asyncio.create_task(p.wait()) for p in running], timeout=self.grace + EXIT_SLACK)
        for process in running:
            if process.returncode is None:
                print(f"tsunagu: worker pid {process.pid} outlived the grace period: killed", file=sys.stderr)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
                self.exit_code = self.exit_code or 1
            elif process.returncode != 0:
                self.exit_code = self.exit_code or 1


def supervise(service: str, host: str, port: int, count: int, passthrough: list[str]) -> int:
    """Run `count` workers of `service` on host:port until SIGTERM/SIGINT; the exit code of the group."""
    broker = os.environ.get("TSUNAGU_BROKER", "memory").strip().lower()
    if broker != "redis":
        print(
            f"tsunagu serve {service} --workers {count}: needs TSUNAGU_BROKER=redis (TSUNAGU_BROKER={broker!r}): the"
            " workers meet through the broker, and a memory broker would keep each worker's publications to itself",
            file=sys.stderr,
        )
        return CONFIG_ERROR
    check_port(host, port)
    metrics_port = os.environ.get("TSUNAGU_METRICS_PORT", "").strip()
    if metrics_port.isdigit() and 0 < int(metrics_port) < 65536:
        check_port(host, int(metrics_port))
    try:
        grace = float(os.environ.get("TSUNAGU_SHUTDOWN_GRACE") or 20.0)
    except ValueError:
        grace = 20.0  # the workers' settings say what is wrong with it
    node_name = os.environ.get("TSUNAGU_NODE_NAME") or socket.gethostname()
    command = [sys.executable, "-m", "tsunagu", "serve", service, "--host", host, "--port", str(port), *passthrough]
    print(f"tsunagu serve {service}: {count} workers on {host}:{port} (supervisor pid {os.getpid()})", flush=True)
    return asyncio.run(Supervisor(command, count, node_name, grace).run())


def set_parent_death_signal() -> None:
    """A worker ends with its supervisor, even one killed with SIGKILL (Linux; elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() == 1:  # the supervisor died before the signal was asked for
        raise SystemExit(1)
