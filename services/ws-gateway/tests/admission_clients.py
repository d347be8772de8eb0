"""One minimal client per transport of the gateway, each trying to get in with a credential and saying
whether it was admitted or how it was refused (a close code, an HTTP status, a protocol's error code).

They speak each protocol's own frames over `websockets` (and `httpx` for FHIR's HTTP operation), so a
check of the admission function is asked the same way of every transport. The stock clients of each
protocol are exercised in the protocol's own tests.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

TIMEOUT = 10.0


@dataclass(frozen=True)
class Outcome:
    admitted: bool
    # The refusal as the transport shows it: an HTTP status for a refused handshake, else a close code
    # or the protocol's error code.
    code: int | None = None
    detail: str = ""

    def __repr__(self) -> str:
        return "admitted" if self.admitted else f"refused({self.code}, {self.detail[:80]!r})"


ADMITTED = Outcome(True)


@dataclass(frozen=True)
class Target:
    port: int
    tls: ssl.SSLContext | None = None
    origin: str | None = None

    def url(self, path: str, scheme: str = "ws") -> str:
        secure = "s" if self.tls is not None else ""
        return f"{scheme}{secure}://127.0.0.1:{self.port}{path}"

    def connect(self, path: str, **options: Any) -> Any:
        headers = {"Origin": self.origin} if self.origin else None
        return websockets.connect(
            self.url(path), ssl=self.tls, additional_headers=headers, open_timeout=TIMEOUT, **options
        )


def _closed(exc: ConnectionClosed) -> Outcome:
    frame = exc.rcvd
    return Outcome(False, frame.code if frame else None, frame.reason if frame else "")


async def _guard(attempt: Callable[[], Awaitable[Outcome]]) -> Outcome:
    try:
        async with asyncio.timeout(TIMEOUT):
            return await attempt()
    except InvalidStatus as exc:
        return Outcome(False, exc.response.status_code, exc.response.body.decode(errors="replace"))
    except ConnectionClosed as exc:
        return _closed(exc)


async def native(target: Target, token: str) -> Outcome:
    async def attempt() -> Outcome:
        async with target.connect("/connection/websocket") as ws:
            await ws.send(json.dumps({"id": 1, "connect": {"token": token} if token else {}}))
            reply = json.loads(await ws.recv())
            if "connect" in reply:
                return ADMITTED
            return Outcome(False, reply["error"]["code"], reply["error"]["message"])

    return await _guard(attempt)


async def jsonrpc(target: Target, token: str) -> Outcome:
    async def attempt() -> Outcome:
        async with target.connect("/rpc" + (f"?token={token}" if token else "")) as ws:
            await ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "subscribe", "params": ["chat:admission"]}))
            reply = json.loads(await ws.recv())
            if "result" in reply:
                return ADMITTED
            return Outcome(False, reply["error"]["code"], reply["error"]["message"])

    return await _guard(attempt)


async def stomp(target: Target, token: str) -> Outcome:
    async def attempt() -> Outcome:
        async with target.connect("/stomp", subprotocols=["v12.stomp"]) as ws:  # type: ignore[list-item]
            passcode = f"passcode:{token}\n" if token else ""
            await ws.send(f"CONNECT\naccept-version:1.2\nhost:tsunagu\n{passcode}\n\x00")
            frame = str(await ws.recv())
            if frame.startswith("CONNECTED"):
                return ADMITTED
            await ws.wait_closed()
            return Outcome(False, ws.close_code, frame)

    return await _guard(attempt)


async def graphql(target: Target, token: str) -> Outcome:
    async def attempt() -> Outcome:
        async with target.connect("/graphql", subprotocols=["graphql-transport-ws"]) as ws:  # type: ignore[list-item]
            await ws.send(json.dumps({"type": "connection_init", "payload": {"token": token} if token else {}}))
            message = json.loads(await ws.recv())
            if message["type"] == "connection_ack":
                return ADMITTED
            return Outcome(False, None, str(message))

    return await _guard(attempt)


async def socketio(target: Target, token: str) -> Outcome:
    """Engine.IO v4 over a WebSocket, then Socket.IO's CONNECT with `auth`."""

    async def attempt() -> Outcome:
        async with target.connect("/socket.io/?EIO=4&transport=websocket") as ws:
            opened = str(await ws.recv())
            assert opened.startswith("0"), opened
            await ws.send("40" + json.dumps({"token": token} if token else {}))
            while True:
                packet = str(await ws.recv())
                if packet == "2":  # an Engine.IO ping
                    await ws.send("3")
                    continue
                if packet.startswith("40"):
                    return ADMITTED
                if packet.startswith("44"):
                    error = json.loads(packet[2:])
                    code = (error.get("data") or {}).get("code")
                    return Outcome(False, code, error.get("message", ""))

    return await _guard(attempt)


async def collab(target: Target, token: str) -> Outcome:
    """Admitted means the document was asked for: without a collab service that ends with 4503."""

    async def attempt() -> Outcome:
        async with target.connect("/collab/admission" + (f"?token={token}" if token else "")) as ws:
            try:
                await ws.recv()
                return ADMITTED
            except ConnectionClosed as exc:
                outcome = _closed(exc)
                if outcome.code == 4503 and "collab did not answer" in outcome.detail:
                    return ADMITTED
                return outcome

    return await _guard(attempt)


async def fhir(target: Target, token: str) -> Outcome:
    """`$get-ws-binding-token` with the credential, then `/fhir/ws` binding it."""
    headers = {"authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(verify=target.tls or True, timeout=TIMEOUT) as http:
        response = await http.get(target.url("/fhir/Subscription/adm/$get-ws-binding-token", "http"), headers=headers)
    if response.status_code != 200:
        return Outcome(False, response.status_code, response.text)
    binding = next(p["valueString"] for p in response.json()["parameter"] if p["name"] == "token")

    async def attempt() -> Outcome:
        async with target.connect("/fhir/ws") as ws:
            await ws.send(f"bind-with-token: {binding}")
            message = json.loads(await ws.recv())
            if message.get("resourceType") == "Bundle":
                return ADMITTED
            issue = message["issue"][0]
            return Outcome(False, None, f"{issue['code']}: {issue.get('diagnostics', '')}")

    return await _guard(attempt)


async def fhir_socket(target: Target, token: str) -> Outcome:
    """Only the `/fhir/ws` handshake (what origin and draining checks refuse)."""

    async def attempt() -> Outcome:
        async with target.connect("/fhir/ws") as ws:
            await ws.send("bind-with-token: not-a-binding-token")
            await ws.recv()
            return ADMITTED

    return await _guard(attempt)


CLIENTS: dict[str, Callable[[Target, str], Awaitable[Outcome]]] = {
    "native": native,
    "jsonrpc": jsonrpc,
    "stomp": stomp,
    "graphql": graphql,
    "socketio": socketio,
    "collab": collab,
    "fhir": fhir,
}
