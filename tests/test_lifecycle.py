"""The daemon's lifecycle with a real `python -m daemon` process: `POST /shutdown` stops it like Ctrl+C (answer
first, then the trainer tree killed, the job recorded as interrupted, exit 0, port freed), only with the token;
`/health` names the instance so the ED server plugin can tell its own daemon from a leftover."""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import time
from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestClient, TestServer

from daemon.config import Config
from daemon.instance_id import instance_id
from daemon.web.api import SHUTDOWN, Shutdown
from daemon.web.app import create_app
from tests import test_crash_recovery as crash
from tests.conftest import no_gpu, train_form
from tests.helpers import REPO, TOKEN
from tests.test_crash_recovery import SLOW, Site, alive, describe, outside_session, wait_for_tree

site = crash.site  # the fixture: one daemon installation under tmp_path, its daemons stopped at teardown

PLUGIN_SRC = REPO / "ed_plugin" / "server" / "character_lora_plugin.py"


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the daemon binds
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def load_plugin() -> object:
    spec = importlib.util.spec_from_file_location("_lifecycle_plugin", PLUGIN_SRC)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_shutdown_needs_the_token_then_stops_training_and_exits_0(site: Site) -> None:
    daemon = await site.start(SLOW)
    job_id = await site.submit(train_form(8, params='{"epochs": 4}'))
    await site.wait_for(job_id, {"training"})
    tree = await wait_for_tree(site, daemon, 2)  # the trainer and the grandchild it started
    trainer = outside_session(tree, daemon)
    assert len(trainer) >= 2

    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"Authorization": "Bearer not-the-token-at-all"}):
            async with http.post(f"{daemon.url}/shutdown", headers=headers) as resp:
                assert resp.status == 401, await resp.text()
                assert "token" in (await resp.json())["error"]
        await asyncio.sleep(0.3)
        assert daemon.proc.poll() is None
        assert (await site.job(job_id))["state"] == "training"

        async with http.post(f"{daemon.url}/shutdown", headers=site.headers) as resp:
            assert resp.status == 202
            assert await resp.json() == {"stopping": True}
    started = time.monotonic()
    assert await asyncio.to_thread(daemon.proc.wait, 15) == 0, daemon.output()
    assert time.monotonic() - started < 10, "graceful shutdown took too long"
    assert port_free(site.config.port)
    created = dict(tree)
    assert [describe(pid) for pid in trainer if alive(pid, created[pid])] == []  # killed before the exit
    # prep's worker processes (and their fork server) end by themselves once the daemon is gone
    end = time.monotonic() + 5
    while (left := [pid for pid, at in tree if alive(pid, at)]) and time.monotonic() < end:
        await asyncio.sleep(0.1)
    assert left == [], [describe(pid) for pid in left]
    assert site.db_state(job_id) == "interrupted"
    assert "Character LoRA daemon stopped." in daemon.output()
    assert "Traceback" not in daemon.output()

    # the next start finds the job interrupted with its reason, and serves again
    await site.start(SLOW)
    job = await site.job(job_id)
    assert job["state"] == "interrupted" and job["error"]["kind"] == "interrupted"


async def test_health_names_the_instance_as_the_server_plugin_computes_it(site: Site, tmp_path: Path) -> None:
    daemon = await site.start(SLOW)
    async with aiohttp.ClientSession() as http, http.get(f"{daemon.url}/health") as resp:
        body = await resp.json()
    assert body["pid"] == daemon.proc.pid
    assert body["config"] == str(site.config_path)
    assert body["instance"] == instance_id(site.config_path, site.config.data_dir)
    plugin = load_plugin()
    assert plugin.expected_instance(str(site.config_path)) == body["instance"]  # type: ignore[attr-defined]
    # reached through a symlink, the config is the same file: the same instance
    link = tmp_path / "link.yaml"
    link.symlink_to(site.config_path)
    assert plugin.expected_instance(str(link)) == body["instance"]  # type: ignore[attr-defined]
    assert plugin.expected_instance(str(tmp_path / "other.yaml")) != body["instance"]  # type: ignore[attr-defined]


async def test_shutdown_with_the_token_from_a_page_of_an_allowed_origin_gets_cors(site: Site) -> None:
    """The tab calls the daemon from ED's page: the 202 must be readable there (CORS), not only acted upon."""
    daemon = await site.start(SLOW)
    origin = "http://localhost:9000"
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{daemon.url}/shutdown", headers={"Origin": "http://evil.example", **site.headers}) as r:
            assert r.status == 403
        assert daemon.proc.poll() is None
        async with http.post(f"{daemon.url}/shutdown", headers={"Origin": origin, **site.headers}) as resp:
            assert resp.status == 202
            assert resp.headers["Access-Control-Allow-Origin"] == origin
    assert await asyncio.to_thread(daemon.proc.wait, 15) == 0


async def test_a_second_shutdown_while_stopping_changes_nothing(config: Config) -> None:
    """In-process, with the stop itself recorded instead of ending the test's event loop."""
    stops: list[float] = []
    app = create_app(config, gpu_probe=no_gpu)
    app[SHUTDOWN] = Shutdown(stop=lambda: stops.append(time.monotonic()))
    client = TestClient(TestServer(app, host="127.0.0.1", port=config.port))
    await client.start_server()
    try:
        resp = await client.post("/shutdown")
        assert resp.status == 401
        await asyncio.sleep(0.05)
        assert stops == []
        for _ in range(3):
            resp = await client.post("/shutdown", headers={"Authorization": f"Bearer {TOKEN}"})
            assert resp.status == 202 and await resp.json() == {"stopping": True}
        await asyncio.sleep(0.05)
        assert len(stops) == 1
    finally:
        await client.close()


async def test_shutdown_asked_twice_at_once_still_exits_0_cleanly(site: Site) -> None:
    daemon = await site.start(SLOW)
    job_id = await site.submit(train_form(8, params='{"epochs": 4}'))
    await site.wait_for(job_id, {"training"})

    async def ask() -> int | None:
        try:
            async with aiohttp.ClientSession() as http, \
                    http.post(f"{daemon.url}/shutdown", headers=site.headers) as resp:
                return resp.status
        except aiohttp.ClientError:  # the port was already closed: also fine
            return None

    statuses = await asyncio.gather(*(ask() for _ in range(4)))
    assert 202 in statuses and set(statuses) <= {202, None}
    assert await asyncio.to_thread(daemon.proc.wait, 15) == 0, daemon.output()
    assert "Traceback" not in daemon.output()
    assert site.db_state(job_id) == "interrupted"
