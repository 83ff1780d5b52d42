"""The standby trainer (issue 9 §3, daemon/pipeline/standby.py) and the latent-caching batch (--vae_batch_size),
with real processes: kohya_prestart.py around the kohya double, the daemon in-process and, for a crash, as its own
SIGKILLed process."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from aiohttp.test_utils import TestClient

from daemon.config import Config, LiveConfig
from daemon.jobs.models import JobError
from daemon.pipeline import fast_start, kohya_prestart, standby
from daemon.pipeline.fast_start import FastStart, vae_batch_size, with_vae_batch
from daemon.pipeline.runner import JobFailed, JobRunner
from daemon.pipeline.standby import Standby, spec_for
from daemon.web.app import STANDBY
from tests.conftest import no_gpu, train_form, wait_for_state
from tests.helpers import KOHYA_DOUBLE, TOKEN, free_port, make_config
from tests.test_crash_recovery import Site, site  # noqa: F401  (fixture)


# ------------------------------------------------------------------------------------------------ VAE batch
def test_vae_batch_follows_the_card_and_the_resolution() -> None:
    assert [vae_batch_size(t, 512, cpu=False) for t in ("6gb", "8gb", "12gb", "16gb", "24gb", "40gb")] == \
        [3, 4, 6, 8, 8, 8]
    assert [vae_batch_size(t, 1024, cpu=False) for t in ("8gb", "12gb", "16gb", "24gb", "40gb")] == [1, 1, 2, 3, 5]
    assert vae_batch_size("40gb", 512, cpu=True) == 1 and vae_batch_size("cpu", 512, cpu=False) == 1


def test_vae_batch_flag_only_with_latent_caching_and_above_one() -> None:
    argv = ["py", "-u", "train_network.py", "--cache_latents", "--sdpa"]
    assert with_vae_batch(argv, 4) == ["py", "-u", "train_network.py", "--cache_latents", "--vae_batch_size", "4",
                                       "--sdpa"]
    assert with_vae_batch(argv, 1) == argv
    assert with_vae_batch(["py", "x.py"], 4) == ["py", "x.py"]
    assert with_vae_batch(with_vae_batch(argv, 4), 8) == with_vae_batch(argv, 4)


def test_the_argv_hook_adds_it_on_a_gpu_only(tmp_path: Path) -> None:
    fs = FastStart(make_config(tmp_path, port=free_port()), store=None)  # type: ignore[arg-type]
    argv = ["py", "-u", "train_network.py", "--cache_latents"]
    assert "--vae_batch_size" not in fs.argv(argv, memory_tier="cpu", resolution=512, cpu=True)
    on_gpu = fs.argv(argv, memory_tier="8gb", resolution=512, cpu=False)
    assert on_gpu[on_gpu.index("--vae_batch_size") + 1] == "4"
    off = FastStart(make_config(tmp_path, port=free_port(), fast_start=False), store=None)  # type: ignore[arg-type]
    assert off.argv(argv, memory_tier="8gb", resolution=512, cpu=False) == argv


# ------------------------------------------------------------------------------------------------ the Standby alone
def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def _until(check, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise AssertionError("timed out")
        await asyncio.sleep(0.02)


async def _gpu_none():
    return no_gpu()


def test_no_standby_without_kohya_python_or_with_fast_start_off(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, port=free_port())
    assert spec_for(cfg, cpu=True) is not None
    assert spec_for(dataclasses.replace(cfg, fast_start=False), cpu=True) is None
    assert spec_for(dataclasses.replace(cfg, kohya=dataclasses.replace(cfg.kohya, python=None)), cpu=True) is None
    # It imports the SDXL script, which imports train_network: both families' modules are ready.
    assert spec_for(cfg, cpu=True).import_script == str(KOHYA_DOUBLE.with_name("sdxl_train_network.py"))


async def test_started_on_interest_and_killed_when_idle(tmp_path: Path) -> None:
    live = LiveConfig(make_config(tmp_path, port=free_port()))
    sb = Standby(live, _gpu_none, lambda: False, idle_s=4.0, tick_s=0.1)
    await sb.start()
    try:
        await asyncio.sleep(0.3)
        assert sb.pid is None  # nobody showed interest
        sb.interest()
        await _until(lambda: sb.ready)
        pid = sb.pid
        assert pid is not None and str(fast_start.WRAPPER) in psutil.Process(pid).cmdline()
        assert (sb.rss() or 0) > 0
        await _until(lambda: not _alive(pid), timeout=8)  # idle: no interest for 4 s
        assert sb.pid is None
        # Its ready file goes with it (there never was a go file).
        await _until(lambda: not list(live.current.data_dir.glob("standby-*")), timeout=5)
    finally:
        await sb.stop()


async def test_never_started_while_a_job_runs(tmp_path: Path) -> None:
    busy = [True]
    sb = Standby(LiveConfig(make_config(tmp_path, port=free_port())), _gpu_none, lambda: busy[0], tick_s=0.1)
    await sb.start()
    try:
        sb.interest()
        await asyncio.sleep(1.0)
        assert sb.pid is None
        busy[0] = False  # the job ended; the tab is still open
        await _until(lambda: sb.pid is not None)
    finally:
        await sb.stop()


@pytest.mark.parametrize("watching", [True, False])
async def test_after_a_long_job_only_a_tab_that_followed_it_gets_one(tmp_path: Path, watching: bool) -> None:
    busy = [True]
    sb = Standby(LiveConfig(make_config(tmp_path, port=free_port())), _gpu_none, lambda: busy[0],
                 watching=lambda: watching, idle_s=1.0, tick_s=0.1)
    await sb.start()
    try:
        sb.interest()
        await asyncio.sleep(1.5)  # the job outlasts the idle time
        busy[0] = False
        if watching:  # its WebSocket stayed connected all along: the tab is still in use
            await _until(lambda: sb.pid is not None, timeout=5)
        else:
            await asyncio.sleep(0.8)
            assert sb.pid is None
    finally:
        await sb.stop()


async def test_a_config_reload_replaces_or_stops_it(tmp_path: Path) -> None:
    live = LiveConfig(make_config(tmp_path, port=free_port()))
    sb = Standby(live, _gpu_none, lambda: False, tick_s=0.1)
    await sb.start()
    try:
        sb.interest()
        await _until(lambda: sb.pid is not None)
        first = sb.pid
        other = tmp_path / "workspace2"
        other.mkdir()
        live.current = dataclasses.replace(live.current, kohya=dataclasses.replace(live.current.kohya,
                                                                                   workspace=other))
        await _until(lambda: sb.pid not in (None, first))  # a new one, for the new settings
        assert not _alive(first)
        assert psutil.Process(sb.pid).cwd() == str(other)
        second = sb.pid
        live.current = dataclasses.replace(live.current, fast_start=False)
        await _until(lambda: not _alive(second))
        await asyncio.sleep(0.3)
        assert sb.pid is None
    finally:
        await sb.stop()


async def test_stop_kills_it(tmp_path: Path) -> None:
    sb = Standby(LiveConfig(make_config(tmp_path, port=free_port())), _gpu_none, lambda: False, tick_s=0.1)
    await sb.start()
    sb.interest()
    await _until(lambda: sb.pid is not None)
    pid = sb.pid
    await sb.stop()
    assert not _alive(pid)


# ------------------------------------------------------------------------------------------------ through the daemon
class StartSpy:
    """Every command started for a job (fast_start) and for the standby (standby.py): both run for real."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.job: list[list[str]] = []
        self.standby: list[int] = []
        real = fast_start.start_trainer

        async def job_start(argv: list[str], **kw: Any):
            self.job.append(list(argv))
            return await real(argv, **kw)

        async def standby_start(argv: list[str], **kw: Any):
            proc = await real(argv, **kw)
            self.standby.append(proc.pid)
            return proc

        monkeypatch.setattr(fast_start, "start_trainer", job_start)
        monkeypatch.setattr(standby, "start_trainer", standby_start)


