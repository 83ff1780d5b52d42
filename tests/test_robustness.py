"""What must hold when things go wrong: two daemons, slow clients, failing error paths, races, odd values."""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from daemon.config import Config, parse_config
from daemon.events import Event, EventType
from daemon.hub import QUEUE_BYTES, EventHub
from daemon.instance_lock import AlreadyRunning
from daemon.jobs.models import Progress
from daemon.jobs.store import JobStore
from daemon.web.app import create_app
from daemon.web.middlewares import allowed_hosts
from tests.conftest import no_gpu, train_form, wait_for_state
from tests.helpers import REPO, TOKEN, free_port, make_config


async def test_a_second_daemon_on_the_same_data_refuses_to_start(client: TestClient, config: Config,
                                                                monkeypatch) -> None:
    monkeypatch.setenv("KOHYA_DOUBLE_STEP_SECONDS", "0.05")
    job_id = (await (await client.post("/train", data=train_form(8, params='{"epochs": 2}'))).json())["job_id"]
    await wait_for_state(client, job_id, {"training"})
    other = Config(**{**config.__dict__, "port": free_port()})
    server = TestServer(create_app(other, gpu_probe=no_gpu), host="127.0.0.1", port=other.port)
    with pytest.raises(AlreadyRunning):
        await server.start_server()
    await server.close()
    job = await wait_for_state(client, job_id, {"done", "error"})
    assert job["state"] == "done", job["error"]  # the first daemon's job was not touched


