"""How long the `tsunagu` command takes to start, and a gateway to answer after it is (re)started.

`tsunagu --help` and `tsunagu token` should start about as fast as Python does (they import no service);
`serve ws-gateway` is timed from the process start to its first `/healthz` answer, which is what a client
that reconnects to a restarted gateway waits for (the socket listens before the imports, so the client
waits in the backlog instead of being refused). Medians of N runs; raw results in bench/results/.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from record import Recorder

REPO = Path(__file__).resolve().parents[1]


def timed(args: list[str], runs: int) -> list[float]:
    subprocess.run(args, capture_output=True, cwd=REPO, check=False)  # warm the file cache and bytecode
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(args, capture_output=True, cwd=REPO, check=True)
        seconds.append(time.perf_counter() - started)
    return seconds


def gateway_answers(runs: int, port: int) -> list[float]:
    env = {**os.environ, "TSUNAGU_GATEWAY_TOKEN_HMAC_SECRET": "bench-secret-long-enough-for-hs256"}
    seconds = []
    for _ in range(runs + 1):
        started = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", "tsunagu", "serve", "ws-gateway", "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30):
                        break
                except OSError:
                    time.sleep(0.01)
            seconds.append(time.perf_counter() - started)
        finally:
            process.kill()
            process.wait()
    return seconds[1:]  # the first run warms the caches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--port", type=int, default=18099)
    args = parser.parse_args()
    python = sys.executable
    cases = {
        "python -c 'import tsunagu'": [python, "-c", "import tsunagu"],
        "tsunagu --help": [python, "-m", "tsunagu", "--help"],
        "tsunagu token --user alice": [python, "-m", "tsunagu", "token", "--user", "alice", "--channels", "chat:*"],
    }
    figures: dict[str, dict[str, float]] = {}
    for name, command in cases.items():
        runs = timed(command, args.runs)
        figures[name] = {"median_s": statistics.median(runs), "min_s": min(runs), "max_s": max(runs)}
    runs = gateway_answers(max(3, args.runs // 3), args.port)
    figures["tsunagu serve ws-gateway: start to first /healthz answer"] = {
        "median_s": statistics.median(runs),
        "min_s": min(runs),
        "max_s": max(runs),
    }
    baseline = figures["python -c 'import tsunagu'"]["median_s"]
    recorder = Recorder("cli", {"runs": args.runs})
    print(f"{'command':<58} {'median':>8} {'min':>8} {'max':>8}  x python start")
    for name, figure in figures.items():
        ratio = figure["median_s"] / baseline
        times = " ".join(f"{figure[key]:>7.3f}s" for key in ("median_s", "min_s", "max_s"))
        print(f"{name:<58} {times}  {ratio:>6.1f}")
        target = "<= 2x python start" if name.startswith("tsunagu --help") or name.startswith("tsunagu token") else ""
        note = f"min {figure['min_s']:.3f} s, max {figure['max_s']:.3f} s; {ratio:.1f}x python start"
        recorder.add(name, figure["median_s"], "s (median)", target=target, note=note)
    recorder.save()


if __name__ == "__main__":
    main()
