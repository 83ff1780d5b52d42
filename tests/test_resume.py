"""Resume (issue 9 §1) through a real `python -m daemon` process and the kohya double: the daemon and its trainer
SIGKILLed after the first saved epoch, then started again; by hand and automatically; with and without a saved
state. Plus the pure parts: which state folder a run continues from, their sizes, their removal."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import yaml

from daemon.pipeline import train_state
from daemon.pipeline.train_state import SavedState, find_resume_state
from tests.conftest import train_form
from tests.helpers import TOKEN
from tests.test_crash_recovery import Daemon, Site
from tests.test_crash_recovery import site as site  # a fixture: pytest finds it by name

# 8 pictures x 2 repeats, batch 2 (the CPU fit) -> a few steps per epoch; one state per epoch
PARAMS = json.dumps({"epochs": 3, "repeats": 2, "save_every_n_epochs": 1, "sample_every_n_epochs": 1})
SLOW = {"KOHYA_DOUBLE_STEP_SECONDS": "0.3"}
FAST = {"KOHYA_DOUBLE_STEP_SECONDS": "0.01"}
WATCHABLE = {"KOHYA_DOUBLE_STEP_SECONDS": "0.05"}


# ------------------------------------------------------------------------------------------------ pure part
def make_state(folder: Path, *, epoch: int, step: int, complete: bool = True) -> Path:
    folder.mkdir(parents=True)
    (folder / "train_state.json").write_text(json.dumps({"current_epoch": epoch, "current_step": step}))
    for name in ("model.safetensors", "optimizer.bin", "scheduler.bin"):
        (folder / name).write_bytes(b"x" * 1000)
    if complete:
        (folder / "random_states_0.pkl").write_bytes(b"x" * 100)
    return folder


def test_the_newest_complete_epoch_state_is_the_resume_point(tmp_path: Path) -> None:
    assert find_resume_state(tmp_path, "hero") is None
    assert find_resume_state(tmp_path / "missing", "hero") is None
    one = make_state(tmp_path / "hero-000001-state", epoch=1, step=4)
    make_state(tmp_path / "hero-000002-state", epoch=2, step=4, complete=False)  # killed while saving
    make_state(tmp_path / "hero-state", epoch=3, step=12)  # the final state: kohya asserts on it (FACTS run e)
    make_state(tmp_path / "heroine-000005-state", epoch=5, step=20)  # another output name
    (tmp_path / "hero-000009-state.txt").write_text("not a folder")
    assert find_resume_state(tmp_path, "hero") == SavedState(one, 1, 4)
    make_state(tmp_path / "hero-000003-state", epoch=3, step=4)
    found = find_resume_state(tmp_path, "hero")
    assert found is not None and (found.epoch, found.step) == (3, 4)  # the recorded step is the launch's own


def test_sizes_and_removal_cover_every_state_folder_and_nothing_else(tmp_path: Path) -> None:
    make_state(tmp_path / "hero-000001-state", epoch=1, step=4)
    make_state(tmp_path / "hero-000002-state", epoch=2, step=4, complete=False)
    make_state(tmp_path / "hero-state", epoch=3, step=12)
    (tmp_path / "hero.safetensors").write_bytes(b"l" * 500)
    (tmp_path / "sample").mkdir()
    one = 3000 + 100 + len(json.dumps({"current_epoch": 1, "current_step": 4}))
    assert train_state.folder_bytes(tmp_path / "hero-000001-state") == one
    assert train_state.states_bytes(tmp_path, "hero") > 3 * 3000
    train_state.remove_incomplete(tmp_path, "hero")
    assert not (tmp_path / "hero-000002-state").exists() and (tmp_path / "hero-000001-state").is_dir()
    freed = train_state.remove_states(tmp_path, "hero")
    assert freed > 2 * 3000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hero.safetensors", "sample"]
    assert train_state.states_bytes(tmp_path, "hero") == 0


def test_clear_output_keeps_only_the_previews(tmp_path: Path) -> None:
    make_state(tmp_path / "hero-000001-state", epoch=1, step=4)
    (tmp_path / "hero-000001.safetensors").write_bytes(b"l")
    (tmp_path / "sample").mkdir()
    (tmp_path / "sample" / "p.png").write_bytes(b"p")
    train_state.clear_output(tmp_path, keep=("sample",))
    assert [p.name for p in tmp_path.iterdir()] == ["sample"] and (tmp_path / "sample" / "p.png").is_file()


def test_step_offset_counts_whole_epochs() -> None:
    assert train_state.step_offset(1, 12, 3) == 4
    assert train_state.step_offset(2, 24, 3) == 16
    assert train_state.step_offset(0, 24, 3) == 0


# ------------------------------------------------------------------------------------------ through a daemon
def set_config(site: Site, **values: Any) -> None:
    raw = yaml.safe_load(site.config_path.read_text(encoding="utf-8"))
    raw.update(values)
    site.config_path.write_text(yaml.safe_dump(raw), encoding="utf-8")


def kill_all(site: Site, daemon: Daemon) -> None:
    """A crash of the daemon and of its trainer: SIGKILL to every process, the daemon first."""
    tree = site.sigkill(daemon)
    for pid, _ in tree:
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).kill()


async def wait_job(site: Site, job_id: str, ok: Any, timeout: float = 40) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while True:
        job = await site.job(job_id)
        if ok(job):
            return job
        assert job["state"] not in ("done", "error", "cancelled") or time.monotonic() < end, job
        if time.monotonic() > end:
            raise AssertionError(f"job {job_id} never got there: {job['state']} {job['recovery']} {job['logs'][-6:]}")
        await asyncio.sleep(0.03)


async def call(site: Site, method: str, path: str, *, token: bool = True) -> tuple[int, Any]:
    async with aiohttp.ClientSession(headers=site.headers if token else {}) as http, \
            http.request(method, f"{site.config.url}{path}") as resp:
        return resp.status, await resp.json()


async def events(site: Site, job_id: str) -> list[dict[str, Any]]:
    return list((await call(site, "GET", f"/jobs/{job_id}/events"))[1]["events"])


def outputs(site: Site, job_id: str) -> list[str]:
    """The job's files in its output folder, without the job's own name: comparable between jobs."""
    folder = site.config.data_dir / "jobs" / job_id / "output"
    return sorted(p.name.split("-", 1)[-1] if "-" in p.name else "final" for p in folder.iterdir()
                  if p.name != "sample")


async def watch_progress(site: Site, job_id: str, steps: list[int]) -> None:
    """The progress steps the WebSocket sends for the job (progress is not kept in the event history)."""
    async with aiohttp.ClientSession() as http, http.ws_connect(f"{site.config.url}/ws?token={TOKEN}") as ws:
        async for msg in ws:
            frame = json.loads(msg.data)
            if frame["type"] == "progress" and frame["job_id"] == job_id:
                steps.append(frame["data"]["step"])


async def crash_after_first_state(site: Site, name: str = "Resumed Hero") -> tuple[str, dict[str, Any]]:
    daemon = await site.start(SLOW)
    job_id = await site.submit(train_form(8, name=name, params=PARAMS))
    job = await wait_job(site, job_id, lambda j: j["recovery"]["state_epoch"] is not None)
    assert job["state"] == "training" and job["recovery"]["state_bytes"] > 0
    kill_all(site, daemon)
    return job_id, job


async def uninterrupted(site: Site) -> dict[str, Any]:
    other = await site.submit(train_form(8, name="Never Stopped", params=PARAMS))
    return await site.wait_for(other, {"done", "error"}, timeout=60)


async def test_killed_after_the_first_saved_epoch_the_restart_resumes_it_to_the_same_end(site: Site) -> None:
    job_id, before = await crash_after_first_state(site)
    daemon = await site.start(WATCHABLE)  # auto_resume is on by default
    steps: list[int] = []
    watching = asyncio.create_task(watch_progress(site, job_id, steps))
    done = await site.wait_for(job_id, {"done", "error", "interrupted"}, timeout=60)
    watching.cancel()
    await asyncio.gather(watching, return_exceptions=True)
    assert done["state"] == "done", done["error"]
    rec = done["recovery"]
    assert rec["resumes"] == 1 and rec["auto_resumes"] == 1 and rec["resume_next"] is False
    assert len(rec["notices"]) == 1
    match = re.fullmatch(r"Resumed automatically after the daemon restarted, from the state saved after epoch "
                         r"(\d) of 3\.", rec["notices"][0])
    assert match is not None, rec["notices"]
    epoch = int(match.group(1))
    assert before["recovery"]["state_epoch"] <= epoch <= 2
    # the states are gone once the job is done
    assert rec["state_bytes"] == 0 and rec["state_epoch"] is None
    assert not list((site.config.data_dir / "jobs" / job_id / "output").glob("*-state"))
    # what an uninterrupted run of the same job gives: the same steps, epochs and files
    other = await uninterrupted(site)
    assert other["state"] == "done", other["error"]
    assert (done["progress"]["step"], done["progress"]["total"]) == (other["progress"]["step"],
                                                                      other["progress"]["total"])
    assert done["progress"]["step"] == done["progress"]["total"] and done["progress"]["epoch"] == 3
    assert outputs(site, job_id) == outputs(site, other["id"]) == ["000001.safetensors", "000002.safetensors",
                                                                     "final"]
    assert Path(done["artifact"]).is_file()
    # the resumed run said so once, and its progress went on from the saved epoch, never back to the start
    evs = await events(site, job_id)
    notices = [e for e in evs if e["type"] == "notice"]
    assert [n["data"]["kind"] for n in notices] == ["auto_resumed"]
    assert notices[0]["data"]["recovery"]["auto_resumes"] == 1
    offset = notices[0]["data"]["recovery"]["step_offset"]
    assert offset == epoch * done["progress"]["total"] // 3 > 0
    assert steps and min(steps) >= offset and steps == sorted(steps)
    # kohya was told where to go on from
    lines = (await call(site, "GET", f"/jobs/{job_id}/logs"))[1]["lines"]
    state = site.config.data_dir / "jobs" / job_id / "output" / f"Resumed_Hero-{epoch:06d}-state"
    assert any(f"--resume {state} --initial_epoch {epoch + 1}" in line for line in lines)
    log = (site.config.data_dir / "jobs" / job_id / "trainer.log").read_text(encoding="utf-8")
    assert f"resume training from local state: {state}" in log
    assert "resuming automatically" in daemon.output()


async def test_without_auto_resume_it_waits_for_post_resume(site: Site) -> None:
    set_config(site, auto_resume=False)
    job_id, _ = await crash_after_first_state(site)
    await site.start(FAST)
    await asyncio.sleep(1.0)  # long enough for an automatic resume to have begun
    job = await site.job(job_id)
    assert job["state"] == "interrupted" and job["resumable"] is True
    assert job["recovery"]["state_epoch"] >= 1 and job["recovery"]["state_bytes"] > 0  # kept, and shown
    assert job["recovery"]["resumes"] == 0
    samples = [s["file"] for s in job["samples"]]

    assert (await call(site, "POST", f"/jobs/{job_id}/resume", token=False))[0] == 401
    status, body = await call(site, "POST", "/jobs/nosuchjob/resume")
    assert status == 404 and "nosuchjob" in body["error"]
    status, body = await call(site, "POST", f"/jobs/{job_id}/resume")
    assert status == 202, body
    assert body["id"] == job_id and body["state"] == "queued" and body["recovery"]["resume_next"] is True
    status, body = await call(site, "POST", f"/jobs/{job_id}/resume")
    assert status == 409 and body["error"].endswith("only an interrupted job can be resumed."), body

    done = await site.wait_for(job_id, {"done", "error"}, timeout=60)
    assert done["state"] == "done", done["error"]
    assert done["recovery"]["resumes"] == 1 and done["recovery"]["auto_resumes"] == 0
    assert done["recovery"]["notices"][0].startswith("Resumed from the state saved after epoch ")
    assert done["progress"]["step"] == done["progress"]["total"]
    assert [s["file"] for s in done["samples"]][:len(samples)] == samples  # the earlier previews are kept
    for file in samples:
        assert (await call_raw(site, f"/jobs/{job_id}/samples/{file}")) == 200
    assert [e["data"]["kind"] for e in await events(site, job_id) if e["type"] == "notice"] == ["resumed"]
    assert done["recovery"]["state_bytes"] == 0
    status, body = await call(site, "POST", f"/jobs/{job_id}/resume")
    assert status == 409 and body["error"] == f"Job {job_id} is done; only an interrupted job can be resumed."


async def call_raw(site: Site, path: str) -> int:
    async with aiohttp.ClientSession(headers=site.headers) as http, http.get(f"{site.config.url}{path}") as resp:
        await resp.read()
        return resp.status


async def test_with_no_saved_state_resume_trains_again_from_the_first_step(site: Site) -> None:
    daemon = await site.start(SLOW)
    job_id = await site.submit(train_form(8, params=PARAMS))
    await wait_job(site, job_id, lambda j: j["state"] == "training" and j["progress"]["step"] >= 1)
    kill_all(site, daemon)
    await site.start(FAST)
    await asyncio.sleep(0.5)
    job = await site.job(job_id)
    # nothing saved: not resumed automatically, it waits for the user
    assert job["state"] == "interrupted" and job["recovery"]["state_epoch"] is None
    status, body = await call(site, "POST", f"/jobs/{job_id}/resume")
    assert status == 202 and body["recovery"]["resume_next"] is False
    done = await site.wait_for(job_id, {"done", "error"}, timeout=60)
    assert done["state"] == "done", done["error"]
    assert done["recovery"]["notices"] == [
        "There was no saved state to continue from: training again from the first step."]
    assert done["progress"]["step"] == done["progress"]["total"]
    log = (site.config.data_dir / "jobs" / job_id / "trainer.log").read_text(encoding="utf-8")
    assert "resume training from local state" not in log


async def test_deleting_an_interrupted_job_deletes_its_states(site: Site) -> None:
    set_config(site, auto_resume=False)
    job_id, _ = await crash_after_first_state(site)
    await site.start(FAST)
    output = site.config.data_dir / "jobs" / job_id / "output"
    assert list(output.glob("*-state"))
    status, _ = await call(site, "DELETE", f"/jobs/{job_id}")
    assert status == 200
    assert not output.exists()
    assert (await call(site, "POST", f"/jobs/{job_id}/resume"))[0] == 404


async def test_a_job_that_keeps_taking_the_daemon_down_is_not_resumed_forever(site: Site) -> None:
    job_id, _ = await crash_after_first_state(site)
    for n in range(1, 4):  # each automatic resume is "crashed" again right after it starts training
        daemon = await site.start(SLOW)
        job = await wait_job(site, job_id, lambda j: j["state"] == "training")
        assert job["recovery"]["auto_resumes"] == n
        kill_all(site, daemon)
    await site.start(FAST)
    await asyncio.sleep(1.0)
    job = await site.job(job_id)
    assert job["state"] == "interrupted" and job["recovery"]["auto_resumes"] == 3
    note = job["recovery"]["notices"][-1]
    assert note.startswith("Not resumed automatically: it was already resumed automatically 3 times")
    assert note in job["logs"]
    status, _ = await call(site, "POST", f"/jobs/{job_id}/resume")  # by hand it still can
    assert status == 202


async def test_clean_stops_do_not_count_towards_the_cap(site: Site) -> None:
    """Closing ED (the daemon stopped cleanly) mid-run four times is not a job that crashes the daemon: it is resumed
    automatically each time."""
    job_id, _ = await crash_after_first_state(site)
    for _ in range(4):
        daemon = await site.start(SLOW)
        job = await wait_job(site, job_id, lambda j: j["state"] == "training")
        assert job["recovery"]["auto_resumes"] == 1
        status, _ = await call(site, "POST", "/shutdown")  # as the ED plugin's Stop does
        assert status == 202
        daemon.proc.wait(30)
        assert site.db_state(job_id) == "interrupted"
    await site.start(FAST)
    job = await wait_job(site, job_id, lambda j: j["state"] == "done", timeout=60)
    assert not any(n.startswith("Not resumed automatically") for n in job["recovery"]["notices"])


async def test_a_job_found_published_after_a_crash_is_done_and_its_states_are_gone(site: Site) -> None:
    daemon = await site.start({**FAST, "KOHYA_DOUBLE_LORA_MB": "40"})  # a big LoRA: the kill lands while it copies
    job_id = await site.submit(train_form(8, name="Just Made It", params=json.dumps(
        {"epochs": 2, "repeats": 1, "save_every_n_epochs": 1, "sample_every_n_epochs": 0})))
    final = site.config.ed_lora_dir / "Just_Made_It.safetensors"
    end = time.monotonic() + 30
    while not final.exists():
        assert time.monotonic() < end, (await site.job(job_id))["state"]
        await asyncio.sleep(0.001)
    site.sigkill(daemon)
    await site.start(FAST)
    job = await site.job(job_id)
    assert job["state"] == "done" and job["artifact"] == str(final)
    assert job["recovery"]["state_bytes"] == 0 and job["recovery"]["state_epoch"] is None
    assert not list((site.config.data_dir / "jobs" / job_id / "output").glob("*-state"))


async def test_a_resumed_bar_counts_on_from_the_saved_epoch(tmp_path: Path) -> None:
    """kohya's bar restarts at 0 of the full total after --resume (FACTS §4.2): shown = offset + n, and the time
    left is for the steps really left."""
    from daemon.hub import EventHub
    from daemon.jobs.models import Job, Progress
    from daemon.jobs.store import JobStore
    from daemon.pipeline.progress import StepProgress, TotalSteps
    from daemon.pipeline.runner import JobReporter, JobRunner

    store = JobStore(tmp_path / "jobs.db")
    job = Job(id="j1", name="Hero", trigger="ohwx", class_token="person", base_model="m", params={}, image_count=8)
    store.insert(job)
    reporter = JobReporter(job, store, EventHub(store))
    reporter.resumed_epochs = 1
    progress = Progress(epochs=3)
    await JobRunner._apply([TotalSteps(12)], progress, reporter)
    assert job.recovery.step_offset == 4 and progress.step == 0
    await JobRunner._apply([StepProgress(step=2, total=12, rate=0.5, elapsed_s=4.0, eta_s=20.0, loss=0.1)],
                           progress, reporter)
    assert (progress.step, progress.total) == (6, 12)
    assert progress.eta_s == 12.0  # 6 steps left at 0.5/s, not kohya's 20 s for 10
    reporter.resumed_epochs = None  # a first run: no offset, kohya's numbers as they are
    job.recovery.step_offset = 0
    await JobRunner._apply([StepProgress(step=2, total=12, rate=0.5, elapsed_s=4.0, eta_s=20.0, loss=0.1)],
                           progress, reporter)
    assert (progress.step, progress.eta_s) == (2, 20.0)
    await reporter.stop_timers()
    store.close()


async def test_resume_is_refused_with_429_when_the_queue_is_full(site: Site) -> None:
    set_config(site, auto_resume=False, max_queued_jobs=1)
    job_id, _ = await crash_after_first_state(site)
    await site.start(SLOW)
    running = await site.submit(train_form(8, name="Running", params=PARAMS))
    await site.wait_for(running, {"training"})
    await site.submit(train_form(8, name="Waiting", params=PARAMS))  # the one place in the queue
    status, body = await call(site, "POST", f"/jobs/{job_id}/resume")
    assert status == 429 and "The queue is full" in body["error"], body
    job = await site.job(job_id)
    assert job["state"] == "interrupted" and job["recovery"]["state_bytes"] > 0  # nothing lost


async def test_a_resume_while_the_job_is_being_deleted_is_refused_and_nothing_comes_back(site: Site) -> None:
    """DELETE removes the job's folder before its row: a resume arriving meanwhile must not queue the job, or its run
    recreates files under the deleted job's folder (and, had the pictures still been there, trained a LoRA for it)."""
    set_config(site, auto_resume=False)
    job_id, _ = await crash_after_first_state(site)
    await site.start(FAST)
    root = site.config.data_dir / "jobs" / job_id
    bulk = root / "bulk"  # so that removing the folder takes a while
    bulk.mkdir()
    names = [f"f{i}" for i in range(20000)]
    for name in names:
        (bulk / name).touch()
    deleting = asyncio.create_task(call(site, "DELETE", f"/jobs/{job_id}"))
    sample = [bulk / name for name in names[::400]]
    end = time.monotonic() + 20
    while all(p.exists() for p in sample):  # until the removal is under way
        assert time.monotonic() < end and not deleting.done(), "the folder was never removed"
        await asyncio.sleep(0.001)
    status, body = await call(site, "POST", f"/jobs/{job_id}/resume")
    assert status in (404, 409) and job_id in body["error"], (status, body)
    assert (await deleting)[0] == 200
    await asyncio.sleep(2.0)  # time for a wrongly queued run to have started
    assert not root.exists(), sorted(p.name for p in root.rglob("*"))
    assert (await call(site, "GET", f"/jobs/{job_id}/status"))[0] == 404
    assert site.loras() == []