def test_cli_says_in_one_line_when_the_port_is_taken(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = tmp_path / "config.yaml"
        cfg.write_text(f"token: {TOKEN}\nport: {port}\ndata_dir: {tmp_path / 'data'}\n")
        done = subprocess.run([sys.executable, "-m", "daemon", "--config", str(cfg)], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "already running" in done.stderr and "Traceback" not in done.stderr


class _StuckSocket:
    """A client that never reads: every send blocks."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()

    async def send_str(self, data: str) -> None:
        await asyncio.Event().wait()

    async def close(self, *, code: int = 1000, message: bytes = b"") -> bool:
        self.closed.set()
        return True


async def test_a_client_that_stops_reading_never_blocks_publishing(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "db.sqlite3")
    hub = EventHub(store)
    stuck = _StuckSocket()
    await hub.subscribe(stuck)

    async def flood() -> None:
        for i in range(QUEUE_BYTES // 65536 + 5):
            await hub.publish(Event.now(EventType.LOG, "j", {"lines": [f"{i}" * 65536]}))

    await asyncio.wait_for(flood(), 4)  # well before the send timeout: the queued bytes decide
    assert hub.subscriber_count == 0  # dropped once its queue held QUEUE_BYTES
    await asyncio.wait_for(stuck.closed.wait(), 5)
    store.close()


async def test_a_failure_after_publishing_still_ends_done(client: TestClient, config: Config, monkeypatch) -> None:
    from daemon.pipeline.runner import JobReporter

    real_finish = JobReporter.finish
    calls = {"n": 0}

    async def finish_fails_once(self, state, **kw):  # e.g. the disk filled up while the job ended
        calls["n"] += 1
        if calls["n"] == 1:
            raise sqlite3.OperationalError("database or disk is full")
        return await real_finish(self, state, **kw)

    monkeypatch.setattr(JobReporter, "finish", finish_fails_once)
    first = (await (await client.post("/train", data=train_form(8, name="First"))).json())["job_id"]
    second = (await (await client.post("/train", data=train_form(8, name="Second"))).json())["job_id"]
    job = await wait_for_state(client, first, {"done", "error"})
    # The LoRA reached ED's folder before finishing failed: the user has it, so the job is not an error.
    assert job["state"] == "done" and job["error"] is None, job
    assert Path(job["artifact"]).is_file() and Path(job["artifact"]).parent == config.ed_lora_dir
    assert (await wait_for_state(client, second, {"done", "error"}))["state"] == "done"


async def test_a_failing_error_path_does_not_stop_later_jobs(client: TestClient, config: Config,
                                                            monkeypatch) -> None:
    from daemon.pipeline.runner import JobReporter, JobRunner

    real_finish = JobReporter.finish

    def publish_fails(self, job, result):
        raise OSError(5, "Input/output error")

    async def finish_fails_for_first(self, state, **kw):  # the error path itself fails (a full disk, say)
        if self.job.name == "First":
            raise sqlite3.OperationalError("database or disk is full")
        return await real_finish(self, state, **kw)

    monkeypatch.setattr(JobRunner, "_publish", publish_fails)
    monkeypatch.setattr(JobReporter, "finish", finish_fails_for_first)
    first = (await (await client.post("/train", data=train_form(8, name="First"))).json())["job_id"]
    second = (await (await client.post("/train", data=train_form(8, name="Second"))).json())["job_id"]
    job = await wait_for_state(client, first, {"done", "error"})
    assert job["state"] == "error" and job["error"]["kind"] == "internal"  # nothing was published
    later = await wait_for_state(client, second, {"done", "error"})
    assert later["state"] == "error" and later["error"]["kind"] == "internal"  # the worker went on
    assert not any(config.ed_lora_dir.glob("*.safetensors"))


async def test_a_published_job_is_done_even_when_every_way_to_finish_fails(client: TestClient, config: Config,
                                                                           monkeypatch) -> None:
    from daemon.pipeline.runner import JobReporter

    real_finish = JobReporter.finish

    async def finish_fails_for_first(self, state, **kw):
        if self.job.name == "First":
            raise sqlite3.OperationalError("database or disk is full")
        return await real_finish(self, state, **kw)

    monkeypatch.setattr(JobReporter, "finish", finish_fails_for_first)
    first = (await (await client.post("/train", data=train_form(8, name="First"))).json())["job_id"]
    second = (await (await client.post("/train", data=train_form(8, name="Second"))).json())["job_id"]
    # The worker records the outcome itself: the artifact was saved as soon as the LoRA was published.
    job = await wait_for_state(client, first, {"done", "error"})
    assert job["state"] == "done" and Path(job["artifact"]).is_file(), job
    assert (await wait_for_state(client, second, {"done", "error"}))["state"] == "done"


async def test_cancel_right_after_submit_never_publishes(client: TestClient, config: Config) -> None:
    for i in range(5):
        job_id = (await (await client.post("/train", data=train_form(8, name=f"Quick {i}"))).json())["job_id"]
        resp = await client.post(f"/jobs/{job_id}/cancel")
        assert resp.status in (200, 202)
        job = await wait_for_state(client, job_id, {"cancelled", "done", "error"})
        assert job["state"] == "cancelled", job
    await asyncio.sleep(0.3)
    assert not any(config.ed_lora_dir.glob("*.safetensors"))
    states = {j["state"] for j in (await (await client.get("/jobs")).json())["jobs"]}
    assert states == {"cancelled"}


async def test_delete_right_after_submit_leaves_nothing(client: TestClient, config: Config) -> None:
    job_id = (await (await client.post("/train", data=train_form(8))).json())["job_id"]
    resp = await client.delete(f"/jobs/{job_id}")
    if resp.status == 409:  # the worker had already taken it: cancel, then delete
        await client.post(f"/jobs/{job_id}/cancel")
        await wait_for_state(client, job_id, {"cancelled", "done", "error"})
        resp = await client.delete(f"/jobs/{job_id}")
    assert resp.status == 200
    await asyncio.sleep(0.3)
    assert (await client.get(f"/jobs/{job_id}/status")).status == 404
    assert not (config.jobs_dir / job_id).exists()
    # the worker is alive: the next job trains
    nxt = (await (await client.post("/train", data=train_form(8, name="Next"))).json())["job_id"]
    assert (await wait_for_state(client, nxt, {"done", "error"}))["state"] == "done"


def test_non_finite_numbers_never_reach_json() -> None:
    p = Progress(step=3, total=10, loss=math.inf, rate=math.nan, eta_s=-math.inf)
    assert p.to_json() == {"step": 3, "total": 10, "epoch": 0, "epochs": None, "loss": None, "rate": None,
                           "eta_s": None, "phase": "training", "prep_done": None, "prep_total": None}


def test_wildcard_bind_accepts_the_allowed_pages_hosts_only() -> None:
    cfg = parse_config({"token": TOKEN, "host": "0.0.0.0", "port": 9131,
                        "allowed_origins": ["http://localhost:9000", "http://192.168.1.20:9000"]}, base_dir=None)
    hosts = allowed_hosts(cfg)
    assert "192.168.1.20:9131" in hosts and "localhost:9131" in hosts
    assert "evil.example:9131" not in hosts
    local = parse_config({"token": TOKEN, "allowed_origins": ["http://192.168.1.20:9000"]}, base_dir=None)
    assert "192.168.1.20:9131" not in allowed_hosts(local)  # bound to loopback: no LAN names


def test_a_version_1_database_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE jobs (id TEXT PRIMARY KEY, name TEXT NOT NULL, trigger TEXT NOT NULL,
            class_token TEXT NOT NULL, base_model TEXT NOT NULL, params TEXT NOT NULL, image_count INTEGER NOT NULL,
            state TEXT NOT NULL, progress TEXT NOT NULL, artifact TEXT, lora_id TEXT, error TEXT,
            created_at REAL NOT NULL, updated_at REAL NOT NULL, pid INTEGER, pid_started REAL);
        INSERT INTO jobs VALUES ('old1', 'Old', 'ohwx', 'person', '/m.safetensors', '{}', 8, 'done', '{}',
            '/lora/Old.safetensors', 'Old', NULL, 1.0, 2.0, NULL, NULL);
        PRAGMA user_version=1;
    """)
    db.close()
    store = JobStore(path)
    job = store.get("old1")
    assert job is not None and job.state.value == "done" and job.samples == []
    job.samples.append("x.png")
    store.save(job)
    assert store.get("old1").samples == ["x.png"]  # type: ignore[union-attr]
    store.close()


async def test_the_token_never_reaches_the_access_log(client: TestClient, caplog) -> None:
    from daemon.web.app import AccessLogger

    # the test server logs with aiohttp's default format; the daemon's own logger is what runs in production
    logger = AccessLogger(logging.getLogger("aiohttp.access"), "")
    with caplog.at_level(logging.INFO, logger="aiohttp.access"):
        ws = await client.ws_connect(f"/ws?token={TOKEN}", headers={"Authorization": ""})
        await ws.receive_json(timeout=5)
        await ws.close()

        class Req:
            method, path = "GET", "/ws"

        class Resp:
            status = 101

        logger.log(Req(), Resp(), 0.01)  # type: ignore[arg-type]
    ours = [r.getMessage() for r in caplog.records if r.getMessage().startswith("GET /ws")]
    assert ours and all(TOKEN not in line for line in ours)


def test_make_config_helper_is_valid(tmp_path: Path) -> None:
    assert make_config(tmp_path, port=9131).allow_cpu is True


async def test_a_child_left_holding_the_output_neither_hangs_the_job_nor_survives(client: TestClient,
                                                                                  monkeypatch) -> None:
    import psutil

    monkeypatch.setenv("KOHYA_DOUBLE_SPAWN_CHILD", "1")  # a grandchild that sleeps with kohya's pipes open
    job_id = (await (await client.post("/train", data=train_form(8, params='{"epochs": 1}'))).json())["job_id"]
    job = await wait_for_state(client, job_id, {"done", "error"}, timeout=40)
    assert job["state"] == "done", job["error"]
    lines = (await (await client.get(f"/jobs/{job_id}/logs")).json())["lines"]
    child = next(int(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("double child pid:"))
    for _ in range(50):
        if not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError(f"the trainer's child {child} outlived the job")


async def test_unsubscribing_never_hangs_whatever_the_send_is_doing(tmp_path: Path) -> None:
    """A cancel that arrives just as a frame's send completes must still end the sender (asyncio.wait_for
    before Python 3.12 swallowed it, and unsubscribe/shutdown then waited for ever)."""

    class Instant:
        def __init__(self) -> None:
            self.sent = 0

        async def send_str(self, data: str) -> None:
            self.sent += 1

        async def close(self, *, code: int = 1000, message: bytes = b"") -> bool:
            return True

    store = JobStore(tmp_path / "db.sqlite3")
    hub = EventHub(store)
    sockets = []
    for attempt in range(40):
        socket = Instant()
        sockets.append(socket)
        await hub.subscribe(socket)
        await hub.publish(Event.now(EventType.LOG, None, {"lines": ["x"]}))
        for _ in range(attempt % 4):  # land the cancel at each point of the send
            await asyncio.sleep(0)
        await asyncio.wait_for(hub.unsubscribe(socket), 5)
    assert hub.subscriber_count == 0
    assert sum(s.sent for s in sockets) >= 40  # the snapshots at least went out
    store.close()
