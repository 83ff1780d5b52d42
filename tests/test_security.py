"""Who may talk to the daemon: token, Host (DNS rebinding), Origin and CORS, on HTTP and the WebSocket."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from daemon.config import Config
from tests.conftest import train_form
from tests.helpers import TOKEN

ED = "http://localhost:9000"


async def test_every_call_but_health_needs_the_token(client: TestClient) -> None:
    no_auth = {"Authorization": ""}
    for method, path in [("GET", "/jobs"), ("POST", "/config/test"), ("GET", "/models"), ("GET", "/presets"),
                         ("POST", "/jobs/x/cancel"), ("DELETE", "/jobs/x"), ("GET", "/jobs/x/status")]:
        resp = await client.request(method, path, headers=no_auth)
        assert resp.status == 401, (method, path)
        assert "token" in (await resp.json())["error"]
    resp = await client.get("/jobs", headers={"Authorization": "Bearer wrong-token-xxxxxxxxxxxx"})
    assert resp.status == 401


async def test_train_without_token_stores_nothing(client: TestClient, config: Config) -> None:
    resp = await client.post("/train", data=train_form(8), headers={"Authorization": ""})
    assert resp.status == 401
    tmp = config.data_dir / "tmp"
    assert not tmp.exists() or list(tmp.iterdir()) == []


@pytest.mark.parametrize("host", ["evil.example:9131", "attacker.test", "192.168.1.5:{port}"])
async def test_foreign_host_header_is_forbidden(client: TestClient, config: Config, host: str) -> None:
    resp = await client.get("/health", headers={"Host": host.format(port=config.port)})
    assert resp.status == 403
    assert "Host" in (await resp.json())["error"]


async def test_localhost_host_forms_are_accepted(client: TestClient, config: Config) -> None:
    for host in (f"localhost:{config.port}", f"127.0.0.1:{config.port}"):
        assert (await client.get("/health", headers={"Host": host})).status == 200


async def test_cors_answers_only_ed_origins(client: TestClient) -> None:
    resp = await client.get("/jobs", headers={"Origin": ED})
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Origin"] == ED
    resp = await client.get("/jobs", headers={"Origin": "http://evil.example"})
    assert resp.status == 403
    assert "Access-Control-Allow-Origin" not in resp.headers


async def test_preflight_needs_no_token_and_allows_auth_header(client: TestClient) -> None:
    resp = await client.options("/train", headers={
        "Authorization": "", "Origin": "http://127.0.0.1:9000",
        "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization",
        "Access-Control-Request-Private-Network": "true",
    })
    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Origin"] == "http://127.0.0.1:9000"
    assert "Authorization" in resp.headers["Access-Control-Allow-Headers"]
    assert "POST" in resp.headers["Access-Control-Allow-Methods"]
    assert resp.headers["Access-Control-Allow-Private-Network"] == "true"


async def test_errors_carry_cors_so_the_page_can_read_them(client: TestClient) -> None:
    resp = await client.get("/jobs/missing/status", headers={"Origin": ED})
    assert resp.status == 404
    assert resp.headers["Access-Control-Allow-Origin"] == ED
    resp = await client.get("/jobs", headers={"Origin": ED, "Authorization": ""})
    assert resp.status == 401
    assert resp.headers["Access-Control-Allow-Origin"] == ED


async def test_websocket_checks_token_and_origin(client: TestClient) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect("/ws", headers={"Authorization": "", "Origin": ED})
    assert info.value.status == 401
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect(f"/ws?token={TOKEN}", headers={"Authorization": "", "Origin": "http://evil.example"})
    assert info.value.status == 403
    ws = await client.ws_connect(f"/ws?token={TOKEN}", headers={"Authorization": "", "Origin": ED})
    assert (await ws.receive_json(timeout=5))["type"] == "snapshot"
    await ws.close()


async def test_token_in_query_is_only_for_the_websocket(client: TestClient) -> None:
    resp = await client.get(f"/jobs?token={TOKEN}", headers={"Authorization": ""})
    assert resp.status == 401
