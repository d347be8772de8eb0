"""A process that is one of several workers of `tsunagu serve --workers N` (src/tsunagu/workers.py).

The workers share the service's port (SO_REUSEPORT: the kernel spreads connections among them), so a
scrape or a probe through that port reaches one worker at random. Each worker therefore answers for
all of them: it serves a control socket of its own (a Unix socket in the supervisor's directory) that
its siblings ask for their metrics and readiness, and

- `/metrics` returns every worker's series, each with a `worker` label (a counter of one worker is
  never mistaken for another's, and a restarted worker's counters restart as their own series, which
  `rate()` expects), plus `tsunagu_worker_up{worker}`;
- `/readyz` is 200 only when every worker is ready, and lists each worker's state.

The control protocol is one line in (`metrics` or `ready`), the answer, then the socket closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

# Set by the supervisor for each worker: "index/count/directory". Not a setting: the CLI owns it.
SLOT_ENV = "_TSUNAGU_WORKER"
ASK_TIMEOUT = 2.0
# Within a readiness probe's timeout (the chart's is 2 s): a sibling slower than this to say whether
# it is ready counts as not ready.
READY_TIMEOUT = 1.5
# The largest answer read from a sibling: a worker's metrics are tens of KB.
ANSWER_LIMIT = 16 * 1024 * 1024

Handler = Callable[[], Awaitable[bytes]]


class WorkerSlot:
    __slots__ = ("count", "directory", "index")

    def __init__(self, index: int, count: int, directory: Path) -> None:
        self.index = index
        self.count = count
        self.directory = directory

    @classmethod
    def parse(cls, value: str) -> WorkerSlot:
        index, count, directory = value.split("/", 2)
        return cls(int(index), int(count), Path("/" + directory.lstrip("/")))

    def encode(self) -> str:
        return f"{self.index}/{self.count}/{self.directory}"

    def control_path(self, index: int | None = None) -> Path:
        return self.directory / f"worker-{self.index if index is None else index}.sock"

    @property
    def siblings(self) -> list[int]:
        return [i for i in range(self.count) if i != self.index]


def current() -> WorkerSlot | None:
    """This process's slot, or None when it is not a worker (one process serves the port alone)."""
    value = os.environ.get(SLOT_ENV)
    return WorkerSlot.parse(value) if value else None


async def serve_control(slot: WorkerSlot, handlers: Mapping[str, Handler]) -> asyncio.AbstractServer:
    """Answer the siblings' (and the supervisor's) questions on this worker's control socket."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            command = (await asyncio.wait_for(reader.readline(), ASK_TIMEOUT)).decode().strip()
            handler = handlers.get(command)
            writer.write(await handler() if handler is not None else f"unknown command {command!r}\n".encode())
            await writer.drain()
        except (OSError, TimeoutError, UnicodeDecodeError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    path = slot.control_path()
    path.unlink(missing_ok=True)  # a dead predecessor's
    return await asyncio.start_unix_server(answer, str(path))


async def ask(path: Path, command: str, timeout: float = ASK_TIMEOUT) -> bytes | None:
    """A worker's answer to `command`, or None when it does not answer within `timeout`."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(str(path), limit=ANSWER_LIMIT)
            try:
                writer.write(command.encode() + b"\n")
                await writer.drain()
                return await reader.read(ANSWER_LIMIT)
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return None


async def ask_siblings(slot: WorkerSlot, command: str, timeout: float = ASK_TIMEOUT) -> dict[int, bytes | None]:
    answers = await asyncio.gather(*(ask(slot.control_path(i), command, timeout) for i in slot.siblings))
    return dict(zip(slot.siblings, answers, strict=True))


def _labelled(sample: str, worker: str) -> str:
    """`sample` (one line of the text exposition format) with `worker="<worker>"` as its first label."""
    brace = sample.find("{")
    space = sample.find(" ")
    if brace != -1 and (space == -1 or brace < space):
        rest = sample[brace + 1 :]
        return f'{sample[:brace]}{{worker="{worker}"{"" if rest.startswith("}") else ","}{rest}'
    return f'{sample[:space]}{{worker="{worker}"}}{sample[space:]}'


def merge_expositions(expositions: dict[str, bytes], up: dict[str, bool]) -> bytes:
    """One text exposition of several workers' (Prometheus text format 0.0.4): each family's HELP and
    TYPE once, then every worker's samples of it with a `worker` label; `tsunagu_worker_up` last."""
    headers: dict[str, list[str]] = {}
    header_from: dict[str, str] = {}
    samples: dict[str, list[str]] = {}
    for worker, text in expositions.items():
        family = ""
        for line in text.decode().splitlines():
            if line.startswith(("# HELP ", "# TYPE ")):
                family = line.split(" ", 3)[2]
                if header_from.setdefault(family, worker) == worker:
                    headers.setdefault(family, []).append(line)
                samples.setdefault(family, [])
            elif line and not line.startswith("#"):
                if not family:  # a sample with no header (not written by prometheus_client)
                    family = line.split("{", 1)[0].split(" ", 1)[0]
                    headers.setdefault(family, [])
                samples.setdefault(family, []).append(_labelled(line, worker))
    lines: list[str] = []
    for family, header in headers.items():
        lines += header + samples.get(family, [])
    lines += [
        "# HELP tsunagu_worker_up Whether the worker answered this scrape (1) or not (0).",
        "# TYPE tsunagu_worker_up gauge",
        *(f'tsunagu_worker_up{{worker="{worker}"}} {1.0 if ok else 0.0}' for worker, ok in sorted(up.items())),
    ]
    return ("\n".join(lines) + "\n").encode()


def own_metrics() -> bytes:
    from prometheus_client import generate_latest

    return generate_latest()


async def exposition() -> bytes:
    """The `/metrics` body: this process's registry, or every worker's when it is one of several."""
    slot = current()
    if slot is None:
        return own_metrics()
    answers = await ask_siblings(slot, "metrics")
    expositions = {str(slot.index): own_metrics()}
    expositions |= {str(i): text for i, text in answers.items() if text is not None}
    up = {str(i): i == slot.index or answers.get(i) is not None for i in range(slot.count)}
    return merge_expositions(dict(sorted(expositions.items())), up)


async def siblings_readiness(slot: WorkerSlot) -> dict[str, dict[str, object]]:
    """Each sibling's readiness as it answers on its control socket (`ready`), or why it does not."""
    states: dict[str, dict[str, object]] = {}
    for index, answer in (await ask_siblings(slot, "ready", READY_TIMEOUT)).items():
        if answer is None:
            exists = slot.control_path(index).exists()
            states[str(index)] = {"ready": False, "status": "not answering" if exists else "not running"}
            continue
        try:
            states[str(index)] = json.loads(answer)
        except ValueError:
            states[str(index)] = {"ready": False, "status": "unreadable answer"}
    return states
