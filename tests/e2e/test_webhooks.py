"""Webhooks on the real stack: gateway processes on Kafka POST their connection events, signed, to an
application endpoint. While the endpoint answers 503 the events wait; the gateway that was retrying is
killed with SIGKILL; another replica of the same webhook group delivers them once the endpoint is back.
Every event arrives, verified with the Standard Webhooks library; a redelivery carries the same id."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import time
import uuid
from collections import defaultdict
from typing import Any

import jwt
import orjson
from centrifuge import Client
from fastapi import FastAPI, Request, Response
from standardwebhooks import Webhook
from tsunagu_core.testing import free_port, serving

SECRET = "e2e-secret-long-enough-for-hs256-tokens"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"the e2e webhook secret of the application").decode()


def token(user: str) -> str:
    claims = {"sub": user, "channels": ["chat:*"], "exp": int(time.time()) + 600}
    return jwt.encode(claims, SECRET, algorithm="HS256")


class Endpoint:
    """The application's webhook endpoint: 503 while `down`, else it verifies and records each delivery."""

    def __init__(self) -> None:
        self.down = False
        self.refused = 0
        self.unverified = 0
        # webhook-id -> the bodies received under it (a redelivery appends)
        self.deliveries: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.app = FastAPI()
        self.app.post("/hooks")(self.hook)

    async def hook(self, request: Request) -> Response:
        if self.down:
            self.refused += 1
            return Response(status_code=503)
        raw = await request.body()
        try:
            Webhook(WEBHOOK_SECRET).verify(raw, dict(request.headers))
        except Exception:
            self.unverified += 1
            return Response(status_code=401)
        self.deliveries[request.headers["webhook-id"]].append(orjson.loads(raw))
        return Response(status_code=204)

    def ids_of(self, kind: str, user: str) -> set[str]:
        return {
            webhook_id
            for webhook_id, bodies in self.deliveries.items()
            if bodies[0]["type"] == kind and bodies[0]["data"]["user"] == user
        }


async def connect_and_leave(port: int, user: str) -> None:
    client = Client(f"ws://127.0.0.1:{port}/connection/websocket", token=token(user))
    await client.connect()
    await client.ready(timeout=10)
    await client.disconnect()


async def until(check: Any, timeout: float, what: str) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.1)
    assert check(), what


async def test_events_held_back_by_a_down_endpoint_arrive_after_the_retrying_gateway_is_killed(  # type: ignore[no-untyped-def]
    start_service, real_env
) -> None:
    endpoint = Endpoint()
    port = free_port()
    name = f"e2e{uuid.uuid4().hex[:8]}"  # its own consumer group: ws-gateway-webhooks-<name>
    webhooks = {
        name: {
            "url": f"http://127.0.0.1:{port}/hooks",
            "events": ["connect", "disconnect"],
            "secrets": [WEBHOOK_SECRET],
            "first_backoff": 0.2,
            "max_backoff": 1.0,
        }
    }
    env = {
        **real_env,
        "TSUNAGU_GATEWAY_TOKEN_HMAC_SECRET": SECRET,
        "TSUNAGU_GATEWAY_API_KEY": "e2e",
        "TSUNAGU_GATEWAY_WEBHOOKS": json.dumps(webhooks),
    }
    async with serving(endpoint.app, port):
        first = start_service(["serve", "ws-gateway"], env)
        await asyncio.to_thread(first.wait_ready)
        # A new webhook group starts at the topics' end once Kafka assigns it partitions: probe until it reads.
        probe = f"probe-{uuid.uuid4().hex[:6]}"
        async with asyncio.timeout(45):
            while not endpoint.ids_of("connect", probe):
                await connect_and_leave(first.port, probe)
                await asyncio.sleep(0.5)

        endpoint.down = True
        users = [f"hooked-{n}-{uuid.uuid4().hex[:4]}" for n in range(5)]
        for user in users:
            await connect_and_leave(first.port, user)
        await until(lambda: endpoint.refused >= 3, 20, "the gateway never tried the down endpoint")
        # The gateway's producer hands its events to Kafka within milliseconds; a kill -9 before that loses what
        # is still in the process (the event feed's limit, not the webhooks'): give the last ones time to leave.
        await asyncio.sleep(2)
        os.kill(first.process.pid, signal.SIGKILL)  # mid-retry: nothing of these events was committed
        first.process.wait()

        second = start_service(["serve", "ws-gateway"], env)
        await asyncio.to_thread(second.wait_ready)
        endpoint.down = False

        def all_delivered() -> bool:
            return all(endpoint.ids_of(kind, user) for user in users for kind in ("connect", "disconnect"))

        try:
            await until(all_delivered, 60, "")
        except TimeoutError:
            seen = sorted((b[0]["type"], b[0]["data"]["user"]) for b in endpoint.deliveries.values())
            raise AssertionError(
                f"events held back while the endpoint was down were lost; seen {seen}; second gateway:\n"
                + second.output()[-3000:]
            ) from None
    for user in users:
        for kind in ("connect", "disconnect"):
            # Once per event: a redelivery after the kill comes under the same id, never as a new event.
            assert len(endpoint.ids_of(kind, user)) == 1, (kind, user, endpoint.ids_of(kind, user))
    assert endpoint.unverified == 0
    with contextlib.suppress(ProcessLookupError):
        second.stop()
