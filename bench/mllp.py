"""HL7 v2 over MLLP into stream-ingest on the real stack: ACK round trips and throughput, plain and TLS.

Starts `tsunagu serve stream-ingest` with its MLLP listener (Kafka for the audit records, Redis for the
`hl7:` channels), once in plaintext and once with TLS and client certificates (a development PKI made
for the run). python-hl7's asyncio MLLP client sends `--messages` ORU^R01 vitals (a bedside monitor's
PCD-01 shape) over one connection, waiting for each ACK as original-mode senders do, then the same
number spread over `--connections` connections at once. Prints ACKs/s and p50/p99 ACK time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import hl7  # type: ignore[import-untyped]
import httpx
from hl7.mllp import open_hl7_connection  # type: ignore[import-untyped]

from tsunagu.devpki import ensure_dev_pki

REPO = Path(__file__).resolve().parents[1]
KAFKA = os.environ.get("TSUNAGU_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
REDIS = os.environ.get("TSUNAGU_REDIS_URL", "redis://127.0.0.1:6379/0")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def vitals(run: str, n: int) -> hl7.Message:
    return hl7.parse(
        f"MSH|^~\\&|MONITOR-{n % 16}^0001^EUI-64|ICU-GW|TSUNAGU|HOSP|20250102030500||ORU^R01^ORU_R01|{run}-{n}|P|2.6\r"
        f"PID|||P{n % 64}^^^GOODHEALTH^MR||EVERYWOMAN^EVE\r"
        f"PV1||I|ICU{n % 4}^2012^01\r"
        "OBR|1|||69837^MDC_DEV_MON_PHYSIO_MULTI_PARAM_MDS^MDC|||20250102030500\r"
        f"OBX|1|NM|8867-4^Heart rate^LN^147842^MDC_ECG_HEART_RATE^MDC||{60 + n % 40}|/min^/min^UCUM|||||F\r"
        f"OBX|2|NM|59408-5^SpO2^LN^150456^MDC_PULS_OXIM_SAT_O2^MDC||{90 + n % 10}|%^%^UCUM|||||F\r"
    )


async def send_all(port: int, context: ssl.SSLContext | None, messages: list[hl7.Message]) -> list[float]:
    """One connection, one message at a time (original mode); the ACK time of each, in ms."""
    options = {"ssl": context, "server_hostname": "localhost"} if context is not None else {}
    reader, writer = await open_hl7_connection("127.0.0.1", port, **options)
    times = []
    try:
        for message in messages:
            started = time.perf_counter()
            writer.writemessage(message)
            await writer.drain()
            ack = await reader.readmessage()
            times.append((time.perf_counter() - started) * 1000)
            code = str(ack.segment("MSA")(1))
            if code != "AA":
                raise RuntimeError(f"ACK {code}: {ack}")
    finally:
        writer.close()
    return times


def start(http_port: int, mllp_port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tsunagu", "serve", "stream-ingest", "--port", str(http_port)],
        cwd=REPO,
        env={**os.environ, **env, "TSUNAGU_INGEST_MLLP_PORT": str(mllp_port), "TSUNAGU_LOG_LEVEL": "warning"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(label: str, env: dict[str, str], context: ssl.SSLContext | None, args: argparse.Namespace) -> None:
    http_port, mllp_port = free_port(), free_port()
    process = start(http_port, mllp_port, env)
    try:
        scheme = "https" if context is not None else "http"
        async with httpx.AsyncClient(verify=context or True) as http:
            for _ in range(600):
                try:
                    if (await http.get(f"{scheme}://127.0.0.1:{http_port}/readyz")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError("stream-ingest never became ready")
        run = uuid.uuid4().hex[:8]
        await send_all(mllp_port, context, [vitals(f"warm{run}", n) for n in range(100)])
        messages = [vitals(run, n) for n in range(args.messages)]
        started = time.perf_counter()
        one = await send_all(mllp_port, context, messages)
        sequential = len(one) / (time.perf_counter() - started)
        per = args.messages // args.connections
        batches = [[vitals(f"{run}c{c}", n) for n in range(per)] for c in range(args.connections)]
        started = time.perf_counter()
        spread = await asyncio.gather(*(send_all(mllp_port, context, batch) for batch in batches))
        parallel = sum(map(len, spread)) / (time.perf_counter() - started)
        flat = [t for times in spread for t in times]
        print(
            f"{label:<5} 1 connection: {sequential:7.0f} ACKs/s  ACK p50 {statistics.median(one):5.2f} ms"
            f"  p99 {percentile(one, 0.99):5.2f} ms | {args.connections} connections: {parallel:7.0f} ACKs/s"
            f"  p50 {statistics.median(flat):5.2f} ms  p99 {percentile(flat, 0.99):5.2f} ms"
        )
    finally:
        process.terminate()
        process.wait(30)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args()
    env = {
        "TSUNAGU_BUS": "kafka",
        "TSUNAGU_BROKER": "redis",
        "TSUNAGU_REDIS_URL": REDIS,
        "TSUNAGU_KAFKA_BOOTSTRAP": KAFKA,
    }
    print(f"HL7 v2 ORU^R01 over MLLP -> stream-ingest (Kafka audit + Redis channels), {os.cpu_count()} cores")
    await measure("plain", env, None, args)
    with tempfile.TemporaryDirectory() as tmp:
        pki, _ = ensure_dev_pki(Path(tmp) / "tls")
        tls_env = {
            **env,
            "TSUNAGU_SERVER_TLS_CERT_FILE": str(pki.server_cert),
            "TSUNAGU_SERVER_TLS_KEY_FILE": str(pki.server_key),
            "TSUNAGU_SERVER_TLS_CLIENT_CA_FILE": str(pki.ca_cert),
            "TSUNAGU_SERVER_TLS_CLIENT_AUTH": "required",
        }
        context = ssl.create_default_context(cafile=str(pki.ca_cert))
        context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
        await measure("mTLS", tls_env, context, args)


if __name__ == "__main__":
    asyncio.run(main())
