"""Attacks on sim-engine's rooms API: creating, deleting and reading rooms without the platform's
credential are refused and change nothing; an oversized room spec gets 413; the service stays up."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient
from tsunagu_core.config import ConfigError, CoreSettings
from tsunagu_core.lifecycle import Runtime
from tsunagu_sim_engine.app import create_app
from tsunagu_sim_engine.config import SimSettings

TOKEN = "sim-internal-token"
PLATFORM = {"authorization": f"Bearer {TOKEN}"}


def test_rooms_cannot_be_created_deleted_or_read_without_the_credential() -> None:
    settings = SimSettings(rooms=[{"room": "world", "kind": "avatar", "tick_hz": 10}])
    with TestClient(create_app(Runtime(CoreSettings(internal_token=TOKEN)), settings)) as client:
        deadline = time.monotonic() + 5
        while client.get("/v1/rooms/world", headers=PLATFORM).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        for headers in ({}, {"authorization": "Bearer guessed"}):
            assert client.delete("/v1/rooms/world", headers=headers).status_code == 401
            created = client.post("/v1/rooms", json={"room": "mine", "kind": "avatar"}, headers=headers)
            assert created.status_code == 401
            assert client.get("/v1/rooms", headers=headers).status_code == 401
            assert client.get("/v1/rooms/world/state", headers=headers).status_code == 401
        rooms = client.get("/v1/rooms", headers=PLATFORM).json()["rooms"]
        assert [room["room"] for room in rooms] == ["world"], "nothing was created or deleted"
        assert client.get("/readyz").status_code == 200


def test_an_oversized_room_spec_gets_413() -> None:
    core = CoreSettings(internal_token=TOKEN, http_max_body_bytes=4096)
    with TestClient(create_app(Runtime(core), SimSettings())) as client:
        spec = {"room": "big", "kind": "avatar", "params": {"padding": "x" * 100_000}}
        answer = client.post("/v1/rooms", json=spec, headers=PLATFORM)
        assert answer.status_code == 413 and answer.json()["error"] == "payload_too_large"
        assert client.get("/v1/rooms", headers=PLATFORM).json()["rooms"] == []
        assert client.get("/healthz").status_code == 200


def test_production_refuses_an_open_rooms_api() -> None:
    with pytest.raises(ConfigError, match="sim-engine: TSUNAGU_ENV=production"):
        create_app(Runtime(CoreSettings(env="production")), SimSettings())
