"""`tsunagu`: run the platform, one service, the local infrastructure, or regenerate the config docs.

This module imports only the standard library at the top: `tsunagu --help` and `tsunagu token` start
as fast as Python does, and each command imports what it runs (`serve auth` loads auth alone).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from tsunagu.services import SERVICES, TYPE_CHECKING, ServiceEntry

if TYPE_CHECKING:
    import socket
    from collections.abc import Sequence
    from typing import Any

    from pydantic_settings import BaseSettings
    from tsunagu_core.tls import ServerTls

    from tsunagu.embedded_mqtt import EmbeddedMqttBroker
    from tsunagu.serving import EmbeddedServer

CONFIG_DOCS = "docs/configuration.md"
# As uvicorn's default: connections that arrive while a service starts wait here.
LISTEN_BACKLOG = 2048

# `tsunagu run` is the embedded development mode on loopback: it signs and accepts tokens with these
# public secrets, serves the server API with this key and the internal APIs with this token unless
# real ones are configured. `tsunagu serve` has no such defaults, and TSUNAGU_ENV=production refuses
# them wherever they appear (refuse_development_secrets).
DEVELOPMENT_TOKEN_SECRET = "tsunagu-development-secret-do-not-use-in-production"
DEVELOPMENT_API_KEY = "tsunagu-development-api-key"
DEVELOPMENT_INTERNAL_TOKEN = "tsunagu-development-internal-token"
# The demo's users: two, so two browser tabs can chat and see each other's avatar.
DEVELOPMENT_USERS = {"alice": "alice-development-password", "bob": "bob-development-password"}
# The operator console's development admin: a password and a TOTP secret (the console needs a second factor).
DEVELOPMENT_ADMIN = "ops"
DEVELOPMENT_ADMIN_PASSWORD = "ops-development-password"
DEVELOPMENT_ADMIN_TOTP_SECRET = "TSUNAGUDEVELOPMENTTOTPSECRET2345"
DEVELOPMENT_SECRETS = frozenset(
    {
        DEVELOPMENT_TOKEN_SECRET,
        DEVELOPMENT_API_KEY,
        DEVELOPMENT_INTERNAL_TOKEN,
        DEVELOPMENT_ADMIN_PASSWORD,
        DEVELOPMENT_ADMIN_TOTP_SECRET,
        *DEVELOPMENT_USERS.values(),
    }
)
DEVELOPMENT_USER = "alice"
DEVELOPMENT_PASSWORD = DEVELOPMENT_USERS[DEVELOPMENT_USER]
# What development_defaults may add that is a secret: `tsunagu run` refuses to serve them beyond
# loopback without --expose-development-secrets.
SECRET_DEFAULTS = {
    "ws-gateway": {"token_hmac_secret": "TSUNAGU_GATEWAY_TOKEN_HMAC_SECRET", "api_key": "TSUNAGU_GATEWAY_API_KEY"},
    "auth": {
        "admin_api_key": "TSUNAGU_AUTH_ADMIN_API_KEY",
        "bootstrap_users": "TSUNAGU_AUTH_BOOTSTRAP_USERS",
        "gateway_api_key": "TSUNAGU_AUTH_GATEWAY_API_KEY",
    },
}
# The web app's world (sim-engine) room.
DEMO_ROOM = {"room": "world", "kind": "avatar", "tick_hz": 20, "params": {"idle_timeout": 600}}


def _base_url(service: str, host: str | None = None) -> str:
    """Where an embedded service answers, as a client on this machine reaches it (https when the
    services serve TLS: TSUNAGU_SERVER_TLS_CERT_FILE)."""
    from tsunagu_core.config import TlsSettings, load_settings

    settings = load_settings(SERVICES[service].settings)
    chosen = host or settings.host
    if chosen in ("0.0.0.0", "::", ""):
        chosen = "127.0.0.1"
    scheme = "https" if load_settings(TlsSettings).server_tls_cert_file else "http"
    return f"{scheme}://{chosen}:{settings.port}"


def _auth_base_url(host: str | None = None) -> str:
    return _base_url("auth", host)


def _unset(*names: str) -> bool:
    return not any(os.environ.get(name) for name in names)


def development_defaults(service: str, host: str | None = None, gateway_port: int | None = None) -> dict[str, Any]:
    """What `tsunagu run` adds when the operator has not configured it: dev secrets, dev users, the
    gateway trusting the embedded auth's JWKS next to the dev HS256 secret, and the web app's demo feeds."""
    defaults: dict[str, Any] = {}
    if service == "ws-gateway":
        if _unset("TSUNAGU_GATEWAY_TOKEN_HMAC_SECRET", "TSUNAGU_GATEWAY_TOKEN_PUBLIC_KEY"):
            defaults["token_hmac_secret"] = DEVELOPMENT_TOKEN_SECRET
        if _unset("TSUNAGU_GATEWAY_API_KEY"):
            defaults["api_key"] = DEVELOPMENT_API_KEY
        if _unset("TSUNAGU_GATEWAY_TOKEN_JWKS_URL"):
            defaults["token_jwks_url"] = _auth_base_url(host) + "/.well-known/jwks.json"
        if _unset("TSUNAGU_GATEWAY_COLLAB_URL"):
            defaults["collab_url"] = _base_url("collab", host)
        if _unset("TSUNAGU_GATEWAY_WEB_AUTH_URL"):
            defaults["web_auth_url"] = _auth_base_url(host)
        if _unset("TSUNAGU_GATEWAY_WEB_SERVICE_URLS"):
            names = ("auth", "collab", "stream-ingest", "mqtt-bridge", "sim-engine")
            defaults["web_service_urls"] = {name: _base_url(name, host) for name in names}
        if _unset("TSUNAGU_GATEWAY_RPC_ROUTES"):
            # The Board asks the demo device through `mqtt.request` (MQTT 5 request/response); a caller must
            # be allowed to publish to the device's topic, as for a command.
            request = {"url": _base_url("mqtt-bridge", host) + "/mqtt.request", "publish_to": "mqtt:{topic}"}
            defaults["rpc_routes"] = {"mqtt.request": {**request, "allow": "authenticated"}}
    elif service == "auth":
        if _unset("TSUNAGU_AUTH_ADMIN_API_KEY"):
            defaults["admin_api_key"] = DEVELOPMENT_API_KEY
        if _unset("TSUNAGU_AUTH_BOOTSTRAP_USERS"):
            defaults["bootstrap_users"] = {
                user: {"password": password, "channels": ["*"]} for user, password in DEVELOPMENT_USERS.items()
            } | {
                DEVELOPMENT_ADMIN: {
                    "password": DEVELOPMENT_ADMIN_PASSWORD,
                    "roles": ["admin"],
                    "totp_secret": DEVELOPMENT_ADMIN_TOTP_SECRET,
                }
            }
        if _unset("TSUNAGU_AUTH_CORS_ORIGINS"):
            gateway = _base_url("ws-gateway", host)
            if gateway_port is not None:
                gateway = gateway.rsplit(":", 1)[0] + f":{gateway_port}"
            port = gateway.rsplit(":", 1)[1]
            defaults["cors_origins"] = sorted({gateway, f"http://127.0.0.1:{port}", f"http://localhost:{port}"})
        # The operator console reaches the gateway's server API (channel inspector) and audit-log's chain.
        if _unset("TSUNAGU_AUTH_GATEWAY_API_URL"):
            gateway = _base_url("ws-gateway", host)
            if gateway_port is not None:
                gateway = gateway.rsplit(":", 1)[0] + f":{gateway_port}"
            defaults["gateway_api_url"] = gateway
        if _unset("TSUNAGU_AUTH_GATEWAY_API_KEY", "TSUNAGU_GATEWAY_API_KEY"):
            defaults["gateway_api_key"] = DEVELOPMENT_API_KEY  # the gateway's development key
        if _unset("TSUNAGU_AUTH_AUDIT_URL"):
            defaults["audit_url"] = _base_url("audit-log", host)
    elif service == "stream-ingest":
        if _unset("TSUNAGU_INGEST_MAPPINGS", "TSUNAGU_INGEST_DEMO_FEED"):
            defaults["demo_feed"] = True
    elif service == "mqtt-bridge" and _unset("TSUNAGU_MQTT_URL"):
        # The embedded broker (rumqttd) disconnects a client that acknowledges out of order: keep the bridge's
        # default (in order, as MQTT requires) even if the operator's environment relaxed it.
        defaults["ack_in_order"] = True
        # One bridge there: no shared subscription, which replicas need and rumqttd mishandles (its
        # router panics when a persistent session in a share group disconnects).
        if _unset("TSUNAGU_MQTT_BRIDGE_SHARE_GROUP"):
            defaults["share_group"] = ""
    elif service == "sim-engine" and _unset("TSUNAGU_SIM_ROOMS"):
        defaults["rooms"] = [DEMO_ROOM]
    return defaults


def development_core_defaults() -> dict[str, Any]:
    """The shared settings `tsunagu run` adds: the internal APIs' token, which the gateway then sends."""
    if _unset("TSUNAGU_INTERNAL_TOKEN", "TSUNAGU_INTERNAL_PEERS"):
        return {"internal_token": DEVELOPMENT_INTERNAL_TOKEN}
    return {}