async def test_a_resume_whose_pictures_were_removed_says_so(site: Site) -> None:
    """The job's uploads folder deleted by hand (freeing disk): the resumed run ends with a sentence naming what is
    gone and what to do, not an internal error asking for a bug report."""
    set_config(site, auto_resume=False)
    job_id, _ = await crash_after_first_state(site)
    await site.start(FAST)
    uploads = site.config.data_dir / "jobs" / job_id / "uploads"
    shutil.rmtree(uploads)
    status, _ = await call(site, "POST", f"/jobs/{job_id}/resume")
    assert status == 202
    job = await site.wait_for(job_id, {"done", "error"}, timeout=60)
    assert job["state"] == "error"
    error = job["error"]
    assert error["kind"] == "no_data", error
    assert error["message"] == f"The job's pictures are gone: {uploads} no longer exists.", error
    assert error["hint"] == "Start a new job with the pictures.", error
    assert job["recovery"]["state_bytes"] == 0  # an error: its states are removed, as for any ended job


async def test_a_job_whose_pictures_were_emptied_out_says_so(site: Site) -> None:
    set_config(site, auto_resume=False)
    job_id, _ = await crash_after_first_state(site)
    await site.start(FAST)
    uploads = site.config.data_dir / "jobs" / job_id / "uploads"
    for picture in uploads.iterdir():
        picture.unlink()
    assert (await call(site, "POST", f"/jobs/{job_id}/resume"))[0] == 202
    job = await site.wait_for(job_id, {"done", "error"}, timeout=60)
    assert job["error"]["kind"] == "no_data", job["error"]
    assert job["error"]["message"] == f"The job's pictures are gone: {uploads} holds none.", job["error"]


