"""The gateway against Centrifugo v6 itself: the same scripted sessions, replies compared field by field.

Both servers get the same namespaces (in each one's own configuration language), the same HS256 secret
and API key, and memory engines. Every difference is either a bug to fix or one of the deliberate
differences listed in docs/protocol.md ("Differences from Centrifugo"), which `DELIBERATE` mirrors: the
test fails on any other, and on a deliberate one that is no longer there (so the list stays true).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .scenarios import API_KEY, CHANNEL_LIMIT, SCENARIOS, SECRET, Peer, Transcript
from .uni_scenarios import TRANSPORTS, unidirectional

REPO = Path(__file__).resolve().parents[2]
BIN = REPO / ".cache" / "bin"
CENTRIFUGO_VERSION = "v6.9.1"

# Namespace options both servers get: name -> (history, presence and join/leave, clients may subscribe, publish)
NAMESPACES: dict[str, dict[str, Any]] = {
    "": {"history": True, "presence": False, "subscribe": True, "publish": True},
    "chat": {"history": True, "presence": True, "subscribe": True, "publish": True},
    "secret": {"history": False, "presence": False, "subscribe": False, "publish": False},
    "readonly": {"history": True, "presence": False, "subscribe": True, "publish": False},
    "nohistory": {"history": False, "presence": False, "subscribe": True, "publish": True},
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def centrifugo_binary() -> Path:
    """Centrifugo built from the Go module proxy (`go install`), cached in .cache/bin as bench/ does."""
    marker = BIN / f"centrifugo-{CENTRIFUGO_VERSION}"
    if not marker.exists():
        BIN.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["go", "install", f"github.com/centrifugal/centrifugo/v6@{CENTRIFUGO_VERSION}"],
            env={**os.environ, "GOBIN": str(BIN)},
            check=True,
            timeout=1800,
        )
        marker.touch()
    return BIN / "centrifugo"


def centrifugo_config(port: int, redis_url: str, prefix: str) -> dict[str, Any]:
    def namespace(options: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "allow_subscribe_for_client": options["subscribe"],
            "allow_publish_for_client": options["publish"],
        }
        if options["history"]:
            out |= {"history_size": 100, "history_ttl": "300s", "force_recovery": True}
            out["allow_history_for_client"] = True
        if options["presence"]:
            out |= {"presence": True, "join_leave": True, "allow_presence_for_client": True}
        return out

    return {
        "http_server": {"address": "127.0.0.1", "port": port},
        "log": {"level": "error"},
        "usage_stats": {"disabled": True},
        "client": {"token": {"hmac_secret_key": SECRET}, "allowed_origins": ["*"], "channel_limit": CHANNEL_LIMIT},
        "http_api": {"key": API_KEY},
        "uni_http_stream": {"enabled": True},
        "uni_sse": {"enabled": True},
        "uni_websocket": {"enabled": True},
        "engine": {"type": "redis", "redis": {"address": [redis_url], "prefix": prefix}},
        "channel": {
            "without_namespace": namespace(NAMESPACES[""]),
            "namespaces": [{"name": name, **namespace(o)} for name, o in NAMESPACES.items() if name],
        },
    }


def gateway_namespaces() -> dict[str, Any]:
    def namespace(options: dict[str, Any]) -> dict[str, Any]:
        allowed = "authenticated"
        return {
            "allow_subscribe": allowed if options["subscribe"] else "none",
            "allow_publish": allowed if options["publish"] else "none",
            "allow_history": allowed if options["history"] else "none",
            "allow_presence": allowed if options["presence"] else "none",
            "history_size": 100 if options["history"] else 0,
            "history_ttl": 300,
            "recovery": options["history"],
            "presence": options["presence"],
            "join_leave": options["presence"],
        }

    return {name: namespace(options) for name, options in NAMESPACES.items()}


def wait_answering(url: str, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"exited with {process.returncode}"
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError(f"{url} never answered")


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Peer]]:
    """Both on the real Redis, each under a key prefix of its own: the engine Centrifugo runs in production
    (its memory engine differs from its Redis engine in small ways, e.g. `epoch` inside publications)."""
    from tsunagu_core.testing import REDIS_URL, require_stack

    require_stack("Centrifugo and the gateway on Redis")
    directory = tmp_path_factory.mktemp("conformance")
    run = uuid.uuid4().hex[:8]
    binary = centrifugo_binary()
    centrifugo_port, gateway_port = free_port(), free_port()
    config = directory / "centrifugo.json"
    config.write_text(json.dumps(centrifugo_config(centrifugo_port, REDIS_URL, f"centrifugo-{run}")))
    logs = [open(directory / name, "wb") for name in ("centrifugo.log", "gateway.log")]  # noqa: SIM115
    centrifugo = subprocess.Popen([str(binary), "--config", str(config)], stdout=logs[0], stderr=subprocess.STDOUT)
    env = {
        **os.environ,
        "TSUNAGU_BUS": "memory",
        "TSUNAGU_BROKER": "redis",
        "TSUNAGU_REDIS_URL": REDIS_URL,
        "TSUNAGU_GATEWAY_TOKEN_HMAC_SECRET": SECRET,
        "TSUNAGU_GATEWAY_API_KEY": API_KEY,
        "TSUNAGU_GATEWAY_NAMESPACES": json.dumps(gateway_namespaces()),
        "TSUNAGU_GATEWAY_MAX_CHANNELS_PER_CLIENT": str(CHANNEL_LIMIT),
    }
    gateway = subprocess.Popen(
        [sys.executable, "-m", "tsunagu", "serve", "ws-gateway", "--port", str(gateway_port)],
        env=env,
        stdout=logs[1],
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    try:
        wait_answering(f"http://127.0.0.1:{centrifugo_port}/health", centrifugo)
        wait_answering(f"http://127.0.0.1:{gateway_port}/healthz", gateway)
        yield {
            "centrifugo": Peer(
                "centrifugo",
                f"ws://127.0.0.1:{centrifugo_port}/connection/websocket",
                f"http://127.0.0.1:{centrifugo_port}/api",
            ),
            "tsunagu": Peer(
                "tsunagu", f"ws://127.0.0.1:{gateway_port}/connection/websocket", f"http://127.0.0.1:{gateway_port}/api"
            ),
        }
    finally:
        for process in (centrifugo, gateway):
            process.kill()
            process.wait()
        for log in logs:
            log.close()


def differences(reference: Any, ours: Any, path: str = "") -> list[str]:
    """Every place where `ours` differs from `reference` (Centrifugo's), as `path: theirs != ours`."""
    if isinstance(reference, dict) and isinstance(ours, dict):
        found = []
        for key in sorted(set(reference) | set(ours), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in ours:
                found.append(f"{where}: missing (Centrifugo: {reference[key]!r})")
            elif key not in reference:
                found.append(f"{where}: extra {ours[key]!r}")
            else:
                found += differences(reference[key], ours[key], where)
        return found
    if isinstance(reference, list) and isinstance(ours, list):
        if len(reference) != len(ours):
            return [f"{path}: {len(reference)} items in Centrifugo's, {len(ours)} in ours: {reference!r} != {ours!r}"]
        pairs = enumerate(zip(reference, ours, strict=True))
        return [line for index, (a, b) in pairs for line in differences(a, b, f"{path}[{index}]")]
    return [] if reference == ours else [f"{path}: Centrifugo {reference!r} != ours {ours!r}"]


# Deliberate differences (docs/protocol.md, "Differences from Centrifugo"), as substrings of the lines
# `differences` writes. Each scenario lists those it shows.
NODE_IN_CONNECT = ["connect.node: extra"]  # the connect reply names the node the client is on
PUBLISH_ACK = ["publish.offset: extra", "publish.epoch: extra"]  # what the offline outbox acknowledges with
# Centrifugo's Redis engine puts the epoch into the first publication of a new stream, for subscribers that
# subscribed before it had one; our subscribe reply always carries the epoch, so publications do not.
FIRST_PUBLICATION_EPOCH = ["push.pub.epoch: missing"]
PING_COMMAND = ["ping / [0].closed: missing", "ping / [0].id: extra", "ping / [0].ping: extra"]  # answered
DELIBERATE: dict[str, list[str]] = {
    "connect": NODE_IN_CONNECT,
    "subscribe, publish, history, presence": NODE_IN_CONNECT + PUBLISH_ACK + FIRST_PUBLICATION_EPOCH,
    "recovery": NODE_IN_CONNECT + FIRST_PUBLICATION_EPOCH,
    "command errors": NODE_IN_CONNECT + PING_COMMAND,
    "refresh": NODE_IN_CONNECT,
    "server API": NODE_IN_CONNECT + FIRST_PUBLICATION_EPOCH,
    "server-side subscriptions": NODE_IN_CONNECT + FIRST_PUBLICATION_EPOCH,
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_the_gateway_answers_as_centrifugo_does(peers: dict[str, Peer], scenario: str) -> None:
    run = uuid.uuid4().hex[:8]
    transcripts = {}
    for name, peer in peers.items():
        transcript = Transcript()
        await SCENARIOS[scenario](peer, run, transcript)
        transcripts[name] = transcript
    theirs = dict(transcripts["centrifugo"].steps)
    ours = dict(transcripts["tsunagu"].steps)
    assert list(theirs) == list(ours)
    found = [f"{step} / {line}" for step in theirs for line in differences(theirs[step], ours[step])]
    explained = DELIBERATE.get(scenario, [])
    unexplained = [line for line in found if not any(reason in line for reason in explained)]
    assert not unexplained, "\n".join(unexplained)
    stale = [reason for reason in explained if not any(reason in line for line in found)]
    assert not stale, f"listed as deliberate but no longer different: {stale}"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_the_unidirectional_transports_answer_as_centrifugo_does(peers: dict[str, Peer], transport: str) -> None:
    run = uuid.uuid4().hex[:8]
    transcripts = {}
    for name, peer in peers.items():
        transcript = Transcript()
        await unidirectional(peer, run, transcript, transport)
        transcripts[name] = transcript
    theirs = dict(transcripts["centrifugo"].steps)
    ours = dict(transcripts["tsunagu"].steps)
    assert list(theirs) == list(ours)
    found = [f"{step} / {line}" for step in theirs for line in differences(theirs[step], ours[step])]
    explained = ["connect.node: extra", "pub.epoch: missing"]  # NODE_IN_CONNECT, FIRST_PUBLICATION_EPOCH
    unexplained = [line for line in found if not any(reason in line for reason in explained)]
    assert not unexplained, "\n".join(unexplained)
    stale = [reason for reason in explained if not any(reason in line for line in found)]
    assert not stale, f"listed as deliberate but no longer different: {stale}"


def go_sdk_program() -> Path:
    """tests/conformance/go: a session of the stock Go SDK (centrifuge-go), built with the Go toolchain."""
    target = BIN / "conformance-go"
    source = Path(__file__).parent / "go"
    newest = max(path.stat().st_mtime for path in source.iterdir())
    if not target.exists() or target.stat().st_mtime < newest:
        BIN.mkdir(parents=True, exist_ok=True)
        subprocess.run(["go", "build", "-o", str(target), "."], cwd=source, check=True, timeout=900)
    return target


def test_the_go_sdk_sees_the_same_session_on_both(peers: dict[str, Peer]) -> None:
    from .scenarios import token

    program = go_sdk_program()
    channel = f"chat:go{uuid.uuid4().hex[:8]}"
    summaries = {}
    for name, peer in peers.items():
        done = subprocess.run(
            [str(program), peer.ws_url, peer.api_url, peer.api_key, token("gopher"), channel],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, f"{name}: {done.stderr}"
        summaries[name] = json.loads(done.stdout)
    ours, theirs = summaries["tsunagu"], summaries["centrifugo"]
    assert ours == theirs, "\n".join(differences(theirs, ours))
    assert [json.loads(json.dumps(d))["n"] for d in ours["received"]] == [0, 1, 2, 3, 4]
    assert ours["subscribed"][-1] == {"recovered": True, "was_recovering": True, "recoverable": True}
