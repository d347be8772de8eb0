"""FHIR subscriptions on a real gateway (memory engines): `$get-ws-binding-token`, the `/fhir/ws`
websocket spoken to with the `websockets` client, rest-hook deliveries at `/fhir/notify`, `$events`.
Every bundle a client receives is parsed with fhir.resources' R5 or R4B models."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import orjson
import pytest
import websockets
from fhir.resources.bundle import Bundle
from fhir.resources.operationoutcome import OperationOutcome
from fhir.resources.parameters import Parameters
from fhir.resources.R4B.bundle import Bundle as BundleR4B
from fhir.resources.R4B.subscriptionstatus import SubscriptionStatus as SubscriptionStatusR4B
from fhir.resources.subscriptionstatus import SubscriptionStatus
from tsunagu_core import topics
from tsunagu_core.envelope import publish_event
from tsunagu_core.wire.events_pb2 import Revocation

from .conftest import API_KEY, RunningGateway, make_token
from .test_fhir_model import r4b_notification, r5_notification

R4B_ACCEPT = "application/fhir+json; fhirVersion=4.3"
Gateway = Callable[..., contextlib.AbstractAsyncContextManager[RunningGateway]]


def bearer(user: str = "alice", channels: list[str] | None = None, **claims: Any) -> dict[str, str]:
    return {"authorization": "Bearer " + make_token(user, ["fhir:*"] if channels is None else channels, **claims)}


@contextlib.asynccontextmanager
async def http_client(gateway: RunningGateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway.http_url, timeout=10) as client:
        yield client


async def binding(
    http: httpx.AsyncClient, subscription: str = "s1", *, accept: str | None = None, user: str = "alice"
) -> tuple[str, str]:
    """(token, websocket-url) from `$get-ws-binding-token`."""
    headers = bearer(user) | ({"accept": accept} if accept else {})
    response = await http.get(f"/fhir/Subscription/{subscription}/$get-ws-binding-token", headers=headers)
    assert response.status_code == 200, response.text
    parameters = Parameters.model_validate(response.json())
    values = {p.name: p.valueString or p.valueUrl for p in parameters.parameter}
    return str(values["token"]), str(values["websocket-url"])


async def notify(http: httpx.AsyncClient, bundle: dict[str, Any], **headers: str) -> httpx.Response:
    sent = {"x-api-key": API_KEY, "content-type": "application/fhir+json"} | headers
    return await http.post("/fhir/notify", content=orjson.dumps(bundle), headers=sent)


async def receive(ws: websockets.ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    message = await asyncio.wait_for(ws.recv(), timeout)
    assert isinstance(message, str), "FHIR bundles come as text messages"
    value: dict[str, Any] = orjson.loads(message)
    return value


async def receive_status(ws: websockets.ClientConnection, r4b: bool = False) -> tuple[dict[str, Any], Any]:
    """A notification bundle and its SubscriptionStatus, both checked with the model library."""
    bundle = await receive(ws)
    assert bundle["resourceType"] == "Bundle", bundle
    if r4b:
        parsed = BundleR4B.model_validate(bundle)
        assert parsed.type == "history"
        status = parsed.entry[0].resource
        assert isinstance(status, SubscriptionStatusR4B)
    else:
        parsed_r5 = Bundle.model_validate(bundle)
        assert parsed_r5.type == "subscription-notification"
        status = parsed_r5.entry[0].resource
        assert isinstance(status, SubscriptionStatus)
    return bundle, status


async def receive_outcome(ws: websockets.ClientConnection) -> dict[str, Any]:
    outcome = await receive(ws)
    OperationOutcome.model_validate(outcome)
    issue: dict[str, Any] = outcome["issue"][0]
    return issue


async def nothing_arrives(ws: websockets.ClientConnection, seconds: float = 0.4) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(ws.recv(), seconds)


async def closed_with(ws: websockets.ClientConnection) -> int:
    with pytest.raises(websockets.ConnectionClosed):
        await asyncio.wait_for(ws.recv(), 5)
    assert ws.close_code is not None
    return ws.close_code


def events_of(status: Any) -> list[int]:
    return [int(event.eventNumber) for event in status.notificationEvent or ()]


# $get-ws-binding-token


async def test_binding_token_needs_a_jwt_that_may_subscribe(gateway: RunningGateway) -> None:
    async with http_client(gateway) as http:
        path = "/fhir/Subscription/s1/$get-ws-binding-token"
        missing = await http.get(path)
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert missing.headers["content-type"].startswith("application/fhir+json")
        assert OperationOutcome.model_validate(missing.json()).issue[0].code == "login"
        bad = await http.get(path, headers={"authorization": "Bearer not-a-jwt"})
        assert bad.status_code == 401 and bad.json()["issue"][0]["code"] == "security"
        wrong_secret = "Bearer " + make_token("alice", ["fhir:*"]).rsplit(".", 1)[0] + ".forged"
        assert (await http.get(path, headers={"authorization": wrong_secret})).status_code == 401
        expired = await http.get(path, headers=bearer(ttl=-60))
        assert expired.status_code == 401
        forbidden = await http.get(path, headers=bearer(channels=["chat:*"]))
        assert forbidden.status_code == 403 and forbidden.json()["issue"][0]["code"] == "forbidden"
        only_s2 = await http.get(path, headers=bearer(channels=["fhir:s2"]))
        assert only_s2.status_code == 403
        bad_id = await http.get("/fhir/Subscription/no%20such%20id/$get-ws-binding-token", headers=bearer())
        assert bad_id.status_code == 400 and "is not a FHIR id" in bad_id.json()["issue"][0]["diagnostics"]
        r4 = await http.get(path, headers=bearer() | {"accept": "application/fhir+json; fhirVersion=4.0"})
        assert r4.status_code == 406

        ok = await http.post(path, headers=bearer())
        assert ok.status_code == 200
        assert ok.headers["content-type"] == "application/fhir+json; fhirVersion=5.0"
        parameters = Parameters.model_validate(ok.json())
        names = [p.name for p in parameters.parameter]
        assert names == ["token", "expiration", "subscription", "websocket-url"]
        assert parameters.parameter[2].valueString == "s1"
        assert parameters.parameter[3].valueUrl == f"ws://127.0.0.1:{gateway.port}/fhir/ws"


async def test_a_token_for_several_subscriptions(gateway: RunningGateway) -> None:
    async with http_client(gateway) as http:
        path = "/fhir/Subscription/$get-ws-binding-token"
        none = await http.get(path, headers=bearer())
        assert none.status_code == 400 and "id" in none.json()["issue"][0]["diagnostics"]
        body = {"resourceType": "Parameters", "parameter": [{"name": "id", "valueId": "s2"}]}
        answer = await http.post(path + "?id=s1", headers=bearer(), content=orjson.dumps(body))
        assert answer.status_code == 200, answer.text
        values = [(p["name"], p.get("valueString")) for p in answer.json()["parameter"]]
        assert [v for n, v in values if n == "subscription"] == ["s1", "s2"]
        token = values[0][1]
        denied = await http.get(path + "?id=s1&id=x9", headers=bearer(channels=["fhir:s1"]))
        assert denied.status_code == 403

        async with websockets.connect(f"{gateway.ws_url.rsplit('/', 2)[0]}/fhir/ws") as ws:
            await ws.send(f"bind-with-token {token}")
            handshakes = [await receive_status(ws) for _ in range(2)]
            assert {status.subscription.reference for _, status in handshakes} == {"Subscription/s1", "Subscription/s2"}
            assert all(status.type == "handshake" for _, status in handshakes)
            await notify(http, r5_notification([1], "s2"))
            await notify(http, r5_notification([1], "s1"))
            _, second = await receive_status(ws)
            _, first = await receive_status(ws)
            assert second.subscription.reference.endswith("/Subscription/s2")  # as the server wrote it
            assert first.subscription.reference.endswith("/Subscription/s1")


# the websocket


async def test_bind_handshake_then_notifications_in_order(gateway: RunningGateway) -> None:
    async with http_client(gateway) as http:
        token, url = await binding(http)
        async with websockets.connect(url) as ws:
            await ws.send(f"bind-with-token: {token}")
            bundle, handshake = await receive_status(ws)
            assert handshake.type == "handshake" and handshake.status == "active"
            assert handshake.subscription.reference == "Subscription/s1"
            assert handshake.eventsSinceSubscriptionStart == 0 and len(bundle["entry"]) == 1
            for n in (1, 2, 3):
                answer = await notify(http, r5_notification([n]))
                assert answer.status_code == 200, answer.text
                assert "published" in answer.json()["issue"][0]["diagnostics"]
            for n in (1, 2, 3):
                bundle, status = await receive_status(ws)
                assert status.type == "event-notification" and events_of(status) == [n]
                assert status.eventsSinceSubscriptionStart == n
                assert status.notificationEvent[0].focus.reference == f"Observation/obs-{n}"
                assert bundle["entry"][1]["resource"]["id"] == f"obs-{n}"
                # integer64 travels as R5's JSON has it: a string.
                assert bundle["entry"][0]["resource"]["notificationEvent"][0]["eventNumber"] == str(n)
            await nothing_arrives(ws)


async def test_what_was_published_before_the_bind_is_counted_not_sent(gateway: RunningGateway) -> None:
    async with http_client(gateway) as http:
        for n in (1, 2):
            await notify(http, r5_notification([n]))
        token, url = await binding(http)
        async with websockets.connect(url) as ws:
            await ws.send(f"bind-with-token: {token}")
            _, handshake = await receive_status(ws)
            assert handshake.eventsSinceSubscriptionStart == 2
            assert handshake.topic == "http://example.org/fhir/SubscriptionTopic/vitals"
            await notify(http, r5_notification([3]))
            _, status = await receive_status(ws)
            assert events_of(status) == [3]


async def test_heartbeats_after_the_period(start_gateway: Gateway) -> None:
    async with start_gateway(fhir_heartbeat_period=0.3) as gw, http_client(gw) as http:
        token, url = await binding(http)
        async with websockets.connect(url) as ws:
            await ws.send(f"bind-with-token: {token}")
            await receive_status(ws)
            await notify(http, r5_notification([1]))
            _, event = await receive_status(ws)
            assert event.type == "event-notification"
            started = asyncio.get_running_loop().time()
            _, heartbeat = await receive_status(ws)
            waited = asyncio.get_running_loop().time() - started
            assert heartbeat.type == "heartbeat" and heartbeat.eventsSinceSubscriptionStart == 1
            assert 0.15 <= waited <= 1.5
            assert heartbeat.notificationEvent is None
            _, again = await receive_status(ws)
            assert again.type == "heartbeat"


async def test_unbind_stops_notifications_and_keeps_the_socket(gateway: RunningGateway) -> None:
    async with http_client(gateway) as http:
        token, url = await binding(http)
        async with websockets.connect(url) as ws:
            await ws.send(f"bind-with-token: {token}")
            await receive_status(ws)
            await ws.send(f"unbind-with-token: {token}")
            await ws.send('{"type": "ping"}')
            assert await receive(ws) == {"type": "pong"}
            await notify(http, r5_notification([1]))
            await nothing_arrives(ws)
            await ws.send(f"unbind-with-token: {token}")
            issue = await receive_outcome(ws)
            assert issue["code"] == "not-found"
            # Bind again (the token still lives): the handshake counts the event sent while unbound.
            await ws.send(f"bind-with-token: {token}")
            _, handshake = await receive_status(ws)
            assert handshake.eventsSinceSubscriptionStart == 1


async def test_expired_binding_tokens(start_gateway: Gateway) -> None:
    async with start_gateway(fhir_binding_token_ttl=1.0) as gw, http_client(gw) as http:
        token, url = await binding(http)
        parameters = (await http.get("/fhir/Subscription/s1/$get-ws-binding-token", headers=bearer())).json()
        assert parameters["parameter"][1]["valueDateTime"].endswith("Z")
        async with websockets.connect(url) as ws:
            await ws.send(f"bind-with-token: {token}")
            await receive_status(ws)
            # Bound, the binding ends with its token: a warning, then nothing more.
            issue = await receive_outcome(ws)
            assert issue["code"] == "expired" and issue["severity"] == "warning"
            await notify(http, r5_notification([1]))
            await nothing_arrives(ws)
            # Binding with the expired token: refused, the socket stays usable.
            await ws.send(f"bind-with-token: {token}")
            issue = await receive_outcome(ws)
            assert issue["code"] in ("expired", "security") and "token" in issue["diagnostics"]
            fresh, _ = await binding(http)
            await ws.send(f"bind-with-token: {fresh}")
            _, handshake = await receive_status(ws)
            assert handshake.type == "handshake" and handshake.eventsSinceSubscriptionStart == 1


async def test_unknown_tokens_get_an_outcome(gateway: RunningGateway) -> None:
    async with websockets.connect(f"ws://127.0.0.1:{gateway.port}/fhir/ws") as ws:
        await ws.send("bind-with-token: " + "A" * 43)
        issue = await receive_outcome(ws)
        assert issue["severity"] == "error" and issue["code"] == "security"
        await ws.send('{"type": "bind-with-token", "payload": {"token": "' + "B" * 43 + '"}}')
        assert (await receive_outcome(ws))["code"] == "security"


@pytest.mark.parametrize(
    "message",
    ["hello", "bind-with-token:", "bind-with-token: bad<token>!", b"\xff\xfe", '{"type": "subscribe"}'],
)
async def test_malformed_commands_get_an_outcome_and_a_close_code(gateway: RunningGateway, message: Any) -> None:
    async with websockets.connect(f"ws://127.0.0.1:{gateway.port}/fhir/ws") as ws:
        await ws.send(message)
        issue = await receive_outcome(ws)
        assert issue["code"] == "invalid" and issue["severity"] == "error"
        assert await closed_with(ws) == 3501


async def test_a_socket_with_nothing_bound_is_closed(start_gateway: Gateway) -> None:
    async with start_gateway(connect_timeout=0.5) as gw, websockets.connect(f"ws://127.0.0.1:{gw.port}/fhir/ws") as ws:
        issue = await receive_outcome(ws)
        assert issue["code"] == "timeout"
        assert await closed_with(ws) == 3502


async def test_a_fresh_token_takes_over_without_losing_or_repeating(gateway: RunningGateway) -> None:
    async with http_client(gateway) as http:
        first, url = await binding(http)
        async with websockets.connect(url) as ws:
            await ws.send(f"bind-with-token: {first}")
            await receive_status(ws)
            await notify(http, r5_notification([1]))
            _, status = await receive_status(ws)
            assert events_of(status) == [1]
            second, _ = await binding(http)
            # Notifications keep coming while the new token binds.
            posting = asyncio.gather(*(notify(http, r5_notification([n])) for n in (2, 3, 4)))
            await ws.send(f"bind-with-token: {second}")
            await posting
            seen, handshakes = [], 0
            while len(seen) < 3:
                _, status = await receive_status(ws)
                if status.type == "handshake":
                    handshakes += 1
                else:
                    seen += events_of(status)
            assert handshakes == 1 and seen == [2, 3, 4]
            await nothing_arrives(ws)
            # Unbinding names subscriptions: the first token's (s1) is unbound, whichever token bound it last.
            await ws.send(f"unbind-with-token: {first}")
            await notify(http, r5_notification([5]))
            await nothing_arrives(ws)
            await ws.send(f"bind-with-token: {second}")
            _, handshake = await receive_status(ws)
            assert handshake.type == "handshake" and handshake.eventsSinceSubscriptionStart == 5


async def test_revoking_the_session_behind_a_binding_ends_it(gateway: RunningGateway) -> None:
    headers = bearer("mallory", sid="sess-1", iat=int(time.time()) - 5)
    async with http_client(gateway) as http:
        answer = await http.get("/fhir/Subscription/s1/$get-ws-binding-token", headers=headers)
        token = answer.json()["parameter"][0]["valueString"]
        async with websockets.connect(f"ws://127.0.0.1:{gateway.port}/fhir/ws") as ws:
            await ws.send(f"bind-with-token: {token}")
            await receive_status(ws)
            bus = gateway.server.config.app.state.runtime.bus
            revocation = Revocation(scope=Revocation.SESSION, value="sess-1", reason="stolen laptop")
            await publish_event(bus, topics.AUTH_REVOCATIONS, "auth.revocation", revocation, key="mallory", source="t")
            assert (await receive_outcome(ws))["code"] == "security"
            assert await closed_with(ws) == 3500
        # Neither the binding token nor the JWT behind it gets in again.
        async with websockets.connect(f"ws://127.0.0.1:{gateway.port}/fhir/ws") as ws:
            await ws.send(f"bind-with-token: {token}")
            issue = await receive_outcome(ws)
            assert issue["code"] == "security" and "not accepted" in issue["diagnostics"]
        again = await http.get("/fhir/Subscription/s1/$get-ws-binding-token", headers=headers)
        assert again.status_code == 401 and "revoked" in again.json()["issue"][0]["diagnostics"]


async def test_server_side_subscriptions_of_the_jwt_do_not_leak_in(gateway: RunningGateway) -> None:
    headers = bearer("carol", channels=["fhir:*", "chat:*"], subs=["fhir:s1", "chat:lobby"])
    async with http_client(gateway) as http:
        answer = await http.get("/fhir/Subscription/s1/$get-ws-binding-token", headers=headers)
        token = answer.json()["parameter"][0]["valueString"]
        async with websockets.connect(f"ws://127.0.0.1:{gateway.port}/fhir/ws") as ws:
            await ws.send(f"bind-with-token: {token}")
            _, handshake = await receive_status(ws)
            assert handshake.type == "handshake"
            chat = {"channel": "chat:lobby", "data": {"text": "not FHIR"}}
            assert (await http.post("/api/publish", json=chat, headers={"x-api-key": API_KEY})).status_code == 200
            await notify(http, r5_notification([1]))
            _, status = await receive_status(ws)
            assert events_of(status) == [1]
            await nothing_arrives(ws)


async def test_r4b_clients_get_r4b_bundles(gateway: RunningGateway) -> None:
    async with http_client(gateway) as http:
        answer = await http.get(
            "/fhir/Subscription/s1/$get-ws-binding-token", headers=bearer() | {"accept": R4B_ACCEPT}
        )
        assert answer.headers["content-type"] == R4B_ACCEPT
        token, url = await binding(http, accept=R4B_ACCEPT)
        r5_token, _ = await binding(http)
        async with websockets.connect(url) as r4b_ws, websockets.connect(url) as r5_ws:
            await r4b_ws.send(f"bind-with-token: {token}")
            await r5_ws.send(f"bind-with-token: {r5_token}")
            bundle, handshake = await receive_status(r4b_ws, r4b=True)
            assert handshake.type == "handshake" and handshake.eventsSinceSubscriptionStart == "0"
            assert bundle["entry"][0]["request"] == {"method": "GET", "url": "Subscription/s1/$status"}
            await receive_status(r5_ws)
            # An R5 server's notification reaches the R4B client as a history bundle, and the other way round.
            await notify(http, r5_notification([1]))
            r4b = {"content-type": R4B_ACCEPT}
            assert (await notify(http, r4b_notification([2]), **r4b)).status_code == 200
            for n in (1, 2):
                bundle, status = await receive_status(r4b_ws, r4b=True)
                assert status.type == "event-notification" and events_of(status) == [n]
                assert all("request" in entry and "response" in entry for entry in bundle["entry"])
                assert bundle["entry"][1]["resource"]["id"] == f"obs-{n}"
                _, status = await receive_status(r5_ws)
                assert events_of(status) == [n]


# rest-hook deliveries


async def test_notify_authentication(start_gateway: Gateway) -> None:
    async with start_gateway(fhir_notify_secret="server-secret") as gw, http_client(gw) as http:
        bundle = r5_notification([1])
        assert (await notify(http, bundle, **{"x-api-key": "wrong"})).status_code == 401
        no_key = await http.post("/fhir/notify", content=orjson.dumps(bundle))
        assert no_key.status_code == 401 and no_key.json()["resourceType"] == "OperationOutcome"
        wrong_bearer = await http.post("/fhir/notify", content=orjson.dumps(bundle), headers=bearer())
        assert wrong_bearer.status_code == 401  # a user's JWT is no server credential
        with_secret = await http.post(
            "/fhir/notify", content=orjson.dumps(bundle), headers={"authorization": "Bearer server-secret"}
        )
        assert with_secret.status_code == 200
    async with start_gateway(api_key="") as gw, http_client(gw) as http:
        assert (await notify(http, bundle)).status_code == 503


async def test_oversize_and_invalid_notifications(start_gateway: Gateway) -> None:
    async with start_gateway(send_buffer_bytes=65536) as gw, http_client(gw) as http:
        big = r5_notification([1])
        big["entry"][1]["resource"]["note"] = [{"text": "x" * 40_000}]  # limit: half the send buffer
        too_big = await notify(http, big)
        assert too_big.status_code == 413 and too_big.json()["issue"][0]["code"] == "too-costly"
        assert (await http.post("/fhir/notify", content=b"{", headers={"x-api-key": API_KEY})).status_code == 400
        invalid = r5_notification([1])
        invalid["entry"][1]["resource"]["status"] = 42
        refused = await notify(http, invalid)
        assert refused.status_code == 400 and refused.json()["issue"][0]["code"] == "structure"
        mismatch = await notify(http, r5_notification([1]), **{"content-type": R4B_ACCEPT})
        assert mismatch.status_code == 400
        r3 = await notify(http, r5_notification([1]), **{"content-type": "application/fhir+json; fhirVersion=3.0"})
        assert r3.status_code == 415
        # A server's own handshake or heartbeat is accepted and not relayed.
        heartbeat = await notify(http, r4b_notification([], kind="heartbeat"), **{"content-type": R4B_ACCEPT})
        assert heartbeat.status_code == 200 and "heartbeat" in heartbeat.json()["issue"][0]["diagnostics"]
        kept = await gw.broker.history("fhir:s1")
        assert kept.publications == []


async def test_a_redelivery_is_published_once(gateway: RunningGateway) -> None:
    async with http_client(gateway) as http:
        token, url = await binding(http)
        async with websockets.connect(url) as ws:
            await ws.send(f"bind-with-token: {token}")
            await receive_status(ws)
            first = await notify(http, r5_notification([1, 2]))
            again = await notify(http, r5_notification([1, 2], as_ints=True))  # a retry, serialised differently
            assert first.status_code == again.status_code == 200
            assert "already published" in again.json()["issue"][0]["diagnostics"]
            _, status = await receive_status(ws)
            assert events_of(status) == [1, 2]
            await nothing_arrives(ws)
        kept = await gateway.broker.history("fhir:s1")
        assert len(kept.publications) == 1
        metrics = (await http.get("/metrics")).text
        assert 'tsunagu_gateway_fhir_notifications_total{outcome="duplicate"}' in metrics


# $events


async def test_events_returns_what_was_missed(gateway: RunningGateway) -> None:
    async with http_client(gateway) as http:
        for numbers in ([1], [2, 3], [4]):
            await notify(http, r5_notification(numbers))
        path = "/fhir/Subscription/s1/$events"
        answer = await http.get(path + "?eventsSinceNumber=2&eventsUntilNumber=3", headers=bearer())
        assert answer.status_code == 200, answer.text
        bundle = Bundle.model_validate(answer.json())
        status = bundle.entry[0].resource
        assert isinstance(status, SubscriptionStatus)
        assert status.type == "query-event" and status.eventsSinceSubscriptionStart == 4
        assert events_of(status) == [2, 3]
        assert [entry.resource.id for entry in bundle.entry[1:]] == ["obs-2", "obs-3"]
        body = {
            "resourceType": "Parameters",
            "parameter": [
                {"name": "eventsSinceNumber", "valueString": "3"},
                {"name": "content", "valueCode": "id-only"},
            ],
        }
        posted = await http.post(path, headers=bearer() | {"accept": R4B_ACCEPT}, content=orjson.dumps(body))
        assert posted.status_code == 200, posted.text
        r4b = BundleR4B.model_validate(posted.json())
        assert r4b.type == "history"
        assert [int(e.eventNumber) for e in r4b.entry[0].resource.notificationEvent] == [3, 4]
        assert all(entry.resource is None for entry in r4b.entry[1:])  # id-only
        assert (await http.get(path + "?eventsSinceNumber=two", headers=bearer())).status_code == 400
        assert (await http.get(path + "?content=everything", headers=bearer())).status_code == 400
        assert (await http.get(path)).status_code == 401
        assert (await http.get(path, headers=bearer(channels=["fhir:other"]))).status_code == 403
