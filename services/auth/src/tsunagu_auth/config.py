"""auth settings (`TSUNAGU_AUTH_*`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import SettingsConfigDict
from tsunagu_core.config import ServiceSettings


class ServiceClient(BaseModel):
    """A backend that gets tokens with the client-credentials grant."""

    model_config = {"extra": "forbid"}

    secret: str = Field("", description="Shared secret (compared in constant time); or set `secret_hash`.")
    secret_hash: str = Field("", description="argon2id hash of the secret (`argon2.PasswordHasher().hash`).")
    scopes: list[str] = Field(default_factory=list)
    channels: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _has_a_secret(self) -> ServiceClient:
        if not self.secret and not self.secret_hash:
            raise ValueError("a client needs `secret` or `secret_hash`")
        return self


class BootstrapUser(BaseModel):
    model_config = {"extra": "forbid"}

    password: str = Field(min_length=1)
    channels: list[str] = Field(default_factory=list)
    # `["admin"]`: an operator (the console, every session); the token carries them in `roles`.
    roles: list[str] = Field(default_factory=list)
    # A TOTP secret (base32) enrolled with the user: unattended set-ups whose admin must use MFA at once.
    totp_secret: str = ""


class AuthSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TSUNAGU_AUTH_", extra="ignore")

    port: int = Field(8081, ge=1, le=65535, description="TCP port to listen on.")
    algorithm: Literal["EdDSA", "RS256"] = Field(
        "EdDSA", description="Signature of access tokens: `EdDSA` (Ed25519) or `RS256` (RSA 2048)."
    )
    audience: str = Field("tsunagu", description="`aud` claim of every token (set the gateway's token_audience to it).")
    issuer: str = Field("tsunagu-auth", description="`iss` claim of every token.")
    access_token_ttl: float = Field(900.0, ge=5, le=86400, description="Seconds an access token is valid.")
    refresh_token_ttl: float = Field(
        30 * 86400.0, ge=60, description="Seconds a refresh token (and its session) lives without being used."
    )
    subscription_token_ttl: float = Field(
        900.0, ge=5, le=86400, description="Seconds a subscription token for a private channel is valid."
    )
    key_lifetime: float = Field(
        86400.0, ge=10, description="Seconds a signing key signs before the next one takes over (rotation timer)."
    )
    key_check_interval: float = Field(
        10.0, gt=0, le=3600, description="Seconds between checks whether the signing key is due for rotation."
    )
    key_encryption_secret: str = Field(
        "",
        description="Passphrase that encrypts private signing keys in the store; empty: stored unencrypted"
        " (`TSUNAGU_ENV=production` refuses that).",
    )
    admin_api_key: str = Field(
        "",
        description="Key of the admin endpoints (users, revoke, key rotation), sent as `X-API-Key` (like the gateway's"
        " server API) or `Authorization: Bearer`; empty: they are off.",
    )
    # OWASP's baseline for argon2id (m=19 MiB, t=2, p=1); raise them where logins may cost more CPU.
    argon2_time_cost: int = Field(2, ge=1, le=20, description="argon2id iterations for password hashes.")
    argon2_memory_cost: int = Field(19456, ge=8, description="argon2id memory in KiB for password hashes.")
    argon2_parallelism: int = Field(1, ge=1, le=64, description="argon2id lanes for password hashes.")
    login_max_failures: int = Field(
        5,
        ge=1,
        description="Failed logins for one username from one client IP within the window before that pair is"
        " refused (429) until the window ends; the user still logs in from other addresses.",
    )
    login_max_failures_per_ip: int = Field(
        50, ge=1, description="Failed logins from one client IP within the window before it is refused for everyone."
    )
    login_user_slowdown_after: int = Field(
        20,
        ge=1,
        description="Failed logins for one username from all addresses within the window after which its logins"
        " are slowed down (never refused); addresses it logged in from before are not slowed.",
    )
    login_user_max_delay: float = Field(
        5.0,
        ge=0,
        le=60,
        description="Longest wait before a slowed-down login's password is checked (0.25 s, doubling per failure).",
    )
    login_window: float = Field(
        300.0, gt=0, description="Seconds over which failed logins are counted; also how long a refusal lasts."
    )
    clients: dict[str, ServiceClient] = Field(
        default_factory=dict,
        description='JSON object: client id to `{"secret" or "secret_hash", "scopes": [...], "channels": [...]}` '
        "for the client-credentials grant.",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="JSON list of browser origins allowed to call the token endpoints (e.g. the gateway's web app); "
        "empty: none.",
    )
    bootstrap_users: dict[str, BootstrapUser] = Field(
        default_factory=dict,
        description='JSON object: username to `{"password", "channels", "roles", "totp_secret"}`, created at start'
        ' when missing; `"roles": ["admin"]` makes an operator (docs/auth.md).',
    )
    mfa_token_ttl: float = Field(
        300.0, ge=30, le=3600, description="Seconds between a right password and its second factor (`mfa_token`)."
    )
    totp_issuer: str = Field("Tsunagu", min_length=1, description="Issuer shown by authenticator apps for TOTP.")
    totp_skew: int = Field(
        1, ge=0, le=4, description="30-second TOTP windows accepted either side of the current one (clock drift)."
    )
    mfa_max_failures: int = Field(
        5,
        ge=1,
        description="Wrong second factors for one user (from all addresses) within the login window before that"
        " user's second factors are refused (429) until the window ends; audited.",
    )
    webauthn_rp_id: str = Field(
        "localhost", min_length=1, description="WebAuthn relying party id: the domain browsers bind passkeys to."
    )
    webauthn_rp_name: str = Field("Tsunagu", min_length=1, description="WebAuthn relying party name shown to users.")
    webauthn_origins: list[str] = Field(
        default_factory=lambda: ["http://localhost:8080"],
        description="JSON list of the origins WebAuthn ceremonies may come from (the web app's); others are refused.",
    )
    console_min_acr: int = Field(
        2,
        ge=1,
        le=3,
        description="`acr` an admin's token needs for the console and the session endpoints of all users.",
    )
    notify_namespace: str = Field(
        "user",
        description="Namespace of each user's own channel (`user:#alice`) that hears of new logins, new factors and"
        " ended sessions; empty: no notifications.",
    )
    sessions_consumer_group: str = Field(
        "auth-sessions", min_length=1, description="Kafka consumer group auth reads `tsunagu.gateway.events` in."
    )
    gateway_dead_after: float = Field(
        15.0, gt=0, description="Seconds without a gateway's heartbeat after which its connections are not shown."
    )
    gateway_api_url: str = Field(
        "http://127.0.0.1:8080", description="The gateway's base URL for the console's channel inspector and stats."
    )
    gateway_api_key: str = Field(
        "", description="The gateway's server API key (`TSUNAGU_GATEWAY_API_KEY`); empty: the inspector is off."
    )
    audit_url: str = Field(
        "http://127.0.0.1:8087",
        description="audit-log's base URL: the console's live audit feed and chain verification.",
    )
    turn_secret: str = Field(
        "",
        description="Secret shared with the TURN server (coturn `static-auth-secret` with `use-auth-secret`) for"
        " `POST /v1/turn-credentials`; empty: no TURN credentials are issued.",
    )
    turn_uris: list[str] = Field(
        default_factory=list,
        description="JSON list of the TURN server's URIs given with the credentials, e.g."
        ' `["turn:turn.example:3478"]`.',
    )
    stun_uris: list[str] = Field(
        default_factory=list, description="JSON list of STUN URIs given beside them (no credential needed)."
    )
    turn_credential_ttl: float = Field(
        3600.0, ge=1, le=86400, description="Seconds a TURN credential is accepted by the TURN server."
    )
