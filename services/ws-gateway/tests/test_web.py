"""The demo web app's files and the two endpoints it reads."""

from __future__ import annotations

import httpx


async def test_config_names_auth_and_the_demo_channels(gateway) -> None:  # type: ignore[no-untyped-def]
    async with httpx.AsyncClient(base_url=gateway.http_url) as http:
        config = (await http.get("/web/config.json")).json()
    assert config["native_path"] == "/connection/websocket" and config["collab_path"] == "/collab"
    assert config["auth_url"].startswith("http") and config["chat_rooms"]


async def test_a_partial_demo_setting_keeps_the_other_defaults(start_gateway) -> None:  # type: ignore[no-untyped-def]
    async with (
        start_gateway(web_demo={"editor_doc": "handbook"}) as gw,
        httpx.AsyncClient(base_url=gw.http_url) as http,
    ):
        config = (await http.get("/web/config.json")).json()
    assert config["editor_doc"] == "handbook"
    assert config["chat_rooms"] == ["chat:lobby", "chat:random"] and config["world_room"] == "world"


async def test_services_report_down_when_nothing_answers(start_gateway) -> None:  # type: ignore[no-untyped-def]
    async with (
        start_gateway(web_service_urls={"collab": "http://127.0.0.1:9"}) as gw,
        httpx.AsyncClient(base_url=gw.http_url) as http,
    ):
        assert (await http.get("/web/services")).json() == {"collab": {"state": "down"}}


async def test_services_report_up_when_ready(start_gateway, gateway) -> None:  # type: ignore[no-untyped-def]
    async with (
        start_gateway(web_service_urls={"gateway": gateway.http_url}) as gw,
        httpx.AsyncClient(base_url=gw.http_url) as http,
    ):
        assert (await http.get("/web/services")).json() == {"gateway": {"state": "up"}}


async def test_a_service_that_runs_without_its_dependency_says_which_one_is_missing(start_gateway) -> None:  # type: ignore[no-untyped-def]
    """A service whose Redis is unreachable is `waiting` for `broker`, with the reason its /readyz gives."""
    from tsunagu_core.config import CoreSettings
    from tsunagu_core.lifecycle import Runtime, create_service_app
    from tsunagu_core.testing import free_port, serving

    closed = free_port()
    runtime = Runtime(CoreSettings(broker="redis", redis_url=f"redis://127.0.0.1:{closed}/0", dependency_retry_max=0.2))
    port = free_port()
    service = create_service_app(service="collab", runtime=runtime, needs=("broker",))
    async with (
        serving(service, port),
        start_gateway(web_service_urls={"collab": f"http://127.0.0.1:{port}"}) as gw,
        httpx.AsyncClient(base_url=gw.http_url) as http,
    ):
        status = (await http.get("/web/services")).json()["collab"]
    assert status["state"] == "waiting"
    assert set(status["missing"]) == {"broker"}
    assert (
        status["missing"]["broker"].startswith("unreachable: Redis at") and f":{closed}" in status["missing"]["broker"]
    )


async def test_the_app_and_its_client_side_routes_are_served(gateway) -> None:  # type: ignore[no-untyped-def]
    async with httpx.AsyncClient(base_url=gateway.http_url) as http:
        index = await http.get("/")
        assert index.status_code == 200 and "<html" in index.text.lower()
        assert (await http.get("/no-such-file.js")).status_code == 404
        # Routes still win over the fallback.
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.post("/nothing-here")).status_code == 404
