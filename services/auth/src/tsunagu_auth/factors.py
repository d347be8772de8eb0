"""Second factors, without HTTP: TOTP (RFC 6238, pyotp), recovery codes, WebAuthn passkeys (`webauthn`).

Levels (`acr` of the tokens, a string as OpenID Connect has it):
  "1"  a password (or nothing more than one factor);
  "2"  a password and a one-time code: TOTP or a recovery code (`amr` ["pwd", "otp"]);
  "3"  a password and a WebAuthn passkey: origin-bound, so phishing-resistant (`amr` ["pwd", "hwk"], plus
       "user" when the authenticator verified the user).

A TOTP code is accepted once: the store keeps the newest 30-second window a code was accepted for, and a
code of that window or an older one is a replay. A WebAuthn assertion must come from one of
`webauthn_origins` and carry a sign counter above the stored one (a counter that does not grow is a
cloned authenticator, or a replay). Every refusal says which of these it was.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

import pyotp
import segno
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from webauthn import (
    generate_authentication_options,
    generate_registration_options,
    options_to_json,
    verify_authentication_response,
    verify_registration_response,
)
from webauthn.helpers import base64url_to_bytes, bytes_to_base64url
from webauthn.helpers.exceptions import InvalidAuthenticationResponse, InvalidRegistrationResponse
from webauthn.helpers.structs import (
    AuthenticatorSelectionCriteria,
    PublicKeyCredentialDescriptor,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from tsunagu_auth.store import Store, WebauthnCredential

TOTP_PERIOD = 30
# How far back a code is recognised as "expired" rather than simply wrong (only for the error's words).
STALE_WINDOWS = 20
RECOVERY_CODES = 10
ENCRYPTED = "enc:"

LEVEL_PASSWORD, LEVEL_OTP, LEVEL_PASSKEY = "1", "2", "3"


class FactorError(Exception):
    """A second factor was refused; `reason` is what the audit records (wrong, replayed, stale, origin...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def level(acr: object) -> int:
    """`acr` as a number to compare ("2" -> 2); anything else is 0."""
    try:
        return int(str(acr))
    except ValueError:
        return 0


@dataclass(frozen=True, slots=True)
class Proof:
    """What a verified second factor adds to a password."""

    acr: str
    amr: tuple[str, ...]
    method: str  # totp, recovery_code, webauthn
    detail: dict[str, Any]


class SecretBox:
    """TOTP secrets at rest: encrypted (Fernet, key derived from TSUNAGU_AUTH_KEY_ENCRYPTION_SECRET) when
    that secret is set, else stored as they are (development; production requires the secret)."""

    def __init__(self, passphrase: str) -> None:
        self.fernet = None
        if passphrase:
            key = HKDF(hashes.SHA256(), 32, salt=None, info=b"tsunagu-auth totp").derive(passphrase.encode())
            self.fernet = Fernet(base64.urlsafe_b64encode(key))

    def seal(self, secret: str) -> str:
        return ENCRYPTED + self.fernet.encrypt(secret.encode()).decode() if self.fernet else secret

    def open(self, stored: str) -> str:
        if not stored.startswith(ENCRYPTED):
            return stored
        if self.fernet is None:
            raise ValueError("a TOTP secret is encrypted but TSUNAGU_AUTH_KEY_ENCRYPTION_SECRET is empty")
        try:
            return self.fernet.decrypt(stored[len(ENCRYPTED) :].encode()).decode()
        except InvalidToken:
            raise ValueError("a TOTP secret does not decrypt with TSUNAGU_AUTH_KEY_ENCRYPTION_SECRET") from None


def hash_recovery_code(code: str) -> str:
    """Codes carry 80 random bits, so a plain SHA-256 of the normalised code is safe to keep."""
    normalised = code.replace("-", "").replace(" ", "").upper()
    return hashlib.sha256(normalised.encode()).hexdigest()


def new_recovery_codes() -> list[str]:
    codes = []
    for _ in range(RECOVERY_CODES):
        raw = base64.b32encode(secrets.token_bytes(10)).decode()  # 16 characters, 80 bits
        codes.append("-".join(raw[i : i + 4] for i in range(0, 16, 4)))
    return codes


def qr_svg(uri: str) -> str:
    """The otpauth:// URI as an SVG data URI an authenticator app scans."""
    return str(segno.make(uri, error="m").svg_data_uri(scale=5, border=2))


class Factors:
    def __init__(
        self,
        store: Store,
        box: SecretBox,
        *,
        issuer: str,
        skew: int,
        rp_id: str,
        rp_name: str,
        origins: list[str],
    ) -> None:
        self.store = store
        self.box = box
        self.issuer = issuer
        self.skew = skew
        self.rp_id = rp_id
        self.rp_name = rp_name
        self.origins = origins

    async def available(self, username: str) -> list[str]:
        """The second factors the user has: what a login must present one of."""
        found = []
        if await self.store.totp(username) is not None:
            found.append("totp")
            if await self.store.recovery_codes_left(username):
                found.append("recovery_code")
        if await self.store.webauthn_credentials(username):
            found.append("webauthn")
        return found

    # TOTP

    async def begin_totp(self, username: str) -> dict[str, str]:
        secret = pyotp.random_base32()
        await self.store.set_totp(username, self.box.seal(secret))
        uri = pyotp.TOTP(secret, interval=TOTP_PERIOD).provisioning_uri(name=username, issuer_name=self.issuer)
        return {"secret": secret, "otpauth_uri": uri, "qr_svg": qr_svg(uri)}

    async def enrol_totp(self, username: str, secret: str) -> None:
        """An enrolled secret given by the operator (bootstrap)."""
        await self.store.set_totp(username, self.box.seal(secret))
        await self.store.confirm_totp(username, -1)

    def _matching_step(self, secret: str, code: str, now: float, windows: int) -> int | None:
        totp = pyotp.TOTP(secret, interval=TOTP_PERIOD)
        current = totp.timecode(datetime.datetime.fromtimestamp(now, tz=datetime.UTC))
        code = code.strip().replace(" ", "")
        if not (code.isdigit() and len(code) == totp.digits):
            return None
        for offset in sorted(range(-windows, windows + 1), key=abs):
            step = current + offset
            if secrets.compare_digest(totp.generate_otp(step), code):
                return step
        return None

    def _check_code(self, secret: str, code: str, now: float) -> int:
        step = self._matching_step(secret, code, now, self.skew)
        if step is not None:
            return step
        if self._matching_step(secret, code, now, STALE_WINDOWS) is not None:
            raise FactorError(
                "stale", "this code is from an earlier 30-second window than allowed: enter the current one"
            )
        raise FactorError("wrong", "wrong code")

    async def confirm_totp(self, username: str, code: str) -> list[str]:
        """The pending secret proven by a code: enrolled; new recovery codes (shown once)."""
        pending = await self.store.pending_totp(username)
        if pending is None:
            raise FactorError("no_enrolment", "no TOTP enrolment is pending: start one first")
        step = self._check_code(self.box.open(pending), code, time.time())
        if not await self.store.confirm_totp(username, step):
            raise FactorError("no_enrolment", "no TOTP enrolment is pending: start one first")
        return await self.new_recovery_codes(username)

    async def verify_totp(self, username: str, code: str) -> Proof:
        factor = await self.store.totp(username)
        if factor is None:
            raise FactorError("not_enrolled", "no TOTP factor is enrolled for this user")
        step = self._check_code(self.box.open(factor.secret), code, time.time())
        if step <= factor.last_step or not await self.store.spend_totp_step(username, step):
            raise FactorError("replayed", "this code was used already: wait for the next one")
        return Proof(LEVEL_OTP, ("pwd", "otp"), "totp", {})

    # recovery codes

    async def new_recovery_codes(self, username: str) -> list[str]:
        codes = new_recovery_codes()
        await self.store.set_recovery_codes(username, [hash_recovery_code(c) for c in codes])
        return codes

    async def verify_recovery_code(self, username: str, code: str) -> Proof:
        if not code or len(code) > 64:
            raise FactorError("wrong", "wrong recovery code")
        if not await self.store.spend_recovery_code(username, hash_recovery_code(code)):
            raise FactorError("wrong", "wrong recovery code, or one used already")
        left = await self.store.recovery_codes_left(username)
        return Proof(LEVEL_OTP, ("pwd", "otp"), "recovery_code", {"codes_left": left})

    # WebAuthn

    async def registration_options(self, username: str) -> tuple[dict[str, Any], bytes]:
        existing = await self.store.webauthn_credentials(username)
        options = generate_registration_options(
            rp_id=self.rp_id,
            rp_name=self.rp_name,
            user_name=username,
            user_id=hashlib.sha256(f"tsunagu-user:{username}".encode()).digest()[:16],
            exclude_credentials=[PublicKeyCredentialDescriptor(id=base64url_to_bytes(c.id)) for c in existing],
            authenticator_selection=AuthenticatorSelectionCriteria(
                resident_key=ResidentKeyRequirement.PREFERRED,
                user_verification=UserVerificationRequirement.PREFERRED,
            ),
        )
        return _json(options), options.challenge

    async def register(self, username: str, credential: dict[str, Any], challenge: bytes, name: str) -> dict[str, Any]:
        try:
            verified = verify_registration_response(
                credential=credential,
                expected_challenge=challenge,
                expected_rp_id=self.rp_id,
                expected_origin=self.origins,
            )
        except (InvalidRegistrationResponse, ValueError, KeyError, TypeError) as exc:
            raise FactorError(_reason(str(exc)), f"the passkey was not registered: {exc}") from None
        transports = credential.get("response", {}).get("transports") or []
        stored = WebauthnCredential(
            id=bytes_to_base64url(verified.credential_id),
            user=username,
            public_key=verified.credential_public_key,
            sign_count=verified.sign_count,
            name=name or "passkey",
            created_at=time.time(),
            transports=tuple(str(t) for t in transports if isinstance(t, str)),
        )
        if not await self.store.add_webauthn(stored):
            raise FactorError("duplicate", "this passkey is registered already")
        return {"id": stored.id, "name": stored.name}

    async def authentication_options(self, username: str) -> tuple[dict[str, Any], bytes]:
        credentials = await self.store.webauthn_credentials(username)
        if not credentials:
            raise FactorError("not_enrolled", "no passkey is registered for this user")
        options = generate_authentication_options(
            rp_id=self.rp_id,
            allow_credentials=[PublicKeyCredentialDescriptor(id=base64url_to_bytes(c.id)) for c in credentials],
            user_verification=UserVerificationRequirement.PREFERRED,
        )
        return _json(options), options.challenge

    async def verify_webauthn(self, username: str, credential: dict[str, Any], challenge: bytes) -> Proof:
        credential_id = credential.get("id") if isinstance(credential, dict) else None
        known = {c.id: c for c in await self.store.webauthn_credentials(username)}
        stored = known.get(credential_id) if isinstance(credential_id, str) else None
        if stored is None:
            raise FactorError("unknown_credential", "this passkey is not registered for this user")
        try:
            verified = verify_authentication_response(
                credential=credential,
                expected_challenge=challenge,
                expected_rp_id=self.rp_id,
                expected_origin=self.origins,
                credential_public_key=stored.public_key,
                credential_current_sign_count=stored.sign_count,
            )
        except (InvalidAuthenticationResponse, ValueError, KeyError, TypeError) as exc:
            reason = _reason(str(exc))
            raise FactorError(reason, f"the passkey assertion was refused: {exc}") from None
        if not await self.store.advance_sign_count(stored.id, stored.sign_count, verified.new_sign_count, time.time()):
            raise FactorError("counter", "the passkey's sign counter was used already (a replay or a cloned key)")
        amr = ("pwd", "hwk", "user") if verified.user_verified else ("pwd", "hwk")
        return Proof(LEVEL_PASSKEY, amr, "webauthn", {"credential": stored.id, "name": stored.name})


def _json(options: Any) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(options_to_json(options))
    return result


def _reason(message: str) -> str:
    """The audit's word for a refused WebAuthn response."""
    lowered = message.lower()
    if "origin" in lowered:
        return "origin"
    if "sign count" in lowered:
        return "counter"
    if "challenge" in lowered:
        return "challenge"
    return "invalid"
