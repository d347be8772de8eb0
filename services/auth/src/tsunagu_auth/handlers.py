"""HTTP routes of auth. Bodies are JSON or form-encoded (OAuth 2 clients send forms)."""

from __future__ import annotations

import base64
import hmac
import time
from typing import Any, cast
from urllib.parse import parse_qsl

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from tsunagu_core.proxies import TrustedProxies
from tsunagu_core.revocation_store import Scope

from tsunagu_auth.console import Caller, Console
from tsunagu_auth.domain import AuthError, AuthService, invalid_request
from tsunagu_auth.turn import IceServers

MAX_BODY = 64 * 1024


def service_of(request: Request) -> AuthService:
    return cast(AuthService, request.app.state.auth)


def console_of(request: Request) -> Console:
    return cast(Console, request.app.state.console)


def user_agent(request: Request) -> str:
    return request.headers.get("user-agent", "")[:512]


def client_ip(request: Request) -> str:
    """The client's address, through the proxies of TSUNAGU_TRUSTED_PROXIES (what the limiter keys on)."""
    return cast(TrustedProxies, request.app.state.proxies).client_ip(request.scope)


async def read_body(request: Request) -> dict[str, Any]:
    # Bodies over MAX_BODY are refused with 413 while they arrive (BodyLimit in create_service_app).
    raw = await request.body()
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/x-www-form-urlencoded":
        try:
            return dict(parse_qsl(raw.decode(), keep_blank_values=True, strict_parsing=False))
        except UnicodeDecodeError:
            raise invalid_request("the form is not UTF-8") from None
    if not raw:
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise invalid_request("the body is neither JSON nor a form") from None
    if not isinstance(body, dict):
        raise invalid_request("the body must be a JSON object")
    return body


def text(body: dict[str, Any], name: str, *, required: bool = True) -> str:
    value = body.get(name, "")
    if not isinstance(value, str):
        raise invalid_request(f"{name} must be a string")
    if required and not value:
        raise invalid_request(f"{name} is required")
    return value


def bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        raise AuthError(401, "invalid_token", "a bearer token is required", {"WWW-Authenticate": "Bearer"})
    return credentials.strip()


def is_admin(request: Request, credentials: str) -> bool:
    key = service_of(request).settings.admin_api_key
    return bool(key) and hmac.compare_digest(key.encode(), credentials.encode())


def admin_key(request: Request) -> str:
    """The admin key as the gateway's server API takes it (`X-API-Key`, `Authorization: apikey`), or a
    bearer token; empty when none was sent."""
    given = request.headers.get("x-api-key", "").strip()
    if given:
        return given
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    return credentials.strip() if scheme.lower() in ("bearer", "apikey") else ""


def require_admin(request: Request) -> str:
    if not service_of(request).settings.admin_api_key:
        raise AuthError(403, "forbidden", "admin endpoints are off (TSUNAGU_AUTH_ADMIN_API_KEY is empty)")
    given = admin_key(request)
    if not given:
        raise AuthError(
            401,
            "invalid_token",
            "the admin API key is required: send X-API-Key: <TSUNAGU_AUTH_ADMIN_API_KEY> (or Authorization: Bearer)",
            {"WWW-Authenticate": "Bearer"},
        )
    if not is_admin(request, given):
        raise AuthError(403, "forbidden", "the admin API key is wrong")
    return "admin"


