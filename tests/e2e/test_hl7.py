"""HL7 v2 over MLLP on the real stack: stream-ingest, audit-log and a gateway as processes; python-hl7's
stock MLLP clients (asyncio and the `mllp_send` tool) send, the stock centrifuge-python SDK subscribes."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import hl7
import httpx
import jwt
from centrifuge import Client
from confluent_kafka.admin import AdminClient
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hl7.mllp import open_hl7_connection
from tsunagu_core.testing import KAFKA_BOOTSTRAP, drop_schema
from tsunagu_core.testing_clients import Inbox

from tsunagu.devpki import issue, make_ca, write_pair

SECRET = "e2e-hl7-secret-long-enough-for-hs256"
MLLP_SEND = Path(sys.executable).with_name("mllp_send")


def token(user: str) -> str:
    return jwt.encode({"sub": user, "channels": ["hl7:*"], "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")


def adt(sender: str, control: str, patient: str, ward: str, event: str = "A01") -> str:
    return (
        f"MSH|^~\\&|{sender}|GOODHEALTH|TSUNAGU|HOSP|20250102030405||ADT^{event}^ADT_A01|{control}|P|2.5.1\r"
        f"EVN|{event}|20250102030405\r"
        f"PID|1||{patient}^^^GOODHEALTH^MR||EVERYWOMAN^EVE^E||19620320|F\r"
        f"PV1|1|I|{ward}^2012^01||||004777^ATTEND^AARON^A|||SUR\r"
    )


def oru(sender: str, control: str, patient: str, ward: str, heart_rate: int, spo2: int, note: str = "") -> str:
    """A bedside monitor's periodic vitals (IHE PCD-01 style)."""
    text = (
        f"MSH|^~\\&|{sender}^0001^EUI-64|ICU-GW|TSUNAGU|HOSP|20250102030500||ORU^R01^ORU_R01|{control}|P|2.6\r"
        f"PID|||{patient}^^^GOODHEALTH^MR||EVERYWOMAN^EVE\r"
        f"PV1||I|{ward}^2012^01\r"
        "OBR|1|||69837^MDC_DEV_MON_PHYSIO_MULTI_PARAM_MDS^MDC|||20250102030500\r"
        f"OBX|1|NM|8867-4^Heart rate^LN^147842^MDC_ECG_HEART_RATE^MDC||{heart_rate}|/min^/min^UCUM|||||F\r"
        f"OBX|2|NM|59408-5^SpO2^LN^150456^MDC_PULS_OXIM_SAT_O2^MDC||{spo2}|%^%^UCUM|||||F\r"
    )
    return text + (f"NTE|1||{note}\r" if note else "")


def msa(ack: hl7.Message) -> tuple[str, str, str]:
    segment = ack.segment("MSA")
    reason = ack.unescape(str(segment(3))) if len(segment) > 3 else ""
    return str(segment(1)), str(segment(2)), reason


