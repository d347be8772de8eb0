"""Build what the Dockerfile builds and start every target, without Docker.

    python deploy/tools/image_replay.py [--work DIR] [--target NAME ...]

There is no Docker engine on the project's machines, so this replays the Dockerfile on the host:

1. The stages the runtime image copies from (base -> deps -> build) are replayed in a scratch
   root (DIR/rootfs stands for the image's /): WORKDIR, ARG, ENV and COPY from the build context
   (honouring .dockerignore) as Docker does them, and RUN for `uv` commands only (anything else
   would run on the host, so it is refused). `COPY --from=<external image>` (uv itself) is taken
   from the host, where `uv` must be installed.
2. Everything the runtime stage does not copy is removed from the scratch root, so the targets
   see what the runtime image holds: the virtual environment, no sources.
3. For each service target: its ENV, then ENTRYPOINT + CMD, as the target's USER when this runs
   as root (so nothing outside /tmp is writable, as with a read-only root filesystem), with
   `--host 0.0.0.0` replaced by 127.0.0.1, `--port` by a free port, and TSUNAGU_BUS/BROKER=memory
   (no Kafka or Redis here). It must pass its own HEALTHCHECK command, answer /readyz and /metrics,
   and exit 0 within 20 s of SIGTERM.

What it cannot show: that the base images exist and behave like the host's Python 3.11, and the
image's own filesystem permissions. Exit status 1 when anything fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dockerfile import Dockerfile, DockerIgnore, Stage, copy_sources, parse, parse_env, substitute

REPO = Path(__file__).resolve().parents[2]
RUNTIME_STAGE = "runtime"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0


class ReplayError(Exception):
    pass


class Root:
    """Maps image paths (/app/...) to the scratch root on the host."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def host(self, image_path: str) -> Path:
        if not image_path.startswith("/"):
            raise ReplayError(f"not an absolute image path: {image_path}")
        return self.path / image_path.lstrip("/")

    def map_value(self, value: str) -> str:
        """Rewrite image paths inside an ENV value (also PATH-like lists) that live in the root."""
        parts = value.split(":")
        out = []
        for part in parts:
            top = part.lstrip("/").split("/")[0] if part.startswith("/") else ""
            out.append(str(self.host(part)) if top and (self.path / top).exists() else part)
        return ":".join(out)


def log(message: str) -> None:
    print(f"replay: {message}", flush=True)


def _copy_into(source: Path, rel: str, dest: Path, ignore: DockerIgnore, context: Path) -> int:
    """Copy a context file or directory as COPY does; returns the number of files copied."""
    count = 0
    if source.is_file():
        if ignore.excluded(rel):
            return 0
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest)
        return 1
    for path in sorted(source.rglob("*")):
        if not path.is_file():
            continue
        relpath = str(path.relative_to(context))
        if ignore.excluded(relpath):
            continue
        target = dest / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
        count += 1
    return count