def _standby_of(client: TestClient) -> Standby:
    return client.server.app[STANDBY]


async def _open_tab(client: TestClient) -> Standby:
    assert (await client.get("/models")).status == 200
    sb = _standby_of(client)
    await _until(lambda: sb.ready)
    return sb


async def test_the_next_job_takes_the_standby_with_the_same_argv(start_daemon, tmp_path: Path, monkeypatch,
                                                                  caplog) -> None:
    monkeypatch.setenv("KOHYA_DOUBLE_STEP_SECONDS", "0.02")
    spy = StartSpy(monkeypatch)
    # Without interest: the per-job prestart, as before.
    plain_cfg = make_config(tmp_path / "plain", port=free_port())
    monkeypatch.setenv("KOHYA_DOUBLE_RECORD", str(tmp_path / "plain.json"))
    plain = await start_daemon(plain_cfg)
    plain_id = (await (await plain.post("/train", data=train_form(8))).json())["job_id"]
    assert (await wait_for_state(plain, plain_id, {"done", "error"}, timeout=90))["state"] == "done"
    assert len(spy.job) == 1 and spy.standby == []
    await plain.close()

    # With the tab open: the standby runs the job, and no other trainer is started.
    cfg = make_config(tmp_path / "sb", port=free_port())
    monkeypatch.setenv("KOHYA_DOUBLE_RECORD", str(tmp_path / "sb.json"))
    client = await start_daemon(cfg)
    sb = await _open_tab(client)
    first = sb.pid
    ws = await client.ws_connect(f"/ws?token={TOKEN}")  # the tab follows the job
    job_id = (await (await client.post("/train", data=train_form(8))).json())["job_id"]
    seen_training = trained_by_standby = False
    while (job := await (await client.get(f"/jobs/{job_id}/status")).json())["state"] not in ("done", "error"):
        if job["state"] == "training":
            seen_training = True
            assert sb.pid is None  # never a standby beside a training run
            trained_by_standby = trained_by_standby or _alive(first)  # it is the trainer (until kohya exits)
        await asyncio.sleep(0.05)
    assert job["state"] == "done", job["error"]
    assert seen_training and trained_by_standby
    assert len(spy.job) == 1  # only the plain daemon's job started a trainer of its own
    lines = (await (await client.get(f"/jobs/{job_id}/logs")).json())["lines"]
    logged = next(line for line in lines if line.startswith("$ "))
    assert logged.split()[3] == str(KOHYA_DOUBLE)  # SD 1.x's script ran, though the standby imported SDXL's

    def same(argv: list[str], jid: str, c: Config) -> list[str]:
        return [a.replace(str(c.jobs_dir / jid), "JOB").replace(str(c.base_model), "MODEL").replace(jid, "ID")
                for a in argv]

    assert same(json.loads((tmp_path / "sb.json").read_text()), job_id, cfg) == \
        same(json.loads((tmp_path / "plain.json").read_text()), plain_id, plain_cfg)
    # The job is over and the tab still in use: a new standby waits for the next click.
    await _until(lambda: sb.pid is not None and sb.pid != first)
    assert len(spy.standby) == 2
    await ws.close()
    assert not [r for r in caplog.records if r.name == "daemon.pipeline.standby" and r.levelname == "ERROR"]


