"""A chatty trainer (issue 6 §4): megabytes of output end `done`, the database keeps a bounded ring of
lines, GET /logs pages through trainer.log, and a WebSocket client that stops reading is dropped fast.

Speed (parse MB/s, event-loop lag) is shown by bench/chatty_trainer.py, not timed here.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import socket
import sqlite3
import time
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from daemon.config import Config
from daemon.events import Event, EventType
from daemon.hub import EventHub
from daemon.jobs.store import LOG_RING, JobStore
from daemon.pipeline import runner
from daemon.pipeline.trainer_log import MAX_PAGE_BYTES, read_page
from daemon.web.keys import HUB
from tests.conftest import train_form, wait_for_state
from tests.helpers import TOKEN

SKIPPED_NOTE = re.compile(r"^\[(\d+) more lines of trainer output here are in trainer\.log\]$")


def trainer_log(config: Config, job_id: str) -> Path:
    return config.jobs_dir / job_id / "trainer.log"


def ring_rows(config: Config, job_id: str) -> int:
    with sqlite3.connect(config.data_dir / "jobs.sqlite3") as db:
        return int(db.execute("SELECT COUNT(*) FROM log_lines WHERE job_id=?", (job_id,)).fetchone()[0])


async def run_chatty_job(client: TestClient, monkeypatch: pytest.MonkeyPatch, megabytes: float) -> str:
    monkeypatch.setenv("KOHYA_DOUBLE_FLOOD_MB", str(megabytes))
    job_id = (await (await client.post("/train", data=train_form(8, params='{"epochs": 1}'))).json())["job_id"]
    job = await wait_for_state(client, job_id, {"done", "error", "cancelled"}, timeout=240)
    assert job["state"] == "done", job["error"]
    return job_id


# --- 32 MB of output --------------------------------------------------------------------------------


async def test_a_trainer_printing_32_mb_then_saving_ends_done(client: TestClient, config: Config,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    ws = await client.ws_connect(f"/ws?token={TOKEN}", headers={"Authorization": ""})
    assert (await ws.receive_json(timeout=5))["type"] == "snapshot"
    job_id = await run_chatty_job(client, monkeypatch, 32)

    log_file = trainer_log(config, job_id)
    assert log_file.stat().st_size > 32 * 1024 * 1024  # trainer.log keeps every line
    with log_file.open("rb") as fh:
        fh.seek(-4096, os.SEEK_END)
        assert b"model saved." in fh.read()  # read to the very end: nothing was cut off after the exit

    lines = (await (await client.get(f"/jobs/{job_id}/logs")).json())["lines"]
    assert len(lines) <= LOG_RING
    assert ring_rows(config, job_id) <= LOG_RING
    assert lines[-1].startswith("LoRA published: ")
    assert "model saved." in lines

    # On the WebSocket every log line of the trainer either arrived or is counted in a note saying
    # that trainer.log has it; and no frame is larger than a batch allows.
    delivered = skipped = 0
    while True:
        frame = await ws.receive_json(timeout=30)
        if frame["type"] == "log":
            assert len(frame["data"]["lines"]) <= LOG_RING
            for line in frame["data"]["lines"]:
                if m := SKIPPED_NOTE.match(line):
                    skipped += int(m.group(1))
                else:
                    delivered += 1
        if frame["type"] == "result":
            break
    await ws.close()
    text = log_file.read_bytes().decode("utf-8", errors="replace")
    trainer_lines = sum(1 for ln in re.split(r"\r\n|\r|\n", text) if ln.strip() and "%|" not in ln)
    assert trainer_lines > 350_000
    assert skipped > 300_000
    # + the daemon's own lines: plan, settings, argv, published
    assert trainer_lines <= delivered + skipped <= trainer_lines + 4


# --- GET /jobs/{id}/logs ----------------------------------------------------------------------------


async def test_logs_tail_and_pages_cover_trainer_log(client: TestClient, config: Config,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    job_id = await run_chatty_job(client, monkeypatch, 3)
    ring = (await (await client.get(f"/jobs/{job_id}/logs")).json())["lines"]
    assert len(ring) == LOG_RING  # 3 MB of lines fill the ring
    tail = await (await client.get(f"/jobs/{job_id}/logs?tail=7")).json()
    assert tail == {"lines": ring[-7:]}

    raw = trainer_log(config, job_id).read_bytes()
    expected = [ln for ln in re.split(r"\r\n|\r|\n", raw.decode("utf-8", errors="replace")) if ln.strip()]
    got: list[str] = []
    offset, pages, limit = 0, 0, 100_000
    while True:
        resp = await client.get(f"/jobs/{job_id}/logs?offset={offset}&limit={limit}")
        assert resp.status == 200
        page = await resp.json()
        assert page["offset"] == offset and page["size"] == len(raw)
        assert 0 < page["next_offset"] - offset <= limit or page["eof"]
        got.extend(page["lines"])
        offset, pages = page["next_offset"], pages + 1
        if page["eof"]:
            break
    assert pages >= len(raw) // limit
    assert got == expected  # pages cut at line breaks join into the whole file, every line once


@pytest.mark.parametrize("query", [
    "tail=0", "tail=-1", "tail=abc", f"tail={LOG_RING + 1}", "tail=", "tail=1e3", "tail=%EF%BC%91",
    "offset=-1", "offset=x", "offset=99999999999999999999999", "limit=0", f"limit={MAX_PAGE_BYTES + 1}",
    "limit=1.5", "offset=0&tail=5", "offset=1000000000",
])
async def test_bad_log_queries_get_a_sentence(client: TestClient, query: str) -> None:
    job_id = (await (await client.post("/train", data=train_form(8, params='{"epochs": 1}'))).json())["job_id"]
    await wait_for_state(client, job_id, {"done"})
    resp = await client.get(f"/jobs/{job_id}/logs?{query}")
    assert resp.status == 400
    body = await resp.json()
    assert isinstance(body["error"], str) and body["error"].endswith(".")
    assert (await client.get("/health")).status == 200


async def test_logs_of_a_job_without_trainer_log_page_empty(client: TestClient, config: Config) -> None:
    job_id = (await (await client.post("/train", data=train_form(8, params='{"epochs": 1}'))).json())["job_id"]
    await wait_for_state(client, job_id, {"done"})
    trainer_log(config, job_id).unlink()
    page = await (await client.get(f"/jobs/{job_id}/logs?offset=0")).json()
    assert page == {"lines": [], "offset": 0, "next_offset": 0, "size": 0, "eof": True}
    assert (await client.get(f"/jobs/{job_id}/logs?offset=10")).status == 400


def test_a_page_ends_at_a_line_break_until_the_trainer_is_done(tmp_path: Path) -> None:
    path = tmp_path / "trainer.log"
    path.write_bytes("first\r\nsecond\rthird – é\nhalf a li".encode())
    live = read_page(path, 0, 1000, final=False)
    assert live.lines == ["first", "second", "third – é"]  # the line still being written waits
    assert live.next_offset == len("first\r\nsecond\rthird – é\n".encode()) and not live.to_json()["eof"]
    assert read_page(path, live.next_offset, 1000, final=False).lines == []
    done = read_page(path, live.next_offset, 1000, final=True)
    assert done.lines == ["half a li"] and done.to_json()["eof"]
    inside_e = "first\r\nsecond\rthird – ".encode().__len__() + 1  # the second byte of `é`
    assert read_page(path, inside_e, 1000, final=True).lines == ["half a li"]


def test_a_line_longer_than_a_page_still_moves_on(tmp_path: Path) -> None:
    path = tmp_path / "trainer.log"
    path.write_text("x" * 2500 + "\nend\n", encoding="utf-8")
    pages, offset = [], 0
    while True:
        page = read_page(path, offset, 1000, final=True)
        pages.append(page.lines)
        offset = page.next_offset
        if page.to_json()["eof"]:
            break
    assert pages == [["x" * 1000], ["x" * 1000], ["x" * 500, "end"]]


def test_the_ring_keeps_the_last_lines_only(tmp_path: Path) -> None:
    from daemon.jobs.models import Job

    store = JobStore(tmp_path / "db.sqlite3")
    store.insert(Job(id="j", name="n", trigger="t", class_token="c", base_model="b", params={}, image_count=8))
    for batch in range(7):
        store.append_logs("j", [f"{batch}:{i}" for i in range(700)])
    lines = store.logs("j")
    assert len(lines) == LOG_RING
    assert lines[-1] == "6:699" and lines[0] == f"{(7 * 700 - LOG_RING) // 700}:{(7 * 700 - LOG_RING) % 700}"
    assert store.logs("j", 3) == ["6:697", "6:698", "6:699"]
    store.close()


# --- the drain after the trainer exits ---------------------------------------------------------------


async def test_a_reader_still_making_progress_is_never_given_up() -> None:
    meter = runner._OutputMeter()

    async def slow_backlog() -> None:
        for _ in range(12):  # 1.2 s in all, far past the 0.3 s stall limit, but never 0.3 s idle
            await asyncio.sleep(0.1)
            meter.chars += 1000

    reader = asyncio.create_task(slow_backlog())
    assert await runner._drained(reader, meter, 0.3)
    assert reader.done() and not reader.cancelled()


async def test_a_reader_without_progress_is_given_up() -> None:
    meter = runner._OutputMeter()
    reader = asyncio.create_task(asyncio.sleep(30))
    start = time.monotonic()
    assert not await runner._drained(reader, meter, 0.3)
    assert time.monotonic() - start < 2
    reader.cancel()


# --- WebSocket subscribers ----------------------------------------------------------------------------


class _StuckSocket:
    def __init__(self) -> None:
        self.closed = asyncio.Event()

    async def send_str(self, data: str) -> None:
        await asyncio.Event().wait()

    async def close(self, *, code: int = 1000, message: bytes = b"") -> bool:
        self.closed.set()
        return True


async def test_a_frame_that_cannot_be_sent_drops_the_subscriber(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from daemon import hub as hub_module

    monkeypatch.setattr(hub_module, "SEND_TIMEOUT_S", 0.5)
    store = JobStore(tmp_path / "db.sqlite3")
    hub = EventHub(store)
    stuck = _StuckSocket()
    aborted = asyncio.Event()
    await hub.subscribe(stuck, abort=aborted.set)  # one small frame (the snapshot), never sent
    start = time.monotonic()
    await asyncio.wait_for(aborted.wait(), 5)
    assert 0.4 < time.monotonic() - start < 3
    assert hub.subscriber_count == 0 and stuck.closed.is_set()
    store.close()


def _raw_websocket(port: int) -> socket.socket:
    """A real client that reads the handshake answer and then nothing more, with a small receive buffer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((
        f"GET /ws?token={TOKEN} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode())
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += sock.recv(1)
    assert answer.startswith(b"HTTP/1.1 101"), answer
    return sock


async def test_a_client_that_stops_reading_is_dropped_within_seconds(client: TestClient, config: Config) -> None:
    hub = client.server.app[HUB]
    reader = await client.ws_connect(f"/ws?token={TOKEN}", headers={"Authorization": ""})
    assert (await reader.receive_json(timeout=5))["type"] == "snapshot"
    stalled = await asyncio.to_thread(_raw_websocket, config.port)
    try:
        for _ in range(50):
            if hub.subscriber_count == 2:
                break
            await asyncio.sleep(0.05)
        assert hub.subscriber_count == 2
        start = time.monotonic()
        received: list[int] = []
        seq_seen = 0
        # Traffic as a chatty trainer makes it: a 200 KB log frame every 0.1 s.
        while hub.subscriber_count == 2 and time.monotonic() - start < 30:
            await hub.emit(EventType.LOG, None, {"lines": ["x" * 200] * 1000})
            while (frame := await _next_frame(reader, 0.01)) is not None:
                received.append(frame["seq"])
            await asyncio.sleep(0.1)
        dropped_after = time.monotonic() - start
        assert hub.subscriber_count == 1
        assert dropped_after < 10, f"the stalled client was dropped only after {dropped_after:.1f} s"
        # The other client missed nothing, and keeps receiving after the drop.
        await hub.publish(Event.now(EventType.LOG, None, {"lines": ["after the drop"]}))
        while (frame := await _next_frame(reader, 5)) is not None:
            received.append(frame["seq"])
            seq_seen = frame["seq"]
            if frame["data"]["lines"] == ["after the drop"]:
                break
        assert received == list(range(received[0], seq_seen + 1))
        # The server let go of the stalled connection too (nothing stays buffered for it).
        assert await asyncio.to_thread(_closed_by_server, stalled, 10)
    finally:
        stalled.close()
        await reader.close()


def _closed_by_server(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    end = time.monotonic() + timeout
    try:
        while time.monotonic() < end:
            if not sock.recv(1 << 20):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return False


async def _next_frame(ws: object, timeout: float) -> dict | None:
    try:
        return await ws.receive_json(timeout=timeout)  # type: ignore[attr-defined]
    except (asyncio.TimeoutError, TimeoutError):
        return None


# --- progress delivery (issue 6 §5) -----------------------------------------------------------------------


class _CollectingSocket:
    def __init__(self) -> None:
        self.frames: list[dict] = []

    async def send_str(self, data: str) -> None:
        self.frames.append(json.loads(data))

    async def close(self, *, code: int = 1000, message: bytes = b"") -> bool:
        return True


async def test_held_back_progress_is_sent_without_waiting_for_more_output(tmp_path: Path) -> None:
    from daemon.jobs.models import Job, JobState, Progress

    store = JobStore(tmp_path / "db.sqlite3")
    hub = EventHub(store)
    job = Job(id="j", name="n", trigger="t", class_token="c", base_model="b", params={}, image_count=8)
    store.insert(job)
    socket_ = _CollectingSocket()
    await hub.subscribe(socket_)
    reporter = runner.JobReporter(job, store, hub)

    def steps_sent() -> list[int]:
        return [f["data"]["step"] for f in socket_.frames if f["type"] == "progress"]

    async def sent_after(count: int) -> list[int]:
        for _ in range(150):
            if len(steps_sent()) >= count:
                break
            await asyncio.sleep(0.02)
        return steps_sent()

    await reporter.progress(Progress(step=1, total=4))
    await reporter.progress(Progress(step=2, total=4))  # inside the throttle interval: held back
    await reporter.progress(Progress(step=3, total=4))
    assert await sent_after(1) == [1]
    # Nothing else is fed (the trainer is silent, no ticker runs): the newest state still goes out.
    assert await sent_after(2) == [1, 3]
    assert store.get("j").progress.step == 3  # saved as well as sent
    await reporter.finish(JobState.DONE)
    assert await sent_after(3) == [1, 3, 3]  # finish() always sends the final state, nothing held back twice
    store.close()
