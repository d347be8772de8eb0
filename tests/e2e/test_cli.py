"""The `tsunagu` command as a newcomer meets it: fast to start, tokens as asked, clear words when it
cannot do what was asked, and a gateway that says when it can verify no token."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import jwt
from centrifuge import Client, PublicationContext, SubscriptionEventHandler

from tsunagu.cli import DEVELOPMENT_TOKEN_SECRET, DEVELOPMENT_USERS


def tsunagu(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tsunagu", *args],
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,  # no terminal, as in CI or a script
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_help_and_token_load_no_service_and_no_heavy_library() -> None:
    """What keeps `tsunagu --help` and `tsunagu token` as fast as Python starts (bench/cli.py times them)."""
    probe = """
import sys
from tsunagu.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
heavy = ("fastapi", "pydantic", "uvicorn", "jwt", "httpx", "redis", "confluent_kafka", "cryptography")
print(sorted(m for m in sys.modules if m.startswith("tsunagu_") or m.split(".")[0] in heavy))
"""
    for args in (["--help"], ["token", "--user", "ann"]):
        done = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().splitlines()[-1] == "[]", f"tsunagu {' '.join(args)} imported: {done.stdout}"


def test_token_grants_every_pattern_however_the_flag_is_repeated() -> None:
    flags = ["--channels", "chat:*", "news", "--channels", "feed:*", "--subs", "a", "--subs", "b"]
    done = tsunagu("token", "--user", "ann", *flags)
    assert done.returncode == 0, done.stderr
    claims = jwt.decode(done.stdout.strip(), DEVELOPMENT_TOKEN_SECRET, algorithms=["HS256"])
    assert claims["sub"] == "ann"
    assert claims["channels"] == ["chat:*", "news", "feed:*"]
    assert claims["subs"] == ["a", "b"]
    assert claims["exp"] - claims["iat"] == 3600


def test_token_from_auth_without_a_terminal(start_service) -> None:  # type: ignore[no-untyped-def]
    """Both development users get their token with no prompt; another user without a password gets one line."""
    users = {user: {"password": password, "channels": ["chat:*"]} for user, password in DEVELOPMENT_USERS.items()}
    auth = start_service(["serve", "auth"], {"TSUNAGU_AUTH_BOOTSTRAP_USERS": json.dumps(users)})
    auth.wait_ready()
    for user in DEVELOPMENT_USERS:
        done = tsunagu("token", "--user", user, "--auth-url", auth.base)
        assert done.returncode == 0, f"{user}: {done.stderr}"
        assert jwt.decode(done.stdout.strip(), options={"verify_signature": False})["sub"] == user
    done = tsunagu("token", "--user", "carol", "--auth-url", auth.base)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "no password for carol" in done.stderr and "--password" in done.stderr
    wrong = tsunagu("token", "--user", "carol", "--auth-url", auth.base, "--password", "guess")
    assert wrong.returncode == 1 and "auth answered 401" in wrong.stderr


def test_a_gateway_that_can_verify_no_token_says_so_at_start_and_in_readyz(start_service) -> None:  # type: ignore[no-untyped-def]
    env = {f"TSUNAGU_GATEWAY_TOKEN_{key}": "" for key in ("HMAC_SECRET", "PUBLIC_KEY", "JWKS_URL")}
    gateway = start_service(["serve", "ws-gateway"], env)
    body = gateway.wait_ready()
    assert "TSUNAGU_GATEWAY_TOKEN_HMAC_SECRET" in body["warnings"]["tokens"]  # type: ignore[index]
    assert "no key verifies tokens" in gateway.output()


def test_the_service_table_knows_each_service_address_as_its_settings_do() -> None:
    """`tsunagu serve` listens before it imports the service, from the table's prefix and default port."""
    from tsunagu.services import SERVICES

    for entry in SERVICES.values():
        settings = entry.settings
        assert settings.model_config.get("env_prefix") == entry.env_prefix, entry.name
        assert settings.model_fields["port"].default == entry.port, entry.name


async def test_the_gateway_serves_on_uvloop_by_default(start_service) -> None:  # type: ignore[no-untyped-def]
    """TSUNAGU_EVENT_LOOP=auto: `tsunagu serve ws-gateway` runs on uvloop, its prepared frames written by
    libuv's transports, and stock SDK clients get every publication in order (the unit tests run the same
    code on the standard library's loop)."""
    secret = "e2e-uvloop-secret-that-is-long-enough"
    env = {"TSUNAGU_GATEWAY_TOKEN_HMAC_SECRET": secret}
    gateway = start_service(["serve", "ws-gateway"], env)
    await asyncio.to_thread(gateway.wait_ready)
    assert "loop=uvloop" in gateway.output()
    url = f"ws://127.0.0.1:{gateway.port}/connection/websocket"
    claims = {"channels": ["chat:*"], "exp": int(time.time()) + 600}
    tokens = [jwt.encode({"sub": user, **claims}, secret, "HS256") for user in ("ann", "bob")]
    clients = [Client(url, token=value) for value in tokens]
    inboxes: list[list[int]] = [[], []]

    class Inbox(SubscriptionEventHandler):
        def __init__(self, inbox: list[int]) -> None:
            self.inbox = inbox

        async def on_publication(self, ctx: PublicationContext) -> None:
            self.inbox.append(ctx.pub.data["n"])

    subscriptions = []
    for client, inbox in zip(clients, inboxes, strict=True):
        await client.connect()
        subscription = client.new_subscription("chat:uvloop", events=Inbox(inbox))
        await subscription.subscribe()
        subscriptions.append(subscription)
    for n in range(50):
        await subscriptions[n % 2].publish({"n": n})
    async with asyncio.timeout(10):
        while any(len(inbox) < 50 for inbox in inboxes):
            await asyncio.sleep(0.02)
    assert inboxes == [list(range(50)), list(range(50))]
    for client in clients:
        await client.disconnect()
    assert await asyncio.to_thread(gateway.stop) == 0
