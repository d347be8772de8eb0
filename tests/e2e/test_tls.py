"""The platform once with TLS everywhere: `tsunagu run` on the stack's TLS-only ports (Redis, Kafka,
PostgreSQL and Mosquitto, each requiring the development client certificate), every service serving
https/wss that asks clients for a certificate (mTLS between the services too: the gateway fetches auth's
JWKS and collab's documents over it). Stock clients drive chat, a Kafka feed, MQTT telemetry, a shared
document and the audit chain through it; plaintext to any TLS-only port is refused with a clear error;
a renewed gateway certificate is served without dropping open connections."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import hl7  # type: ignore[import-untyped]
import httpx
import paho.mqtt.client as mqtt
import pytest
from centrifuge import Client
from confluent_kafka import Producer
from hl7.mllp import open_hl7_connection  # type: ignore[import-untyped]
from pycrdt import Doc, Provider, Text
from tsunagu_core.bus.base import BusError
from tsunagu_core.bus.kafka import KafkaBus
from tsunagu_core.config import TlsSettings
from tsunagu_core.redis_pool import connect_redis
from tsunagu_core.testing_clients import Inbox, WebsocketChannel, subscribed
from tsunagu_core.tls import client_context, kafka_config
from websockets.asyncio.client import connect

from tsunagu.devpki import DevPki, issue, load_ca, write_pair
from tsunagu.stack.settings import load_settings, tls_connection_env

API_KEY = "e2e-tls-api-key"
USER, PASSWORD = "tls-alice", "tls-alice-password-long-enough"


@pytest.fixture(scope="module")
def tls_env() -> dict[str, str]:
    from tsunagu_core.testing import require_stack

    require_stack("TLS everywhere")
    return tls_connection_env(load_settings())


def tls_of(env: dict[str, str], *, certificate: bool = True) -> ssl.SSLContext:
    settings = TlsSettings(
        tls_ca_file=env["TSUNAGU_TLS_CA_FILE"],
        tls_cert_file=env["TSUNAGU_TLS_CERT_FILE"] if certificate else "",
        tls_key_file=env["TSUNAGU_TLS_KEY_FILE"] if certificate else "",
    )
    return client_context(settings)


@pytest.fixture(scope="module")
def platform(
    tls_env: dict[str, str], start_module_service: Any, pick_port: Any, tmp_path_factory: Any
) -> Iterator[dict[str, Any]]:
    run = uuid.uuid4().hex[:8]
    schema = f"tls_{run}"
    asyncio.run(_sql(tls_env, f"CREATE SCHEMA {schema}"))
    # The gateway's certificate is a copy, so the test can renew it without touching the stack's.
    served = Path(tmp_path_factory.mktemp("served"))
    shutil.copy(tls_env["TSUNAGU_SERVER_TLS_CERT_FILE"], served / "tls.crt")
    shutil.copy(tls_env["TSUNAGU_SERVER_TLS_KEY_FILE"], served / "tls.key")
    ports = {name: pick_port() for name in ("AUTH", "PRESENCE", "COLLAB", "INGEST", "MQTT_BRIDGE", "SIM", "AUDIT")}
    mllp_port = pick_port()
    topic = f"tls.quotes.{run}"
    env = (
        {f"TSUNAGU_{name}_PORT": str(port) for name, port in ports.items()}
        | tls_env
        | {
            "TSUNAGU_BUS": "kafka",
            "TSUNAGU_BROKER": "redis",
            "TSUNAGU_DATABASE": "postgres",
            "TSUNAGU_POSTGRES_DSN": f"{tls_env['TSUNAGU_POSTGRES_DSN']}&search_path={schema}",
            "TSUNAGU_AUDIT_SCHEMA_NAME": schema,
            "TSUNAGU_NODE_NAME": f"tls-{run}",
            "TSUNAGU_SERVER_TLS_CERT_FILE": str(served / "tls.crt"),
            "TSUNAGU_SERVER_TLS_KEY_FILE": str(served / "tls.key"),
            # every port of the platform wants a client certificate from the platform CA
            "TSUNAGU_SERVER_TLS_CLIENT_AUTH": "required",
            "TSUNAGU_SERVER_TLS_RELOAD_INTERVAL": "0.5",
            "TSUNAGU_GATEWAY_API_KEY": API_KEY,
            # the internal APIs let in the platform's client certificate, no token (mTLS peers)
            "TSUNAGU_INTERNAL_PEERS": json.dumps(["spiffe://tsunagu.dev/tsunagu-dev-client"]),
            "TSUNAGU_AUTH_BOOTSTRAP_USERS": json.dumps({USER: {"password": PASSWORD, "channels": ["*"]}}),
            "TSUNAGU_INGEST_MAPPINGS": json.dumps([{"topic": topic}]),
            "TSUNAGU_MQTT_BRIDGE_FILTERS": json.dumps([f"tls-{run}/#"]),
            # HL7 v2 over MLLP, on TLS like every other port
            "TSUNAGU_INGEST_MLLP_PORT": str(mllp_port),
        }
    )
    process = start_module_service(["run"], env, tls=tls_of(tls_env))
    try:
        process.wait_healthy(90)
        process.wait_ready(60)
        ports_by_service = {
            "auth": ports["AUTH"], "collab": ports["COLLAB"], "ingest": ports["INGEST"],
            "mqtt-bridge": ports["MQTT_BRIDGE"], "audit": ports["AUDIT"],
        }  # fmt: skip
        for name, port in ports_by_service.items():
            _wait_ready(f"https://127.0.0.1:{port}", tls_of(tls_env), name)
        yield {
            "gateway": process.base,
            "wss": process.base.replace("https", "wss"),
            "ports": ports_by_service,
            "mllp_port": mllp_port,
            "run": run,
            "topic": topic,
            "served": served,
            "process": process,
        }
    finally:
        process.stop()
        asyncio.run(_sql(tls_env, f"DROP SCHEMA {schema} CASCADE"))


def _wait_ready(base: str, context: ssl.SSLContext, name: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            response = httpx.get(base + "/readyz", verify=context, timeout=3)
            if response.status_code == 200:
                return
            last = response.text
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.2)
    raise AssertionError(f"{name} never ready: {last}")


async def _sql(env: dict[str, str], statement: str) -> None:
    """As the TLS-only role, over TLS with the client certificate (PostgreSQL refuses it otherwise)."""
    dsn = env["TSUNAGU_POSTGRES_DSN"]
    connection = await asyncpg.connect(dsn, ssl=tls_of(env))
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


async def login(platform: dict[str, Any], env: dict[str, str]) -> str:
    async with httpx.AsyncClient(verify=tls_of(env)) as http:
        response = await http.post(
            f"https://127.0.0.1:{platform['ports']['auth']}/v1/token",
            json={"grant_type": "password", "username": USER, "password": PASSWORD},
        )
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token


async def test_chat_feeds_telemetry_documents_and_audit_over_tls_everywhere(platform, tls_env) -> None:  # type: ignore[no-untyped-def]
    context = tls_of(tls_env)
    token = await login(platform, tls_env)  # auth over https; the gateway checks it with auth's JWKS over mTLS
    client = Client(platform["wss"] + "/connection/websocket", token=token, ssl_context=context)
    await client.connect()
    run = platform["run"]

    # chat: the server API over https publishes, Redis (TLS) fans out and keeps history
    chat, chat_inbox = f"chat:tls-{run}", Inbox()
    subscription = await subscribed(client, chat, chat_inbox)
    async with httpx.AsyncClient(verify=context) as http:
        for n in range(3):
            published = await http.post(
                platform["gateway"] + "/api/publish",
                json={"channel": chat, "data": {"n": n}},
                headers={"X-API-Key": API_KEY},
            )
            assert published.status_code == 200, published.text
    await chat_inbox.wait_for(3)
    assert chat_inbox.data == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert [p.data for p in (await subscription.history(limit=10)).publications] == chat_inbox.data

    # a live feed: records produced to Kafka over SSL reach the client through stream-ingest
    feed, feed_inbox = f"stream:{platform['topic']}.ACME", Inbox()
    await subscribed(client, feed, feed_inbox)
    producer = Producer(
        {"bootstrap.servers": tls_env["TSUNAGU_KAFKA_BOOTSTRAP"], **kafka_config(_tls_settings(tls_env))}
    )
    for price in (101.5, 102.25):
        producer.produce(platform["topic"], key=b"ACME", value=json.dumps({"price": price}).encode())
    assert producer.flush(20) == 0
    await feed_inbox.wait_for(1)
    async with asyncio.timeout(20):
        while feed_inbox.data[-1] != {"price": 102.25}:
            await asyncio.sleep(0.05)

    # IoT: a paho-mqtt device with its certificate publishes to Mosquitto's TLS listener
    device_topic = f"tls-{run}/sensor-1/telemetry"
    telemetry = Inbox()
    await subscribed(client, f"mqtt:{device_topic}", telemetry)
    await asyncio.to_thread(_device_publishes, tls_env, device_topic, {"temperature": 22.5})
    await telemetry.wait_for(1)
    assert telemetry.data == [{"temperature": 22.5}]

    # a shared document: pycrdt's provider over wss, stored by collab in PostgreSQL (TLS)
    doc = f"tls-{run}"
    ydoc: Doc = Doc()
    ytext = ydoc.get("text", type=Text)
    async with (
        connect(f"{platform['wss']}/collab/{doc}?token={token}", ssl=context) as websocket,
        Provider(ydoc, WebsocketChannel(websocket, doc)),
    ):
        await asyncio.sleep(0.3)
        ytext.insert(0, "over tls")
        assert await _stored_text(platform, tls_env, doc) == "over tls"

    # the audit chain: auth's login events went over Kafka (SSL) into PostgreSQL (TLS), and it verifies
    audit = f"https://127.0.0.1:{platform['ports']['audit']}"
    async with httpx.AsyncClient(verify=context) as http, asyncio.timeout(30):
        while True:
            events = (await http.get(audit + "/v1/audit", params={"actor": USER})).json()["items"]
            if any(event["action"] == "auth.login" for event in events):
                break
            await asyncio.sleep(0.2)
        report = (await http.get(audit + "/v1/audit/verify")).json()
    assert report["ok"] is True and report["first_broken"] is None, report
    await client.disconnect()


async def test_hl7_over_mllp_and_fhir_notifications_over_tls(platform, tls_env) -> None:  # type: ignore[no-untyped-def]
    """The medical feeds with TLS on every hop: python-hl7's MLLP client with a client certificate, a FHIR
    subscriber binding on wss and a FHIR server delivering to https, subscribers on wss."""
    context = tls_of(tls_env)
    token = await login(platform, tls_env)
    run = platform["run"]
    client = Client(platform["wss"] + "/connection/websocket", token=token, ssl_context=context)
    await client.connect()
    admissions = Inbox()
    patient = f"P{run}"
    await subscribed(client, f"hl7:adt.patient.{patient}", admissions)

    message = (
        f"MSH|^~\\&|ADT1|GOODHEALTH|TSUNAGU|HOSP|20250102030405||ADT^A01^ADT_A01|tls-{run}|P|2.5.1\r"
        f"PID|1||{patient}^^^GOODHEALTH^MR||EVERYWOMAN^EVE||19620320|F\r"
        "PV1|1|I|W3^2012^01\r"
    )
    reader, writer = await open_hl7_connection(
        "127.0.0.1", platform["mllp_port"], ssl=context, server_hostname="localhost"
    )
    try:
        writer.writemessage(hl7.parse(message))
        await writer.drain()
        ack = await asyncio.wait_for(reader.readmessage(), 15)
    finally:
        writer.close()
    msa = ack.segment("MSA")
    assert (str(msa(1)), str(msa(2))) == ("AA", f"tls-{run}")
    await admissions.wait_for(1)
    assert admissions.data[0]["control_id"] == f"tls-{run}" and admissions.data[0]["patient"] == patient
    # a plaintext MLLP sender gets nowhere on the TLS port
    with pytest.raises((ConnectionError, OSError, asyncio.IncompleteReadError, TimeoutError)):
        plain_reader, plain = await open_hl7_connection("127.0.0.1", platform["mllp_port"])
        try:
            plain.writemessage(hl7.parse(message))
            await plain.drain()
            await asyncio.wait_for(plain_reader.readmessage(), 5)
        finally:
            plain.close()

    fhir_subscription = f"tls-{run}"
    async with httpx.AsyncClient(verify=context) as http:
        issued = await http.get(
            f"{platform['gateway']}/fhir/Subscription/{fhir_subscription}/$get-ws-binding-token",
            headers={"authorization": f"Bearer {token}"},
        )
        assert issued.status_code == 200, issued.text
        parameters = {p["name"]: p.get("valueString") or p.get("valueUrl") for p in issued.json()["parameter"]}
        assert parameters["websocket-url"].startswith("wss://"), parameters
        async with connect(parameters["websocket-url"], ssl=context) as socket:
            await socket.send(f"bind-with-token: {parameters['token']}")
            handshake = json.loads(await asyncio.wait_for(socket.recv(), 10))
            assert handshake["entry"][0]["resource"]["type"] == "handshake"
            delivered = await http.post(
                f"{platform['gateway']}/fhir/notify",
                content=json.dumps(_fhir_event(fhir_subscription, 1)),
                headers={"content-type": "application/fhir+json", "X-API-Key": API_KEY},
            )
            assert delivered.status_code == 200, delivered.text
            while True:
                bundle = json.loads(await asyncio.wait_for(socket.recv(), 10))
                status = bundle["entry"][0]["resource"]
                if status["type"] == "event-notification":
                    break
    assert [event["eventNumber"] for event in status["notificationEvent"]] == ["1"]
    await client.disconnect()


def _fhir_event(subscription: str, n: int) -> dict[str, Any]:
    """An R5 rest-hook event-notification with its focus Observation (what a FHIR server POSTs)."""
    observation = {
        "resourceType": "Observation",
        "id": f"obs-{n}",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
        "valueQuantity": {"value": 72, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"},
    }
    return {
        "resourceType": "Bundle",
        "type": "subscription-notification",
        "timestamp": "2025-06-01T12:00:00Z",
        "entry": [
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": {
                    "resourceType": "SubscriptionStatus",
                    "status": "active",
                    "type": "event-notification",
                    "eventsSinceSubscriptionStart": str(n),
                    "subscription": {"reference": f"https://ehr.example.org/fhir/Subscription/{subscription}"},
                    "topic": "http://example.org/fhir/SubscriptionTopic/vitals",
                    "notificationEvent": [{"eventNumber": str(n), "focus": {"reference": f"Observation/obs-{n}"}}],
                },
            },
            {"fullUrl": f"https://ehr.example.org/fhir/Observation/obs-{n}", "resource": observation},
        ],
    }


def _tls_settings(env: dict[str, str]) -> TlsSettings:
    return TlsSettings(
        tls_ca_file=env["TSUNAGU_TLS_CA_FILE"],
        tls_cert_file=env["TSUNAGU_TLS_CERT_FILE"],
        tls_key_file=env["TSUNAGU_TLS_KEY_FILE"],
        kafka_security_protocol="SSL",
    )


def _device_publishes(env: dict[str, str], topic: str, payload: dict[str, Any]) -> None:
    host, port = env["TSUNAGU_MQTT_URL"].split("://", 1)[1].rstrip("/").rsplit(":", 1)
    device = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    device.tls_set(
        ca_certs=env["TSUNAGU_TLS_CA_FILE"], certfile=env["TSUNAGU_TLS_CERT_FILE"], keyfile=env["TSUNAGU_TLS_KEY_FILE"]
    )
    device.connect(host, int(port))
    device.loop_start()
    try:
        device.publish(topic, json.dumps(payload), qos=1).wait_for_publish(10)
    finally:
        device.loop_stop()
        device.disconnect()


async def _stored_text(platform: dict[str, Any], env: dict[str, str], doc: str) -> str:
    async with httpx.AsyncClient(verify=tls_of(env)) as http, asyncio.timeout(20):
        while True:
            body = (await http.get(f"https://127.0.0.1:{platform['ports']['collab']}/v1/docs/{doc}")).json()
            text = str(body.get("content", {}).get("text", ""))
            if text:
                return text
            await asyncio.sleep(0.1)


async def test_plaintext_to_a_tls_only_port_is_refused_with_a_clear_error(platform, tls_env) -> None:  # type: ignore[no-untyped-def]
    settings = load_settings()
    with pytest.raises(Exception, match="closed a plaintext connection: the port requires TLS"):
        await connect_redis(f"redis://127.0.0.1:{settings.redis_tls_port}/0", connect_timeout=3)

    os.environ.pop("TSUNAGU_KAFKA_SECURITY_PROTOCOL", None)
    bus = KafkaBus(tls_env["TSUNAGU_KAFKA_BOOTSTRAP"], tls=TlsSettings())
    with pytest.raises(BusError, match="if the listener is SSL-only, set TSUNAGU_KAFKA_SECURITY_PROTOCOL=SSL"):
        await bus.start()
    await bus.close()

    plain = tls_env["TSUNAGU_POSTGRES_DSN"].replace("sslmode=verify-full", "sslmode=disable")
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="no encryption"):
        await asyncpg.connect(plain)

    with pytest.raises((ConnectionError, OSError)):
        await asyncio.to_thread(_plain_mqtt_connect, tls_env)

    # the platform's own ports: plain HTTP gets nothing, and TLS without a client certificate neither
    async with httpx.AsyncClient(timeout=3) as plain_http:
        with pytest.raises(httpx.HTTPError):
            await plain_http.get(platform["gateway"].replace("https", "http") + "/healthz")
    async with httpx.AsyncClient(timeout=3, verify=tls_of(tls_env, certificate=False)) as no_certificate:
        with pytest.raises(httpx.HTTPError):
            await no_certificate.get(platform["gateway"] + "/healthz")


def _plain_mqtt_connect(env: dict[str, str]) -> None:
    host, port = env["TSUNAGU_MQTT_URL"].split("://", 1)[1].rstrip("/").rsplit(":", 1)
    device = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    connected = threading.Event()
    device.on_connect = lambda *args: connected.set()
    device.connect(host, int(port), keepalive=5)
    device.loop_start()
    try:
        if not connected.wait(5):
            raise ConnectionError("the broker's TLS port did not accept a plaintext MQTT connection")
    finally:
        device.loop_stop()


@pytest.mark.parametrize(
    ("service", "variable", "url", "expected"),
    [
        (
            "presence",
            "TSUNAGU_REDIS_URL",
            "redis://127.0.0.1:{redis_tls_port}/0",
            "the port requires TLS? use rediss://",
        ),
        ("mqtt-bridge", "TSUNAGU_MQTT_URL", "mqtt://127.0.0.1:{mqtt_tls_port}", "the port requires TLS? use mqtts://"),
    ],
)
async def test_a_service_pointed_at_a_tls_port_in_plaintext_says_why_it_is_not_ready(  # type: ignore[no-untyped-def]
    tls_env, start_service, service, variable, url, expected
) -> None:
    settings = load_settings()
    address = url.format(redis_tls_port=settings.redis_tls_port, mqtt_tls_port=settings.mqtt_tls_port)
    process = start_service(
        ["serve", service],
        {"TSUNAGU_BUS": "memory", "TSUNAGU_BROKER": "redis" if service == "presence" else "memory", variable: address},
    )
    process.wait_healthy(60)
    deadline = time.monotonic() + 30
    checks: dict[str, str] = {}
    while time.monotonic() < deadline:
        checks = process.readiness().json()["checks"]
        if expected in json.dumps(checks):
            break
        await asyncio.sleep(0.3)
    assert any(expected in str(value) for value in checks.values()), checks


async def test_a_renewed_gateway_certificate_is_served_without_dropping_connections(platform, tls_env) -> None:  # type: ignore[no-untyped-def]
    context = tls_of(tls_env)
    token = await login(platform, tls_env)
    inbox = Inbox()
    client = Client(platform["wss"] + "/connection/websocket", token=token, ssl_context=context)
    await client.connect()
    channel = f"chat:renew-{platform['run']}"
    await subscribed(client, channel, inbox)

    pki = DevPki(Path(tls_env["TSUNAGU_TLS_CA_FILE"]).parent)
    renewed, key = issue(load_ca(pki), "renewed.localhost", server=True, dns=("localhost",), ips=("127.0.0.1",))
    write_pair(renewed, key, platform["served"] / "tls.crt", platform["served"] / "tls.key")
    async with asyncio.timeout(15):
        while await asyncio.to_thread(_served_name, platform["process"].port, context) != "renewed.localhost":
            await asyncio.sleep(0.2)

    async with httpx.AsyncClient(verify=context) as http:
        await http.post(
            platform["gateway"] + "/api/publish",
            json={"channel": channel, "data": {"after": "renewal"}},
            headers={"X-API-Key": API_KEY},
        )
    await inbox.wait_for(1)
    assert inbox.data == [{"after": "renewal"}], "the connection opened before the renewal still delivers"
    await client.disconnect()


def _served_name(port: int, context: ssl.SSLContext) -> str:
    import socket

    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        subject = tls.getpeercert()["subject"]
    return next(value for rdn in subject for key, value in rdn if key == "commonName")
