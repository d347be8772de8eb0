"""Raw benchmark results: one JSON file per run under bench/results/, with what produced them.

Every benchmark calls `record(name, parameters, figures)`; docs/benchmarks.md quotes these files (and
is regenerated from them), so a figure in the docs can always be traced to its run: when, on what
machine (cores, load), with which versions and parameters.
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
