"""A reconnect storm: 1,000 subscribers of two gateway replicas, one replica killed with SIGKILL.

999 light clients of the native JSON protocol (tsunagu_core.testing_storm, two worker processes) and one
stock centrifuge-python SDK, each subscribed with recovery to one of 20 channels, half of them homed on
each replica; publications flow through the survivor's server API at a steady rate. The kill sends the
first replica's 500 clients at the second at once (each after the SDK's jittered backoff), past the
survivor's connect rate: it sheds the excess with 3013, they come back later, and every one of them must
recover what it missed from history, every client ending with each publication exactly once, in order.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from typing import Any

import httpx
from centrifuge import Client, PublicationContext, SubscribedContext, SubscriptionEventHandler
from tsunagu_core.testing_storm import FailoverProxy, Storm, publish_steadily, storm_token

SECRET = "e2e-secret-long-enough-for-hs256-tokens"
API_KEY = "e2e"
CHANNELS = 20
CLIENTS = 1_000  # the SDK's one included
RATE = 3.0  # publications per second on each channel: 60/s in all, 3,000 deliveries/s
COUNT = 45  # 15 s of publications
KILL_AT = 15  # the tick at which the first replica is killed


class SdkSubscriber(SubscriptionEventHandler):
    def __init__(self) -> None:
        self.received: list[int] = []
        self.subscribed: list[SubscribedContext] = []

    async def on_publication(self, ctx: PublicationContext) -> None:
        self.received.append(ctx.pub.data["n"])

    async def on_subscribed(self, ctx: SubscribedContext) -> None:
        self.subscribed.append(ctx)


def shed(metrics: str) -> float:
    prefix = "tsunagu_gateway_connects_shed_total{"
    return sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(prefix))


async def test_a_thousand_subscribers_of_a_killed_gateway_reconnect_to_the_other_and_recover_everything(  # type: ignore[no-untyped-def]
    start_service, real_env
) -> None:
    env = {
        **real_env,
        "TSUNAGU_GATEWAY_TOKEN_HMAC_SECRET": SECRET,
        "TSUNAGU_GATEWAY_API_KEY": API_KEY,
        # A namespace of the test's own: recoverable (history 100, 10 min), no presence or join/leave.
        "TSUNAGU_GATEWAY_NAMESPACES": json.dumps({"storm": {}}),
        "TSUNAGU_GATEWAY_MAX_CONNECTIONS_PER_IP": "0",  # every client comes from 127.0.0.1
        # Low enough that 500 clients arriving within a second are partly shed, as a real storm would be.
        "TSUNAGU_GATEWAY_CONNECT_RATE": "100",
        "TSUNAGU_GATEWAY_CONNECT_BURST": "50",
    }
    first = start_service(["serve", "ws-gateway"], env)
    second = start_service(["serve", "ws-gateway"], env)
    await asyncio.gather(asyncio.to_thread(first.wait_ready), asyncio.to_thread(second.wait_ready))
    run = uuid.uuid4().hex[:8]
    channels = [f"storm:{run}-{n}" for n in range(CHANNELS)]
    urls = [f"ws://127.0.0.1:{gateway.port}/connection/websocket" for gateway in (first, second)]
    # Even clients live on the first replica (the one killed), odd ones on the second; each falls back on the other.
    specs = [
        {"user": f"storm-{n}", "channel": channels[n % CHANNELS], "urls": urls if n % 2 == 0 else urls[::-1]}
        for n in range(CLIENTS - 1)
    ]
    storm = Storm(SECRET, specs, clients_per_worker=500, min_delay=0.2, max_delay=3.0)
    proxy = FailoverProxy([first.port, second.port])
    await proxy.start()
    sdk = Client(
        f"ws://127.0.0.1:{proxy.port}/connection/websocket",
        token=storm_token(SECRET, "sdk", channels[:1]),
        max_reconnect_delay=1.0,
    )
    inbox = SdkSubscriber()
    try:
        await storm.start(ready_timeout=40)
        assert storm.subscribed == CLIENTS - 1, f"only {storm.subscribed} of {CLIENTS - 1} subscribed"
        await sdk.connect()
        subscription = sdk.new_subscription(channels[0], inbox, recoverable=True, positioned=True)
        await subscription.subscribe()
        await subscription.ready(timeout=10)
        async with httpx.AsyncClient(base_url=second.base) as http:
            shed_before = shed((await http.get("/metrics")).text)
        killed_at: list[float] = []

        async def kill_the_first(n: int) -> None:
            if n == KILL_AT:
                first.process.send_signal(signal.SIGKILL)
                killed_at.append(time.time())

        await publish_steadily(second.base + "/api", API_KEY, channels, COUNT, RATE, kill_the_first)
        summaries = await storm.finish({channel: COUNT for channel in channels}, timeout=30)
        deadline = time.monotonic() + 10
        while len(set(inbox.received)) < COUNT and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        async with httpx.AsyncClient(base_url=second.base) as http:
            shed_during = shed((await http.get("/metrics")).text) - shed_before
    finally:
        storm.kill()
        await sdk.disconnect()
        await proxy.close()

    assert len(summaries) == CLIENTS - 1
    hurt = [s for s in summaries if s["lost"] or s["duplicated"] or s["out_of_order"] or s["fatal"]]
    assert not hurt, f"{len(hurt)} clients lost, doubled or reordered publications: {summary_of(hurt[:3])}"
    moved = [s for s in summaries if s["home"] == urls[0]]
    stayed = [s for s in summaries if s["home"] == urls[1]]
    assert all(s["disconnects"] for s in moved), "a client of the killed replica never noticed"
    not_recovered = [s for s in moved if not all(recovered for _, recovered, _ in s["subscribed"][1:])]
    assert not not_recovered, f"resubscribed without recovering: {summary_of(not_recovered[:3])}"
    assert not [s for s in stayed if s["disconnects"]], "the survivor dropped clients of its own"
    # The survivor shed part of the storm, and the clients it shed recovered like the others.
    assert shed_during > 0 and any(s["shed"] for s in moved), f"nothing shed ({shed_during})"
    last = max(s["subscribed"][-1][0] for s in moved)
    print(
        f"\n{len(moved)} clients moved, all recovered {last - killed_at[0]:.1f} s after the kill;"
        f" {shed_during:.0f} connects shed by the survivor"
    )

    assert inbox.received == list(range(COUNT)), f"centrifuge-python: {inbox.received}"
    assert len(inbox.subscribed) >= 2 and inbox.subscribed[-1].recovered, [s.recovered for s in inbox.subscribed]


def summary_of(clients: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = ("user", "lost", "duplicated", "out_of_order", "fatal", "errors", "subscribed", "trace")
    return [{key: client[key] for key in keys} for client in clients]
