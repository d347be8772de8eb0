"""The hash chain and its signed checkpoints, with no I/O: encoding, hashing, signing, verifying.

Row `n` stores `hash_n = SHA-256(hash_{n-1} || canonical(row_n))` with `hash_0` = 32 zero bytes.
`canonical` is a fixed binary layout (magic, then every field length-prefixed in a fixed order),
so the same row always hashes the same whatever store or language reads it back.

Hashes alone only show accidental or naive edits: whoever can write the table can also recompute
every hash after the rows they changed. Checkpoints close that gap: the service signs
`(seq, hash)` of the chain head with its Ed25519 key every N rows or T seconds; a rewritten chain
no longer matches the signed hash, and a forged checkpoint has no valid signature.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import struct
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

log = logging.getLogger("tsunagu.audit.chain")

GENESIS = bytes(32)
ROW_MAGIC = b"tsunagu-audit-row/v1\x00"
CHECKPOINT_MAGIC = b"tsunagu-audit-checkpoint/v1\x00"


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append; the store gives it its seq and hashes."""

    event_id: str
    time_ms: int
    source: str
    type: str
    actor: str
    action: str
    subject: str
    outcome: str
    client_ip: str
    details: bytes


@dataclass(frozen=True, slots=True)
class Row:
    seq: int
    event_id: str
    time_ms: int
    source: str
    type: str
    actor: str
    action: str
    subject: str
    outcome: str
    client_ip: str
    details: bytes
    prev_hash: bytes
    hash: bytes


@dataclass(frozen=True, slots=True)
class Checkpoint:
    seq: int
    hash: bytes
    created_ms: int
    public_key: bytes
    signature: bytes


@dataclass(frozen=True, slots=True)
class Head:
    seq: int
    hash: bytes


