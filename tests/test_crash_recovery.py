"""The daemon SIGKILLed in every stage (a real `python -m daemon` process), then started again: nothing of the
old trainer survives, no temporary file stays, the database is intact, each job says how far it got, and the
next job trains. Plus the pure parts of recovery: the pid-reuse guard, our temp-name pattern, reconciliation."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
import yaml

from daemon.config import Config
from daemon.jobs.models import JobState, Recovery
from daemon.jobs.recovery import published_file
from daemon.jobs.store import JobStore
from daemon.pipeline import publish
from daemon.pipeline.leftovers import ProcInfo, TrainerRecord, kill_leftovers, leftovers
from daemon.pipeline.process import start_trainer
from tests.conftest import train_form
from tests.helpers import KOHYA_DOUBLE, REPO, TOKEN, free_port, make_config, picture_bytes
from tests.test_publish import lora

# Written out here, not imported: the test must notice if the product's pattern drifts.
OUR_TEMP = re.compile(r"\.[A-Za-z0-9_-]+\.[0-9a-f]{8}\.partial|\.write-test-\w+\.partial")
FAST = {"KOHYA_DOUBLE_STEP_SECONDS": "0.005"}
SLOW = {"KOHYA_DOUBLE_STEP_SECONDS": "0.3", "KOHYA_DOUBLE_SPAWN_CHILD": "1"}


# ------------------------------------------------------------------------------------------ a real daemon
@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


@dataclass
class Site:
    """One daemon installation (config, data, ED's lora folder) that daemons are started on in turn."""

    root: Path
    config: Config
    config_path: Path
    daemons: list[Daemon] = field(default_factory=list)
    strays: list[tuple[int, float]] = field(default_factory=list)  # killed at teardown whatever happens

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}"}

    async def start(self, env: dict[str, str]) -> Daemon:
        log = self.root / f"daemon-{len(self.daemons)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "daemon", "--config", str(self.config_path)], cwd=REPO,
                                    env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)
        daemon = Daemon(proc, self.config.url, log)
        self.daemons.append(daemon)
        end = time.monotonic() + 30
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < end:
                if proc.poll() is not None:
                    raise AssertionError(f"the daemon exited with {proc.returncode}:\n{daemon.output()}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{daemon.url}/health") as resp:
                        if resp.status == 200:
                            return daemon
                await asyncio.sleep(0.05)
        raise AssertionError(f"the daemon did not answer within 30 s:\n{daemon.output()}")

    async def submit(self, form: aiohttp.FormData | None = None) -> str:
        async with aiohttp.ClientSession(headers=self.headers) as http, \
                http.post(f"{self.config.url}/train", data=form or train_form(8)) as resp:
            body = await resp.json()
            assert resp.status == 202, body
            return str(body["job_id"])

    async def job(self, job_id: str) -> dict[str, Any]:
        async with aiohttp.ClientSession(headers=self.headers) as http, \
                http.get(f"{self.config.url}/jobs/{job_id}/status") as resp:
            assert resp.status == 200
            return dict(await resp.json())

    async def wait_for(self, job_id: str, states: set[str], timeout: float = 30) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while True:
            job = await self.job(job_id)
            if job["state"] in states:
                return job
            if time.monotonic() > end:
                raise AssertionError(f"job {job_id} stayed {job['state']}, wanted {states}: {job['logs'][-8:]}")
            await asyncio.sleep(0.01)

    def tree(self, daemon: Daemon) -> list[tuple[int, float]]:
        """The daemon's descendants right now: the trainer and what it started."""
        found = []
        for child in psutil.Process(daemon.proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                found.append((child.pid, child.create_time()))
        self.strays.extend(found)
        return found

    def sigkill(self, daemon: Daemon) -> list[tuple[int, float]]:
        """Kill the daemon as a crash would (SIGKILL: no cleanup at all); returns its tree at that moment."""
        tree = self.tree(daemon)
        daemon.proc.kill()
        daemon.proc.wait(10)
        return tree

    def db_state(self, job_id: str) -> str:
        with contextlib.closing(sqlite3.connect(f"file:{self.config.db_path}?mode=ro", uri=True)) as db:
            return str(db.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()[0])

    def temp_files(self) -> list[Path]:
        places = [*self.config.ed_lora_dir.iterdir(), *self.config.data_dir.rglob("*")]
        return [p for p in places if OUR_TEMP.fullmatch(p.name)]

    def loras(self) -> list[Path]:
        return sorted(self.config.ed_lora_dir.glob("*.safetensors"))


def describe(pid: int) -> str:
    try:
        proc = psutil.Process(pid)
        return f"{pid} (parent {proc.ppid()}): {' '.join(proc.cmdline())[:120]}"
    except psutil.Error:
        return f"{pid} (gone)"


def alive(pid: int, created: float) -> bool:
    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - created) < 1 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    config = make_config(tmp_path, port=free_port())
    raw = {
        "port": config.port, "token": TOKEN, "data_dir": str(config.data_dir),
        "ed_lora_dir": str(config.ed_lora_dir), "ed_models_dir": str(config.ed_models_dir),
        "base_model": str(config.base_model), "allow_cpu": True,
        "kohya": {"python": sys.executable, "script_path": str(KOHYA_DOUBLE), "workspace": str(tmp_path / "workspace")},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    config.ed_lora_dir.mkdir(parents=True, exist_ok=True)
    s = Site(tmp_path, config, path)
    yield s
    for daemon in s.daemons:
        if daemon.proc.poll() is None:
            daemon.proc.send_signal(signal.SIGINT)  # graceful: it stops its own trainer
            try:
                daemon.proc.wait(15)
            except subprocess.TimeoutExpired:
                daemon.proc.kill()
                daemon.proc.wait()
    for pid, created in s.strays:  # only if a test failed: never leave its processes running
        if alive(pid, created):
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()


def outside_session(tree: list[tuple[int, float]], daemon: Daemon) -> list[int]:
    """The trainer's processes among the daemon's descendants: the trainer leads a session of its own, while
    the daemon's own helpers (prep's fork server) stay in the daemon's session."""
    own = os.getsid(daemon.proc.pid)
    found = []
    for pid, _ in tree:
        with contextlib.suppress(OSError):
            if os.getsid(pid) != own:
                found.append(pid)
    return found


async def wait_for_tree(site: Site, daemon: Daemon, size: int) -> list[tuple[int, float]]:
    """The daemon's whole tree once `size` trainer processes run in it."""
    end = time.monotonic() + 20
    while len(outside_session(tree := site.tree(daemon), daemon)) < size:
        assert time.monotonic() < end, f"the trainer tree never reached {size} processes: {tree}"
        await asyncio.sleep(0.05)
    return tree


async def assert_recovered(site: Site, job_id: str, tree: list[tuple[int, float]], states: set[str]) -> Daemon:
    """Start again and check everything a restart after a crash must give."""
    daemon = await site.start(FAST)
    # The trainer's tree is stopped by recovery before the daemon serves; prep's worker processes (and the fork
    # server they came from) end by themselves once they notice the daemon is gone, within a second or so.
    end = time.monotonic() + 5
    while (left := [pid for pid, created in tree if alive(pid, created)]) and time.monotonic() < end:
        await asyncio.sleep(0.1)
    assert left == [], [describe(pid) for pid in left]
    assert site.temp_files() == []
    with contextlib.closing(sqlite3.connect(site.config.db_path)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    job = await site.job(job_id)
    assert job["state"] in states, job
    if job["state"] == "interrupted":
        assert job["error"]["kind"] == "interrupted"
    nxt = await site.submit(train_form(8, name="After the crash", params='{"epochs": 1}'))
    done = await site.wait_for(nxt, {"done", "error", "interrupted"})
    assert done["state"] == "done", done["error"]
    return daemon


# ------------------------------------------------------------------------------------- killed in each stage
async def test_killed_while_training_the_whole_trainer_tree_dies_at_the_restart(site: Site) -> None:
    daemon = await site.start(SLOW)
    job_id = await site.submit(train_form(8, params='{"epochs": 4}'))
    await site.wait_for(job_id, {"training"})
    tree = await wait_for_tree(site, daemon, 2)  # the trainer and its grandchild
    site.sigkill(daemon)
    await asyncio.sleep(0.3)
    # what the old recovery missed: the grandchild outlives both the daemon and (after a broken pipe) the trainer
    assert any(alive(pid, created) for pid, created in tree)
    new = await assert_recovered(site, job_id, tree, {"interrupted"})
    logs = (await site.job(job_id))["logs"]
    assert any(line.startswith("After a restart, stopped the trainer processes left running") for line in logs)
    assert "stopped trainer processes left running by the previous daemon" in new.output()


@pytest.mark.skipif(sys.platform == "win32", reason="sessions are POSIX")
async def test_killed_while_the_trainer_leader_is_already_gone(site: Site) -> None:
    """Recovery kills the session even when the recorded pid is dead (it died of the broken pipe)."""
    daemon = await site.start(SLOW)
    job_id = await site.submit(train_form(8, params='{"epochs": 4}'))
    await site.wait_for(job_id, {"training"})
    tree = await wait_for_tree(site, daemon, 2)
    leader_pid = next(pid for pid, _ in tree if psutil.Process(pid).ppid() == daemon.proc.pid)
    site.sigkill(daemon)
    os.kill(leader_pid, signal.SIGKILL)  # surely gone, whatever its output was doing
    end = time.monotonic() + 10
    while psutil.pid_exists(leader_pid):  # reaped, not only a zombie: a zombie still names its group
        assert time.monotonic() < end, "init never reaped the killed trainer"
        await asyncio.sleep(0.05)
    assert any(alive(pid, created) for pid, created in tree)
    await assert_recovered(site, job_id, tree, {"interrupted"})


@pytest.mark.skipif(sys.platform == "win32", reason="sessions are POSIX")
async def test_a_descendant_that_left_the_session_is_found_through_the_store(site: Site) -> None:
    """Orphaned and in a session of its own, it can only be found because the runner saved it while it ran."""
    daemon = await site.start({**SLOW, "KOHYA_DOUBLE_SPAWN_CHILD": "own_session"})
    job_id = await site.submit(train_form(8, params='{"epochs": 4}'))
    await site.wait_for(job_id, {"training"})
    tree = await wait_for_tree(site, daemon, 2)
    trainer = outside_session(tree, daemon)
    leader_pid = next(pid for pid in trainer if psutil.Process(pid).ppid() == daemon.proc.pid)
    loner = next((pid, created) for pid, created in tree if pid in trainer and pid != leader_pid)
    end = time.monotonic() + 10
    # seen between its fork and its setsid() it is still in the leader's session: wait for it to leave
    while os.getsid(loner[0]) == leader_pid:
        assert time.monotonic() < end, "the child never left the trainer's session"
        await asyncio.sleep(0.05)
    end = time.monotonic() + 10
    while True:  # the runner looks for new descendants every ~2 s
        with contextlib.closing(sqlite3.connect(f"file:{site.config.db_path}?mode=ro", uri=True)) as db:
            saved = db.execute("SELECT descendants FROM jobs WHERE id=?", (job_id,)).fetchone()[0]
        if str(loner[0]) in saved:
            break
        assert time.monotonic() < end, f"the descendants were never saved: {saved}"
        await asyncio.sleep(0.1)
    site.sigkill(daemon)
    os.kill(leader_pid, signal.SIGKILL)
    end = time.monotonic() + 10
    while psutil.pid_exists(leader_pid):
        assert time.monotonic() < end, "init never reaped the killed trainer"
        await asyncio.sleep(0.05)
    assert alive(*loner)
    await assert_recovered(site, job_id, tree, {"interrupted"})


async def test_killed_with_a_job_queued_the_queued_job_trains_after_the_restart(site: Site) -> None:
    daemon = await site.start(SLOW)
    first = await site.submit(train_form(8, name="First", params='{"epochs": 4}'))
    second = await site.submit(train_form(8, name="Second", params='{"epochs": 1}'))
    await site.wait_for(first, {"training"})
    assert (await site.job(second))["state"] == "queued"
    tree = await wait_for_tree(site, daemon, 2)
    site.sigkill(daemon)
    await assert_recovered(site, first, tree, {"interrupted"})
    job = await site.wait_for(second, {"done", "error", "interrupted"})
    assert job["state"] == "done", job["error"]


_BIG = [picture_bytes(i, size=(2400, 2400)) for i in range(8)]


async def test_killed_while_prepping(site: Site) -> None:
    daemon = await site.start(SLOW)
    form = aiohttp.FormData()
    form.add_field("name", "Big pictures")
    form.add_field("trigger", "ohwx")
    for i, data in enumerate(_BIG):  # camera-sized pictures: preparing them takes a moment
        form.add_field("images", data, filename=f"big{i}.png", content_type="image/png")
    job_id = await site.submit(form)
    await site.wait_for(job_id, {"prepping"})
    tree = site.sigkill(daemon)  # whatever prep runs besides the daemon must not outlive it either
    assert site.db_state(job_id) == "prepping"
    await assert_recovered(site, job_id, tree, {"interrupted"})


async def kill_while_copying(site: Site) -> tuple[str, list[tuple[int, float]]]:
    """A 150 MB LoRA trained, the daemon SIGKILLed the moment its copy into ED's folder has begun."""
    daemon = await site.start({**FAST, "KOHYA_DOUBLE_LORA_MB": "150"})
    job_id = await site.submit(train_form(8, name="Copy Me", params='{"epochs": 1}'))
    lora_dir = site.config.ed_lora_dir
    end = time.monotonic() + 30
    while not any(OUR_TEMP.fullmatch(name) for name in os.listdir(lora_dir)):
        assert time.monotonic() < end, (await site.job(job_id))["state"]
        time.sleep(0.001)  # blocking on purpose: the kill must follow the partial file's creation at once
    tree = site.sigkill(daemon)
    assert site.db_state(job_id) == "copying"
    return job_id, tree


async def test_killed_while_copying_leaves_no_partial_file_and_no_false_result(site: Site) -> None:
    job_id, tree = await kill_while_copying(site)
    assert site.temp_files() != []  # the half-written copy the restart must remove
    await assert_recovered(site, job_id, tree, {"interrupted", "done"})
    job = await site.job(job_id)
    published = [p for p in site.loras() if p.name.startswith("Copy_Me")]
    if job["state"] == "interrupted":  # a LoRA that reached ED's folder is never recorded as interrupted
        assert published == []
    else:
        assert [str(p) for p in published] == [job["artifact"]]


async def test_killed_right_after_the_lora_appeared_the_job_is_done(site: Site) -> None:
    daemon = await site.start({**FAST, "KOHYA_DOUBLE_LORA_MB": "40"})
    job_id = await site.submit(train_form(8, name="Just Made It", params='{"epochs": 1}'))
    final = site.config.ed_lora_dir / "Just_Made_It.safetensors"
    end = time.monotonic() + 30
    while not final.exists():
        assert time.monotonic() < end, (await site.job(job_id))["state"]
        time.sleep(0.001)
    tree = site.sigkill(daemon)
    assert site.db_state(job_id) in {"copying", "done"}
    await assert_recovered(site, job_id, tree, {"done"})
    job = await site.job(job_id)
    assert (job["artifact"], job["lora_id"]) == (str(final), "Just_Made_It")
    assert publish.verify_lora(final).unet_modules > 0


async def test_a_crash_between_publishing_and_recording_is_reconciled(site: Site) -> None:
    """The exact state a kill between the link and the store write leaves: copying, no artifact recorded."""
    daemon = await site.start(FAST)
    done = await site.submit(train_form(8, name="Hero", params='{"epochs": 1}'))
    torn = await site.submit(train_form(8, name="Torn", params='{"epochs": 1}'))
    for job_id in (done, torn):
        assert (await site.wait_for(job_id, {"done", "error"}))["state"] == "done"
    site.sigkill(daemon)
    hero, torn_file = site.config.ed_lora_dir / "Hero.safetensors", site.config.ed_lora_dir / "Torn.safetensors"
    with contextlib.closing(sqlite3.connect(site.config.db_path)) as db, db:
        db.execute("UPDATE jobs SET state='copying', artifact=NULL, lora_id=NULL WHERE id IN (?, ?)", (done, torn))
    torn_file.write_bytes(torn_file.read_bytes()[:1000])  # the copy of this one never completed
    await site.start(FAST)
    job = await site.job(done)
    assert (job["state"], job["artifact"], job["lora_id"], job["error"]) == ("done", str(hero), "Hero", None)
    assert any("the LoRA had been published" in line for line in job["logs"])
    # the torn copy is never taken for the job's LoRA: the complete one in the job's folder is copied again
    job = await site.job(torn)
    assert job["state"] == "done" and job["artifact"] not in (None, str(torn_file)), job
    again = Path(job["artifact"])
    assert again.read_bytes() == (site.config.data_dir / "jobs" / torn / "output" / "Torn.safetensors").read_bytes()
    assert publish.verify_lora(again).unet_modules > 0
    assert torn_file.stat().st_size == 1000  # not ours to remove: it is not one of our temporary names


async def test_a_power_cut_leaves_only_foreign_files(site: Site) -> None:
    lora_dir, data_dir = site.config.ed_lora_dir, site.config.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    ours = [lora_dir / ".Hero.0123abcd.partial", lora_dir / ".Mira_Blue-2.deadbeef.partial",
            lora_dir / ".write-test-k3j_2x9a.partial", data_dir / ".x.89abcdef.partial"]
    foreign = [lora_dir / ".something.partial", lora_dir / "Hero.partial", lora_dir / ".Hero.0123ABCD.partial",
               lora_dir / ".Hero.0123abcd.partial.bak", lora_dir / ".Hero.0123abcd9.partial",
               data_dir / ".other.partial", lora_dir / "Hero.safetensors"]
    for path in ours + foreign:
        path.write_bytes(b"half a file")
    odd_dir = lora_dir / ".dir.01234567.partial"  # our name, but a folder: not ours to delete
    odd_dir.mkdir()
    upload = data_dir / "tmp" / "upload-1" / "0.png"
    upload.parent.mkdir(parents=True)
    upload.write_bytes(b"cut short")
    await site.start(FAST)
    assert [p for p in ours if p.exists()] == []
    assert [p for p in foreign if not p.exists()] == []
    assert odd_dir.is_dir() and not upload.parent.exists()


# ----------------------------------------------------------------------------------- pid-reuse guard (pure)
T0 = 1_000_000.0
BOOT = T0 - 3600


def info(pid: int, created: float, *, session: int | None = 100, ppid: int = 1, group: int | None = None) -> ProcInfo:
    return ProcInfo(pid, ppid, created, session, session if group is None else group, "python")


def pids(found: list[ProcInfo]) -> list[int]:
    return [p.pid for p in found]


def test_the_leader_and_its_session_are_found() -> None:
    procs = [info(100, T0), info(101, T0 + 5, ppid=100), info(102, T0 + 6, ppid=1, group=102),
             info(200, T0 - 50, session=200), info(7, T0 + 9, session=7)]
    assert pids(leftovers(TrainerRecord(100, T0, {}), procs, boot_time=BOOT)) == [100, 101, 102]


def test_the_session_is_found_when_the_leader_is_gone() -> None:
    procs = [info(101, T0 + 5, ppid=1), info(300, T0 + 1, session=300)]
    assert pids(leftovers(TrainerRecord(100, T0, {}), procs, boot_time=BOOT)) == [101]


def test_a_reused_leader_pid_protects_the_new_owners_session() -> None:
    # pid 100 now belongs to a stranger who started its own session: the old session had emptied first
    procs = [info(100, T0 + 500), info(101, T0 + 501, ppid=100), info(150, T0 + 3, session=140)]
    record = TrainerRecord(100, T0, {150: T0 + 3})
    assert pids(leftovers(record, procs, boot_time=BOOT)) == [150]  # only the remembered descendant


def test_reused_descendant_pids_and_older_processes_are_spared() -> None:
    procs = [info(100, T0), info(150, T0 + 900, session=150),  # remembered pid 150, but another process now
             info(160, T0 - 10, ppid=100, session=100)]  # in the session but older than the trainer: impossible
    record = TrainerRecord(100, T0, {150: T0 + 3})
    assert pids(leftovers(record, procs, boot_time=BOOT)) == [100]


def test_children_that_left_the_session_are_followed() -> None:
    procs = [info(100, T0), info(110, T0 + 2, session=110, ppid=100), info(111, T0 + 3, session=110, ppid=110),
             info(120, T0 - 100, session=120, ppid=111)]  # older than the trainer: cannot be its child
    assert pids(leftovers(TrainerRecord(100, T0, {}), procs, boot_time=BOOT)) == [100, 110, 111]


def test_nothing_is_found_for_an_earlier_boot_an_unknown_start_or_ourselves() -> None:
    procs = [info(100, T0), info(101, T0 + 1)]
    assert leftovers(TrainerRecord(100, T0, {}), procs, boot_time=T0 + 60) == []
    assert leftovers(TrainerRecord(100, 0.0, {101: T0 + 1}), procs, boot_time=BOOT) == []
    assert pids(leftovers(TrainerRecord(100, T0, {}), procs, boot_time=BOOT, me=101)) == [100]


def test_windows_has_no_sessions_only_recorded_processes_and_their_children() -> None:
    procs = [info(101, T0 + 1, session=None), info(102, T0 + 2, session=None, ppid=101),
             info(103, T0 + 3, session=None, ppid=9)]
    assert pids(leftovers(TrainerRecord(100, T0, {101: T0 + 1}), procs, boot_time=BOOT)) == [101, 102]


ORPHANS = textwrap.dedent("""
    import subprocess, sys
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    print(child.pid, flush=True)
""")


@pytest.mark.skipif(sys.platform == "win32", reason="sessions are POSIX")
def test_kill_leftovers_stops_the_orphans_of_a_dead_leader_and_spares_strangers() -> None:
    leader = subprocess.Popen([sys.executable, "-c", ORPHANS + "import time; time.sleep(60)"],
                              stdout=subprocess.PIPE, start_new_session=True)
    assert leader.stdout is not None
    orphan = int(leader.stdout.readline())
    started = psutil.Process(leader.pid).create_time()
    created = psutil.Process(orphan).create_time()
    try:
        # the recorded trainer was another process that had this pid before: its session is not this one
        assert kill_leftovers(TrainerRecord(leader.pid, started - 30, {}), grace_s=1) == []
        leader.kill()
        leader.wait(10)  # the leader is gone; its child lives on in its session
        # a trainer started after the child was born cannot be its ancestor
        assert kill_leftovers(TrainerRecord(leader.pid, created + 30, {}), grace_s=1) == []
        assert alive(orphan, created)
        killed = kill_leftovers(TrainerRecord(leader.pid, started, {}), grace_s=1)
        assert pids(killed) == [orphan]
        assert not alive(orphan, created)
    finally:
        with contextlib.suppress(psutil.Error):
            psutil.Process(orphan).kill()
        if leader.poll() is None:
            leader.kill()
            leader.wait()


async def test_a_trainer_leads_its_own_session_and_reports_new_descendants(tmp_path: Path) -> None:
    proc = await start_trainer([sys.executable, "-u", "-c", ORPHANS + "import time; time.sleep(60)"],
                               cwd=str(tmp_path), env=dict(os.environ))
    try:
        if sys.platform != "win32":
            assert os.getsid(proc.pid) == proc.pid  # what recovery relies on: session id = the trainer's pid
        end = time.monotonic() + 10
        while not proc.remember_descendants():
            assert time.monotonic() < end
            await asyncio.sleep(0.05)
        assert len(proc.descendants) == 1 and not proc.remember_descendants()
    finally:
        await proc.terminate_tree(grace_s=1)


# ------------------------------------------------------------------------------------ temp names (pure)
@pytest.mark.parametrize("stem", ["Hero", "Mira_Blue-2", "x" * 64, publish.slugify("Zoë / ../ x")])
def test_our_temp_names_are_recognised(stem: str) -> None:
    name = publish.temp_name(stem)
    assert publish.is_our_temp(name) and OUR_TEMP.fullmatch(name)


@pytest.mark.parametrize("name", [".something.partial", "Hero.partial", ".Hero.0123ABCD.partial",
                                  ".Hero.0123abc.partial", ".Hero.0123abcd.partial.bak", "Hero.0123abcd.partial",
                                  ".He ro.0123abcd.partial", "..0123abcd.partial", ".write-test-.partial",
                                  ".Hero.0123abcd.safetensors", "." + "x" * 65 + ".0123abcd.partial"])
def test_foreign_names_are_not_ours(name: str) -> None:
    assert not publish.is_our_temp(name)


def test_sweep_removes_only_our_files_and_survives_a_missing_folder(tmp_path: Path) -> None:
    (tmp_path / ".Hero.0123abcd.partial").write_bytes(b"x")
    (tmp_path / ".foreign.partial").write_bytes(b"x")
    assert [p.name for p in publish.sweep_temp_files(tmp_path)] == [".Hero.0123abcd.partial"]
    assert [p.name for p in tmp_path.iterdir()] == [".foreign.partial"]
    assert publish.sweep_temp_files(tmp_path / "missing") == []


# --------------------------------------------------------------------------------- reconciliation (pure)
def test_reconciliation_trusts_only_a_file_that_is_there_and_verifies(tmp_path: Path) -> None:
    good, bad = lora(tmp_path / "good.safetensors"), tmp_path / "bad.safetensors"
    bad.write_bytes(b"torn")
    missing = tmp_path / "missing.safetensors"

    def verifies(path: Path) -> bool:
        return path == good

    assert published_file(JobState.COPYING, None, good, verifies) == good
    assert published_file(JobState.COPYING, missing, good, verifies) == good
    assert published_file(JobState.COPYING, None, bad, verifies) is None
    assert published_file(JobState.COPYING, None, None, verifies) is None
    assert published_file(JobState.TRAINING, None, good, verifies) is None  # cannot have published yet
    assert published_file(JobState.TRAINING, good, None, verifies) == good  # but a recorded artifact counts
    assert published_file(JobState.PREPPING, missing, None, verifies) is None


def test_find_published_matches_bytes_not_names(tmp_path: Path) -> None:
    source = lora(tmp_path / "out.safetensors")
    dest = tmp_path / "lora"
    dest.mkdir()
    (dest / "Hero.safetensors").write_bytes(source.read_bytes()[:-1] + b"!")  # same size, other bytes
    ours = publish.publish(source, dest, "Hero")
    assert ours.name == "Hero-2.safetensors"
    (dest / "Hero-3.safetensors").write_bytes(source.read_bytes())  # a copy another job recorded
    assert publish.find_published(source, dest, "Hero") == ours
    assert publish.find_published(source, dest, "Hero", taken=frozenset({ours})) == dest / "Hero-3.safetensors"
    ours.unlink()
    (dest / "Hero-3.safetensors").unlink()
    assert publish.find_published(source, dest, "Hero") is None
    assert publish.find_published(tmp_path / "gone.safetensors", dest, "Hero") is None


def test_a_version_2_database_gains_the_descendants_and_recovery_columns(tmp_path: Path) -> None:
    path = tmp_path / "v2.sqlite3"
    store = JobStore(path)
    store.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript("ALTER TABLE jobs DROP COLUMN descendants; ALTER TABLE jobs DROP COLUMN recovery;"
                         " PRAGMA user_version=2;")
        db.execute("INSERT INTO jobs (id, name, trigger, class_token, base_model, params, image_count, state,"
                   " progress, created_at, updated_at, pid, pid_started) VALUES"
                   " ('j', 'n', 't', 'c', 'm', '{}', 8, 'training', '{}', 1, 1, 4242, 12.5)")
        db.commit()
    store = JobStore(path)
    assert store.process_of("j") == (4242, 12.5, {})
    store.set_descendants("j", {4243: 13.0})
    assert store.process_of("j") == (4242, 12.5, {4243: 13.0})
    store.set_process("j", None, None)
    store.set_descendants("j", {1: 1.0})  # no trainer recorded: nothing to remember
    assert store.process_of("j") is None
    job = store.get("j")
    assert job is not None and job.recovery == Recovery()  # a job from before issue 9 has none
    job.recovery.resumes = 1
    store.save(job)
    assert store.get("j").recovery.resumes == 1
    store.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 5


async def test_killed_while_copying_the_trained_lora_is_published_at_the_restart(site: Site) -> None:
    """Training was over: the LoRA lay complete in the job's folder while the daemon copied it into ED's. A restart
    finishes the copy; the job is done, not interrupted with its finished training thrown away (a job without a
    saved state would have had to train again from the first step, which empties its output folder)."""
    job_id, _ = await kill_while_copying(site)
    lora_dir = site.config.ed_lora_dir
    trained = site.config.data_dir / "jobs" / job_id / "output" / "Copy_Me.safetensors"
    await site.start(FAST)
    job = await site.job(job_id)
    assert (job["state"], job["error"]) == ("done", None), job
    final = lora_dir / "Copy_Me.safetensors"
    assert (job["artifact"], job["lora_id"]) == (str(final), "Copy_Me")
    assert final.read_bytes() == trained.read_bytes()
    assert site.temp_files() == [] and site.loras() == [final]
    assert any("finished copying" in line for line in job["logs"]), job["logs"][-5:]
