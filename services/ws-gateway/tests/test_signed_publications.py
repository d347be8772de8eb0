"""Signed publications with the stock centrifuge-python SDK: the client signs (as docs/protocol.md shows),
the gateway verifies, refuses forged, stale and replayed messages with their codes, and the audit record
holds the signature so the publication can be proven later."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from typing import Any

import orjson
import pytest
from centrifuge import Client, PublicationContext, SubscriptionEventHandler
from centrifuge.exceptions import ReplyError
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from tsunagu_core import topics
from tsunagu_core.bus import BusMessage
from tsunagu_core.envelope import envelope_of, payload_of
from tsunagu_core.wire.events_pb2 import AuditEvent


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# --- the client side, as a user writes it (docs/protocol.md, "Signed publications") -----------------


def sign(key: Ed25519PrivateKey, kid: str, channel: str, user: str, payload: str, ts: int | None = None) -> dict:
    ts = int(time.time() * 1000) if ts is None else ts
    nonce = uuid.uuid4().hex
    message = "\n".join(("tsunagu-signed-v1", channel, user, str(ts), nonce, payload)).encode()
    return {"payload": payload, "signature": {"kid": kid, "ts": ts, "nonce": nonce, "sig": b64url(key.sign(message))}}


# ---------------------------------------------------------------------------------------------------


class Inbox(SubscriptionEventHandler):
    def __init__(self) -> None:
        self.data: list[Any] = []

    async def on_publication(self, ctx: PublicationContext) -> None:
        self.data.append(ctx.pub.data)


def public_text(key: Ed25519PrivateKey) -> str:
    return b64url(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))


@pytest.fixture
def alice_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
async def audit_records(gateway) -> list[AuditEvent]:  # type: ignore[no-untyped-def]
    records: list[AuditEvent] = []

    async def keep(message: BusMessage) -> None:
        records.append(payload_of(envelope_of(message), AuditEvent))

    bus = gateway.server.config.app.state.runtime.bus
    await bus.consume([topics.AUDIT], "test-audit", keep)
    return records


async def client_for(gateway, token, user: str, key: Ed25519PrivateKey | None) -> Client:  # type: ignore[no-untyped-def]
    sig_keys = [{"kid": "k1", "key": public_text(key)}] if key is not None else []
    client = Client(gateway.ws_url, token=token(user, ["ledger:*"], sig_keys=sig_keys))
    await client.connect()
    return client


async def test_signed_publication_is_delivered_and_audited_with_its_signature(  # type: ignore[no-untyped-def]
    gateway, token, alice_key, audit_records
) -> None:
    alice = await client_for(gateway, token, "alice", alice_key)
    inbox = Inbox()
    sub = alice.new_subscription("ledger:trades", events=inbox)
    await sub.subscribe()
    data = sign(alice_key, "k1", "ledger:trades", "alice", json.dumps({"buy": "ACME", "qty": 100}))
    await sub.publish(data)
    for _ in range(100):
        if inbox.data and audit_records:
            break
        await asyncio.sleep(0.02)
    assert inbox.data == [data], "subscribers get the signed message as published, to check it themselves"
    [record] = audit_records
    assert (record.actor, record.action, record.subject, record.outcome) == ("alice", "publish", "ledger:trades", "ok")
    details = orjson.loads(record.details)
    assert details["offset"] == 1 and details["signature"] == data["signature"]
    # Proof later: the record alone and alice's public key verify the publication.
    signature = details["signature"]
    message = "\n".join(
        (
            "tsunagu-signed-v1",
            details["channel"],
            record.actor,
            str(signature["ts"]),
            signature["nonce"],
            details["payload"],
        )
    ).encode()
    public = Ed25519PublicKey.from_public_bytes(alice_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))
    public.verify(base64.urlsafe_b64decode(signature["sig"] + "=="), message)
    await alice.disconnect()


async def refused(client: Client, channel: str, data: Any) -> tuple[int, str]:
    with pytest.raises(ReplyError) as caught:
        await client.publish(channel, data)
    return caught.value.code, caught.value.message


async def test_forged_stale_replayed_and_unsigned_messages_are_refused(  # type: ignore[no-untyped-def]
    gateway, token, alice_key, audit_records
) -> None:
    alice = await client_for(gateway, token, "alice", alice_key)
    channel = "ledger:payments"

    assert (await refused(alice, channel, {"amount": 5}))[0] == 440
    assert (await refused(alice, channel, "plain text"))[0] == 440

    tampered = sign(alice_key, "k1", channel, "alice", '{"amount": 5}')
    tampered["payload"] = '{"amount": 5000}'
    assert await refused(alice, channel, tampered) == (
        441,
        "bad signature: the signature does not match the payload and key",
    )

    moved = sign(alice_key, "k1", "ledger:other", "alice", "x")
    assert (await refused(alice, channel, moved))[0] == 441, "a signature is bound to its channel"

    unknown_kid = sign(alice_key, "k2", channel, "alice", "x")
    assert (await refused(alice, channel, unknown_kid))[0] == 441

    mallory_key = Ed25519PrivateKey.generate()
    by_mallory = sign(mallory_key, "k1", channel, "alice", "x")
    assert (await refused(alice, channel, by_mallory))[0] == 441, "only the registered key signs for alice"

    stale = sign(alice_key, "k1", channel, "alice", "x", ts=int(time.time() * 1000) - 120_000)
    assert (await refused(alice, channel, stale))[0] == 442

    malformed = sign(alice_key, "k1", channel, "alice", "x")
    malformed["signature"]["ts"] = "yesterday"
    assert (await refused(alice, channel, malformed))[0] == 441

    good = sign(alice_key, "k1", channel, "alice", "x")
    await alice.publish(channel, good)
    assert await refused(alice, channel, good) == (443, "signature replayed: this signed message was already published")

    # Another user replaying alice's message: bound to alice, so it does not verify as bob's.
    bob = await client_for(gateway, token, "bob", alice_key)
    assert (await refused(bob, channel, good))[0] == 441

    await asyncio.sleep(0.1)
    assert len(audit_records) == 1, "only the accepted publication is recorded"
    await alice.disconnect()
    await bob.disconnect()


async def test_user_without_registered_keys_cannot_publish_signed(gateway, token) -> None:  # type: ignore[no-untyped-def]
    carol = await client_for(gateway, token, "carol", None)
    data = sign(Ed25519PrivateKey.generate(), "k1", "ledger:x", "carol", "x")
    code, message = await refused(carol, "ledger:x", data)
    assert (code, message) == (441, "bad signature: no signing key 'k1' is registered for this user")
    await carol.disconnect()