async def test_a_failed_prep_kills_the_taken_standby(start_daemon, tmp_path: Path, monkeypatch) -> None:
    spy = StartSpy(monkeypatch)

    def failing_prepare(self, job, *args: Any) -> None:
        time.sleep(0.3)
        assert self._store.process_of(job.id) is not None  # recorded as the job's: a crash now would stop it
        raise JobFailed(JobError("bad_image", "pic3.png cannot be read.", "Upload it again."))

    monkeypatch.setattr(JobRunner, "_prepare", failing_prepare)
    client = await start_daemon(make_config(tmp_path, port=free_port()))
    sb = await _open_tab(client)
    first = sb.pid
    job_id = (await (await client.post("/train", data=train_form(8))).json())["job_id"]
    job = await wait_for_state(client, job_id, {"error", "done", "cancelled"})
    assert job["error"]["kind"] == "bad_image"
    await _until(lambda: not _alive(first), timeout=5)
    assert spy.job == []  # it had been taken: the job started nothing of its own
    await _until(lambda: sb.pid is not None and sb.pid != first)  # the tab is still open


async def test_a_cancel_during_prep_kills_the_taken_standby(start_daemon, tmp_path: Path, monkeypatch) -> None:
    StartSpy(monkeypatch)
    real_prepare = JobRunner._prepare

    def slow_prepare(self, *args: Any) -> None:
        time.sleep(3)
        real_prepare(self, *args)

    monkeypatch.setattr(JobRunner, "_prepare", slow_prepare)
    client = await start_daemon(make_config(tmp_path, port=free_port()))
    sb = await _open_tab(client)
    first = sb.pid
    job_id = (await (await client.post("/train", data=train_form(8))).json())["job_id"]
    await _until(lambda: sb.pid is None)  # taken by the job
    await client.post(f"/jobs/{job_id}/cancel")
    t0 = time.monotonic()
    await _until(lambda: not _alive(first), timeout=5)
    assert time.monotonic() - t0 < 2.5  # at once, not after the prep
    assert (await wait_for_state(client, job_id, {"cancelled", "error", "done"}))["state"] == "cancelled"