def refuse_development_secrets(core: Any, settings: Any, service: str) -> None:
    """TSUNAGU_ENV=production: a setting holding one of the public development secrets stops the start."""
    from tsunagu_core.config import ConfigError
    from tsunagu_core.deployment import development_secrets_in

    if core.env != "production":
        return
    found = development_secrets_in(core, DEVELOPMENT_SECRETS) + development_secrets_in(settings, DEVELOPMENT_SECRETS)
    if found:
        raise ConfigError(
            f"{service}: TSUNAGU_ENV=production with the public development secret in {', '.join(found)}:"
            " configure real secrets"
        )


def refuse_exposed_secrets(exposed: dict[str, str], hosts: dict[str, str]) -> None:
    """`tsunagu run` beyond loopback with development secrets in use (hosts: service -> listen address)."""
    from tsunagu_core.config import ConfigError
    from tsunagu_core.deployment import is_loopback

    public = sorted({host for host in hosts.values() if not is_loopback(host)})
    if exposed and public:
        raise ConfigError(
            f"tsunagu run on {', '.join(public)} would serve the public development secrets of"
            f" {', '.join(sorted(set(exposed.values())))} to the network: configure real ones, listen on"
            " 127.0.0.1, or pass --expose-development-secrets"
        )


def _development_credentials(host: str | None) -> list[str]:
    """The banner's lines on the development secrets in effect, each with the variable that replaces it."""
    gateway, auth = development_defaults("ws-gateway", host), development_defaults("auth", host)
    lines = []
    if "token_hmac_secret" in gateway:
        lines.append(
            "    tokens:      uv run tsunagu token --user alice --channels 'chat:*'"
            "  (set TSUNAGU_GATEWAY_TOKEN_HMAC_SECRET)"
        )
    if "api_key" in gateway:
        lines.append(f"    server API:  X-API-Key: {DEVELOPMENT_API_KEY}  (set TSUNAGU_GATEWAY_API_KEY)")
    if "admin_api_key" in auth:
        lines.append(f"    auth admin:  X-API-Key: {DEVELOPMENT_API_KEY}  (set TSUNAGU_AUTH_ADMIN_API_KEY)")
    if development_core_defaults():
        lines.append(
            f"    internal APIs: Authorization: Bearer {DEVELOPMENT_INTERNAL_TOKEN}  (set TSUNAGU_INTERNAL_TOKEN)"
        )
    return lines


