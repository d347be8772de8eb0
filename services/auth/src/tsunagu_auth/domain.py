"""What auth does, without HTTP: grants (a password, then a second factor when the user has one), refresh
rotation, step-up, revocation, keys, audit, and the notices on each user's own channel."""

from __future__ import annotations

import asyncio
import base64
import fnmatch
import hashlib
import hmac
import logging
import re
import secrets
import time
import uuid
from collections.abc import Mapping
from typing import Any

import jwt
import orjson
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from prometheus_client import Counter, Histogram
from tsunagu_core import topics
from tsunagu_core.bus import Bus
from tsunagu_core.envelope import publish_event
from tsunagu_core.nonces import NonceRegistry
from tsunagu_core.revocation_store import RevocationStore, Scope, TokenIdentity
from tsunagu_core.wire.events_pb2 import AuditEvent, Revocation

from tsunagu_auth import keys as keyring
from tsunagu_auth.config import AuthSettings
from tsunagu_auth.factors import LEVEL_PASSWORD, FactorError, Factors, Proof, level
from tsunagu_auth.keys import PrivateKey, SigningKey
from tsunagu_auth.limits import LoginLimiter
from tsunagu_auth.notices import Notices
from tsunagu_auth.store import MessageKey, Session, Store, User

log = logging.getLogger("tsunagu.auth")

