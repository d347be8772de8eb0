"""Attacks on presence's API: who is online, and who is in a channel, are not told without the
platform's credential; the service stays up."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from tsunagu_core.config import ConfigError, CoreSettings
from tsunagu_core.lifecycle import Runtime
from tsunagu_presence.app import create_app
from tsunagu_presence.config import PresenceSettings

TOKEN = "presence-internal-token"


def test_online_status_and_channel_members_need_the_credential() -> None:
    with TestClient(create_app(Runtime(CoreSettings(internal_token=TOKEN)), PresenceSettings())) as client:
        for path in (
            "/v1/users/alice/online",
            "/v1/channels/chat:ops/presence",
            "/v1/channels/chat:ops/presence-stats",
        ):
            for headers in ({}, {"authorization": "Bearer guessed"}):
                assert client.get(path, headers=headers).status_code == 401, path
            assert client.get(path, headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert client.get("/readyz").status_code == 200


def test_production_refuses_an_open_presence_api() -> None:
    with pytest.raises(ConfigError, match="presence: TSUNAGU_ENV=production"):
        create_app(Runtime(CoreSettings(env="production")), PresenceSettings())
