"""FHIR rest-hook delivery -> `/fhir/ws` subscriber, through the gateway on Redis: plain and TLS.

Starts `tsunagu serve ws-gateway` (Redis broker) once in plaintext and once serving https/wss with a
development certificate. A subscriber binds with a `$get-ws-binding-token` token; a "FHIR server"
POSTs `--events` R5 event-notifications (each with an Observation) to `/fhir/notify` from
`--concurrency` connections. Prints notifications/s accepted and delivered, and the time from the POST
to the bundle on the subscriber's socket (p50/p99; every bundle is validated on the way).
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
from typing import Any

import httpx
import jwt
import websockets

from tsunagu.devpki import ensure_dev_pki

REPO = Path(__file__).resolve().parents[1]
REDIS = os.environ.get("TSUNAGU_REDIS_URL", "redis://127.0.0.1:6379/0")
SECRET = "bench-secret-that-is-long-enough-for-hs256"
API_KEY = "bench-api-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def notification(subscription: str, n: int) -> bytes:
    observation = {
        "resourceType": "Observation",
        "id": f"obs-{n}",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
        "subject": {"reference": "Patient/example"},
        "valueQuantity": {"value": 60 + n % 40, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"},
    }
    status = {
        "resourceType": "SubscriptionStatus",
        "status": "active",
        "type": "event-notification",
        "eventsSinceSubscriptionStart": str(n),
        "subscription": {"reference": f"https://ehr.example.org/fhir/Subscription/{subscription}"},
        "topic": "http://example.org/fhir/SubscriptionTopic/vitals",
        "notificationEvent": [{"eventNumber": str(n), "focus": {"reference": f"Observation/obs-{n}"}}],
    }
    bundle = {
        "resourceType": "Bundle",
        "type": "subscription-notification",
        "timestamp": "2025-06-01T12:00:00Z",
        "entry": [
            {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": status},
            {"fullUrl": f"https://ehr.example.org/fhir/Observation/obs-{n}", "resource": observation},
        ],
    }
    return json.dumps(bundle).encode()


def start(port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tsunagu", "serve", "ws-gateway", "--port", str(port)],
        cwd=REPO,
        env={**os.environ, **env, "TSUNAGU_LOG_LEVEL": "warning"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(label: str, env: dict[str, str], context: ssl.SSLContext | None, args: argparse.Namespace) -> None:
    port = free_port()
    process = start(port, env)
    scheme = "https" if context is not None else "http"
    base = f"{scheme}://127.0.0.1:{port}"
    subscription = f"bench-{uuid.uuid4().hex[:8]}"
    token = jwt.encode(
        {"sub": "clinician", "channels": [f"fhir:{subscription}"], "exp": int(time.time()) + 3600}, SECRET, "HS256"
    )
    try:
        async with httpx.AsyncClient(verify=context or True, timeout=30) as http:
            for _ in range(600):
                try:
                    if (await http.get(base + "/readyz")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError("the gateway never became ready")
            issued = await http.get(
                f"{base}/fhir/Subscription/{subscription}/$get-ws-binding-token",
                headers={"authorization": f"Bearer {token}"},
            )
            parameters = {p["name"]: p.get("valueString") or p.get("valueUrl") for p in issued.json()["parameter"]}
            posted: dict[int, float] = {}
            arrived: dict[int, float] = {}
            options: dict[str, Any] = {"ssl": context} if context is not None else {}
            async with websockets.connect(parameters["websocket-url"], max_size=None, **options) as socket_:
                await socket_.send(f"bind-with-token: {parameters['token']}")
                await socket_.recv()  # the handshake

                async def read() -> None:
                    while len(arrived) < args.events:
                        bundle = json.loads(await socket_.recv())
                        status = bundle["entry"][0]["resource"]
                        for event in status.get("notificationEvent", ()):
                            arrived[int(event["eventNumber"])] = time.perf_counter()

                reader = asyncio.create_task(read())
                numbers = iter(range(1, args.events + 1))
                headers = {"content-type": "application/fhir+json", "X-API-Key": API_KEY}

                async def deliver() -> None:
                    for n in numbers:
                        body = notification(subscription, n)
                        posted[n] = time.perf_counter()
                        response = await http.post(base + "/fhir/notify", content=body, headers=headers)
                        if response.status_code != 200:
                            raise RuntimeError(f"notify {n}: {response.status_code} {response.text}")

                started = time.perf_counter()
                await asyncio.gather(*(deliver() for _ in range(args.concurrency)))
                accepted = args.events / (time.perf_counter() - started)
                await asyncio.wait_for(reader, 60)
                delivered = args.events / (max(arrived.values()) - started)
        latencies = [(arrived[n] - posted[n]) * 1000 for n in posted]
        print(
            f"{label:<5} {accepted:6.0f} notifications/s accepted, {delivered:6.0f}/s delivered;"
            f" POST -> subscriber p50 {statistics.median(latencies):6.2f} ms  p99 {percentile(latencies, 0.99):6.2f} ms"
        )
    finally:
        process.terminate()
        process.wait(30)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    env = {
        "TSUNAGU_BUS": "memory",
        "TSUNAGU_BROKER": "redis",
        "TSUNAGU_REDIS_URL": REDIS,
        "TSUNAGU_GATEWAY_TOKEN_HMAC_SECRET": SECRET,
        "TSUNAGU_GATEWAY_API_KEY": API_KEY,
    }
    cores = os.cpu_count()
    print(f"FHIR R5 rest-hook -> /fhir/ws, {args.events} events from {args.concurrency} connections, {cores} cores")
    await measure("plain", env, None, args)
    with tempfile.TemporaryDirectory() as tmp:
        pki, _ = ensure_dev_pki(Path(tmp) / "tls")
        tls_env = {
            **env,
            "TSUNAGU_SERVER_TLS_CERT_FILE": str(pki.server_cert),
            "TSUNAGU_SERVER_TLS_KEY_FILE": str(pki.server_key),
        }
        await measure("TLS", tls_env, ssl.create_default_context(cafile=str(pki.ca_cert)), args)


if __name__ == "__main__":
    asyncio.run(main())