LOGINS = Counter("tsunagu_auth_logins_total", "Password and client-credential logins", ["outcome"])
REVOCATIONS = Counter("tsunagu_auth_revocations_total", "Revocations published", ["scope"])
TOKEN_ISSUE_SECONDS = Histogram(
    "tsunagu_auth_token_issue_seconds",
    "Time to answer a token request, password hashing included",
    ["grant"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
AUDIT_DROPPED = Counter("tsunagu_auth_audit_dropped_total", "Audit events not sent to the bus")

USERNAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
CHANNEL_PATTERN = re.compile(r"^[\w\-:.@/#,=+!~$*?\[\]]{1,255}$")
KID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# Gateways accept tokens this many seconds past `exp`; revocations and retired keys outlive tokens by more.
TOKEN_GRACE = 60.0
SOURCE = "auth"


class AuthError(Exception):
    def __init__(
        self,
        status: int,
        error: str,
        message: str,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


def step_up_required(needed: int, has: object) -> AuthError:
    """RFC 9470: the token is valid but its authentication is too weak for this request."""
    message = f"this needs acr {needed} or more (the token has {has or 'none'}): verify a second factor (step-up)"
    challenge = f'Bearer error="insufficient_user_authentication", acr_values="{needed}"'
    return AuthError(401, "insufficient_user_authentication", message, {"WWW-Authenticate": challenge})


def invalid_request(message: str) -> AuthError:
    return AuthError(400, "invalid_request", message)


def _hash_refresh(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def canonical_json(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


class AuthService:
    def __init__(
        self,
        settings: AuthSettings,
        store: Store,
        revocations: RevocationStore,
        bus: Bus,
        limiter: LoginLimiter,
        node: str = "",
        *,
        factors: Factors,
        factor_limiter: LoginLimiter,
        nonces: NonceRegistry,
        notices: Notices,
    ) -> None:
        self.settings = settings
        self.store = store
        self.revocations = revocations
        self.bus = bus
        self.limiter = limiter
        self.factors = factors
        self.factor_limiter = factor_limiter
        self.nonces = nonces
        self.notices = notices
        self.source = f"{SOURCE}/{node}" if node else SOURCE
        self.hasher = PasswordHasher(
            time_cost=settings.argon2_time_cost,
            memory_cost=settings.argon2_memory_cost,
            parallelism=settings.argon2_parallelism,
        )
        # Verified when the user does not exist, so both answers take as long.
        self.dummy_hash = self.hasher.hash(secrets.token_urlsafe(16))
        self.keys: list[SigningKey] = []
        self._private: dict[str, PrivateKey] = {}
        self._audits: set[asyncio.Task[None]] = set()

    @property
    def token_life(self) -> float:
        """How long after a key retires, or a revocation is made, a token it concerns can still be used."""
        return self.settings.access_token_ttl + TOKEN_GRACE

    # keys

    async def load_keys(self) -> None:
        self.keys = await self.store.signing_keys()

    def _due(self, keys: list[SigningKey], now: float) -> bool:
        active = keyring.active_key(keys, now)
        if active is None or active.algorithm != self.settings.algorithm:
            return True
        return (active.activated_at or 0.0) + self.settings.key_lifetime <= now

    async def rotate_keys(self, *, force: bool = False, actor: str = "auth") -> bool:
        """Rotate when due (or `force`); True when this call rotated."""
        rotated = False

        def rotation(keys: list[SigningKey]) -> list[SigningKey] | None:
            nonlocal rotated
            now = time.time()
            if not force and not self._due(keys, now):
                return None
            rotated = True
            s = self.settings
            return keyring.rotation(keys, s.algorithm, s.key_encryption_secret, self.token_life, now)

        self.keys = await self.store.rotate_keys(rotation)
        if rotated:
            active = keyring.active_key(self.keys, time.time())
            log.info("signing key rotated; active kid %s", active.kid if active else "?")
            self.audit("keys.rotated", actor, active.kid if active else "", "ok", {"forced": force})
        return rotated

    async def maintain(self) -> None:
        """One tick of the key timer: reload, rotate when due, forget what expired."""
        await self.rotate_keys()
        await self.store.purge(time.time())

    def jwks(self) -> dict[str, Any]:
        return keyring.jwks(self.keys, time.time())

    async def _signing_key(self) -> tuple[SigningKey, PrivateKey]:
        key = keyring.active_key(self.keys, time.time())
        if key is None:
            await self.rotate_keys()
            key = keyring.active_key(self.keys, time.time())
            if key is None:
                raise AuthError(503, "temporarily_unavailable", "no signing key")
        private = self._private.get(key.kid)
        if private is None:
            private = key.private_key(self.settings.key_encryption_secret)
            self._private[key.kid] = private
        return key, private

    async def sign(self, claims: dict[str, Any]) -> str:
        key, private = await self._signing_key()
        return jwt.encode(claims, private, algorithm=key.algorithm, headers={"kid": key.kid})

    # tokens

    def _base_claims(self, sub: str, ttl: float, now: float) -> dict[str, Any]:
        return {
            "iss": self.settings.issuer,
            "aud": self.settings.audience,
            "sub": sub,
            # Milliseconds: a user revoked at t refuses tokens issued before t, not those issued just after.
            "iat": round(now, 3),
            "exp": int(now + ttl),
            "jti": uuid.uuid4().hex,
        }

    async def _access_token(self, user: User, session: Session, now: float) -> str:
        claims = self._base_claims(user.username, self.settings.access_token_ttl, now)
        claims["sid"] = session.id
        claims["channels"] = list(user.channels)
        # How the session was authenticated (RFC 8176 `amr`, the level as `acr`), for step-up checks.
        claims["acr"] = session.acr
        claims["amr"] = list(session.amr)
        claims["auth_time"] = int(session.auth_time or session.created_at)
        if user.roles:
            claims["roles"] = list(user.roles)
        message_keys = await self.store.message_keys(user.username)
        if message_keys:
            claims["sig_keys"] = [{"kid": k.kid, "key": k.key} for k in message_keys]
        return await self.sign(claims)

    def _token_response(self, access: str, refresh: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": int(self.settings.access_token_ttl),
        }
        if refresh is not None:
            body["refresh_token"] = refresh
        return body

    async def password_grant(self, username: str, password: str, ip: str, user_agent: str = "") -> dict[str, Any]:
        """Tokens, or, when the user has a second factor, 403 `mfa_required` with an `mfa_token` to
        present it with (grant types mfa_otp, mfa_recovery_code, mfa_webauthn)."""
        started = time.perf_counter()
        if not username or not password or len(username) > 256 or len(password) > 1024:
            raise invalid_request("username and password are required")
        await self._admit(username, ip, "password")
        try:
            user = await self.store.get_user(username)
            password_hash = user.password_hash if user else self.dummy_hash
            ok = await asyncio.to_thread(self._verify_password, password_hash, password)
        except BaseException:
            await self.limiter.finish(username, ip, "abandoned")  # not a wrong password: nothing to count
            raise
        await self.limiter.finish(username, ip, "ok" if user is not None and ok else "failed")
        if user is None or not ok:
            LOGINS.labels("failed").inc()
            self.audit("login", username, username, "failed", {"grant": "password"}, ip)
            raise AuthError(401, "invalid_grant", "invalid username or password")
        factors = await self.factors.available(user.username)
        if factors:
            LOGINS.labels("mfa_required").inc()
            self.audit("login", user.username, user.username, "mfa_required", {"grant": "password"}, ip)
            token = await self._ceremony(user.username, "mfa", self.settings.mfa_token_ttl)
            raise AuthError(
                403,
                "mfa_required",
                "the password is right; a second factor is required: " + ", ".join(factors),
                extra={"mfa_token": token, "factors": factors, "expires_in": int(self.settings.mfa_token_ttl)},
            )
        result = await self._open_session(user, ip, user_agent, None, "password")
        TOKEN_ISSUE_SECONDS.labels("password").observe(time.perf_counter() - started)
        return result

    async def _open_session(
        self, user: User, ip: str, user_agent: str, proof: Proof | None, grant: str
    ) -> dict[str, Any]:
        now = time.time()
        session = Session(
            id=uuid.uuid4().hex,
            user=user.username,
            created_at=now,
            expires_at=now + self.settings.refresh_token_ttl,
            channels=user.channels,
            ip=ip,
            user_agent=user_agent[:512],
            acr=proof.acr if proof else LEVEL_PASSWORD,
            amr=proof.amr if proof else ("pwd",),
            auth_time=now,
            last_seen_at=now,
        )
        refresh = secrets.token_urlsafe(32)
        await self.store.create_session(session, _hash_refresh(refresh))
        access = await self._access_token(user, session, now)
        LOGINS.labels("ok").inc()
        details = {"grant": grant, "session": session.id, "acr": session.acr, "amr": list(session.amr)}
        self.audit("login", user.username, user.username, "ok", details, ip)
        self.notices.tell(user.username, "login", session=session)
        return self._token_response(access, refresh) | {"acr": session.acr, "amr": list(session.amr)}

    async def mfa_grant(self, method: str, mfa_token: str, value: Any, ip: str, user_agent: str = "") -> dict[str, Any]:
        """The second step of a login: the mfa_token of the right password and a factor."""
        started = time.perf_counter()
        claims = await self._read_ceremony(mfa_token, "mfa")
        user = await self.store.get_user(str(claims["sub"]))
        if user is None:
            raise AuthError(401, "invalid_grant", "invalid mfa_token")
        proof = await self._prove(user.username, method, value, claims.get("chal"), ip, "login")
        if not await self.nonces.claim(f"tsunagu:auth:mfa:{claims['jti']}", self.settings.mfa_token_ttl + 60):
            raise AuthError(401, "invalid_grant", "this mfa_token was used already: log in again")
        result = await self._open_session(user, ip, user_agent, proof, f"mfa_{method}")
        TOKEN_ISSUE_SECONDS.labels(f"mfa_{method}").observe(time.perf_counter() - started)
        return result

    async def _prove(self, username: str, method: str, value: Any, challenge: object, ip: str, purpose: str) -> Proof:
        """Check one second factor, counted by the factor limiter and audited whatever the outcome."""
        subject = f"mfa:{username}"
        admission = await self.factor_limiter.admit(subject, ip)
        if admission.retry_after is not None:
            self.audit(f"mfa.{method}", username, username, "limited", {"purpose": purpose}, ip)
            raise AuthError(
                429,
                "too_many_requests",
                "too many wrong second factors for this user; try later",
                {"Retry-After": str(max(1, int(admission.retry_after + 0.999)))},
            )
        try:
            if method == "otp":
                proof = await self.factors.verify_totp(username, _string(value, "otp"))
            elif method == "recovery_code":
                proof = await self.factors.verify_recovery_code(username, _string(value, "recovery_code"))
            elif method == "webauthn":
                if not isinstance(challenge, str) or not isinstance(value, dict):
                    raise invalid_request("a passkey needs the challenge's token and the credential object")
                proof = await self.factors.verify_webauthn(username, value, _unb64(challenge))
            else:
                raise invalid_request(f"unknown second factor {method!r}")
        except FactorError as exc:
            await self.factor_limiter.finish(subject, ip, "failed")
            self.audit(f"mfa.{method}", username, username, exc.reason, {"purpose": purpose}, ip)
            raise AuthError(401, "invalid_grant", exc.message, extra={"reason": exc.reason}) from None
        except BaseException:
            await self.factor_limiter.finish(subject, ip, "abandoned")
            raise
        await self.factor_limiter.finish(subject, ip, "ok")
        self.audit(f"mfa.{method}", username, username, "ok", {"purpose": purpose, **proof.detail}, ip)
        return proof

    # signed, single-use ceremony tokens: the mfa_token of a login, the challenge of a passkey ceremony

    async def _ceremony(self, sub: str, kind: str, ttl: float, **extra: Any) -> str:
        claims = self._base_claims(sub, ttl, time.time())
        claims["aud"] = f"{self.settings.audience}:{kind}"
        claims["typ"] = kind
        claims.update(extra)
        return await self.sign(claims)

    async def _read_ceremony(self, token: str, kind: str) -> dict[str, Any]:
        if not token or len(token) > 8192:
            raise invalid_request(f"{'mfa_token' if kind == 'mfa' else 'ceremony'} is required")
        try:
            claims = await self._decode(token, f"{self.settings.audience}:{kind}")
        except AuthError:
            raise AuthError(401, "invalid_grant", f"invalid or expired {kind} token: start again") from None
        if claims.get("typ") != kind:
            raise AuthError(401, "invalid_grant", f"not a {kind} token")
        return claims

    async def webauthn_login_options(self, mfa_token: str) -> dict[str, Any]:
        """A passkey challenge for a login: the options for navigator.credentials.get and the mfa_token
        to send back with the assertion (it carries the challenge)."""
        claims = await self._read_ceremony(mfa_token, "mfa")
        options, challenge = await self._factor_call(self.factors.authentication_options(str(claims["sub"])))
        ttl = max(30.0, float(claims["exp"]) - time.time())
        token = await self._ceremony(str(claims["sub"]), "mfa", ttl, chal=_b64(challenge))
        return {"options": options, "mfa_token": token}

    async def _factor_call(self, work: Any) -> Any:
        try:
            return await work
        except FactorError as exc:
            raise AuthError(400, "invalid_request", exc.message, extra={"reason": exc.reason}) from None

    # step-up and enrolment, for a logged-in user (claims of a verified access token)

    async def step_up(
        self, claims: Mapping[str, Any], method: str, value: Any, ceremony: str, ip: str
    ) -> dict[str, Any]:
        """Raise the session's level with a second factor; the fresh access token (and every refreshed
        one) carries the new `acr`, which a connection takes over with a refresh."""
        username, session_id = str(claims["sub"]), str(claims.get("sid", ""))
        challenge = None
        if method == "webauthn":
            ceremony_claims = await self._read_ceremony(ceremony, "webauthn")
            if ceremony_claims.get("sub") != username or ceremony_claims.get("purpose") != "step-up":
                raise AuthError(401, "invalid_grant", "this challenge is for another user or purpose")
            challenge = ceremony_claims.get("chal")
        proof = await self._prove(username, method, value, challenge, ip, "step-up")
        return await self._elevate(username, session_id, proof)

    async def _elevate(self, username: str, session_id: str, proof: Proof) -> dict[str, Any]:
        if not session_id:
            raise invalid_request("this token belongs to no session")
        current = await self.store.get_session(session_id)
        acr, amr = proof.acr, proof.amr
        if current is not None and level(current.acr) > level(acr):
            acr, amr = current.acr, current.amr  # a passkey session stays at its level after an OTP
        session = await self.store.elevate_session(session_id, acr, amr, time.time())
        user = await self.store.get_user(username)
        if session is None or user is None:
            raise AuthError(401, "invalid_token", "the session has ended")
        self.audit("step_up", username, username, "ok", {"session": session_id, "acr": acr, "method": proof.method})
        access = await self._access_token(user, session, time.time())
        return self._token_response(access, None) | {"acr": session.acr, "amr": list(session.amr)}

    async def webauthn_options(self, claims: Mapping[str, Any], purpose: str) -> dict[str, Any]:
        """Passkey options for a logged-in user: `register` a new one, or `step-up` with one."""
        username = str(claims["sub"])
        if purpose == "register":
            await self._may_add_factor(claims)
            options, challenge = await self.factors.registration_options(username)
        else:
            options, challenge = await self._factor_call(self.factors.authentication_options(username))
        ceremony = await self._ceremony(
            username, "webauthn", 300.0, purpose=purpose, chal=_b64(challenge), sid=claims.get("sid", "")
        )
        return {"options": options, "ceremony": ceremony}

    async def _may_add_factor(self, claims: Mapping[str, Any]) -> None:
        """A user with a factor adds or replaces one only from a session that proved one (acr >= 2)."""
        if await self.factors.available(str(claims["sub"])) and level(claims.get("acr")) < 2:
            raise step_up_required(2, claims.get("acr"))

    async def register_webauthn(
        self, claims: Mapping[str, Any], ceremony: str, credential: Any, name: str, ip: str
    ) -> dict[str, Any]:
        username = str(claims["sub"])
        ceremony_claims = await self._read_ceremony(ceremony, "webauthn")
        if ceremony_claims.get("sub") != username or ceremony_claims.get("purpose") != "register":
            raise AuthError(401, "invalid_grant", "this challenge is for another user or purpose")
        if not isinstance(credential, dict):
            raise invalid_request("credential must be the object navigator.credentials.create returned")
        try:
            registered = await self.factors.register(
                username, credential, _unb64(str(ceremony_claims["chal"])), name[:64]
            )
        except FactorError as exc:
            self.audit("mfa.enrolled", username, username, exc.reason, {"factor": "webauthn"}, ip)
            raise AuthError(400, "invalid_request", exc.message, extra={"reason": exc.reason}) from None
        if not await self.nonces.claim(f"tsunagu:auth:webauthn:{ceremony_claims['jti']}", 400.0):
            raise AuthError(401, "invalid_grant", "this challenge was used already")
        self.audit("mfa.enrolled", username, username, "ok", {"factor": "webauthn", **registered}, ip)
        self.notices.tell(username, "factor_added", factor="webauthn", name=registered["name"])
        return registered

    async def begin_totp(self, claims: Mapping[str, Any]) -> dict[str, str]:
        await self._may_add_factor(claims)
        return await self.factors.begin_totp(str(claims["sub"]))

    async def confirm_totp(self, claims: Mapping[str, Any], code: str, ip: str) -> dict[str, Any]:
        """The enrolment proven by a first code: recovery codes (shown once) and this session stepped up."""
        username = str(claims["sub"])
        subject = f"mfa:{username}"
        admission = await self.factor_limiter.admit(subject, ip)
        if admission.retry_after is not None:
            self.audit("mfa.enrolled", username, username, "limited", {"factor": "totp"}, ip)
            raise AuthError(
                429,
                "too_many_requests",
                "too many wrong codes; try later",
                {"Retry-After": str(max(1, int(admission.retry_after + 0.999)))},
            )
        try:
            codes = await self.factors.confirm_totp(username, code)
        except FactorError as exc:
            await self.factor_limiter.finish(subject, ip, "failed")
            self.audit("mfa.enrolled", username, username, exc.reason, {"factor": "totp"}, ip)
            raise AuthError(400, "invalid_grant", exc.message, extra={"reason": exc.reason}) from None
        await self.factor_limiter.finish(subject, ip, "ok")
        self.audit("mfa.enrolled", username, username, "ok", {"factor": "totp"}, ip)
        self.notices.tell(username, "factor_added", factor="totp")
        proof = Proof("2", ("pwd", "otp"), "totp", {})
        tokens = await self._elevate(username, str(claims.get("sid", "")), proof)
        return tokens | {"recovery_codes": codes}

    async def new_recovery_codes(self, claims: Mapping[str, Any], ip: str) -> dict[str, Any]:
        username = str(claims["sub"])
        if level(claims.get("acr")) < 2:
            raise step_up_required(2, claims.get("acr"))
        if await self.store.totp(username) is None:
            raise invalid_request("recovery codes come with a TOTP factor: enrol one first")
        codes = await self.factors.new_recovery_codes(username)
        self.audit("mfa.recovery_codes", username, username, "ok", {"count": len(codes)}, ip)
        return {"recovery_codes": codes}

    async def mfa_status(self, claims: Mapping[str, Any]) -> dict[str, Any]:
        username = str(claims["sub"])
        credentials = await self.store.webauthn_credentials(username)
        return {
            "user": username,
            "acr": claims.get("acr"),
            "amr": claims.get("amr", []),
            "roles": claims.get("roles", []),
            "totp": await self.store.totp(username) is not None,
            "recovery_codes_left": await self.store.recovery_codes_left(username),
            "passkeys": [
                {"id": c.id, "name": c.name, "created_at": c.created_at, "last_used_at": c.last_used_at}
                for c in credentials
            ],
        }

    async def _admit(self, subject: str, ip: str, grant: str) -> None:
        """The limiter's word on a login attempt: 429 when refused, a wait when slowed down."""
        admission = await self.limiter.admit(subject, ip)
        if admission.retry_after is not None:
            LOGINS.labels("limited").inc()
            self.audit("login", subject, subject, "limited", {"grant": grant}, ip)
            raise AuthError(
                429,
                "too_many_requests",
                "too many failed logins from this address; try later",
                {"Retry-After": str(max(1, int(admission.retry_after + 0.999)))},
            )
        if admission.delay:
            LOGINS.labels("slowed").inc()
            await asyncio.sleep(admission.delay)

    def _verify_password(self, password_hash: str, password: str) -> bool:
        try:
            return bool(self.hasher.verify(password_hash, password))
        except (VerificationError, InvalidHashError):
            return False

    async def client_grant(self, client_id: str, secret: str, scope: str, ip: str) -> dict[str, Any]:
        started = time.perf_counter()
        if not client_id or not secret:
            raise invalid_request("client_id and client_secret are required")
        subject = f"client:{client_id}"
        await self._admit(subject, ip, "client_credentials")
        client = self.settings.clients.get(client_id)
        try:
            if client is None:
                await asyncio.to_thread(self._verify_password, self.dummy_hash, secret)
                ok = False
            elif client.secret_hash:
                ok = await asyncio.to_thread(self._verify_password, client.secret_hash, secret)
            else:
                ok = hmac.compare_digest(client.secret.encode(), secret.encode())
        except BaseException:
            await self.limiter.finish(subject, ip, "abandoned")
            raise
        await self.limiter.finish(subject, ip, "ok" if client is not None and ok else "failed")
        if client is None or not ok:
            LOGINS.labels("failed").inc()
            self.audit(
                "login", f"client:{client_id}", f"client:{client_id}", "failed", {"grant": "client_credentials"}, ip
            )
            raise AuthError(401, "invalid_client", "invalid client credentials")
        requested = scope.split() if scope else list(client.scopes)
        if not set(requested) <= set(client.scopes):
            raise AuthError(
                400,
                "invalid_scope",
                "the client may not have scope " + " ".join(sorted(set(requested) - set(client.scopes))),
            )
        now = time.time()
        claims = self._base_claims(f"client:{client_id}", self.settings.access_token_ttl, now)
        claims.update({"client_id": client_id, "scope": " ".join(requested), "channels": list(client.channels)})
        access = await self.sign(claims)
        LOGINS.labels("ok").inc()
        self.audit("login", f"client:{client_id}", f"client:{client_id}", "ok", {"grant": "client_credentials"}, ip)
        TOKEN_ISSUE_SECONDS.labels("client_credentials").observe(time.perf_counter() - started)
        return self._token_response(access, None)

    async def refresh(self, token: str, ip: str) -> dict[str, Any]:
        started = time.perf_counter()
        if not token or len(token) > 256:
            raise invalid_request("refresh_token is required")
        new = secrets.token_urlsafe(32)
        now = time.time()
        outcome = await self.store.rotate_refresh(
            _hash_refresh(token), _hash_refresh(new), now, self.settings.refresh_token_ttl
        )
        if outcome.status == "reused" and outcome.session is not None:
            session = outcome.session
            log.warning("refresh token of session %s used twice: revoking the session", session.id)
            self.audit("refresh.reuse_detected", session.user, session.user, "revoked", {"session": session.id}, ip)
            await self._publish_revocation("session", session.id, session.user, "refresh token reused", "auth")
            self.notices.tell(session.user, "session_ended", session=session, by="auth", reason="refresh token reused")
            raise AuthError(401, "invalid_grant", "invalid refresh token")
        if outcome.status != "ok" or outcome.session is None:
            raise AuthError(401, "invalid_grant", "invalid refresh token")
        session = outcome.session
        user = await self.store.get_user(session.user)
        if user is None:
            raise AuthError(401, "invalid_grant", "invalid refresh token")
        access = await self._access_token(user, session, now)
        self.audit("refresh", user.username, user.username, "ok", {"session": session.id}, ip)
        TOKEN_ISSUE_SECONDS.labels("refresh_token").observe(time.perf_counter() - started)
        return self._token_response(access, new)

    # access tokens presented to auth itself

    async def verify_access(self, token: str) -> dict[str, Any]:
        claims = await self._decode(token, self.settings.audience)
        if claims.get("typ", "access") != "access":
            raise AuthError(401, "invalid_token", "not an access token", {"WWW-Authenticate": "Bearer"})
        identity = TokenIdentity(
            str(claims["sub"]), str(claims.get("sid", "")), str(claims.get("jti", "")), float(claims["iat"])
        )
        if await self.revocations.revoked(identity):
            raise AuthError(401, "invalid_token", "invalid or expired access token", {"WWW-Authenticate": "Bearer"})
        return claims

    async def _decode(self, token: str, audience: str) -> dict[str, Any]:
        """A token auth signed, for `audience`, not expired."""
        unauthorized = AuthError(
            401, "invalid_token", "invalid or expired access token", {"WWW-Authenticate": "Bearer"}
        )
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.InvalidTokenError:
            raise unauthorized from None
        key = next((k for k in self.keys if k.kid == kid), None)
        if key is None:
            await self.load_keys()
            key = next((k for k in self.keys if k.kid == kid), None)
        if key is None or key.state(time.time()) == "expired":
            raise unauthorized
        try:
            public = jwt.PyJWK.from_dict(key.public_jwk).key
            claims: dict[str, Any] = jwt.decode(
                token,
                public,
                algorithms=[key.algorithm],
                audience=audience,
                issuer=self.settings.issuer,
                options={"require": ["sub", "exp", "iat"]},
            )
        except jwt.InvalidTokenError:
            raise unauthorized from None
        return claims

    async def subscription_token(self, claims: Mapping[str, Any], channel: str) -> dict[str, Any]:
        if not channel or len(channel) > 255:
            raise invalid_request("channel is required")
        patterns = claims.get("channels") or []
        if not any(fnmatch.fnmatchcase(channel, p) for p in patterns if isinstance(p, str)):
            raise AuthError(403, "forbidden", f"this token grants no access to channel {channel[:64]!r}")
        now = time.time()
        sub = self._base_claims(str(claims["sub"]), self.settings.subscription_token_ttl, now)
        sub["channel"] = channel
        if claims.get("sid"):
            sub["sid"] = claims["sid"]
        return {"token": await self.sign(sub), "expires_in": int(self.settings.subscription_token_ttl)}

    # admin

    async def create_user(
        self, username: str, password: str, channels: list[str], actor: str, roles: list[str] | None = None
    ) -> dict[str, Any]:
        if not USERNAME.match(username):
            raise invalid_request("username: 1-64 of letters, digits, `_ . @ -`")
        if not 8 <= len(password) <= 1024:
            raise invalid_request("password: 8 to 1024 characters")
        bad = [c for c in channels if not CHANNEL_PATTERN.match(c)]
        if bad:
            raise invalid_request(f"invalid channel pattern {bad[0][:64]!r}")
        password_hash = await asyncio.to_thread(self.hasher.hash, password)
        roles = list(roles or [])
        if not all(isinstance(r, str) and USERNAME.match(r) for r in roles):
            raise invalid_request("roles: a list of names such as admin")
        if not await self.store.create_user(User(username, password_hash, tuple(channels), tuple(roles))):
            raise AuthError(409, "conflict", f"user {username!r} exists")
        self.audit("user.created", actor, username, "ok", {"channels": channels, "roles": roles})
        return {"id": username, "username": username, "channels": channels, "roles": roles}

    async def register_message_key(self, username: str, kid: str, key: str, actor: str) -> dict[str, Any]:
        try:
            raw = base64.urlsafe_b64decode(key + "=" * (-len(key) % 4))
            if len(raw) != 32:
                raise ValueError("not 32 bytes")
            Ed25519PublicKey.from_public_bytes(raw)
        except (ValueError, TypeError):
            raise invalid_request("key: base64url of a raw 32-byte Ed25519 public key") from None
        canonical = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
        kid = kid or "k-" + hashlib.sha256(raw).hexdigest()[:12]
        if not KID.match(kid):
            raise invalid_request("kid: 1-64 of letters, digits, `_ . -`")
        if await self.store.get_user(username) is None:
            raise AuthError(404, "not_found", f"no user {username!r}")
        if not await self.store.add_message_key(username, MessageKey(kid, canonical)):
            raise AuthError(409, "conflict", f"user {username!r} already has a key {kid!r}")
        self.audit("signing_key.registered", actor, username, "ok", {"kid": kid, "key": canonical})
        return {"kid": kid, "key": canonical}

    async def revoke(self, scope: Scope, value: str, *, actor: str, reason: str, user: str = "") -> dict[str, Any]:
        if not value or len(value) > 256:
            raise invalid_request(f"{scope} is required")
        sessions: list[str] = []
        ended: Session | None = None
        if scope == "session":
            ended = await self.store.revoke_session(value, time.time())
            if ended is None:
                raise AuthError(404, "not_found", f"no session {value!r}")
            user = ended.user
        elif scope == "user":
            user = value
            sessions = await self.store.revoke_user_sessions(value, time.time())
        revocation = await self._publish_revocation(scope, value, user, reason, actor)
        self.audit("revoke", actor, user or value, "ok", {"scope": scope, "value": value, "reason": reason})
        if ended is not None:
            self.notices.tell(ended.user, "session_ended", session=ended, by=actor, reason=reason)
        elif scope == "user":
            self.notices.tell(value, "sessions_ended", by=actor, reason=reason, count=len(sessions))
        body: dict[str, Any] = {
            "scope": scope,
            "value": value,
            "expires_unix_ms": revocation.expires_unix_ms,
        }
        if scope == "user":
            body["sessions"] = len(sessions)
        return body

    async def _publish_revocation(self, scope: Scope, value: str, user: str, reason: str, actor: str) -> Revocation:
        now = time.time()
        # Written to the shared store first: a gateway connecting a client from now on refuses it even
        # before the Kafka event reaches it.
        await self.revocations.revoke(scope, value, ttl=self.token_life, issued_before=now if scope == "user" else None)
        revocation = Revocation(
            scope={"session": Revocation.SESSION, "user": Revocation.USER, "token": Revocation.TOKEN}[scope],
            value=value,
            issued_before_unix_ms=int(now * 1000) if scope == "user" else 0,
            expires_unix_ms=int((now + self.token_life) * 1000),
            reason=reason,
            actor=actor,
        )
        await publish_event(
            self.bus, topics.AUTH_REVOCATIONS, "auth.revocation", revocation, key=user or value, source=self.source
        )
        REVOCATIONS.labels(scope).inc()
        return revocation

    # audit

    def audit(
        self, action: str, actor: str, subject: str, outcome: str, details: Mapping[str, Any], ip: str = ""
    ) -> None:
        """Hand an AuditEvent to the bus in the background: a slow Kafka never delays a login."""
        if len(self._audits) >= 1000:
            AUDIT_DROPPED.inc()
            return
        event = AuditEvent(
            actor=actor,
            action=f"auth.{action}",
            subject=subject,
            details=canonical_json(dict(details)),
            outcome=outcome,
            client_ip=ip,
        )
        task = asyncio.create_task(self._send_audit(event))
        self._audits.add(task)
        task.add_done_callback(self._audits.discard)

    async def _send_audit(self, event: AuditEvent) -> None:
        try:
            await publish_event(self.bus, topics.AUDIT, event.action, event, key=event.subject, source=self.source)
        except Exception as exc:
            AUDIT_DROPPED.inc()
            log.warning("audit event %s not sent: %s", event.action, exc)

    async def flush(self, timeout: float = 5.0) -> None:
        if self._audits:
            await asyncio.wait(set(self._audits), timeout=timeout)

    async def bootstrap(self) -> None:
        for username, entry in self.settings.bootstrap_users.items():
            if await self.store.get_user(username) is None:
                password_hash = await asyncio.to_thread(self.hasher.hash, entry.password)
                user = User(username, password_hash, tuple(entry.channels), tuple(entry.roles))
                if await self.store.create_user(user):
                    log.info("bootstrap user %s created%s", username, " (admin)" if "admin" in entry.roles else "")
                    if entry.totp_secret:
                        await self.factors.enrol_totp(username, entry.totp_secret)


def _string(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise invalid_request(f"{name} is required")
    return value


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
