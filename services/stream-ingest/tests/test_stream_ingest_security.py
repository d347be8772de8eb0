"""Attacks on stream-ingest: HL7 over MLLP from a sender that is not on the allow-list is cut off
before a byte is read (nothing published, nothing acknowledged), the mappings API needs the platform's
credential, and the service stays up."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY
from tsunagu_core.config import ConfigError, CoreSettings
from tsunagu_core.lifecycle import Runtime
from tsunagu_stream_ingest.app import create_app
from tsunagu_stream_ingest.config import IngestSettings

TOKEN = "ingest-internal-token"
PLATFORM = {"authorization": f"Bearer {TOKEN}"}
ADT = (
    "MSH|^~\\&|ADT1|GOODHEALTH|TSUNAGU|HOSP|20250102030405||ADT^A01^ADT_A01|ATTACK-1|P|2.5.1\r"
    "EVN|A01|20250102030000\r"
    "PID|1||P-ATTACK^^^GOODHEALTH^MR||EVERYWOMAN^EVE\r"
    "PV1|1|I|ICU^2012^01\r"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def ingest(settings: IngestSettings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = create_app(Runtime(CoreSettings(internal_token=TOKEN)), settings)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://ingest") as http,
    ):
        async with asyncio.timeout(5):
            while (await http.get("/readyz")).status_code != 200:
                await asyncio.sleep(0.02)
        yield app, http


def refused_connections() -> float:
    return REGISTRY.get_sample_value("tsunagu_hl7_connections_closed_total", {"reason": "refused"}) or 0.0


async def test_an_mllp_sender_off_the_allow_list_gets_no_ack_and_nothing_is_published() -> None:
    port = free_port()
    before = refused_connections()
    # Senders from the hospital's interface-engine subnet only: this machine's loopback is not one.
    async with ingest(IngestSettings(mllp_port=port, mllp_senders=["192.0.2.128/25"])) as (app, http):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\x0b" + ADT.encode() + b"\x1c\r")
        try:
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(4096), 5)
        except ConnectionError:
            answer = b""
        assert answer == b"", "closed without an ACK"
        writer.close()
        history = await app.state.runtime.broker.history("hl7:adt.patient.P-ATTACK")
        assert history.publications == []
        assert refused_connections() == before + 1
        ready = await http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["checks"]["hl7-mllp"] == "ok"


def test_the_default_allow_list_is_this_machine_only() -> None:
    assert IngestSettings().mllp_senders == ["127.0.0.0/8", "::1/128"]
    with pytest.raises(ConfigError, match="TSUNAGU_INGEST_MLLP_SENDERS: 'anyone'"):
        create_app(Runtime(CoreSettings()), IngestSettings(mllp_port=free_port(), mllp_senders=["anyone"]))


async def test_the_mappings_api_needs_the_credential() -> None:
    async with ingest(IngestSettings()) as (_app, http):
        assert (await http.get("/v1/mappings")).status_code == 401
        assert (await http.get("/v1/mappings", headers=PLATFORM)).status_code == 200