def _field(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def canonical(seq: int, event: NewEvent | Row) -> bytes:
    """The bytes of a row that its hash covers (everything but the hashes themselves)."""
    parts = [
        ROW_MAGIC,
        struct.pack(">qq", seq, event.time_ms),
        _field(event.event_id.encode()),
        _field(event.source.encode()),
        _field(event.type.encode()),
        _field(event.actor.encode()),
        _field(event.action.encode()),
        _field(event.subject.encode()),
        _field(event.outcome.encode()),
        _field(event.client_ip.encode()),
        _field(event.details),
    ]
    return b"".join(parts)


def row_hash(prev_hash: bytes, seq: int, event: NewEvent | Row) -> bytes:
    return hashlib.sha256(prev_hash + canonical(seq, event)).digest()


def link(head: Head, events: Iterable[NewEvent]) -> list[Row]:
    """The rows that extend the chain at `head` with `events`, in order."""
    rows = []
    seq, prev = head.seq, head.hash
    for event in events:
        seq += 1
        digest = row_hash(prev, seq, event)
        rows.append(
            Row(
                seq=seq,
                event_id=event.event_id,
                time_ms=event.time_ms,
                source=event.source,
                type=event.type,
                actor=event.actor,
                action=event.action,
                subject=event.subject,
                outcome=event.outcome,
                client_ip=event.client_ip,
                details=event.details,
                prev_hash=prev,
                hash=digest,
            )
        )
        prev = digest
    return rows


def checkpoint_message(seq: int, digest: bytes, created_ms: int) -> bytes:
    return CHECKPOINT_MAGIC + struct.pack(">q", seq) + digest + struct.pack(">q", created_ms)


def raw_public_key(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class Signer:
    """The service's Ed25519 checkpoint key, and the public keys whose checkpoints are trusted."""

    def __init__(
        self, private_key: Ed25519PrivateKey, trusted: Sequence[bytes] = (), *, ephemeral: bool = False
    ) -> None:
        self.private_key = private_key
        self.public_key = raw_public_key(private_key.public_key())
        self.trusted = {self.public_key, *trusted}
        self.ephemeral = ephemeral

    @classmethod
    def generate(cls, trusted: Sequence[bytes] = ()) -> Signer:
        return cls(Ed25519PrivateKey.generate(), trusted, ephemeral=True)

    @classmethod
    def from_text(cls, text: str, trusted: Sequence[bytes] = ()) -> Signer:
        """A PEM (PKCS#8) private key, or the base64 of the 32-byte raw seed."""
        text = text.strip()
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_private_key(text.encode(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError("the checkpoint signing key must be an Ed25519 key")
            return cls(key, trusted)
        try:
            seed = base64.b64decode(text, validate=True)
        except ValueError:
            raise ValueError("the checkpoint signing key is neither PEM nor base64") from None
        if len(seed) != 32:
            raise ValueError(f"a raw Ed25519 key is 32 bytes, this one is {len(seed)}")
        return cls(Ed25519PrivateKey.from_private_bytes(seed), trusted)

    @classmethod
    def from_file(cls, path: str | Path, trusted: Sequence[bytes] = ()) -> Signer:
        return cls.from_text(Path(path).read_text(), trusted)

    def public_pem(self) -> str:
        return (
            self.private_key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )

    def sign(self, head: Head, created_ms: int) -> Checkpoint:
        signature = self.private_key.sign(checkpoint_message(head.seq, head.hash, created_ms))
        return Checkpoint(head.seq, head.hash, created_ms, self.public_key, signature)

    def check(self, checkpoint: Checkpoint) -> str | None:
        """Why `checkpoint` cannot be trusted, or None when its signature is good."""
        if checkpoint.public_key not in self.trusted:
            return "checkpoint signed by an untrusted key"
        try:
            Ed25519PublicKey.from_public_bytes(checkpoint.public_key).verify(
                checkpoint.signature, checkpoint_message(checkpoint.seq, checkpoint.hash, checkpoint.created_ms)
            )
        except (InvalidSignature, ValueError):
            return "checkpoint signature is invalid"
        return None


@dataclass(slots=True)
class Broken:
    seq: int
    reason: str


@dataclass(slots=True)
class Report:
    ok: bool
    rows_checked: int
    checkpoints_checked: int
    head: Head | None
    first_broken: Broken | None = None
    last_checkpoint: Checkpoint | None = None
    problems: list[Broken] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "rows_checked": self.rows_checked,
            "checkpoints_checked": self.checkpoints_checked,
            "head": None if self.head is None else {"seq": self.head.seq, "hash": self.head.hash.hex()},
            "last_checkpoint": None
            if self.last_checkpoint is None
            else {
                "seq": self.last_checkpoint.seq,
                "hash": self.last_checkpoint.hash.hex(),
                "created_ms": self.last_checkpoint.created_ms,
            },
            "first_broken": None
            if self.first_broken is None
            else {"seq": self.first_broken.seq, "reason": self.first_broken.reason},
        }


async def verify(
    rows: AsyncIterator[Row],
    head: Head | None,
    checkpoints: Sequence[Checkpoint],
    signer: Signer,
    *,
    start: Head = Head(0, GENESIS),
) -> Report:
    """Walk `rows` (ascending seq, starting after `start`) and say where the chain first breaks.

    A row is broken when its hash does not match its content (altered), its prev_hash does not
    link to the row before (altered or inserted), its seq skips (removed), or it disagrees with
    a signed checkpoint (rewritten with recomputed hashes). The stored head and every checkpoint
    must match the rows as well, so rows removed at the end are found too.
    """
    problems: list[Broken] = []
    by_seq: dict[int, Checkpoint] = {}
    for checkpoint in checkpoints:
        why = signer.check(checkpoint)
        if why is not None:
            problems.append(Broken(checkpoint.seq, why))
        else:
            by_seq[checkpoint.seq] = checkpoint
    expected, prev = start.seq + 1, start.hash
    checked = 0
    last_good_checkpoint = start.seq
    async for row in rows:
        if row.seq != expected:
            problems.append(Broken(expected, f"row missing (the next row has seq {row.seq})"))
            break
        checked += 1
        if row.prev_hash != prev:
            problems.append(Broken(row.seq, "prev_hash does not link to the previous row"))
            break
        if row_hash(prev, row.seq, row) != row.hash:
            problems.append(Broken(row.seq, "hash does not match the row's content"))
            break
        signed = by_seq.get(row.seq)
        if signed is not None:
            if signed.hash != row.hash:
                problems.append(
                    Broken(
                        row.seq,
                        "chain does not match the signed checkpoint at this seq"
                        f" (rows after seq {last_good_checkpoint} were rewritten)",
                    )
                )
                break
            last_good_checkpoint = row.seq
        prev = row.hash
        expected += 1
    else:
        last = expected - 1
        if head is not None and head.seq > last:
            problems.append(Broken(last + 1, f"rows missing at the end (the chain head is seq {head.seq})"))
        elif head is not None and head.seq < last:
            problems.append(Broken(head.seq + 1, "row beyond the chain head"))
        elif head is not None and head.hash != prev:
            problems.append(Broken(last, "the chain head's hash does not match the last row"))
        for seq in by_seq:
            if seq > last:
                problems.append(Broken(seq, "row covered by a signed checkpoint is missing"))
    problems.sort(key=lambda broken: broken.seq)
    trusted = [c for c in checkpoints if c.seq in by_seq and by_seq[c.seq] is c]
    return Report(
        ok=not problems,
        rows_checked=checked,
        checkpoints_checked=len(checkpoints),
        head=head,
        first_broken=problems[0] if problems else None,
        last_checkpoint=max(trusted, key=lambda c: c.seq) if trusted else None,
        problems=problems,
    )
