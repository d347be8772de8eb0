"""Sessions you can see and end, and the operator console's backend.

Who asks decides what is seen: a user sees their own sessions and may end them; an admin (`roles`
holds "admin") whose token has `acr` >= `console_min_acr` (a second factor) sees everyone's and may end
any, and may use the console: the gateways' numbers, the channel inspector (the gateway's server API:
presence, history, publish) and the audit chain's verification (audit-log's API). The admin API key
(machines, scripts) counts as an admin. Every console action is audited as `auth.console.*`, an ended
session as `auth.revoke` (the revocation path: every gateway closes its connections within a second).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx
import orjson
from tsunagu_core.tls import client_context

from tsunagu_auth.config import AuthSettings
from tsunagu_auth.connections import ConnectionIndex, by_session
from tsunagu_auth.domain import AuthError, AuthService, invalid_request, step_up_required
from tsunagu_auth.factors import level
from tsunagu_auth.notices import device
from tsunagu_auth.store import Session

INSPECTOR_METHODS = ("presence", "history", "publish")
UPSTREAM_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class Caller:
    """Who calls: a user (their claims) or the admin key (`claims` empty)."""

    name: str
    admin: bool
    claims: dict[str, Any]

    @property
    def session(self) -> str:
        return str(self.claims.get("sid", ""))


class Console:
    def __init__(
        self, settings: AuthSettings, auth: AuthService, index: ConnectionIndex, service_headers: dict[str, str]
    ) -> None:
        self.settings = settings
        self.auth = auth
        self.index = index
        self.service_headers = service_headers
        self._http: httpx.AsyncClient | None = None

    def caller(self, claims: dict[str, Any]) -> Caller:
        admin = "admin" in (claims.get("roles") or [])
        return Caller(str(claims["sub"]), admin and level(claims.get("acr")) >= self.settings.console_min_acr, claims)

    def require_admin(self, caller: Caller) -> None:
        if caller.admin:
            return
        if "admin" in (caller.claims.get("roles") or []):
            raise step_up_required(self.settings.console_min_acr, caller.claims.get("acr"))
        raise AuthError(403, "forbidden", "the console is for admins")

    # sessions

    async def sessions(self, caller: Caller, user: str = "") -> dict[str, Any]:
        """Live sessions (not revoked, not expired) with their connections: everyone's for an admin (or
        one user's with `user`), the caller's own otherwise."""
        if not caller.admin:
            if user and user != caller.name:
                if "admin" in (caller.claims.get("roles") or []):
                    raise step_up_required(self.settings.console_min_acr, caller.claims.get("acr"))
                raise AuthError(403, "forbidden", "a user sees their own sessions only")
            user = caller.name
        now = time.time()
        sessions = await self.auth.store.live_sessions(user or None, now)
        connections, _ = await self.index.snapshot()
        grouped = by_session(connections)
        items = [self._session_json(s, grouped.get(s.id, []), caller, now) for s in sessions]
        return {"sessions": items}

    def _session_json(self, session: Session, connections: list[Any], caller: Caller, now: float) -> dict[str, Any]:
        channels = sorted({c for conn in connections for c in conn.channels})
        last_seen = max(session.last_seen_at, session.created_at)
        if connections:
            last_seen = now  # connected now, on a gateway that is alive
        return {
            "id": session.id,
            "user": session.user,
            "ip": session.ip,
            "user_agent": session.user_agent,
            "device": device(session.user_agent),
            "acr": session.acr,
            "amr": list(session.amr),
            "started_at": session.created_at,
            "last_seen_at": last_seen,
            "expires_at": session.expires_at,
            "current": session.id == caller.session,
            "gateways": sorted({c.node for c in connections}),
            "connections": [c.as_json() for c in sorted(connections, key=lambda c: c.since_ms)],
            "channels": channels,
        }

    async def end_session(self, caller: Caller, session_id: str, reason: str) -> dict[str, Any]:
        session = await self.auth.store.get_session(session_id)
        if session is None or session.revoked_at is not None:
            raise AuthError(404, "not_found", f"no live session {session_id[:64]!r}")
        if session.user != caller.name and not caller.admin:
            if "admin" in (caller.claims.get("roles") or []):
                raise step_up_required(self.settings.console_min_acr, caller.claims.get("acr"))
            raise AuthError(403, "forbidden", "a user may end their own sessions only")
        why = reason or ("ended by its user" if session.user == caller.name else f"ended by {caller.name}")
        result = await self.auth.revoke("session", session_id, actor=caller.name, reason=why)
        return result | {"user": session.user}

    # the console

    async def gateways(self, caller: Caller) -> dict[str, Any]:
        """Each gateway auth has heard of (its connections, sessions, users; alive or silent), with the
        gateways' own numbers from the server API's `info` when the key is configured."""
        self.require_admin(caller)
        _, nodes = await self.index.snapshot()
        body: dict[str, Any] = {
            "gateways": [
                {
                    "node": n.node,
                    "alive": n.alive,
                    "last_seen": n.last_seen_ms,
                    "connections": n.connections,
                    "sessions": n.sessions,
                    "users": n.users,
                }
                for n in nodes
                if n.alive or n.last_seen_ms >= (time.time() - 3600) * 1000
            ]
        }
        if self.settings.gateway_api_key:
            try:
                body["info"] = await self._gateway("info", {})
            except AuthError as exc:
                body["info_error"] = exc.message
        return body

    async def inspect(self, caller: Caller, method: str, body: dict[str, Any], ip: str) -> dict[str, Any]:
        """The channel inspector: presence, history or publish on any channel, through the server API."""
        self.require_admin(caller)
        if method not in INSPECTOR_METHODS:
            raise AuthError(404, "not_found", f"the inspector does {', '.join(INSPECTOR_METHODS)}")
        channel = body.get("channel")
        if not isinstance(channel, str) or not channel or len(channel) > 255:
            raise invalid_request("channel is required")
        params: dict[str, Any] = {"channel": channel}
        if method == "history":
            limit = body.get("limit", 20)
            params |= {"limit": limit if isinstance(limit, int) and 0 < limit <= 100 else 20, "reverse": True}
        if method == "publish":
            if "data" not in body:
                raise invalid_request("data is required")
            params["data"] = body["data"]
        try:
            answer = await self._gateway(method, params)
        except AuthError as exc:
            self.auth.audit(f"console.{method}", caller.name, channel, "failed", {"error": exc.message}, ip)
            raise
        self.auth.audit(f"console.{method}", caller.name, channel, "ok", {"channel": channel}, ip)
        return answer

    async def audit_feed(self, caller: Caller, limit: int, after_seq: int) -> dict[str, Any]:
        """The newest audit events (after `after_seq`, the newest one the console has), from audit-log's
        API; the console polls this for its live feed. Reading is not itself audited (it would be every
        poll); what the console changes is."""
        self.require_admin(caller)
        limit = limit if 0 < limit <= 200 else 50
        url = self.settings.audit_url.rstrip("/") + f"/v1/audit?{urlencode({'limit': limit, 'order': 'desc'})}"
        response = await self._call("GET", url, None, self.service_headers)
        if response.status_code != 200:
            raise AuthError(502, "bad_gateway", f"audit-log answered {response.status_code}: {response.text[:200]}")
        items = [item for item in response.json().get("items", []) if int(item.get("seq", 0)) > after_seq]
        return {"items": items}

    async def verify_audit(self, caller: Caller, ip: str) -> dict[str, Any]:
        self.require_admin(caller)
        url = self.settings.audit_url.rstrip("/") + "/v1/audit/verify"
        response = await self._call("GET", url, None, self.service_headers)
        if response.status_code != 200:
            raise AuthError(502, "bad_gateway", f"audit-log answered {response.status_code}: {response.text[:200]}")
        report: dict[str, Any] = response.json()
        self.auth.audit(
            "console.audit_verify", caller.name, "audit-log", "ok" if report.get("ok") else "broken", {}, ip
        )
        return report

    async def _gateway(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        if not self.settings.gateway_api_key:
            raise AuthError(503, "not_configured", "the inspector needs TSUNAGU_AUTH_GATEWAY_API_KEY")
        url = self.settings.gateway_api_url.rstrip("/") + f"/api/{method}"
        response = await self._call("POST", url, params, {"x-api-key": self.settings.gateway_api_key})
        if response.status_code != 200:
            raise AuthError(502, "bad_gateway", f"the gateway answered {response.status_code}: {response.text[:200]}")
        answer = response.json()
        if "error" in answer:
            error = answer["error"]
            raise AuthError(400, "invalid_request", f"the gateway refused it: {error.get('message', error)}")
        result: dict[str, Any] = answer.get("result", {})
        return result

    async def _call(self, verb: str, url: str, body: Any, headers: dict[str, str]) -> httpx.Response:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=UPSTREAM_TIMEOUT, verify=client_context())
        try:
            return await self._http.request(
                verb,
                url,
                content=orjson.dumps(body) if body is not None else None,
                headers={"content-type": "application/json", **headers},
            )
        except httpx.HTTPError as exc:
            raise AuthError(502, "bad_gateway", f"{url} did not answer: {exc!r}") from None

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