def cmd_run(args: argparse.Namespace) -> int:

    from tsunagu_core.config import CoreSettings, load_settings
    from tsunagu_core.lifecycle import Runtime
    from tsunagu_core.telemetry import setup_logging, setup_tracing
    from tsunagu_core.tls import ServerTls

    from tsunagu.embedded_mqtt import EmbeddedMqttBroker, RunSettings, mqtt_url_configured
    from tsunagu.serving import EmbeddedServer, event_loop, metrics_server, run_loop, uvicorn_config

    # No TSUNAGU_MQTT_URL: run mode brings its own MQTT broker and a demo device, as it brings its
    # in-process bus, so the IoT half of the demo works with no server installed.
    mqtt: EmbeddedMqttBroker | None = None
    if not mqtt_url_configured():
        mqtt = EmbeddedMqttBroker(args.host or "127.0.0.1", load_settings(RunSettings).mqtt_port)
    core_defaults = development_core_defaults()
    core = load_settings(CoreSettings, **core_defaults, **({"mqtt_url": mqtt.url} if mqtt is not None else {}))
    chosen = {}
    exposed = {"internal_token": "TSUNAGU_INTERNAL_TOKEN"} if core_defaults else {}
    if mqtt is not None:  # the embedded broker takes any client: devices and commands for anyone
        exposed["embedded_mqtt"] = "TSUNAGU_MQTT_URL"
    hosts = {}
    for entry in SERVICES.values():
        defaults = development_defaults(entry.name, args.host, args.port)
        settings = load_settings(entry.settings, **defaults)
        refuse_development_secrets(core, settings, entry.name)
        exposed |= {key: variable for key, variable in SECRET_DEFAULTS.get(entry.name, {}).items() if key in defaults}
        hosts[entry.name] = args.host or settings.host
        chosen[entry.name] = settings
    if not args.expose_development_secrets:
        refuse_exposed_secrets(exposed, hosts)
    setup_logging(core, "tsunagu")
    setup_tracing(core, "tsunagu")
    runtime = Runtime(core)
    server_tls = ServerTls.from_settings(core)
    scheme = "https" if server_tls is not None else "http"
    servers = []
    print(f"tsunagu run: bus={core.bus} broker={core.broker} database={core.database} loop={event_loop(core)}")
    probes = "/healthz /readyz" if core.metrics_port else "/healthz /readyz /metrics"
    for entry in SERVICES.values():
        settings = chosen[entry.name]
        port = args.port if entry.name == "ws-gateway" and args.port else settings.port
        host = hosts[entry.name]
        app = entry.factory(runtime, settings)
        servers.append(EmbeddedServer(uvicorn_config(app, host, port, core, server_tls), entry.name))
        print(f"  {entry.name:<14} {scheme}://{host}:{port}/  ({probes})")
    if core.metrics_port:
        # One registry per process: one listener has the metrics of every embedded service.
        servers.append(metrics_server(core, args.host or "127.0.0.1", server_tls))
        print(f"  {'metrics':<14} {scheme}://{args.host or '127.0.0.1'}:{core.metrics_port}/metrics")
    if mqtt is not None:
        from tsunagu.demo_device import COMMAND_TOPIC, DEVICE, TELEMETRY_TOPIC

        print(f"  {'mqtt broker':<14} {mqtt.url}  (embedded, MQTT 5; set TSUNAGU_MQTT_URL to use your own)")
        if mqtt.displaced:
            print(
                f"                 (port {mqtt.wanted} is taken, by another broker? To use that one:"
                f" TSUNAGU_MQTT_URL=mqtt://{mqtt.host}:{mqtt.wanted})"
            )
        print(f"  {'demo device':<14} {DEVICE}: telemetry on {TELEMETRY_TOPIC}, commands on {COMMAND_TOPIC}")
        rover = _demo_rover(args, server_tls is not None)
        if rover is not None:
            from tsunagu.demo_device import ROVER

            print(f"  {'demo rover':<14} {ROVER}: the web app's Device view (WebRTC data channel, MQTT fallback)")
    else:
        print(f"  {'mqtt broker':<14} {core.mqtt_url}  (TSUNAGU_MQTT_URL)")
    gateway_url = _base_url("ws-gateway", args.host)
    if args.port:
        gateway_url = gateway_url.rsplit(":", 1)[0] + f":{args.port}"
    print(f"  the demo web app: {gateway_url}/  (log in as alice or bob)")
    credentials = _development_credentials(args.host)
    if credentials:
        print("  development credentials, never for production:")
        print("\n".join(credentials))
    if "bootstrap_users" in development_defaults("auth"):
        users = ", ".join(f"{user!r} (password {password!r})" for user, password in DEVELOPMENT_USERS.items())
        print(f"  development users {users}; an auth-issued token:")
        print(f"    uv run tsunagu token --user {DEVELOPMENT_USER} --auth-url {_auth_base_url(args.host)}")
        print(
            f"  the operator console: {gateway_url}/console  (admin {DEVELOPMENT_ADMIN!r}, password"
            f" {DEVELOPMENT_ADMIN_PASSWORD!r}, TOTP secret {DEVELOPMENT_ADMIN_TOTP_SECRET} for an authenticator app)"
        )
    sys.stdout.flush()
    rover = _demo_rover(args, server_tls is not None) if mqtt is not None else None
    return run_loop(
        event_loop(core), _serve_run_mode(servers, server_tls, core.server_tls_reload_interval, mqtt, rover)
    )


