"""The HL7 v2 feed: what a sender is answered, what subscribers and the audit log get, over a real socket
with python-hl7's own MLLP clients (asyncio and blocking), also over TLS."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hl7
import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from hl7.client import MLLPClient
from hl7.mllp import open_hl7_connection
from tsunagu_core import topics
from tsunagu_core.broker import BrokerError, MemoryBroker, PublishOptions, PublishResult
from tsunagu_core.bus import BusError, Delivery, MemoryBus
from tsunagu_core.config import CoreSettings
from tsunagu_core.envelope import payload_of, unwrap
from tsunagu_core.lifecycle import Runtime
from tsunagu_core.tls import ServerTls
from tsunagu_core.wire.events_pb2 import AuditEvent
from tsunagu_stream_ingest.app import create_app
from tsunagu_stream_ingest.config import IngestSettings
from tsunagu_stream_ingest.hl7_feed import Hl7Feed, MllpListener, Rejected, channels_for, safe_id, validate
from tsunagu_stream_ingest.mllp import Frame, ack_code_of

from tsunagu.devpki import issue, make_ca, write_pair

# --------------------------------------------------------------------------- messages as devices send them


def adt(control: str, patient: str = "P123", *, event: str = "A01", ward: str = "ICU") -> str:
    return (
        f"MSH|^~\\&|ADT1|GOODHEALTH|TSUNAGU|HOSP|20250102030405|SECURITY|ADT^{event}^ADT_A01|{control}|P|2.5.1\r"
        f"EVN|{event}|20250102030000\r"
        f"PID|1||{patient}^^^GOODHEALTH^MR~99-123^^^SSA^SS||EVERYWOMAN^EVE^E||19620320|F|||"
        "2222 HOME STREET^^GREENSBORO^NC^27401-1020||(555)555-2004\r"
        f"PV1|1|I|{ward}^2012^01||||004777^ATTEND^AARON^A|||SUR\r"
    )


def oru(control: str, patient: str = "P123", *, ward: str = "ICU", heart_rate: int = 72) -> str:
    """Vitals from a bedside monitor (IHE PCD-01 style): OBX per measurement, LOINC and MDC codes."""
    return (
        f"MSH|^~\\&|MONITOR^0001^EUI-64|ICU-GW|TSUNAGU|HOSP|20250102030500||ORU^R01^ORU_R01|{control}|P|2.6\r"
        f"PID|||{patient}^^^GOODHEALTH^MR||EVERYWOMAN^EVE\r"
        f"PV1||I|{ward}^2012^01\r"
        "OBR|1|||69837^MDC_DEV_MON_PHYSIO_MULTI_PARAM_MDS^MDC|||20250102030500\r"
        f"OBX|1|NM|8867-4^Heart rate^LN^147842^MDC_ECG_HEART_RATE^MDC||{heart_rate}|/min^/min^UCUM|||||F\r"
        "OBX|2|NM|59408-5^SpO2^LN^150456^MDC_PULS_OXIM_SAT_O2^MDC||97|%^%^UCUM|||||F\r"
        "OBX|3|NM|8480-6^Systolic BP^LN^150021^MDC_PRESS_BLD_NONINV_SYS^MDC||118|mm[Hg]^mm[Hg]^UCUM|||||F\r"
    )


# --------------------------------------------------------------------------- engines that can be made to fail


class FlakyBroker(MemoryBroker):
    def __init__(self) -> None:
        super().__init__()
        self.failing = False

    async def publish(self, channel: str, data: bytes, options: PublishOptions = PublishOptions()) -> PublishResult:
        if self.failing:
            raise BrokerError("Redis is not reachable")
        return await super().publish(channel, data, options)


class FlakyBus(MemoryBus):
    def __init__(self) -> None:
        super().__init__()
        self.failing = False

    async def publish(
        self, topic: str, value: bytes, *, key: bytes | str | None = None, headers: Any = None
    ) -> Delivery:
        if self.failing:
            raise BusError("Kafka did not accept the record")
        return await super().publish(topic, value, key=key, headers=headers)


@dataclass
class Setup:
    bus: FlakyBus
    broker: FlakyBroker
    feed: Hl7Feed

    async def send(self, text: str | bytes, peer: str = "10.0.0.7:40001") -> tuple[str, str, hl7.Message]:
        data = text.encode() if isinstance(text, str) else text
        ack = await self.feed.handle(Frame(data, len(data)), peer)
        assert ack is not None
        parsed = hl7.parse(ack.decode())
        return str(parsed.segment("MSA")(1)), str(parsed.segment("MSA")(2)), parsed

    async def published(self, channel: str) -> list[dict[str, Any]]:
        history = await self.broker.history(channel)
        return [json.loads(p.data) for p in history.publications]

    def audit(self) -> list[tuple[AuditEvent, dict[str, Any]]]:
        messages = [m for p in range(self.bus.partitions) for m in self.bus.log_of(topics.AUDIT, p)]
        messages.sort(key=lambda m: (m.timestamp_ms, m.offset))
        events = [payload_of(unwrap(m.value), AuditEvent) for m in messages]
        return [(e, json.loads(e.details)) for e in events]


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    bus, broker = FlakyBus(), FlakyBroker()
    await bus.start()
    await broker.start()
    await bus.ensure_topics([topics.AUDIT])
    yield Setup(bus, broker, Hl7Feed(bus, broker, history_size=100, history_ttl=600, max_bytes=65536))
    await bus.close()
    await broker.close()


def reason_of(ack: hl7.Message) -> tuple[str, str]:
    """(ERR-3.1 table 0357 code, the reason text of MSA-3)."""
    return str(ack.segment("ERR")(3)(1)(1)), ack.unescape(str(ack.segment("MSA")(3)))


# --------------------------------------------------------------------------- checks


def test_realistic_adt_and_oru_messages_are_read() -> None:
    admitted = validate(adt("A-1", "MRN/00 7", ward="ICU EAST"))
    assert (admitted.code, admitted.header.type, admitted.header.control_id) == ("ADT", "ADT^A01", "A-1")
    assert (admitted.patient, admitted.location, admitted.sent_at) == ("MRN/00 7", "ICU EAST", "2025-01-02T03:04:05")
    assert admitted.header.actor == "ADT1@GOODHEALTH"
    assert admitted.channels == ["hl7:adt.patient.MRN_00_7", "hl7:adt.location.ICU_EAST"]
    vitals = validate(oru("O-1"))
    assert (vitals.code, vitals.header.type, vitals.header.application) == ("ORU", "ORU^R01", "MONITOR")
    assert vitals.channels == ["hl7:oru.patient.P123", "hl7:oru.location.ICU"]


def test_segments_on_lf_or_crlf_lines_and_blank_lines_are_accepted() -> None:
    text = oru("O-2")
    for variant in (text.replace("\r", "\n"), text.replace("\r", "\r\n"), text.replace("\rPV1", "\r\r\nPV1")):
        assert validate(variant).channels == ["hl7:oru.patient.P123", "hl7:oru.location.ICU"]


def test_the_id_in_a_channel_name_is_sanitised_and_bounded() -> None:
    assert safe_id("12/34 ÄB.c:d") == "12_34__B_c_d"
    assert len(safe_id("x" * 500)) == 64
    assert channels_for("ADT", "P-1_a", "") == ["hl7:adt.patient.P-1_a"]


GOOD_MSH = "MSH|^~\\&|APP|FAC|TSUNAGU|HOSP|20250101||"


@pytest.mark.parametrize(
    ("text", "code", "location", "reason"),
    [
        ("PID|1||P1\r", "100", "MSH", "does not start with an MSH segment"),
        (GOOD_MSH + "ADT^A01|C1|P|2.5\rEVN|A01\r", "100", "PID", "ADT^A01 needs a PID segment"),
        (GOOD_MSH + "ADT^A01|C1|P|2.5\rPID|1||\r", "101", "PID^1^3", "PID-3 patient identifier is missing"),
        (GOOD_MSH + "ADT^A01|C1|P|2.5\rPID|1\r", "101", "PID^1^3", "PID-3 patient identifier is missing"),
        (GOOD_MSH + "SIU^S12|C1|P|2.5\rPID|1||P1\r", "200", "MSH^1^9", "message type SIU^S12 is not accepted"),
        (GOOD_MSH + "ADT^A01|C1|P|3.0\rPID|1||P1\r", "203", "MSH^1^12", "MSH-12 version '3.0' is not an HL7 v2"),
        (GOOD_MSH + "ADT^A01||P|2.5\rPID|1||P1\r", "101", "MSH^1^10", "MSH-10 message control id is missing"),
        (GOOD_MSH + "ADT|C1|P|2.5\rPID|1||P1\r", "101", "MSH^1^9", "MSH-9 message type needs a code and a trigger"),
        (GOOD_MSH + "ADT^A01|C1|P|2.5\rPID|1||P1\r|oops\r", "100", "", "segment 3 does not start with a segment id"),
        ("MSH|", "102", "MSH", "not parseable as HL7 v2"),
    ],
)
def test_what_is_rejected_and_why(text: str, code: str, location: str, reason: str) -> None:
    with pytest.raises(Rejected) as caught:
        validate(text)
    assert (caught.value.error_code, caught.value.location) == (code, location)
    assert reason in caught.value.reason


# --------------------------------------------------------------------------- the feed on the memory engines


async def test_an_accepted_message_reaches_both_channels_and_the_audit_log(setup: Setup) -> None:
    text = oru("O-10", "P-77", ward="ICU", heart_rate=131)
    code, control, ack = await setup.send(text)
    assert (code, control) == ("AA", "O-10")
    with pytest.raises(KeyError):
        ack.segment("ERR")
    for channel in ("hl7:oru.patient.P-77", "hl7:oru.location.ICU"):
        [publication] = await setup.published(channel)
        assert publication["type"] == "ORU^R01" and publication["control_id"] == "O-10"
        assert publication["patient"] == "P-77" and publication["location"] == "ICU"
        assert publication["sender"] == {"application": "MONITOR", "facility": "ICU-GW"}
        assert publication["raw"] == text
        obx = [s for s in publication["segments"] if s[0] == "OBX"]
        assert [(s[3].split("^")[1], s[5]) for s in obx] == [
            ("Heart rate", "131"),
            ("SpO2", "97"),
            ("Systolic BP", "118"),
        ]
    [(event, details)] = setup.audit()
    assert (event.action, event.outcome, event.subject, event.actor) == ("hl7.received", "ok", "O-10", "MONITOR@ICU-GW")
    assert event.client_ip == "10.0.0.7"
    assert details["message"] == text  # the original, byte for byte
    assert details["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert details["channels"] == ["hl7:oru.patient.P-77", "hl7:oru.location.ICU"]
    assert details["patient"] == "P-77" and "duplicate" not in details


async def test_a_resend_is_acknowledged_again_but_published_once(setup: Setup) -> None:
    first = adt("A-5", "P-5")
    assert (await setup.send(first))[:2] == ("AA", "A-5")
    # The same message again, even with a new MSH-7 (some engines restamp a resend) and CR LF lines.
    resent = first.replace("20250102030405", "20250102031000", 1).replace("\r", "\r\n")
    assert (await setup.send(resent))[:2] == ("AA", "A-5")
    assert len(await setup.published("hl7:adt.patient.P-5")) == 1
    assert len(await setup.published("hl7:adt.location.ICU")) == 1
    records = setup.audit()
    assert [(e.outcome, d.get("duplicate", False)) for e, d in records] == [("ok", False), ("ok", True)]
    assert records[1][1]["message"] == resent


async def test_a_reused_control_id_with_other_content_is_a_new_message(setup: Setup) -> None:
    # A monitor that restarted counts its control ids from 1 again: its new vitals must not be dropped.
    assert (await setup.send(oru("1", "P-9", heart_rate=80)))[0] == "AA"
    assert (await setup.send(oru("1", "P-9", heart_rate=95)))[0] == "AA"
    rates = [p["segments"][4][5] for p in await setup.published("hl7:oru.patient.P-9")]
    assert rates == ["80", "95"]


async def test_a_rejected_message_is_answered_ar_and_audited_but_not_published(setup: Setup) -> None:
    text = GOOD_MSH + "ADT^A01|R-1|P|2.5.1\rEVN|A01\rPV1|1|I|ICU^1^1\r"
    code, control, ack = await setup.send(text)
    assert (code, control) == ("AR", "R-1")
    assert reason_of(ack) == ("100", "ADT^A01 needs a PID segment")
    assert str(ack.segment("ERR")(2)) == "PID"
    assert await setup.published("hl7:adt.location.ICU") == []
    [(event, details)] = setup.audit()
    assert (event.outcome, event.subject, details["reason"]) == ("rejected", "R-1", "ADT^A01 needs a PID segment")
    assert details["message"] == text and details["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    # The next message is fine.
    assert (await setup.send(adt("A-6")))[0] == "AA"


async def test_ae_when_the_broker_fails_then_aa_once_it_is_back(setup: Setup) -> None:
    setup.broker.failing = True
    code, control, ack = await setup.send(adt("E-1", "P-E"))
    assert (code, control) == ("AE", "E-1")
    err, reason = reason_of(ack)
    assert err == "207" and reason.startswith("not published, retry") and "Redis is not reachable" in reason
    setup.broker.failing = False
    assert (await setup.send(adt("E-1", "P-E")))[:2] == ("AA", "E-1")
    assert len(await setup.published("hl7:adt.patient.P-E")) == 1
    assert [e.outcome for e, _ in setup.audit()] == ["error", "ok"]


async def test_ae_when_the_audit_record_fails_and_the_retry_is_not_published_twice(setup: Setup) -> None:
    setup.bus.failing = True
    code, _, ack = await setup.send(adt("E-2", "P-F"))
    assert code == "AE"
    assert "audit record failed" in reason_of(ack)[1]
    setup.bus.failing = False
    assert (await setup.send(adt("E-2", "P-F")))[0] == "AA"
    assert len(await setup.published("hl7:adt.patient.P-F")) == 1
    [(event, details)] = setup.audit()
    assert event.outcome == "ok" and details["duplicate"] is True


async def test_a_rejected_message_that_cannot_be_audited_gets_ae_so_it_is_sent_again(setup: Setup) -> None:
    bad = GOOD_MSH + "SIU^S12|R-2|P|2.5\rPID|1||P1\r"
    setup.bus.failing = True
    code, _, ack = await setup.send(bad)
    assert code == "AE" and "message type SIU^S12 is not accepted" in reason_of(ack)[1]
    setup.bus.failing = False
    code, _, ack = await setup.send(bad)
    assert code == "AR" and reason_of(ack)[0] == "200"
    assert [(e.outcome, e.subject) for e, _ in setup.audit()] == [("rejected", "R-2")]


async def test_an_oversize_message_gets_ar_and_its_head_is_audited(setup: Setup) -> None:
    text = adt("BIG-1") + "NTE|1||" + "x" * 100_000 + "\r"
    head = text.encode()[:1000]
    ack = await setup.feed.handle(Frame(head, len(text), oversize=True), "10.0.0.8:1")
    assert ack is not None
    parsed = hl7.parse(ack.decode())
    assert ack_code_of(ack) == ("AR", "BIG-1")
    assert reason_of(parsed) == ("102", f"message of {len(text)} bytes is larger than the limit of 65536")
    [(event, details)] = setup.audit()
    assert event.outcome == "rejected" and details["truncated"] is True
    assert details["message_head"] == head.decode() and details["size"] == len(text)


async def test_the_head_of_an_oversize_message_cut_inside_a_character_is_still_utf8(setup: Setup) -> None:
    text = adt("BIG-2").replace("EVERYWOMAN^EVE", "MÜLLER^JÜRGEN") + "NTE|1||" + "ü" * 50_000 + "\r"
    data = text.encode()
    head = data[: data.index("ü".encode(), 400) + 1]  # ends with half of a "ü"
    assert await setup.feed.handle(Frame(head, len(data), oversize=True)) is not None
    [(_, details)] = setup.audit()
    assert details["message_head"] == head[:-1].decode() and "MÜLLER^JÜRGEN" in details["message_head"]


async def test_unframed_bytes_without_an_msh_close_the_connection_and_are_audited(setup: Setup) -> None:
    assert await setup.feed.handle(Frame(b"\x16\x03\x01 not hl7", 13, framed=False), "10.0.0.9:2") is None
    [(event, details)] = setup.audit()
    assert event.outcome == "rejected" and "no <VT> start byte" in details["reason"]
    ack = await setup.feed.handle(Frame(adt("U-1").encode(), 10, framed=False), "10.0.0.9:2")
    assert ack is not None and ack_code_of(ack) == ("AR", "U-1")


# --------------------------------------------------------------------------- over a socket, with stock clients


@pytest.fixture
async def listening(setup: Setup) -> AsyncIterator[tuple[Setup, MllpListener]]:
    listener = MllpListener(setup.feed, "127.0.0.1", 0, idle_timeout=30)
    await listener.start()
    await listener.ping()
    yield setup, listener
    await listener.close()


async def exchange(reader: Any, writer: Any, text: str) -> hl7.Message:
    writer.writemessage(hl7.parse(text))
    await writer.drain()
    async with asyncio.timeout(5):
        return await reader.readmessage()


async def test_python_hl7s_mllp_client_gets_acks_and_bad_messages_do_not_end_the_connection(
    listening: tuple[Setup, MllpListener],
) -> None:
    setup, listener = listening
    reader, writer = await open_hl7_connection("127.0.0.1", listener.bound_port)
    sent = [
        (adt("S-1", "P-S", event="A01"), "AA"),
        (GOOD_MSH + "ADT^A01|S-2|P|2.5\rEVN|A01\r", "AR"),  # no PID
        (GOOD_MSH + "QRY^A19|S-3|P|2.5\rPID|1||P-S\r", "AR"),  # a type the feed does not take
        (adt("S-4", "P-S", event="A08"), "AA"),
        (oru("S-5", "P-S"), "AA"),
    ]
    answers = [await exchange(reader, writer, text) for text, _ in sent]
    assert [(str(a.segment("MSA")(1)), str(a.segment("MSA")(2))) for a in answers] == [
        (code, f"S-{n}") for n, (_, code) in enumerate(sent, 1)
    ]
    assert "QRY^A19 is not accepted" in answers[2].unescape(str(answers[2].segment("MSA")(3)))
    assert [p["control_id"] for p in await setup.published("hl7:adt.patient.P-S")] == ["S-1", "S-4"]
    assert [p["control_id"] for p in await setup.published("hl7:oru.patient.P-S")] == ["S-5"]
    assert len(setup.audit()) == 5
    writer.close()
    await writer.wait_closed()


async def test_the_blocking_mllp_client_and_garbage_on_another_connection(
    listening: tuple[Setup, MllpListener],
) -> None:
    setup, listener = listening
    # Garbage with no MSH to answer ends only its own connection.
    garbage_reader, garbage_writer = await asyncio.open_connection("127.0.0.1", listener.bound_port)
    garbage_writer.write(b"GET / HTTP/1.1\r\n\x1c\r")
    async with asyncio.timeout(5):
        assert await garbage_reader.read() == b""
    garbage_writer.close()

    def send_blocking() -> bytes:
        with MLLPClient("127.0.0.1", listener.bound_port) as client:
            answer: bytes = client.send_message(adt("B-1", "P-B"))
            return answer

    answer = await asyncio.to_thread(send_blocking)
    assert ack_code_of(answer) == ("AA", "B-1")
    assert len(await setup.published("hl7:adt.patient.P-B")) == 1


async def test_an_idle_connection_is_closed_and_stopping_does_not_wait_for_idle_ones(setup: Setup) -> None:
    listener = MllpListener(setup.feed, "127.0.0.1", 0, idle_timeout=0.3)
    await listener.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.bound_port)
    async with asyncio.timeout(5):
        assert await reader.read() == b""  # closed by the listener after 0.3 s without a message
    listener.idle_timeout = 30
    _, idle_writer = await open_hl7_connection("127.0.0.1", listener.bound_port)
    await asyncio.sleep(0.05)
    async with asyncio.timeout(2):
        await listener.close(grace=5)
    with pytest.raises(RuntimeError):
        await listener.ping()
    writer.close()
    idle_writer.close()


# --------------------------------------------------------------------------- TLS


@dataclass
class Pki:
    authority: Any  # (certificate, key) of the CA, to issue more
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca = make_ca("HL7 test CA")
    (root / "ca.crt").write_bytes(ca[0].public_bytes(serialization.Encoding.PEM))
    server = issue(ca, "localhost", server=True, dns=("localhost",), ips=("127.0.0.1",))
    client = issue(ca, "monitor-gw-7", client=True)
    write_pair(*server, root / "server.crt", root / "server.key")
    write_pair(*client, root / "client.crt", root / "client.key")
    return Pki(
        ca,
        root / "ca.crt",
        root / "server.crt",
        root / "server.key",
        root / "client.crt",
        root / "client.key",
    )


def client_context(pki: Pki, *, with_cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if with_cert:
        context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return context


async def test_mllp_over_tls_with_a_client_certificate(setup: Setup, pki: Pki) -> None:
    tls = ServerTls(str(pki.server_cert), str(pki.server_key), str(pki.ca), "required")
    listener = MllpListener(setup.feed, "127.0.0.1", 0, idle_timeout=30, ssl_context=tls.context)
    await listener.start()
    try:
        port = listener.bound_port
        reader, writer = await open_hl7_connection(
            "127.0.0.1", port, ssl=client_context(pki, with_cert=True), server_hostname="localhost"
        )
        answer = await exchange(reader, writer, oru("T-1", "P-T"))
        assert (str(answer.segment("MSA")(1)), str(answer.segment("MSA")(2))) == ("AA", "T-1")
        writer.close()
        [(_, details)] = setup.audit()
        assert details["client_cert"] == "CN=monitor-gw-7,O=Tsunagu development"

        # Without a client certificate the handshake is refused; in plain text nothing is answered.
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            no_cert_reader, _ = await open_hl7_connection(
                "127.0.0.1", port, ssl=client_context(pki, with_cert=False), server_hostname="localhost"
            )
            await asyncio.wait_for(no_cert_reader.readmessage(), 5)  # TLS 1.3: the refusal comes after

        def plain() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"\x0b" + adt("T-2").encode() + b"\x1c\r")
                try:
                    return sock.recv(4096)
                except ConnectionError:
                    return b""

        assert b"MSA" not in await asyncio.to_thread(plain)
        assert len(setup.audit()) == 1
    finally:
        await listener.close()


# --------------------------------------------------------------------------- the service


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_the_service_listens_when_a_port_is_set_and_says_so_in_readyz_and_metrics() -> None:
    runtime = Runtime(CoreSettings())
    port = free_port()
    app = create_app(runtime, IngestSettings(mllp_port=port))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingest") as client:
            async with asyncio.timeout(5):
                while (ready := await client.get("/readyz")).status_code != 200:
                    await asyncio.sleep(0.02)
            assert ready.json()["checks"]["hl7-mllp"] == "ok"
            reader, writer = await open_hl7_connection("127.0.0.1", port)
            answer = await exchange(reader, writer, adt("SVC-1", "P-SVC"))
            assert str(answer.segment("MSA")(1)) == "AA"
            writer.close()
            metrics = (await client.get("/metrics")).text
        assert 'tsunagu_hl7_messages_total{ack="AA",type="ADT^A01"}' in metrics
        assert "tsunagu_hl7_ack_seconds_count" in metrics
        history = await runtime.broker.history("hl7:adt.patient.P-SVC")
        assert [json.loads(p.data)["control_id"] for p in history.publications] == ["SVC-1"]
    with pytest.raises(OSError):
        await open_hl7_connection("127.0.0.1", port)  # stopped with the service


async def test_the_service_serves_tls_when_it_has_a_certificate_and_picks_up_a_rotated_one(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(pki.server_cert.read_bytes())
    key.write_bytes(pki.server_key.read_bytes())
    monkeypatch.setenv("TSUNAGU_SERVER_TLS_CERT_FILE", str(cert))
    monkeypatch.setenv("TSUNAGU_SERVER_TLS_KEY_FILE", str(key))
    monkeypatch.setenv("TSUNAGU_SERVER_TLS_RELOAD_INTERVAL", "0.1")
    port = free_port()
    app = create_app(Runtime(CoreSettings()), IngestSettings(mllp_port=port))
    assert app.state.mllp_tls is not None

    async def served_by(control: str) -> str:
        reader, writer = await open_hl7_connection(
            "127.0.0.1", port, ssl=client_context(pki, with_cert=False), server_hostname="localhost"
        )
        answer = await exchange(reader, writer, adt(control))
        assert str(answer.segment("MSA")(1)) == "AA"
        subject = dict(rdn[0] for rdn in writer.get_extra_info("ssl_object").getpeercert()["subject"])
        writer.close()
        return str(subject["commonName"])

    async with app.router.lifespan_context(app):
        async with asyncio.timeout(5):
            while app.state.mllp.bound_port == 0:
                await asyncio.sleep(0.02)
        assert await served_by("TLS-1") == "localhost"
        # cert-manager renews the Secret: the next handshake gets the new certificate, no restart
        write_pair(*issue(pki.authority, "localhost-renewed", server=True, dns=("localhost",)), cert, key)
        async with asyncio.timeout(5):
            while await served_by("TLS-2") != "localhost-renewed":
                await asyncio.sleep(0.1)
    plain = create_app(Runtime(CoreSettings()), IngestSettings(mllp_port=free_port(), mllp_tls=False))
    assert plain.state.mllp_tls is None and plain.state.mllp.ssl_context is None