async def test_a_job_that_cannot_use_it_kills_it_first(start_daemon, tmp_path: Path, monkeypatch) -> None:
    spy = StartSpy(monkeypatch)
    client = await start_daemon(make_config(tmp_path, port=free_port()))
    sb = await _open_tab(client)
    first = sb.pid
    monkeypatch.setattr(fast_start, "CUTS", frozenset({"warm"}))  # a runner with no prestart (bench modes)
    job_id = (await (await client.post("/train", data=train_form(8))).json())["job_id"]
    assert (await wait_for_state(client, job_id, {"done", "error"}))["state"] == "done"
    assert not _alive(first)
    assert len(spy.job) == 1 and spy.job[0][2] == str(KOHYA_DOUBLE)


async def test_shutdown_kills_it(start_daemon, tmp_path: Path) -> None:
    client = await start_daemon(make_config(tmp_path, port=free_port()))
    sb = await _open_tab(client)
    pid = sb.pid
    await client.close()
    assert not _alive(pid)


async def test_it_exits_when_the_daemon_is_sigkilled(site: Site) -> None:  # noqa: F811
    daemon = await site.start({})
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http, \
            http.get(f"{daemon.url}/models") as resp:
        assert resp.status == 200
    data_dir = site.config.data_dir
    await _until(lambda: bool(list(data_dir.glob("standby-*-go.json.ready"))), timeout=30)
    tree = site.tree(daemon)
    waiting = [pid for pid, _ in tree if str(fast_start.WRAPPER) in " ".join(psutil.Process(pid).cmdline())]
    assert len(waiting) == 1
    site.sigkill(daemon)
    t0 = time.monotonic()
    await _until(lambda: not _alive(waiting[0]), timeout=10)
    assert time.monotonic() - t0 < 5  # its parent check, not its max wait
    with contextlib.suppress(FileNotFoundError):
        assert not any(p.name.endswith("go.json") for p in data_dir.iterdir())
    assert list(data_dir.glob("standby-*")) == []  # nor its ready marker: no daemon is left to remove it


def test_the_wrapper_never_runs_a_go_file_once_orphaned(tmp_path: Path) -> None:
    go = tmp_path / "go.json"
    go.write_text(json.dumps({"script": "x.py", "argv": []}), encoding="utf-8")
    assert kohya_prestart.wait_for_go(str(go), 5, parent=-1) is None  # "re-parented" at once
    assert go.exists()  # left for nobody to run


def test_a_daemon_killed_before_the_wrapper_started_leaves_nothing_waiting(tmp_path: Path) -> None:
    # The race CI met: the daemon SIGKILLed between spawning the wrapper and the wrapper reading its own parent.
    # Told the daemon's pid on its command line, it sees at once that its parent is not that daemon.
    script = tmp_path / "never_imported.py"
    script.write_text("import pathlib\npathlib.Path(__file__).with_suffix('.imported').touch()\n", encoding="utf-8")
    argv = fast_start.prestart_argv(sys.executable, str(script), tmp_path / "go.json")
    at = argv.index("--parent") + 1
    argv[at] = str(2**22 + 12345)  # no such process: never our parent
    t0 = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == kohya_prestart.EXIT_NO_GO, done.stderr
    assert time.monotonic() - t0 < 10
    assert not script.with_suffix(".imported").exists()  # gave up before importing anything


