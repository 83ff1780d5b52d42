"""Issue 10 §1: every step's loss is recorded (store table, `loss` events, GET /jobs/{id}/loss)."""

from __future__ import annotations

import contextlib
import json
import math
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from daemon.config import Config
from daemon.jobs.models import Job, LossPoint
from daemon.jobs.store import SCHEMA_VERSION, JobStore
from daemon.pipeline.loss_history import LossBuffer, epoch_means, to_json
from daemon.pipeline.progress import OutputParser, StepProgress
from tests.conftest import train_form, wait_for_state
from tests.test_oom_retry_daemon import gpu_daemon as gpu_daemon  # a fixture: pytest finds it by name
from tests.test_oom_retry_daemon import train


def test_a_step_is_final_only_once_a_later_step_or_the_end_comes() -> None:
    buf = LossBuffer()
    buf.add(1, 1, None)  # the first draw of step 1 has no avr_loss yet
    buf.add(1, 1, 0.5)
    assert buf.take() == []  # step 1 may still be redrawn with its new loss
    buf.add(2, 1, 0.5)  # step 2's first draw still shows step 1's loss
    buf.add(2, 1, 0.4)
    buf.add(3, 2, 0.3)
    assert buf.take() == [LossPoint(1, 1, 0.5), LossPoint(2, 1, 0.4)]
    assert buf.take() == []  # each point once
    buf.add(4, 2, math.nan)  # nan is no point (the failure classifier reports it)
    assert buf.take(final=True) == [LossPoint(3, 2, 0.3)]
    assert buf.take(final=True) == []


def test_the_real_bar_gives_one_point_per_step_with_the_loss_kohya_set_after_it() -> None:
    # two redraws per step, as sd-scripts 48d368fa draws them (shared/kohya-logs/cpu): update(1), then set_postfix
    parser = OutputParser()
    buf = LossBuffer()
    text = ""
    for step, (before, after) in enumerate([(None, 0.2), (0.2, 0.15), (0.15, 0.12)], start=1):
        post = f", avr_loss={before}" if before is not None else ""
        text += f"\rsteps:  {step * 33}%|###| {step}/3 [00:0{step}<00:01,  1.00s/it{post}]"
        text += f"\rsteps:  {step * 33}%|###| {step}/3 [00:0{step}<00:01,  1.00s/it, avr_loss={after}]"
    for char_chunk in (text[:40], text[40:]):
        for event in parser.feed("stderr", char_chunk).events:
            if isinstance(event, StepProgress):
                buf.add(event.step, 1, event.loss)
    for event in parser.finish().events:
        if isinstance(event, StepProgress):
            buf.add(event.step, 1, event.loss)
    assert buf.take(final=True) == [LossPoint(1, 1, 0.2), LossPoint(2, 1, 0.15), LossPoint(3, 1, 0.12)]


def test_epoch_means() -> None:
    points = [LossPoint(1, 1, 0.4), LossPoint(2, 1, 0.2), LossPoint(3, 2, 0.1)]
    assert epoch_means(points) == pytest.approx({1: 0.3, 2: 0.1})
    assert to_json(points)[0] == [1, 1, 0.4]


def _job(store: JobStore, job_id: str = "j") -> None:
    store.insert(Job(id=job_id, name="n", trigger="t", class_token="c", base_model="/m", params={}, image_count=8))


def test_the_store_keeps_replaces_and_forgets_points(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "db.sqlite3")
    _job(store)
    store.add_loss("j", [LossPoint(1, 1, 0.5), LossPoint(2, 1, 0.4), LossPoint(3, 2, 0.3)])
    store.add_loss("j", [LossPoint(3, 2, 0.25), LossPoint(4, 2, 0.2)])  # a resumed epoch redraws step 3
    assert store.loss("j") == [LossPoint(1, 1, 0.5), LossPoint(2, 1, 0.4), LossPoint(3, 2, 0.25), LossPoint(4, 2, 0.2)]
    store.forget_after("j", 1)
    assert [p.step for p in store.loss("j")] == [1, 2]
    store.add_loss("gone", [LossPoint(1, 1, 0.1)])  # a batch for a deleted job is dropped, not an error
    assert store.loss("gone") == []
    store.delete("j")
    assert store.loss("j") == []  # ON DELETE CASCADE
    store.close()


def test_a_version_4_database_gains_the_loss_and_published_tables(tmp_path: Path) -> None:
    path = tmp_path / "v4.sqlite3"
    store = JobStore(path)
    _job(store)
    store.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript("DROP TABLE loss_points; DROP TABLE published_epochs; PRAGMA user_version=4;")
    store = JobStore(path)
    store.add_loss("j", [LossPoint(1, 1, 0.5)])
    assert store.loss("j") == [LossPoint(1, 1, 0.5)] and store.published("j") == {}
    store.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5


async def _frames_until_result(ws: Any) -> list[dict[str, Any]]:
    frames = []
    while True:
        frame = await ws.receive_json(timeout=60)
        frames.append(frame)
        if frame["type"] == "result":
            return frames