def _demo_rover(args: argparse.Namespace, tls: bool) -> dict[str, str] | None:
    """How run mode's demo rover reaches the gateway (its URL and token), or None where it cannot: without
    aiortc (the `device-agent` extra), under TLS, or when the gateway verifies tokens run mode cannot sign."""
    import importlib.util

    if tls or importlib.util.find_spec("aiortc") is None:
        return None
    secret = os.environ.get("TSUNAGU_GATEWAY_TOKEN_HMAC_SECRET") or (
        DEVELOPMENT_TOKEN_SECRET if _unset("TSUNAGU_GATEWAY_TOKEN_PUBLIC_KEY") else ""
    )
    if not secret:
        return None
    from tsunagu.demo_device import ROVER

    port = args.port or int(_base_url("ws-gateway", args.host).rsplit(":", 1)[1])
    host = args.host if args.host not in (None, "0.0.0.0", "::") else "127.0.0.1"
    # Long-lived: a demo device that stays connected for as long as run mode runs.
    token = hs256_token({"sub": ROVER, "iat": int(time.time()), "exp": int(time.time()) + 30 * 86400}, secret)
    return {"gateway": f"ws://{host}:{port}/connection/websocket", "token": token}


async def _serve_run_mode(
    servers: list[EmbeddedServer],
    server_tls: ServerTls | None,
    reload: float,
    mqtt: EmbeddedMqttBroker | None,
    rover: dict[str, str] | None = None,
) -> int:
    """The services, and with an embedded broker the broker and the demo devices beside them."""
    import asyncio
    import contextlib

    from tsunagu.serving import serve_all

    if mqtt is None:
        return await serve_all(servers, server_tls, reload)
    from tsunagu.demo_device import DemoDevice

    async def broker_and_device() -> None:
        try:
            await asyncio.to_thread(mqtt.start)
        except (OSError, RuntimeError) as exc:
            print(f"tsunagu run: the embedded MQTT broker did not start: {exc}", file=sys.stderr)
            return
        devices = [DemoDevice(mqtt.host, mqtt.port).run()]
        if rover is not None:
            from tsunagu.demo_device import run_demo_rover

            devices.append(run_demo_rover(rover["gateway"], rover["token"], mqtt.url, list(DEVELOPMENT_USERS)))
        results = await asyncio.gather(*devices, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                print(f"tsunagu run: a demo device stopped: {result!r}", file=sys.stderr)

    side = asyncio.create_task(broker_and_device(), name="tsunagu-run-mqtt")
    try:
        return await serve_all(servers, server_tls, reload)
    finally:
        side.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await side
        await asyncio.to_thread(mqtt.stop)


def _listen_early(
    entry: ServiceEntry, host: str | None, port: int | None, reuse_port: bool = False
) -> socket.socket | None:
    """The service's listening socket, opened before the service is imported (seconds of Python imports).
    A client that reconnects to a restarting process meanwhile waits in the listen backlog and is served
    once the app is up, instead of being refused and backing off further each time (as the SDKs do).
    None when the address cannot be told yet (a malformed variable: the settings then say what is wrong).
    `reuse_port`: SO_REUSEPORT, for a worker sharing the port with its siblings (workers.py)."""
    import socket

    try:
        chosen_port = port or int(os.environ.get(f"{entry.env_prefix}PORT") or entry.port)
    except ValueError:
        return None
    if not 0 < chosen_port < 65536:
        return None
    chosen_host = host or os.environ.get(f"{entry.env_prefix}HOST") or "127.0.0.1"
    family = socket.AF_INET6 if ":" in chosen_host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        listener.bind((chosen_host, chosen_port))
    except OSError as exc:
        listener.close()
        raise SystemExit(f"tsunagu serve {entry.name}: cannot listen on {chosen_host}:{chosen_port}: {exc}") from None
    listener.listen(LISTEN_BACKLOG)
    return listener


def _worker_count(args: argparse.Namespace) -> int:
    """`--workers`, else TSUNAGU_GATEWAY_WORKERS (read raw: the supervisor imports no service)."""
    from tsunagu.workers import parse_workers

    if args.workers is not None:
        if args.service != "ws-gateway":
            print(f"tsunagu serve {args.service}: --workers is for ws-gateway", file=sys.stderr)
            raise SystemExit(2)
        return parse_workers(args.workers, "--workers")
    if args.service != "ws-gateway":
        return 1
    return parse_workers(os.environ.get("TSUNAGU_GATEWAY_WORKERS") or "1", "TSUNAGU_GATEWAY_WORKERS")


def cmd_serve(args: argparse.Namespace) -> int:
    from tsunagu_core.workers import SLOT_ENV

    entry = SERVICES[args.service]
    worker = bool(os.environ.get(SLOT_ENV))
    listen_late = False
    if not worker:
        count = _worker_count(args)
        if count > 1:
            from tsunagu.workers import supervise

            host = args.host or os.environ.get(f"{entry.env_prefix}HOST") or "127.0.0.1"
            try:
                port = args.port or int(os.environ.get(f"{entry.env_prefix}PORT") or entry.port)
            except ValueError:
                port = entry.port  # a worker's settings will say what is wrong
            return supervise(entry.name, host, port, count, [])
    else:
        from tsunagu.workers import RESTART_ENV, set_parent_death_signal

        set_parent_death_signal()
        # A restarted worker listens once it is built: its siblings serve meanwhile.
        listen_late = bool(os.environ.get(RESTART_ENV))
    listener = None if listen_late else _listen_early(entry, args.host, args.port, reuse_port=worker)

    from tsunagu_core.config import CoreSettings, load_settings
    from tsunagu_core.lifecycle import Runtime
    from tsunagu_core.telemetry import setup_logging, setup_tracing
    from tsunagu_core.tls import ServerTls

    from tsunagu.serving import EmbeddedServer, event_loop, metrics_server, run_loop, serve_all, uvicorn_config

    core = load_settings(CoreSettings)
    settings = load_settings(entry.settings)
    refuse_development_secrets(core, settings, entry.name)
    setup_logging(core, entry.name)
    setup_tracing(core, entry.name)
    port = args.port or settings.port
    host = args.host or settings.host
    server_tls = ServerTls.from_settings(core)
    app = entry.factory(Runtime(core), settings)
    scheme = "https" if server_tls is not None else "http"
    loop = event_loop(core, entry.event_loop)
    engines = f"bus={core.bus} broker={core.broker} loop={loop}"
    print(f"tsunagu serve {entry.name}: {scheme}://{host}:{port}/ ({engines})")
    sys.stdout.flush()
    server = EmbeddedServer(uvicorn_config(app, host, port, core, server_tls), entry.name)
    if listener is not None and listener.getsockname()[1] != port:  # the settings chose otherwise after all
        listener.close()
        listener = None
    if listener is None and worker:
        listener = _listen_early(entry, host, port, reuse_port=True)
    server.listener = listener
    servers = [server]
    if core.metrics_port:
        # The workers share the metrics port too; whichever answers a scrape answers for all.
        metrics_listener = _listen_early(entry, host, core.metrics_port, reuse_port=True) if worker else None
        servers.append(metrics_server(core, host, server_tls, metrics_listener))
        print(f"  /metrics on {scheme}://{host}:{core.metrics_port}/metrics", flush=True)
    return run_loop(loop, serve_all(servers, server_tls, core.server_tls_reload_interval))


def config_docs_text() -> str:
    from tsunagu_core.config import CoreSettings, render_config_docs

    classes: list[tuple[str, type[BaseSettings]]] = [("Shared by every service", CoreSettings)]
    classes += [(entry.name, entry.settings) for entry in SERVICES.values()]
    from tsunagu.embedded_mqtt import RunSettings
    from tsunagu.stack.settings import StackSettings

    classes.append(("Run mode (`tsunagu run`)", RunSettings))
    classes.append(("Local infrastructure (`tsunagu stack`)", StackSettings))
    return render_config_docs(classes)


def cmd_config_docs(args: argparse.Namespace) -> int:
    text = config_docs_text()
    from pathlib import Path

    target = Path(args.output)
    if args.check:
        current = target.read_text() if target.exists() else ""
        if current != text:
            print(f"{target} is out of date: run `tsunagu config-docs`", file=sys.stderr)
            return 1
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    print(f"wrote {target}")
    return 0


def _b64url(raw: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def hs256_token(claims: dict[str, Any], secret: str) -> str:
    """A compact HS256 JWT (RFC 7519). Written out here rather than through pyjwt, whose import (it loads
    `cryptography`) would make `tsunagu token` ten times slower to start; the services verify with pyjwt."""
    import hashlib
    import hmac
    import json

    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    payload = _b64url(json.dumps(claims, separators=(",", ":")).encode())
    signing_input = f"{header}.{payload}".encode()
    signature = hmac.new(secret.encode(), signing_input, hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64url(signature)}"


def cmd_token(args: argparse.Namespace) -> int:
    """A development connection token: signed with the gateway's HS256 dev secret, or, with
    `--auth-url`, a real one from a running auth (password grant)."""
    if args.auth_url:
        return _token_from_auth(args)
    secret = os.environ.get("TSUNAGU_GATEWAY_TOKEN_HMAC_SECRET") or DEVELOPMENT_TOKEN_SECRET
    now = int(time.time())
    claims: dict[str, object] = {"sub": args.user, "iat": now, "exp": now + args.ttl}
    if args.channels:
        claims["channels"] = args.channels
    if args.subs:
        claims["subs"] = args.subs
    print(hs256_token(claims, secret))
    return 0


def _password_for(args: argparse.Namespace) -> str | None:
    """--password, $TSUNAGU_TOKEN_PASSWORD, a development user's own password, or a prompt on a terminal."""
    password: str | None = args.password or os.environ.get("TSUNAGU_TOKEN_PASSWORD")
    if password is None and args.user in DEVELOPMENT_USERS:
        print(f"tsunagu token: using the development password of {args.user}", file=sys.stderr)
        password = DEVELOPMENT_USERS[args.user]
    if password is None and sys.stdin.isatty():
        import getpass

        password = getpass.getpass(f"password of {args.user}: ")
    return password


def _token_from_auth(args: argparse.Namespace) -> int:
    # urllib rather than httpx: one request does not justify httpx's import time in a CLI.
    import json
    import urllib.error
    import urllib.request

    password = _password_for(args)
    if password is None:
        print(
            f"tsunagu token: no password for {args.user}: pass --password or set TSUNAGU_TOKEN_PASSWORD"
            " (standard input is not a terminal, so there is no prompt)",
            file=sys.stderr,
        )
        return 2
    if args.channels or args.subs:
        print(
            "tsunagu token: --channels/--subs are ignored with --auth-url (auth grants the user's own)", file=sys.stderr
        )
    body = json.dumps({"grant_type": "password", "username": args.user, "password": password}).encode()
    request = urllib.request.Request(
        args.auth_url.rstrip("/") + "/v1/token", data=body, headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        print(f"tsunagu token: auth answered {exc.code}: {detail}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"tsunagu token: {args.auth_url} not reachable: {exc}", file=sys.stderr)
        return 1
    print(answer["access_token"])
    return 0


def cmd_device_agent(args: argparse.Namespace) -> int:
    import asyncio

    try:
        import aiortc  # noqa: F401  (checked here, for a clear message)

        from tsunagu.device_agent import run_agent
    except ImportError:
        print("tsunagu device-agent needs aiortc: pip install 'tsunagu[device-agent]'", file=sys.stderr)
        return 2
    try:
        asyncio.run(run_agent(args))
    except KeyboardInterrupt:
        return 130
    return 0


def cmd_stack(args: argparse.Namespace) -> int:
    from tsunagu.stack import cli as stack_cli

    return stack_cli.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tsunagu", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="all services in one process with embedded engines")
    run.add_argument("--host", default=None, help="interface for every service (default 127.0.0.1)")
    run.add_argument("--port", type=int, default=None, help="gateway port (default 8080)")
    run.add_argument(
        "--expose-development-secrets",
        action="store_true",
        help="allow a non-loopback --host although the public development secrets are in use (a trusted LAN only)",
    )
    run.set_defaults(func=cmd_run)

    serve = commands.add_parser("serve", help="one service as its own process")
    serve.add_argument("service", choices=list(SERVICES), metavar="SERVICE", help=" | ".join(SERVICES))
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument(
        "--workers",
        default=None,
        help="ws-gateway: processes sharing the port (SO_REUSEPORT), N, or 0/auto for one per CPU of the"
        " cgroup limit (default: $TSUNAGU_GATEWAY_WORKERS or 1; more than 1 needs TSUNAGU_BROKER=redis)",
    )
    serve.set_defaults(func=cmd_serve)

    from tsunagu.stack import cli as stack_cli  # argparse only: the stack itself loads when it runs

    stack = commands.add_parser(
        "stack",
        help="the real local infrastructure on loopback",
        description=stack_cli.DESCRIPTION,
        epilog=stack_cli.EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    stack_cli.add_arguments(stack)
    stack.set_defaults(func=cmd_stack)

    token = commands.add_parser("token", help="a development connection token for the gateway")
    token.add_argument("--user", required=True, help="user id (the `sub` claim)")
    # `--channels a b`, `--channels a --channels b` and both mixed all grant every pattern given.
    token.add_argument(
        "--channels",
        nargs="+",
        action="extend",
        default=[],
        metavar="PATTERN",
        help="channel patterns the user may use, e.g. 'chat:*' (several after one flag, or the flag repeated)",
    )
    token.add_argument(
        "--subs",
        nargs="+",
        action="extend",
        default=[],
        metavar="CHANNEL",
        help="channels to subscribe on the server side",
    )
    token.add_argument("--ttl", type=int, default=3600, help="seconds until the token expires")
    token.add_argument("--auth-url", default=None, help="get a real token from auth at this URL (password grant)")
    token.add_argument(
        "--password", default=None, help="with --auth-url (default: $TSUNAGU_TOKEN_PASSWORD or a prompt)"
    )
    token.set_defaults(func=cmd_token)

    agent = commands.add_parser(
        "device-agent",
        help="a device's end of WebRTC control: commands over a data channel, MQTT as the fallback (aiortc)",
    )
    agent.add_argument(
        "--gateway", required=True, help="the gateway's native endpoint, ws://host:8080/connection/websocket"
    )
    agent.add_argument("--token", required=True, help="a connection token of the device's user")
    agent.add_argument("--device", required=True, help="the device's user id (its name in the signaling channel)")
    agent.add_argument("--operators", required=True, help="comma-separated users whose calls it answers")
    agent.add_argument("--mqtt", default="mqtt://127.0.0.1:1883", help="the MQTT broker of the fallback path")
    agent.add_argument("--command-topic", required=True, help="the device's MQTT command topic")
    agent.add_argument("--ack-topic", default="", help="an MQTT topic to acknowledge commands that came over MQTT on")
    agent.add_argument(
        "--telemetry-topic", default="", help="an MQTT topic for telemetry samples (besides the data channels)"
    )
    agent.add_argument(
        "--telemetry-every", type=float, default=0.1, help="seconds between samples on the data channels (0: none)"
    )
    agent.add_argument(
        "--telemetry-mqtt-every", type=float, default=1.0, help="seconds between the samples also sent over MQTT"
    )
    agent.set_defaults(func=cmd_device_agent)

    docs = commands.add_parser("config-docs", help="write docs/configuration.md from the settings classes")
    docs.add_argument("--check", action="store_true", help="fail when the file is not current")
    docs.add_argument("--output", default=CONFIG_DOCS)
    docs.set_defaults(func=cmd_config_docs)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except Exception as exc:
        # Only a command that loaded the configuration can raise ConfigError, so it is imported by then.
        config = sys.modules.get("tsunagu_core.config")
        if config is None or not isinstance(exc, config.ConfigError):
            raise
        print(f"tsunagu: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    raise SystemExit(code)