def listed(base: str, **params: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    query: dict[str, str] = {**params, "limit": "1000", "order": "asc"}
    while True:
        body = httpx.get(base + "/v1/audit", params=query, timeout=10).json()
        found += body["items"]
        if not body["next_cursor"]:
            return found
        query["cursor"] = body["next_cursor"]


async def eventually(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if await asyncio.to_thread(condition):
                return
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_stock_mllp_client_feeds_subscribers_and_the_audit_log(  # type: ignore[no-untyped-def]
    start_service, real_env, pick_port, tmp_path
) -> None:
    run = uuid.uuid4().hex[:8]
    schema, group = f"hl7_e2e_{run}", f"audit-hl7-e2e-{run}"
    adt_app, monitor = f"ADT{run}", f"MON{run}"
    patient, ward, other = f"MRN{run}", f"ICU{run}", f"MRN{run}X"
    key_file = tmp_path / "audit.pem"
    key_file.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    mllp_port = pick_port()
    gateway = start_service(["serve", "ws-gateway"], {**real_env, "TSUNAGU_GATEWAY_TOKEN_HMAC_SECRET": SECRET})
    audit = start_service(
        ["serve", "audit-log"],
        {
            **real_env,
            "TSUNAGU_AUDIT_SCHEMA_NAME": schema,
            "TSUNAGU_AUDIT_GROUP": group,
            "TSUNAGU_AUDIT_GATEWAY_EVENTS": "false",
            "TSUNAGU_AUDIT_SIGNING_KEY_FILE": str(key_file),
            "TSUNAGU_AUDIT_CHECKPOINT_INTERVAL": "1",
            "TSUNAGU_AUDIT_VERIFY_INTERVAL": "0",
        },
    )
    ingest = start_service(["serve", "stream-ingest"], {**real_env, "TSUNAGU_INGEST_MLLP_PORT": str(mllp_port)})
    try:
        for service in (gateway, audit, ingest):
            await asyncio.to_thread(service.wait_ready)
        assert ingest.readiness().json()["checks"]["hl7-mllp"] == "ok"

        viewer = Client(f"ws://127.0.0.1:{gateway.port}/connection/websocket", token=token("nurse"))
        await viewer.connect()
        admissions, vitals = Inbox(), Inbox()
        for channel, inbox in ((f"hl7:adt.patient.{patient}", admissions), (f"hl7:oru.location.{ward}", vitals)):
            subscription = viewer.new_subscription(channel, events=inbox)
            await subscription.subscribe()
            await subscription.ready(timeout=10)  # subscribe() only sends the command

        big_note = "x" * 300_000  # below the limit, but an audit record of ~300 KB on Kafka
        sent = [
            (adt(adt_app, f"{run}-1", patient, ward, "A01"), "AA"),
            (oru(monitor, f"{run}-2", patient, ward, heart_rate=72, spo2=98), "AA"),
            (adt(adt_app, f"{run}-3", patient, ward).replace(f"PID|1||{patient}^^^GOODHEALTH^MR", "PID|1||"), "AR"),
            (f"MSH|^~\\&|{adt_app}|GOODHEALTH|TSUNAGU|HOSP|20250102||SIU^S12|{run}-4|P|2.5\rPID|1||{patient}\r", "AR"),
            (adt(adt_app, f"{run}-5", patient, ward, "A08"), "AA"),
            (oru(monitor, f"{run}-6", patient, ward, heart_rate=131, spo2=91), "AA"),
            (oru(monitor, f"{run}-6", patient, ward, heart_rate=131, spo2=91), "AA"),  # a resend: published once
            (oru(monitor, f"{run}-7", other, f"{ward}B", heart_rate=60, spo2=99, note=big_note), "AA"),
            (oru(monitor, f"{run}-8", other, f"{ward}B", heart_rate=60, spo2=99, note="y" * 600_000), "AR"),
            (oru(monitor, f"{run}-9", patient, ward, heart_rate=88, spo2=96), "AA"),
        ]
        reader, writer = await open_hl7_connection("127.0.0.1", mllp_port, limit=1 << 20)
        answers = []
        for text, _ in sent:  # one connection: the bad ones must not end it
            writer.writemessage(hl7.parse(text))
            await writer.drain()
            async with asyncio.timeout(15):
                answers.append(msa(await reader.readmessage()))
        assert [a[:2] for a in answers] == [(code, text.split("|")[9]) for text, code in sent]
        assert answers[2][2] == "PID-3 patient identifier is missing"
        assert answers[3][2] == "message type SIU^S12 is not accepted (accepted: ADT, ORU)"
        assert answers[8][2].startswith("message of ") and "larger than the limit of 524288" in answers[8][2]
        writer.close()

        # python-hl7's command line sender, on a connection of its own: a discharge and a bad message.
        batch = tmp_path / "batch.hl7"
        discharge = adt(adt_app, f"{run}-10", patient, ward, "A03")
        no_control_id = f"MSH|^~\\&|{adt_app}|GOODHEALTH|TSUNAGU|HOSP|20250102||ADT^A01||P|2.5"
        batch.write_bytes(b"".join(b"\x0b" + text.encode() + b"\x1c\r" for text in (discharge, no_control_id)))
        # mllp_send strips the CR that ends the last segment
        sent += [(discharge.rstrip("\r"), "AA"), (no_control_id, "AR")]
        done = await asyncio.to_thread(
            subprocess.run,
            [str(MLLP_SEND), "-p", str(mllp_port), "-f", str(batch), "127.0.0.1"],
            capture_output=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        acks = [hl7.parse(block.strip(b"\x0b\x1c\r\n").decode()) for block in done.stdout.split(b"\x1c\r")[:-1]]
        assert [msa(a)[:2] for a in acks] == [("AA", f"{run}-10"), ("AR", "")]

        # Subscribers got each accepted message once, in order.
        await admissions.wait_for(3, timeout=15)
        await vitals.wait_for(3, timeout=15)
        await asyncio.sleep(0.5)
        assert [(m["type"], m["control_id"]) for m in admissions.data] == [
            ("ADT^A01", f"{run}-1"),
            ("ADT^A08", f"{run}-5"),
            ("ADT^A03", f"{run}-10"),
        ]
        assert [m["control_id"] for m in vitals.data] == [f"{run}-2", f"{run}-6", f"{run}-9"]
        heart_rates = [next(s[5] for s in m["segments"] if s[:2] == ["OBX", "1"]) for m in vitals.data]
        assert heart_rates == ["72", "131", "88"]
        assert vitals.data[1]["raw"] == sent[5][0] and vitals.data[1]["patient"] == patient
        late = viewer.new_subscription(f"hl7:oru.patient.{other}")
        await late.subscribe()
        await late.ready(timeout=10)
        history = await late.history(limit=10)
        assert [len(p.data["raw"]) for p in history.publications] == [len(sent[7][0])]
        await viewer.disconnect()

        # The audit log has every message received, accepted or not, with its original text.
        def ours() -> list[dict[str, Any]]:
            senders = (f"{adt_app}@GOODHEALTH", f"{monitor}@ICU-GW")
            return [row for actor in senders for row in listed(audit.base, actor=actor, action="hl7.received")]

        await eventually(lambda: len(ours()) >= len(sent), 30, "an audit record of every message")
        rows = sorted(ours(), key=lambda row: row["seq"])
        assert len(rows) == len(sent)
        by_control: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_control.setdefault(row["subject"], []).append(row)
        expected = {text.split("|")[9]: code for text, code in sent}
        for control, code in expected.items():
            outcomes = [row["outcome"] for row in by_control[control]]
            assert outcomes == (["ok", "ok"] if control == f"{run}-6" else ["ok" if code == "AA" else "rejected"])
        assert [r["details"].get("duplicate", False) for r in by_control[f"{run}-6"]] == [False, True]
        for text, _ in sent:
            control = text.split("|")[9]
            details = by_control[control][0]["details"]
            if control == f"{run}-8":
                assert details["truncated"] is True and details["size"] == len(text.encode())
                assert details["message_head"] == text[: len(details["message_head"])]
            else:
                assert details["message"] == text
                assert details["sha256"] == hashlib.sha256(text.encode()).hexdigest()
        assert by_control[f"{run}-3"][0]["details"]["reason"] == "PID-3 patient identifier is missing"
        assert by_control[""][0]["details"]["reason"] == "MSH-10 message control id is missing"
        assert all(row["client_ip"] == "127.0.0.1" and row["source"] == "stream-ingest/hl7" for row in rows)

        # verify walks the chain through a signed checkpoint past the last of them
        def covered() -> bool:
            report = httpx.get(audit.base + "/v1/audit/verify", timeout=30).json()
            return bool(report["last_checkpoint"] and report["last_checkpoint"]["seq"] >= rows[-1]["seq"])

        await eventually(covered, 15, "a checkpoint covering every record")
        async with httpx.AsyncClient(timeout=30) as http:
            report = (await http.get(audit.base + "/v1/audit/verify")).json()
            metrics = (await http.get(ingest.base + "/metrics")).text
        assert report["ok"] is True and report["first_broken"] is None, report
        assert report["rows_checked"] >= rows[-1]["seq"]

        assert 'tsunagu_hl7_messages_total{ack="AR",type="unsupported"} 1.0' in metrics
        assert 'tsunagu_hl7_messages_total{ack="AA",type="ORU^R01"} 5.0' in metrics
        for service in (ingest, audit, gateway):
            assert service.stop() == 0
    finally:
        await drop_schema(schema)
        admin = AdminClient({"bootstrap.servers": KAFKA_BOOTSTRAP})
        for future in admin.delete_consumer_groups([group], request_timeout=10).values():
            with contextlib.suppress(Exception):
                future.result(timeout=15)


async def test_mllp_over_tls_with_client_certificates(start_service, real_env, pick_port, tmp_path) -> None:  # type: ignore[no-untyped-def]
    ca = make_ca("HL7 e2e CA")
    (tmp_path / "ca.crt").write_bytes(ca[0].public_bytes(serialization.Encoding.PEM))
    write_pair(*issue(ca, "localhost", server=True, dns=("localhost",), ips=("127.0.0.1",)), *_pair(tmp_path, "server"))
    write_pair(*issue(ca, "monitor-gw", client=True), *_pair(tmp_path, "client"))
    mllp_port = pick_port()
    env = {
        **real_env,
        "TSUNAGU_INGEST_MLLP_PORT": str(mllp_port),
        "TSUNAGU_SERVER_TLS_CERT_FILE": str(tmp_path / "server.crt"),
        "TSUNAGU_SERVER_TLS_KEY_FILE": str(tmp_path / "server.key"),
        "TSUNAGU_SERVER_TLS_CLIENT_CA_FILE": str(tmp_path / "ca.crt"),
        "TSUNAGU_SERVER_TLS_CLIENT_AUTH": "required",
    }
    ingest = start_service(["serve", "stream-ingest"], env)
    trusted = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
    with_cert = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
    with_cert.load_cert_chain(str(tmp_path / "client.crt"), str(tmp_path / "client.key"))
    run = uuid.uuid4().hex[:8]

    async def send(context: ssl.SSLContext, control: str) -> tuple[str, str, str]:
        reader, writer = await open_hl7_connection("127.0.0.1", mllp_port, ssl=context, server_hostname="localhost")
        try:
            writer.writemessage(hl7.parse(adt(f"TLS{run}", control, f"MRN{run}", "ICU")))
            await writer.drain()
            async with asyncio.timeout(15):
                return msa(await reader.readmessage())
        finally:
            writer.close()

    deadline = time.monotonic() + 30
    while True:  # the port opens once Kafka and Redis answer
        assert ingest.process.poll() is None, ingest.output()
        try:
            answer = await send(with_cert, f"{run}-1")
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
    assert answer[:2] == ("AA", f"{run}-1")
    refused: BaseException | None = None
    try:
        await send(trusted, f"{run}-2")  # no client certificate
    except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError) as exc:
        refused = exc
    assert refused is not None, "a client without a certificate must not be answered"
    assert ingest.stop() == 0


def _pair(root: Path, name: str) -> tuple[Path, Path]:
    return root / f"{name}.crt", root / f"{name}.key"
