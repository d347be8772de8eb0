"""Raw benchmark results as JSON under bench/results/: one file per run of a stage.

Each file holds the stage, its parameters, the machine (cores, load from `uptime`, kernel), the
versions of Python and of the libraries on the path, and every figure the run printed, so the
numbers in docs/benchmarks.md can be traced to a file.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
PACKAGES = (
    "confluent-kafka",
    "redis",
    "hiredis",
    "asyncpg",
    "pycrdt",
    "pycrdt-websocket",
    "gmqtt",
    "uvicorn",
    "websockets",
    "protobuf",
    "orjson",
)


def load() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine() -> dict[str, Any]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    try:
        from confluent_kafka import libversion

        versions["librdkafka"] = libversion()[0]
    except ImportError:
        pass
    return {
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


class Recorder:
    """Collects one stage's figures; `save()` writes them with the load before and after the run."""

    def __init__(self, stage: str, parameters: dict[str, Any]) -> None:
        self.stage = stage
        self.parameters = parameters
        self.started = datetime.datetime.now(datetime.UTC)
        self.load_before = load()
        self.figures: list[dict[str, Any]] = []

    def add(self, name: str, value: float, unit: str, **details: Any) -> None:
        self.figures.append({"name": name, "value": value, "unit": unit, **details})

    def save(self, **summary: Any) -> Path:
        RESULTS.mkdir(exist_ok=True)
        stamp = self.started.strftime("%Y%m%dT%H%M%SZ")
        path = RESULTS / f"{stamp}-{self.stage}.json"
        body = {
            "stage": self.stage,
            "started": self.started.isoformat(),
            "finished": datetime.datetime.now(datetime.UTC).isoformat(),
            "uptime_before": self.load_before,
            "uptime_after": load(),
            "machine": machine(),
            "parameters": self.parameters,
            "figures": self.figures,
            "summary": summary,
        }
        path.write_text(json.dumps(body, indent=2, default=str) + "\n")
        print(f"  raw results: {path.relative_to(RESULTS.parent.parent)}", flush=True)
        return path


class Profile:
    """`py-spy record` of a running process into bench/results/profiles/ (a flame graph SVG and the
    collapsed stacks), and the functions where its samples end, for docs/benchmarks.md."""

    def __init__(self, name: str, pid: int, seconds: float) -> None:
        directory = RESULTS / "profiles"
        directory.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        self.raw = directory / f"{stamp}-{name}.txt"
        self.svg = directory / f"{stamp}-{name}.svg"
        spy = [os.path.join(os.path.dirname(sys.executable), "py-spy"), "record"]
        common = ["--pid", str(pid), "--duration", str(int(seconds)), "--rate", "50", "--nonblocking"]
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
