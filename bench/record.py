"""Raw benchmark results: one JSON file per run under bench/results/, with what produced them.

Every benchmark calls `record(name, parameters, figures)` (or collects rows in a `Recorder`, which
does); docs/benchmarks.md quotes these files (and is regenerated from them), so a figure in the docs
can always be traced to its run: when, on what machine (cores, load), with which versions and
parameters. `Profile` attaches py-spy to a service process for a stage's flame graph.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    try:
        load = os.getloadavg()
    except OSError:
        load = (0.0, 0.0, 0.0)
    return {
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "load_average": [round(value, 2) for value in load],
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def versions(*packages: str) -> dict[str, str]:
    found = {}
    for package in packages:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=RESULTS.parent, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def record(name: str, parameters: dict[str, Any], figures: dict[str, Any], packages: tuple[str, ...] = ()) -> Path:
    """Write `bench/results/<name>-<UTC time>.json` and return its path."""
    now = datetime.datetime.now(datetime.UTC)
    body = {
        "benchmark": name,
        "at": now.isoformat(timespec="seconds"),
        "commit": commit(),
        "machine": machine(),
        "versions": versions("tsunagu", *packages),
        "parameters": parameters,
        "figures": figures,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{now.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    return path


# The libraries the stages behind the gateway (bench/run.py, ingest, mqtt, sim, audit, collab) lean on.
STAGE_PACKAGES = (
    "confluent-kafka",
    "redis",
    "hiredis",
    "asyncpg",
    "pycrdt",
    "pycrdt-websocket",
    "gmqtt",
    "paho-mqtt",
    "uvicorn",
    "websockets",
    "protobuf",
    "orjson",
)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _librdkafka() -> str:
    try:
        from confluent_kafka import libversion
    except ImportError:
        return "not installed"
    return str(libversion()[0])


def stop_processes(processes: list[subprocess.Popen[bytes]], grace: float = 20.0) -> None:
    """SIGTERM every process, then SIGKILL those still running after `grace` seconds (a service with a
    backlog may take longer to drain than a benchmark should wait)."""
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            print(f"  {' '.join(map(str, process.args))[-60:]} did not stop within {grace:g} s: killed", flush=True)
            process.kill()
            process.wait(10)


class Recorder:
    """Collects a stage's rows (name, value, unit, details); `save()` writes them through `record` with
    `uptime` before and after the run."""

    def __init__(self, stage: str, parameters: dict[str, Any]) -> None:
        self.stage = stage
        self.parameters = parameters
        self.started = datetime.datetime.now(datetime.UTC)
        self.load_before = uptime()
        self.figures: list[dict[str, Any]] = []

    def add(self, name: str, value: float, unit: str, **details: Any) -> None:
        self.figures.append({"name": name, "value": value, "unit": unit, **details})

    def save(self) -> Path:
        figures = {
            "started": self.started.isoformat(timespec="seconds"),
            "uptime_before": self.load_before,
            "uptime_after": uptime(),
            "librdkafka": _librdkafka(),
            "rows": self.figures,
        }
        path = record(self.stage, self.parameters, figures, packages=STAGE_PACKAGES)
        print(f"  raw results: {path.relative_to(RESULTS.parent.parent)}", flush=True)
        return path


class Profile:
    """`py-spy record` of a running process into bench/results/profiles/ (a flame graph SVG and the
    collapsed stacks), and the functions where its samples end, for docs/benchmarks.md."""

    def __init__(self, name: str, pid: int, seconds: float, rate: int = 50) -> None:
        directory = RESULTS / "profiles"
        directory.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        self.raw = directory / f"{stamp}-{name}.txt"
        self.svg = directory / f"{stamp}-{name}.svg"
        spy = [os.path.join(os.path.dirname(sys.executable), "py-spy"), "record"]
        common = ["--pid", str(pid), "--duration", str(int(seconds)), "--rate", str(rate), "--nonblocking"]
        self.processes = [
            subprocess.Popen([*spy, *common, "--format", "raw", "-o", str(self.raw)], stdout=subprocess.DEVNULL),
            subprocess.Popen([*spy, *common, "--format", "flamegraph", "-o", str(self.svg)], stdout=subprocess.DEVNULL),
        ]

    def finish(self, top: int = 12) -> list[tuple[float, str]]:
        for process in self.processes:
            try:
                process.wait(120)
            except subprocess.TimeoutExpired:
                process.kill()
        return leaf_share(self.raw, top)


def leaf_share(raw: Path, top: int = 12) -> list[tuple[float, str]]:
    """The share of samples per function where the stack ends (self time), from py-spy's raw format."""
    if not raw.exists():
        return []
    counts: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        if not number.isdigit():
            continue
        leaf = stack.rsplit(";", 1)[-1]
        counts[leaf] = counts.get(leaf, 0) + int(number)
        total += int(number)
    ranked = sorted(counts.items(), key=lambda item: -item[1])[:top]
    return [(count / max(total, 1), name) for name, count in ranked]
