"""README.md's quickstart, executed as written against `tsunagu run` (embedded engines, as `make run`).

The snippets are read out of README.md, so they cannot drift from what the platform does. Two things are
changed on the way, and only these: the services listen on free ports instead of 8080/8081 (other tests
run beside this one), and `uv run tsunagu` is this interpreter's `python -m tsunagu` (the same command
in the same environment, without uv resolving the workspace once more).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def readme_blocks() -> list[tuple[str, str]]:
    return [(match[1], match[2]) for match in BLOCK.finditer(README.read_text())]


def the_block(language: str, needle: str) -> str:
    found = [body for lang, body in readme_blocks() if lang == language and needle in body]
    assert len(found) == 1, f"README.md should have one {language} block with {needle!r}, has {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def platform(start_module_service: Any, pick_port: Any) -> dict[str, Any]:
    names = ("GATEWAY", "AUTH", "PRESENCE", "COLLAB", "INGEST", "MQTT_BRIDGE", "SIM", "AUDIT")
    ports = {name: pick_port() for name in names}
    env = {f"TSUNAGU_{name}_PORT": str(port) for name, port in ports.items()}
    env |= {"TSUNAGU_BUS": "memory", "TSUNAGU_BROKER": "memory", "TSUNAGU_DATABASE": "memory"}
    process = start_module_service(["run"], env, port=ports["GATEWAY"])
    process.wait_healthy(90)
    process.wait_ready(60)
    return {"gateway": ports["GATEWAY"], "auth": ports["AUTH"], "process": process}


def localised(snippet: str, platform: dict[str, Any]) -> str:
    text = snippet.replace("127.0.0.1:8080", f"127.0.0.1:{platform['gateway']}")
    text = text.replace("127.0.0.1:8081", f"127.0.0.1:{platform['auth']}")
    return text.replace("uv run tsunagu", f"{sys.executable} -m tsunagu")


def shell(snippet: str, platform: dict[str, Any], env: dict[str, str] | None = None) -> list[str]:
    """Run a sh block line by line in one bash (`set -e`), echoing what each command printed."""
    script = "set -euo pipefail\n" + localised(snippet, platform)
    done = subprocess.run(
        ["bash", "-c", script + '\necho "TOKEN=${TOKEN:-}"'],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, f"{snippet}\nfailed: {done.stdout}{done.stderr}"
    return done.stdout.strip().splitlines()


def hello(platform: dict[str, Any], token: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "hello.py"
    script.write_text(localised(the_block("python", "hello.py"), platform))
    return subprocess.run(
        [sys.executable, str(script)], env={**os.environ, "TOKEN": token}, capture_output=True, text=True, timeout=60
    )


def test_the_quickstart_as_the_readme_writes_it(platform: dict[str, Any], tmp_path: Path) -> None:
    dev_token = shell(the_block("sh", "export TOKEN=$(uv run tsunagu token"), platform)[-1].removeprefix("TOKEN=")
    assert dev_token.count(".") == 2, dev_token

    said = hello(platform, dev_token, tmp_path)
    assert said.returncode == 0, said.stdout + said.stderr
    assert "received {'text': 'hi'}" in said.stdout

    # A bad token: the script says why, in one line each, and stops without a traceback.
    refused = hello(platform, "not-a-token", tmp_path)
    assert refused.returncode != 0
    assert "disconnected: 3500 invalid token" in refused.stdout
    assert "not subscribed" in refused.stderr and "Traceback" not in refused.stderr

    # curl prints its JSON without a line break: what the next command prints follows on the same line.
    answer, rest = first_json(shell(the_block("sh", "/v1/token"), platform))
    assert "access_token" in answer
    assert rest.split()[0].count(".") == 2, f"tsunagu token --auth-url printed no token: {rest}"

    published, _ = first_json(shell(the_block("sh", "/api/publish"), platform))
    assert "result" in published, published

    revoked, _ = first_json(shell(the_block("sh", "/v1/revoke"), platform))
    assert revoked.get("scope") == "user", revoked


def first_json(lines: list[str]) -> tuple[dict[str, Any], str]:
    text = "\n".join(lines)
    value, end = json.JSONDecoder().raw_decode(text)
    assert isinstance(value, dict), text
    return value, text[end:].strip()