def replay_build(dockerfile: Dockerfile, stage_name: str, root: Root, context: Path) -> None:
    ignore = DockerIgnore.load(context / ".dockerignore")
    variables = dict(dockerfile.global_args)
    env: dict[str, str] = {}
    cwd = "/"
    names = dockerfile.stage_names()
    for stage in dockerfile.chain(stage_name):
        for instruction in stage.instructions:
            keyword = instruction.keyword
            where = f"Dockerfile:{instruction.line} {keyword}"
            if keyword == "ARG":
                key, _, default = instruction.args.partition("=")
                if default or key.strip() not in variables:
                    variables[key.strip()] = default.strip().strip('"')
            elif keyword == "ENV":
                for key, value in parse_env(instruction.args, {**variables, **env}).items():
                    env[key] = value
            elif keyword == "WORKDIR":
                cwd = substitute(instruction.args.strip(), {**variables, **env})
                root.host(cwd).mkdir(parents=True, exist_ok=True)
            elif keyword in ("COPY", "ADD"):
                flags, sources, dest = copy_sources(instruction)
                if "from" in flags:
                    source_stage = flags["from"]
                    if source_stage not in names or _is_external(dockerfile, source_stage):
                        log(f"{where} --from={source_stage}: taken from the host ({', '.join(sources)})")
                        _require_host_tools(sources)
                        continue
                    raise ReplayError(f"{where}: copying between replayed stages is not supported")
                dest_path = dest if dest.startswith("/") else os.path.join(cwd, dest)
                multiple = len(sources) > 1 or dest.endswith("/")
                copied = 0
                for source in sources:
                    src = context / source
                    if not src.exists():
                        raise ReplayError(f"{where} {source}: not in the build context")
                    target = root.host(dest_path)
                    if src.is_file() and multiple:
                        target = target / src.name
                    copied += _copy_into(src, source, target, ignore, context)
                log(f"{where} {' '.join(sources)} -> {dest} ({copied} file{'s' if copied != 1 else ''})")
            elif keyword == "RUN":
                _run(instruction.args, instruction.line, root, cwd, env)
            # LABEL, EXPOSE, USER, HEALTHCHECK, CMD, ENTRYPOINT: nothing to build.


def _is_external(dockerfile: Dockerfile, stage_name: str) -> bool:
    """A stage that only names an external image (`FROM image AS uv`) and does nothing else."""
    stage = dockerfile.stage(stage_name)
    return not stage.instructions


def _require_host_tools(sources: list[str]) -> None:
    for source in sources:
        tool = Path(source).name
        if shutil.which(tool) is None:
            raise ReplayError(f"{tool} is not installed on this machine (the image copies it from its own stage)")


def _run(args: str, line: int, root: Root, cwd: str, env: dict[str, str]) -> None:
    text = args.strip()
    while text.startswith("--"):
        _, _, text = text.partition(" ")
        text = text.lstrip()
    words = shlex.split(text)
    if not words or words[0] != "uv" or any(op in text for op in (";", "&&", "||", "|", "`", "$(")):
        raise ReplayError(f"Dockerfile:{line} RUN {text!r}: only plain `uv ...` commands are replayed on the host")
    if any(w.startswith("/") for w in words[1:]):
        raise ReplayError(f"Dockerfile:{line} RUN {text!r}: absolute paths would point outside the scratch root")
    run_env = {**os.environ, **{k: root.map_value(v) for k, v in env.items()}}
    log(f"Dockerfile:{line} RUN {text}")
    started = time.monotonic()
    result = subprocess.run(words, cwd=root.host(cwd), env=run_env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stdout.write(result.stdout[-4000:])
        sys.stdout.write(result.stderr[-4000:])
        raise ReplayError(f"Dockerfile:{line} RUN {text!r} exited {result.returncode}")
    log(f"  done in {time.monotonic() - started:.1f}s")


def keep_only_runtime_copies(dockerfile: Dockerfile, root: Root) -> str:
    """Remove from the scratch root what the runtime stage does not copy; returns the build stage."""
    runtime = dockerfile.stage(RUNTIME_STAGE)
    kept: list[Path] = []
    build_stage = None
    for instruction in runtime.find("COPY"):
        flags, sources, dest = copy_sources(instruction)
        if "from" not in flags:
            raise ReplayError(f"Dockerfile:{instruction.line}: the runtime stage copies from the build context")
        if len(sources) != 1 or sources[0].rstrip("/") != dest.rstrip("/"):
            raise ReplayError(
                f"Dockerfile:{instruction.line}: replay supports only `COPY --from=<stage> <path> <same path>`"
            )
        build_stage = flags["from"]
        kept.append(root.host(dest.rstrip("/")))
    if build_stage is None:
        raise ReplayError("the runtime stage copies nothing from a build stage")

    def prune(directory: Path) -> None:
        for child in directory.iterdir():
            if any(child == k for k in kept):
                continue
            if any(k.is_relative_to(child) for k in kept):
                prune(child)
            elif child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()

    prune(root.path)
    return build_stage


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _http(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")
    except OSError as exc:
        return 0, str(exc)


def _can_drop_privileges(uid: int, gid: int, python: str) -> bool:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return False
    # The image's user must run the same interpreter the environment was built for: when the host's
    # Python lives somewhere that user cannot read (e.g. under a private /root), the venv's link does
    # not resolve for it and another Python may answer instead, which is not what the image would run.
    ask = [python, "-c", "import sys; print(sys.version)"]
    probe = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *ask], capture_output=True)
    if probe.returncode != 0:
        return False
    return probe.stdout == subprocess.run(ask, capture_output=True).stdout