def test_a_slow_import_is_cut_short_when_the_daemon_dies(tmp_path: Path) -> None:
    # kohya's imports take 5-20 s; a daemon dying meanwhile must not leave them running to the end.
    script = tmp_path / "slow_import.py"
    script.write_text("import time\ntime.sleep(60)\n", encoding="utf-8")
    middle = tmp_path / "middle.py"  # stands for the daemon: starts the wrapper, then dies without a word
    middle.write_text(
        "import os, subprocess, sys, time\n"
        f"argv = {fast_start.prestart_argv(sys.executable, str(script), tmp_path / 'go.json')!r}\n"
        "argv[argv.index('--parent') + 1] = str(os.getpid())\n"
        "proc = subprocess.Popen(argv)\n"
        "print(proc.pid, flush=True)\n"
        "time.sleep(2)\n"
        "os._exit(9)\n", encoding="utf-8")
    out = subprocess.run([sys.executable, str(middle)], capture_output=True, text=True, timeout=30)
    wrapper = int(out.stdout.split()[0])
    t0 = time.monotonic()
    while _alive(wrapper) and time.monotonic() - t0 < 20:
        time.sleep(0.1)
    assert not _alive(wrapper)
    assert time.monotonic() - t0 < 5  # the watcher, not the 60 s import


# ------------------------------------------------------------------------------------------------ bench mode
def test_bench_standby_mode_and_a_report_after_every_run(tmp_path: Path) -> None:
    from bench.quick_start import (
        RunResult,
        build_parser,
        mode_settings,
        parse_modes,
        report_of,
        standby_line,
        write_report,
    )

    args = build_parser().parse_args(["--kohya-sd", "/sd", "--kohya-python", "/py", "--model", "/m",
                                      "--tokenizer-cache", "/t", "--modes", "off,on,standby",
                                      "--out", str(tmp_path / "r.json")])
    assert args.modes == ["off", "on", "standby"] and args.tab_lead_s == 20
    assert mode_settings("standby") == (True, None) and parse_modes("standby") == ["standby"]
    assert parse_modes("warm+vae_batch") == ["warm+vae_batch"]
    runs = [RunResult("off", 1, first_step_s=30.0)]
    write_report(args.out, report_of(args, {}, 8, False, runs, None, 31.0))
    assert json.loads(Path(args.out).read_text())["summary"]["off"]["median_s"] == 30.0
    runs.append(RunResult("standby", 1, first_step_s=12.0, standby_ready_s=6.5, standby_rss_mib=431.0))
    write_report(args.out, report_of(args, {}, 8, False, runs, None, 60.0))  # replaced whole, run by run
    report = json.loads(Path(args.out).read_text())
    assert [r["mode"] for r in report["runs"]] == ["off", "standby"] and report["runs"][1]["standby_rss_mib"] == 431.0
    assert report["summary"]["standby"]["saved_s"] == 18.0
    assert standby_line(runs) == "standby: tab opened → ready (imports done), median 6.50 s; idle RSS 431 MiB"
    assert standby_line(runs[:1]) == "standby: no run"


async def test_a_job_that_takes_the_standby_mid_import_leaves_no_marker_behind(start_daemon, tmp_path: Path,
                                                                                monkeypatch) -> None:
    """The job clicked while the standby still imports takes it; the standby's `.ready` marker, made once the imports
    are done, must not then stay in the data dir (one more file per job, forever)."""
    kohya = tmp_path / "sd-scripts"
    kohya.mkdir()
    for script in KOHYA_DOUBLE.parent.glob("*.py"):
        (kohya / script.name).write_text(script.read_text(encoding="utf-8"), encoding="utf-8")
    sdxl = kohya / "sdxl_train_network.py"  # what the standby imports: slow, as kohya's imports are
    sdxl.write_text("import time\ntime.sleep(2)\n" + sdxl.read_text(encoding="utf-8"), encoding="utf-8")
    spy = StartSpy(monkeypatch)
    cfg = make_config(tmp_path, port=free_port(), kohya={"script_path": str(kohya / "train_network.py")})
    client = await start_daemon(cfg)
    assert (await client.get("/models")).status == 200
    sb = _standby_of(client)
    await _until(lambda: sb.pid is not None)
    assert not sb.ready  # still importing
    job_id = (await (await client.post("/train", data=train_form(8))).json())["job_id"]
    job = await wait_for_state(client, job_id, {"done", "error"}, timeout=90)
    assert job["state"] == "done", job["error"]
    assert spy.job == [] and len(spy.standby) >= 1  # the standby ran it
    await client.close()  # no standby left waiting, so none of its files is current
    assert sorted(p.name for p in cfg.data_dir.glob("standby-*")) == []
