"""What a client sends on the FHIR websocket (`/fhir/ws`), sans I/O.

The Subscriptions framework's websocket channel has the client send `bind-with-token` with the token
of `$get-ws-binding-token` (repeatable, for more subscriptions or a fresh token); the pages write it
both as `bind-with-token: <token>` and `bind-with-token <token>`, so both are accepted, the verb
case-insensitive. `unbind-with-token: <token>` ends what that token bound.

Medplum's clients (the most used websocket subscription clients) send JSON instead:
`{"type": "bind-with-token", "payload": {"token": "..."}}`, `{"type": "unbind-from-token", ...}` and
`{"type": "ping"}` (answered `{"type": "pong"}`); those are accepted too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson

BIND: Final = "bind-with-token"
UNBIND: Final = "unbind-with-token"
PING: Final = "ping"
MAX_COMMAND_CHARS = 1024

_COMMAND = re.compile(r"^\s*(bind-with-token|unbind-with-token)\s*(?::\s*|\s+)(\S+)\s*$", re.IGNORECASE)
_TOKEN = re.compile(r"^[A-Za-z0-9_\-.~+/=]{8,512}$")
Action = Literal["bind-with-token", "unbind-with-token", "ping"]
_JSON_VERBS: Final[dict[str, Action]] = {
    "bind-with-token": "bind-with-token",
    "unbind-with-token": "unbind-with-token",
    "unbind-from-token": "unbind-with-token",
}


class CommandError(ValueError):
    """Not a command this endpoint knows."""


@dataclass(frozen=True, slots=True)
class Command:
    action: Action
    token: str = ""
    # Answer in JSON (the client spoke JSON): only what a ping gets differs.
    json: bool = False


def parse_command(message: str | bytes) -> Command:
    if isinstance(message, bytes):
        try:
            message = message.decode()
        except UnicodeDecodeError:
            raise CommandError("commands are UTF-8 text") from None
    if len(message) > MAX_COMMAND_CHARS:
        raise CommandError(f"a command is at most {MAX_COMMAND_CHARS} characters")
    if message.lstrip().startswith("{"):
        return _json_command(message)
    match = _COMMAND.match(message)
    if match is None:
        raise CommandError(f"expected '{BIND}: <token>' or '{UNBIND}: <token>', got {message[:60]!r}")
    verb, token = match.group(1).lower(), match.group(2)
    return Command("bind-with-token" if verb == BIND else "unbind-with-token", _checked(token))


def _json_command(message: str) -> Command:
    try:
        value: Any = orjson.loads(message)
    except orjson.JSONDecodeError:
        raise CommandError("the message is not JSON") from None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == PING:
        return Command("ping", json=True)
    action = _JSON_VERBS.get(kind) if isinstance(kind, str) else None
    if action is None:
        raise CommandError(f"a JSON message's type must be bind-with-token, unbind-from-token or ping, not {kind!r}")
    payload = value.get("payload")
    token = payload.get("token") if isinstance(payload, dict) else None
    if not isinstance(token, str):
        raise CommandError(f"{kind} needs payload.token")
    return Command(action, _checked(token), json=True)


def _checked(token: str) -> str:
    if not _TOKEN.match(token):
        raise CommandError("the token is malformed")
    return token