def _snapshot(path: Path) -> set[str]:
    return {str(p) for p in path.rglob("*")}


def run_target(dockerfile: Dockerfile, target: Stage, root: Root, logs: Path) -> list[str]:
    """Start one target as its image would; returns the problems found."""
    name = target.name or "?"
    chain = dockerfile.chain(name)
    chain = chain[[s.name for s in chain].index(RUNTIME_STAGE) :]
    host_path = os.environ.get("PATH", "/usr/bin:/bin")
    # The base image's own PATH is the host's here; ENV PATH="...:${PATH}" extends it.
    variables = {**dockerfile.global_args, "PATH": host_path}
    env: dict[str, str] = {}
    entrypoint: list[str] = []
    cmd: list[str] = []
    health: list[str] = []
    user = "0"
    cwd = "/"
    for stage in chain:
        for instruction in stage.instructions:
            keyword = instruction.keyword
            if keyword == "ARG":
                key, _, default = instruction.args.partition("=")
                if default or key.strip() not in variables:
                    variables[key.strip()] = default.strip().strip('"')
            elif keyword == "ENV":
                env.update(parse_env(instruction.args, {**variables, **env}))
            elif keyword == "WORKDIR":
                cwd = instruction.args.strip()
            elif keyword == "USER":
                user = instruction.args.strip()
            elif keyword == "ENTRYPOINT":
                entrypoint = instruction.exec_form() or []
                cmd = []
            elif keyword == "CMD":
                cmd = instruction.exec_form() or []
            elif keyword == "HEALTHCHECK":
                match = re.search(r"CMD\s+(\[.*\])\s*$", instruction.args)
                health = [str(w) for w in json.loads(match.group(1))] if match else []
    problems: list[str] = []
    if not entrypoint and not cmd:
        return [f"{name}: no ENTRYPOINT or CMD"]
    if not health:
        problems.append(f"{name}: no HEALTHCHECK in exec form")

    port = _free_port()
    argv = entrypoint + cmd
    image_port = None
    for i, word in enumerate(argv[:-1]):
        if word == "--port":
            image_port = argv[i + 1]
            argv[i + 1] = str(port)
        if word == "--host":
            argv[i + 1] = "127.0.0.1"
    if image_port is None:
        return [*problems, f"{name}: the command has no --port"]

    run_env = {"PATH": host_path, "LANG": "C.UTF-8"}
    run_env.update({key: root.map_value(value) for key, value in env.items()})
    run_env.update({"TSUNAGU_BUS": "memory", "TSUNAGU_BROKER": "memory"})

    executable = shutil.which(argv[0], path=run_env["PATH"])
    if executable is None or not Path(executable).is_relative_to(root.path):
        return [*problems, f"{name}: {argv[0]} is not in the image's environment (found {executable})"]
    python = shutil.which("python", path=run_env["PATH"]) or "python"

    uid, _, gid = user.partition(":")
    prefix: list[str] = []
    as_user = "the current user"
    if uid.isdigit() and int(uid) != 0 and _can_drop_privileges(int(uid), int(gid or uid), python):
        prefix = ["setpriv", f"--reuid={uid}", f"--regid={gid or uid}", "--clear-groups", "--"]
        as_user = f"uid {uid}"
    before = _snapshot(root.path)
    log_file = logs / f"{name}.log"
    workdir = root.host(cwd) if root.host(cwd).exists() else root.path
    with open(log_file, "w") as out:
        process = subprocess.Popen(
            [*prefix, executable, *argv[1:]],
            cwd=workdir,
            env=run_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        started = time.monotonic()
        healthy = False
        probe = [w.replace(f":{image_port}/", f":{port}/") for w in health]
        if probe and probe[0] == "python":
            probe[0] = python
        while time.monotonic() - started < START_TIMEOUT and process.poll() is None:
            result = subprocess.run(prefix + probe, env=run_env, capture_output=True, timeout=10)
            if result.returncode == 0:
                healthy = True
                break
            time.sleep(0.5)
        elapsed = time.monotonic() - started
        if not healthy:
            problems.append(f"{name}: HEALTHCHECK never passed within {START_TIMEOUT:.0f}s (exit {process.poll()})")
        else:
            status, body = _http(f"http://127.0.0.1:{port}/readyz")
            if status != 200:
                problems.append(f"{name}: /readyz answered {status}: {body[:200]}")
            status, body = _http(f"http://127.0.0.1:{port}/metrics")
            if status != 200 or "# HELP" not in body:
                problems.append(f"{name}: /metrics answered {status} without Prometheus text")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        try:
            code = process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            code = process.wait()
            problems.append(f"{name}: did not stop within {STOP_TIMEOUT:.0f}s of SIGTERM")
    if code != 0 and not problems:
        problems.append(f"{name}: exited {code} after SIGTERM")
    written = sorted(_snapshot(root.path) - before)
    if written:
        problems.append(f"{name}: wrote into the image filesystem: {written[:5]}")
    if problems:
        sys.stdout.write(f"--- {name} log (last lines) ---\n")
        sys.stdout.write("\n".join(log_file.read_text().splitlines()[-25:]) + "\n")
    else:
        log(
            f"{name}: `{' '.join(entrypoint + cmd)}` healthy in {elapsed:.1f}s as {as_user}, ready, metrics, clean stop"
        )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "image-replay")
    parser.add_argument("--target", action="append", dest="targets", help="only these targets (default: all)")
    parser.add_argument("--repo", type=Path, default=REPO, help="build context holding the Dockerfile")
    args = parser.parse_args(argv)

    dockerfile = parse(args.repo / "Dockerfile")
    root = Root(args.work / "rootfs")
    logs = args.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        # Keep the virtual environment between runs (uv syncs it exactly); start from nothing else.
        build_stage = _build_stage_of_runtime(dockerfile)
        if root.path.exists():
            keep_only_runtime_copies(dockerfile, root)
        replay_build(dockerfile, build_stage, root, args.repo)
        keep_only_runtime_copies(dockerfile, root)
        for p in root.path.rglob("*"):  # the image's files belong to root and are not writable by others
            if not p.is_symlink():
                p.chmod(p.stat().st_mode & ~0o022)
    except ReplayError as exc:
        print(f"FAIL replay: {exc}")
        return 1
    log(f"environment built in {time.monotonic() - started:.1f}s")

    targets = [t for t in dockerfile.targets(RUNTIME_STAGE) if not args.targets or t.name in args.targets]
    problems: list[str] = []
    for target in targets:
        problems += run_target(dockerfile, target, root, logs)
    for problem in problems:
        print(f"FAIL {problem}")
    failed = {problem.split(":")[0] for problem in problems}
    print(f"replay: {len(targets) - len(failed)}/{len(targets)} targets started, healthy and stopped cleanly")
    return 1 if problems or not targets else 0


def _build_stage_of_runtime(dockerfile: Dockerfile) -> str:
    for instruction in dockerfile.stage(RUNTIME_STAGE).find("COPY"):
        flags, _, _ = copy_sources(instruction)
        if "from" in flags:
            return flags["from"]
    raise ReplayError("the runtime stage copies nothing from a build stage")


if __name__ == "__main__":
    sys.exit(main())