async def test_the_job_that_was_training_goes_on_before_the_jobs_queued_behind_it(site: Site) -> None:
    """First in, first out across a crash: the job training when the daemon died is resumed before the job that was
    waiting behind it, not sent to the back of the queue."""
    daemon = await site.start(SLOW)
    first = await site.submit(train_form(8, name="First", params=PARAMS))
    await wait_job(site, first, lambda j: j["recovery"]["state_epoch"] is not None)
    second = await site.submit(train_form(8, name="Second", params=PARAMS))
    assert (await site.job(second))["state"] == "queued"
    kill_all(site, daemon)
    await site.start(FAST)
    for job_id in (first, second):
        assert (await site.wait_for(job_id, {"done", "error"}, timeout=90))["state"] == "done"

    async def preps(job_id: str) -> list[float]:  # when each of its runs began
        return [e["ts"] for e in await events(site, job_id)
                if e["type"] == "state" and e["data"]["state"] == "prepping"]

    resumed, waited = await preps(first), await preps(second)
    assert len(resumed) == 2 and len(waited) == 1  # before and after the crash; only after it
    assert resumed[1] < waited[0]


async def test_a_resume_that_cannot_find_its_base_model_keeps_the_saved_state_for_later(site: Site) -> None:
    """The base model's drive not mounted when the job resumes: hours of saved training must not be thrown away
    with the error. The job stays interrupted with the reason and a fix, its state kept; once the model is back,
    Resume goes on from that state to the same end."""
    job_id, before = await crash_after_first_state(site)
    model = Path(before["base_model"])
    away = model.with_name(model.name + ".unplugged")
    model.rename(away)
    daemon = await site.start(FAST)  # auto_resume (default) tries at once, and fails before kohya
    job = await site.wait_for(job_id, {"interrupted", "error", "done"}, timeout=60)
    await asyncio.sleep(0.3)  # the state frame is sent before the store is written; then it must stay
    job = await site.job(job_id)
    assert job["state"] == "interrupted" and job["resumable"] is True, job
    error = job["error"]
    assert error["kind"] == "model_not_found", error
    assert error["message"] == f"The base model {model} no longer exists.", error
    assert error["hint"].startswith(f"Put the base model back at {model}"), error
    assert "then press Resume: the training saved after epoch " in error["hint"], error
    rec = job["recovery"]
    assert rec["state_epoch"] >= 1 and rec["state_bytes"] > 0, rec
    assert rec["auto_resumes"] == 0, rec  # not a crash: no step towards the cap on automatic resumes
    states = list((site.config.data_dir / "jobs" / job_id / "output").glob("*-state"))
    assert states, "the saved state was removed"
    assert "is kept for a resume" in daemon.output()
    assert rec["notices"][-2].startswith("Resumed automatically after the daemon restarted"), rec["notices"]
    assert rec["notices"][-1] == (f"Stopped before training: The base model {model} no longer exists. The state "
                                  f"saved after epoch {rec['state_epoch']} is kept for Resume."), rec["notices"]
    kinds = [e["data"]["kind"] for e in await events(site, job_id) if e["type"] == "notice"]
    assert kinds == ["auto_resumed", "state_kept"], kinds

    away.rename(model)
    status, body = await call(site, "POST", f"/jobs/{job_id}/resume")
    assert status == 202, body
    done = await site.wait_for(job_id, {"done", "error", "interrupted"}, timeout=60)
    assert done["state"] == "done", done["error"]
    assert done["progress"]["step"] == done["progress"]["total"]
    assert done["recovery"]["notices"][-1].startswith(f"Resumed from the state saved after epoch {rec['state_epoch']}")
    assert done["recovery"]["state_bytes"] == 0