def basic_client(request: Request) -> tuple[str, str] | None:
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        client_id, _, secret = base64.b64decode(credentials, validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        raise invalid_request("malformed Basic credentials") from None
    return client_id, secret


async def caller_of(request: Request) -> Caller:
    """The admin key (as `require_admin` takes it), or a user's access token."""
    given = admin_key(request)
    if given and is_admin(request, given):
        return Caller("admin", True, {})
    claims = await service_of(request).verify_access(bearer(request))
    return console_of(request).caller(claims)


async def access_claims(request: Request) -> dict[str, Any]:
    return await service_of(request).verify_access(bearer(request))


def error_response(exc: AuthError) -> JSONResponse:
    return JSONResponse(
        {"error": exc.error, "error_description": exc.message, **exc.extra},
        status_code=exc.status,
        headers=exc.headers,
    )


MFA_GRANTS = {"mfa_otp": ("otp", "otp"), "mfa_recovery_code": ("recovery_code", "recovery_code")}


def build_router() -> APIRouter:
    router = APIRouter()

    @router.get("/.well-known/jwks.json", tags=["auth"])
    async def jwks(request: Request) -> JSONResponse:
        return JSONResponse(service_of(request).jwks(), headers={"Cache-Control": "max-age=60"})

    @router.post("/v1/token", tags=["auth"])
    async def token(request: Request) -> JSONResponse:
        auth = service_of(request)
        body = await read_body(request)
        grant = text(body, "grant_type")
        ip, agent = client_ip(request), user_agent(request)
        if grant == "password":
            result = await auth.password_grant(text(body, "username"), text(body, "password"), ip, agent)
        elif grant in MFA_GRANTS:
            method, field = MFA_GRANTS[grant]
            result = await auth.mfa_grant(method, text(body, "mfa_token"), text(body, field), ip, agent)
        elif grant == "mfa_webauthn":
            result = await auth.mfa_grant("webauthn", text(body, "mfa_token"), body.get("credential"), ip, agent)
        elif grant == "client_credentials":
            basic = basic_client(request)
            client_id, secret = basic or (text(body, "client_id"), text(body, "client_secret"))
            result = await auth.client_grant(client_id, secret, text(body, "scope", required=False), client_ip(request))
        else:
            raise AuthError(
                400,
                "unsupported_grant_type",
                "grant_type must be password, client_credentials, mfa_otp, mfa_recovery_code or mfa_webauthn",
            )
        return JSONResponse(result, headers={"Cache-Control": "no-store"})

    @router.post("/v1/refresh", tags=["auth"])
    async def refresh(request: Request) -> JSONResponse:
        body = await read_body(request)
        result = await service_of(request).refresh(text(body, "refresh_token"), client_ip(request))
        return JSONResponse(result, headers={"Cache-Control": "no-store"})

    @router.post("/v1/revoke", tags=["admin"])
    async def revoke(request: Request) -> JSONResponse:
        actor = require_admin(request)
        body = await read_body(request)
        given = [s for s in ("session", "user", "token") if body.get(s)]
        if given == ["user", "token"]:
            given = ["token"]  # a token id, with its user as the event key
        if len(given) != 1:
            raise invalid_request("give exactly one of session, user, token (a jti, optionally with its user)")
        scope = cast(Scope, given[0])
        result = await service_of(request).revoke(
            scope,
            text(body, scope),
            actor=actor,
            reason=text(body, "reason", required=False),
            user=text(body, "user", required=False) if scope == "token" else "",
        )
        return JSONResponse(result)

    @router.post("/v1/keys/rotate", tags=["admin"])
    async def rotate(request: Request) -> JSONResponse:
        actor = require_admin(request)
        auth = service_of(request)
        await auth.rotate_keys(force=True, actor=actor)
        return JSONResponse(auth.jwks())

    @router.post("/v1/users", tags=["admin"], status_code=201)
    async def create_user(request: Request) -> JSONResponse:
        actor = require_admin(request)
        body = await read_body(request)
        channels = body.get("channels", [])
        if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
            raise invalid_request("channels must be a list of channel patterns")
        roles = body.get("roles", [])
        if not isinstance(roles, list):
            raise invalid_request("roles must be a list")
        result = await service_of(request).create_user(
            text(body, "username"), text(body, "password"), channels, actor=actor, roles=roles
        )
        return JSONResponse(result, status_code=201)

    @router.post("/v1/users/{user}/signing-keys", tags=["auth"], status_code=201)
    async def signing_key(user: str, request: Request) -> JSONResponse:
        auth = service_of(request)
        if request.headers.get("x-api-key"):
            actor = require_admin(request)
        elif is_admin(request, credentials := bearer(request)):
            actor = "admin"
        else:
            claims = await auth.verify_access(credentials)
            if claims["sub"] != user:
                raise AuthError(403, "forbidden", "a user may register keys for itself only")
            actor = user
        body = await read_body(request)
        result = await auth.register_message_key(
            user, text(body, "kid", required=False), text(body, "key"), actor=actor
        )
        return JSONResponse(result, status_code=201)

    @router.post("/v1/subscription-token", tags=["auth"])
    async def subscription_token(request: Request) -> JSONResponse:
        auth = service_of(request)
        claims = await auth.verify_access(bearer(request))
        body = await read_body(request)
        result = await auth.subscription_token(claims, text(body, "channel"))
        return JSONResponse(result, headers={"Cache-Control": "no-store"})

    @router.post("/v1/turn-credentials", tags=["webrtc"])
    async def turn_credentials(request: Request) -> JSONResponse:
        """Short-lived TURN credentials for the caller (turn.py), so its WebRTC peers can relay."""
        claims = await service_of(request).verify_access(bearer(request))
        servers: IceServers = request.app.state.ice_servers
        if not servers.configured:
            raise AuthError(404, "turn_not_configured", "this platform has no TURN server (TSUNAGU_AUTH_TURN_SECRET)")
        return JSONResponse(servers.credentials(str(claims["sub"]), time.time()), headers={"Cache-Control": "no-store"})

    add_factor_routes(router)
    add_session_routes(router)
    return router


def add_factor_routes(router: APIRouter) -> None:
    """Second factors: enrolment, the passkey step of a login, step-up (docs/auth.md)."""

    @router.post("/v1/mfa/webauthn/login-options", tags=["mfa"])
    async def webauthn_login_options(request: Request) -> JSONResponse:
        body = await read_body(request)
        return JSONResponse(await service_of(request).webauthn_login_options(text(body, "mfa_token")))

    @router.get("/v1/mfa", tags=["mfa"])
    async def mfa_status(request: Request) -> JSONResponse:
        return JSONResponse(await service_of(request).mfa_status(await access_claims(request)))

    @router.post("/v1/mfa/totp", tags=["mfa"])
    async def begin_totp(request: Request) -> JSONResponse:
        result = await service_of(request).begin_totp(await access_claims(request))
        return JSONResponse(result, headers={"Cache-Control": "no-store"})

    @router.post("/v1/mfa/totp/confirm", tags=["mfa"])
    async def confirm_totp(request: Request) -> JSONResponse:
        claims = await access_claims(request)
        body = await read_body(request)
        result = await service_of(request).confirm_totp(claims, text(body, "otp"), client_ip(request))
        return JSONResponse(result, headers={"Cache-Control": "no-store"})

    @router.post("/v1/mfa/recovery-codes", tags=["mfa"])
    async def recovery_codes(request: Request) -> JSONResponse:
        result = await service_of(request).new_recovery_codes(await access_claims(request), client_ip(request))
        return JSONResponse(result, headers={"Cache-Control": "no-store"})

    @router.post("/v1/mfa/webauthn/register-options", tags=["mfa"])
    async def register_options(request: Request) -> JSONResponse:
        return JSONResponse(await service_of(request).webauthn_options(await access_claims(request), "register"))

    @router.post("/v1/mfa/webauthn/register", tags=["mfa"], status_code=201)
    async def register(request: Request) -> JSONResponse:
        claims = await access_claims(request)
        body = await read_body(request)
        result = await service_of(request).register_webauthn(
            claims,
            text(body, "ceremony"),
            body.get("credential"),
            text(body, "name", required=False),
            client_ip(request),
        )
        return JSONResponse(result, status_code=201)

    @router.post("/v1/step-up/webauthn-options", tags=["mfa"])
    async def step_up_options(request: Request) -> JSONResponse:
        return JSONResponse(await service_of(request).webauthn_options(await access_claims(request), "step-up"))

    @router.post("/v1/step-up", tags=["mfa"])
    async def step_up(request: Request) -> JSONResponse:
        """A second factor for a logged-in session: `otp`, `recovery_code`, or `ceremony` + `credential`."""
        claims = await access_claims(request)
        body = await read_body(request)
        auth = service_of(request)
        ip = client_ip(request)
        if body.get("credential") is not None:
            result = await auth.step_up(claims, "webauthn", body["credential"], text(body, "ceremony"), ip)
        elif body.get("recovery_code"):
            result = await auth.step_up(claims, "recovery_code", text(body, "recovery_code"), "", ip)
        else:
            result = await auth.step_up(claims, "otp", text(body, "otp"), "", ip)
        return JSONResponse(result, headers={"Cache-Control": "no-store"})


def add_session_routes(router: APIRouter) -> None:
    """Sessions (a user's own; every one for an admin) and the operator console's backend."""

    @router.get("/v1/sessions", tags=["sessions"])
    async def list_sessions(request: Request) -> JSONResponse:
        caller = await caller_of(request)
        user = request.query_params.get("user", "")
        return JSONResponse(await console_of(request).sessions(caller, user), headers={"Cache-Control": "no-store"})

    @router.delete("/v1/sessions/{session_id}", tags=["sessions"])
    async def end_session(session_id: str, request: Request) -> JSONResponse:
        caller = await caller_of(request)
        reason = request.query_params.get("reason", "")[:200]
        return JSONResponse(await console_of(request).end_session(caller, session_id, reason))

    @router.get("/v1/console/gateways", tags=["console"])
    async def gateways(request: Request) -> JSONResponse:
        return JSONResponse(await console_of(request).gateways(await caller_of(request)))

    @router.post("/v1/console/channels/{method}", tags=["console"])
    async def inspect(method: str, request: Request) -> JSONResponse:
        caller = await caller_of(request)
        body = await read_body(request)
        return JSONResponse(await console_of(request).inspect(caller, method, body, client_ip(request)))

    @router.get("/v1/console/audit", tags=["console"])
    async def audit_feed(request: Request) -> JSONResponse:
        caller = await caller_of(request)
        limit, after = request.query_params.get("limit", "50"), request.query_params.get("after", "0")
        if not (limit.isdigit() and after.isdigit()):
            raise invalid_request("limit and after are whole numbers (after: the newest seq seen)")
        feed = await console_of(request).audit_feed(caller, int(limit), int(after))
        return JSONResponse(feed, headers={"Cache-Control": "no-store"})

    @router.post("/v1/console/audit/verify", tags=["console"])
    async def verify_audit(request: Request) -> JSONResponse:
        caller = await caller_of(request)
        return JSONResponse(await console_of(request).verify_audit(caller, client_ip(request)))