async def test_every_step_is_recorded_and_sent_once_in_order(client: TestClient, config: Config) -> None:
    ws = await client.ws_connect("/ws")
    assert (await ws.receive_json(timeout=5))["type"] == "snapshot"
    params = json.dumps({"epochs": 3, "save_every_n_epochs": 1})
    job_id = (await (await client.post("/train", data=train_form(8, params=params))).json())["job_id"]
    frames = await _frames_until_result(ws)
    await ws.close()
    job = await wait_for_state(client, job_id, {"done"})
    total = job["progress"]["total"]
    body = await (await client.get(f"/jobs/{job_id}/loss")).json()
    assert body["total"] == total and body["epochs"] == 3
    points = body["points"]
    assert [p[0] for p in points] == list(range(1, total + 1))  # every step, once
    per_epoch = total // 3
    assert [p[1] for p in points] == [(s - 1) // per_epoch + 1 for s in range(1, total + 1)]
    assert all(isinstance(p[2], float) and p[2] > 0 for p in points)
    loss_frames = [f["data"] for f in frames if f["type"] == "loss"]
    assert loss_frames[0] == {"points": [], "cleared_after_epoch": 0}  # a launch from the first step
    sent = [p for data in loss_frames for p in data["points"]]
    assert sent == points  # what the socket said is what the store has
    assert len(loss_frames) < total  # batched, not one frame per step
    # the last step's loss is the one the bar showed at the end
    assert points[-1][2] == pytest.approx(job["progress"]["loss"])
    # not kept twice: the loss lives in its own table, not in the event history
    events = (await (await client.get(f"/jobs/{job_id}/events")).json())["events"]
    assert "loss" not in {e["type"] for e in events}
    assert (await client.get(f"/jobs/{job_id}/loss", headers={"Authorization": ""})).status == 401
    assert (await client.get("/jobs/nope/loss")).status == 404


async def test_a_resumed_launch_counts_on_and_replaces_the_later_epochs(gpu_daemon: Any,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # batch 8: 25 steps an epoch; the first step of epoch 3 runs out of memory, the retry resumes after epoch 2 at
    # batch 4 (50 steps an epoch, 200 in all: it starts at step 100)
    monkeypatch.setenv("KOHYA_DOUBLE_OOM_ABOVE_BATCH", "4")
    monkeypatch.setenv("KOHYA_DOUBLE_OOM_AT_STEP", "51")
    client, _ = await gpu_daemon()
    job_id, job = await train(client, '{"epochs": 4, "save_every_n_epochs": 1}')
    assert job["state"] == "done", job["error"]
    points = (await (await client.get(f"/jobs/{job_id}/loss")).json())["points"]
    steps = [p[0] for p in points]
    assert steps == list(range(1, 51)) + list(range(101, 201))
    assert {p[1] for p in points if p[0] <= 50} == {1, 2} and {p[1] for p in points if p[0] > 100} == {3, 4}


def _ok_runs() -> list[object]:
    from tests.test_progress import run_params

    return [p for p in run_params() if "_ok_" in str(getattr(p, "id", "")) or "gpu-h100" in str(getattr(p, "id", ""))]


@pytest.mark.parametrize("run", _ok_runs())
def test_real_kohya_output_gives_one_point_per_step_with_its_last_drawn_loss(run: Path) -> None:
    """Real sd-scripts 48d368fa runs (shared/kohya-logs), fed as the daemon reads them (OutputParser, chunk by chunk,
    both pipes): every step from 1 to kohya's total exactly once, with the avr_loss its bar last showed for that step
    (read from the raw bytes here, independently of the parser), and the epoch `epoch E/N` said."""
    from daemon.pipeline.progress import EpochStarted
    from tests.test_progress import replay_streams

    if (run / "exit_code").read_text().strip() != "0":
        pytest.skip("not a finished run")
    parser = OutputParser()
    buf = LossBuffer()
    epoch = 0
    total = 0
    chunks = list(replay_streams(run))
    for parsed in [parser.feed(stream, text) for stream, text in chunks] + [parser.finish()]:
        for event in parsed.events:
            if isinstance(event, EpochStarted):
                epoch = event.epoch
            elif isinstance(event, StepProgress):
                total = event.total
                buf.add(event.step, epoch, event.loss)
    points = buf.take(final=True)
    raw = (run / "stderr.log").read_bytes().decode("utf-8", "replace") + (run / "stdout.log").read_bytes().decode(
        "utf-8", "replace")
    last: dict[int, float] = {}
    for match in re.finditer(r"steps:[^\r\n]*?\| (\d+)/(\d+) \[[^\]\r\n]*?avr_loss=([0-9.e+-]+)\]", raw):
        last[int(match.group(1))] = float(match.group(3))
    assert total > 0 and [p.step for p in points] == list(range(1, total + 1)), run
    assert {p.step: p.loss for p in points} == pytest.approx(last)
    assert [p.epoch for p in points] == sorted(p.epoch for p in points) and points[0].epoch == 1
