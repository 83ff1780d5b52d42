"""Fast start (issue 9 §3, config.fast_start): the warm-up, the prestarted trainer and the latent cache, with real
processes (the kohya double through daemon/pipeline/kohya_prestart.py) and real files."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import threading
import time
import types
import zipfile
from pathlib import Path
from typing import Any

import psutil
import pytest
from aiohttp.test_utils import TestClient

from daemon.config import Config
from daemon.jobs.models import JobError
from daemon.jobs.store import JobStore
from daemon.pipeline import fast_start, kohya, kohya_prestart
from daemon.pipeline.fast_start import FastStart, clean_latent_cache, go_document, warm_file, worth_warming
from daemon.pipeline.runner import JobFailed, JobRunner
from tests.conftest import train_form, wait_for_state
from tests.helpers import KOHYA_DOUBLE, free_port, make_config


# ------------------------------------------------------------------------------------------------ pure parts
def test_latent_disk_cache_flag_follows_cache_latents() -> None:
    argv = ["py", "-u", "train_network.py", "--seed", "1", "--cache_latents", "--sdpa"]
    assert kohya.with_latent_disk_cache(argv) == [*argv[:6], "--cache_latents_to_disk", "--sdpa"]
    assert kohya.with_latent_disk_cache(kohya.with_latent_disk_cache(argv)) == kohya.with_latent_disk_cache(argv)
    assert kohya.with_latent_disk_cache(["py", "x.py"]) == ["py", "x.py"]  # no latent caching: nothing to keep


def test_go_document_only_for_the_same_launcher_and_script() -> None:
    argv = ["/venv/python", "-u", "/sd/train_network.py", "--seed", "1"]
    assert go_document(argv, "/venv/python", "/sd/train_network.py") == {
        "script": "/sd/train_network.py", "argv": ["--seed", "1"]}
    assert go_document(argv, "/venv/python", "/sd/sdxl_train_network.py") is None
    assert go_document(["accelerate", "launch", "/sd/train_network.py"], "/venv/python", "/sd/train_network.py") is None


def test_warm_file_reads_it_all_unless_stopped(tmp_path: Path) -> None:
    model = tmp_path / "model.safetensors"
    model.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    assert warm_file(model, threading.Event(), chunk=1024 * 1024) == model.stat().st_size
    stop = threading.Event()
    stop.set()
    assert warm_file(model, stop) == 0
    assert worth_warming(2 << 30, 8 << 30) and not worth_warming(6 << 30, 8 << 30) and not worth_warming(0, 8 << 30)


def test_a_failing_warm_up_only_ends_itself(tmp_path: Path) -> None:
    for path in (tmp_path / "missing.safetensors", tmp_path):  # gone; a folder (IsADirectoryError)
        warmer = fast_start.Warmer(path).start()
        assert warmer.finished.wait(10)
        assert warmer.bytes_read == 0


def _npz(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("latents.npy", b"\x93NUMPY" + b"\0" * 64)


def test_cached_latents_kept_only_for_the_same_checkpoint_and_when_whole(tmp_path: Path) -> None:
    images, stamp = tmp_path / "img" / "1_x", tmp_path / "latent-cache.json"
    images.mkdir(parents=True)
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"one")
    good, cut = images / "a_0256x0256_sd.npz", images / "b_0256x0256_sd.npz"
    _npz(good)
    _npz(cut)
    assert clean_latent_cache(images.parent, stamp, model) == [good, cut]  # never stamped: made with who knows what
    _npz(good)
    _npz(cut)
    cut.write_bytes(cut.read_bytes()[:-30])  # a run killed while kohya wrote it
    assert clean_latent_cache(images.parent, stamp, model) == [cut]
    assert good.is_file() and not cut.exists()
    os.utime(model, ns=(time.time_ns(), time.time_ns() + 10**9))  # the user replaced the checkpoint
    assert clean_latent_cache(images.parent, stamp, model) == [good]


# ------------------------------------------------------------------------------------------------ real processes
@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    return JobStore(tmp_path / "jobs.sqlite3")


def _argv(cfg: Config, *args: str) -> list[str]:
    assert cfg.kohya.python is not None and cfg.kohya.script_path is not None
    return [str(cfg.kohya.python), "-u", str(cfg.kohya.script_path), *args]


async def test_the_prestarted_double_runs_the_real_argv(tmp_path: Path, store: JobStore, monkeypatch) -> None:
    cfg = make_config(tmp_path, port=free_port())
    record = tmp_path / "argv.json"
    monkeypatch.setenv("KOHYA_DOUBLE_RECORD", str(record))
    fs = FastStart(cfg, store)
    seen: dict[str, Any] = {}

    async def prep() -> None:
        await asyncio.sleep(0.3)
        seen["pre"] = fs.prestarted

    await fs.prepare(prep, job_id="j1", base_model=str(cfg.base_model), arch="sd1", job_root=tmp_path,
                     images=tmp_path / "img", cpu=True, cancel=asyncio.Event())
    pre = seen["pre"]
    assert pre is not None and pre.proc.returncode is None  # waiting for its go signal, imports done
    assert str(fast_start.WRAPPER) in psutil.Process(pre.proc.pid).cmdline()
    argv = _argv(cfg, "--help")
    proc = await fs.start(argv, cwd=str(cfg.kohya.workspace), env=pre.env, job_id="j1")
    assert proc is pre.proc  # the same process: no second start
    out = "".join([c.text async for c in proc.output()])
    assert await proc.wait() == 0
    assert json.loads(record.read_text()) == ["--help"]
    assert "usage: train_network.py" in out  # argparse's prog: the script's own name, as when run directly
    assert not (tmp_path / fast_start.GO_FILE).exists()


async def test_another_command_gets_a_new_process(tmp_path: Path, store: JobStore) -> None:
    cfg = make_config(tmp_path, port=free_port())
    fs = FastStart(cfg, store)
    await fs.prepare(_noop, job_id="j1", base_model=str(cfg.base_model), arch="sd1", job_root=tmp_path,
                     images=tmp_path / "img", cpu=True, cancel=asyncio.Event())
    pre = fs.prestarted
    assert pre is not None
    other = [sys.executable, "-u", "-c", "print('other')"]
    proc = await fs.start(other, cwd=str(tmp_path), env=pre.env, job_id="j1")
    assert proc.pid != pre.proc.pid
    assert await proc.wait() == 0
    assert pre.proc.returncode is not None  # the prestarted one was stopped


async def _noop() -> None:
    return None


async def test_a_guard_thrown_away_with_its_loop_awaits_nothing(tmp_path: Path, store: JobStore) -> None:
    """A prestarted trainer whose job never reached the go (the daemon stopping between prep and training), its
    guard still pending when the event loop is closed: the loop throws the guard's coroutine away (GeneratorExit),
    and a guard that awaited its clean-up then was a RuntimeError on the console (and an INTERNALERROR in pytest)."""
    cfg = make_config(tmp_path, port=free_port())
    fs = FastStart(cfg, store)
    await fs.prepare(_noop, job_id="j1", base_model=str(cfg.base_model), arch="sd1", job_root=tmp_path,
                     images=tmp_path / "img", cpu=True, cancel=asyncio.Event())
    pre = fs.prestarted
    assert pre is not None and pre.guard is not None
    try:
        # what a closing loop does to a pending task's coroutine: one guard of our own, suspended, then closed
        guard = fs._kill_on_cancel(pre, "j1", asyncio.Event())
        guard.send(None)  # runs up to its wait
        guard.close()  # raised RuntimeError ("coroutine ignored GeneratorExit") when the clean-up awaited here
    finally:
        await fs.discard("j1")  # the runner's clean-up on cancellation
    assert fs.prestarted is None and pre.proc.returncode is not None


async def test_a_failed_prep_kills_the_prestarted_trainer(tmp_path: Path, store: JobStore) -> None:
    cfg = make_config(tmp_path, port=free_port())
    fs = FastStart(cfg, store)
    pids: list[int] = []

    async def prep() -> None:
        assert fs.prestarted is not None
        pids.append(fs.prestarted.proc.pid)
        raise JobFailed(JobError("bad_image", "broken", ""))

    with pytest.raises(JobFailed):
        await fs.prepare(prep, job_id="j1", base_model=str(cfg.base_model), arch="sd1", job_root=tmp_path,
                         images=tmp_path / "img", cpu=True, cancel=asyncio.Event())
    assert fs.prestarted is None
    assert not _alive(pids[0])


async def test_fast_start_off_starts_nothing_early(tmp_path: Path, store: JobStore) -> None:
    cfg = make_config(tmp_path, port=free_port(), fast_start=False)
    fs = FastStart(cfg, store)
    await fs.prepare(_noop, job_id="j1", base_model=str(cfg.base_model), arch="sd1", job_root=tmp_path,
                     images=tmp_path / "img", cpu=True, cancel=asyncio.Event())
    assert fs.prestarted is None and fs.warmer is None and fs.cuts == frozenset()
    assert fs.argv(["a", "--cache_latents"]) == ["a", "--cache_latents"]


async def test_accelerate_launch_is_never_prestarted_nor_hashed_for(tmp_path: Path, store: JobStore) -> None:
    cfg = make_config(tmp_path, port=free_port(), kohya={"python": None, "accelerate_bin": "accelerate"})
    fs = FastStart(cfg, store)
    await fs.prepare(_noop, job_id="j1", base_model=str(cfg.base_model), arch="sd1", job_root=tmp_path,
                     images=tmp_path / "img", cpu=True, cancel=asyncio.Event())
    assert fs.prestarted is None
    assert fs.warmer is not None and fs.warmer.hash_file is None  # still warmed: kohya reads it either way
    assert fs.warmer.finished.wait(10) and fs.warmer.bytes_read == Path(str(cfg.base_model)).stat().st_size


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ------------------------------------------------------------------------------------------------ through the daemon
REAL_START_TRAINER = fast_start.start_trainer


class Spy:
    """Every command the daemon starts (the real start_trainer runs them)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[list[str]] = []
        self.pids: list[int] = []
        real = REAL_START_TRAINER

        async def spy(argv: list[str], **kw: Any):
            self.calls.append(list(argv))
            proc = await real(argv, **kw)
            self.pids.append(proc.pid)
            return proc

        monkeypatch.setattr(fast_start, "start_trainer", spy)


async def _run_job(start_daemon, cfg: Config, monkeypatch, record: Path) -> tuple[dict[str, Any], Spy, list[str]]:
    monkeypatch.setenv("KOHYA_DOUBLE_RECORD", str(record))
    spy = Spy(monkeypatch)
    client = await start_daemon(cfg)
    job_id = (await (await client.post("/train", data=train_form(8))).json())["job_id"]
    job = await wait_for_state(client, job_id, {"done", "error", "cancelled"})
    assert job["state"] == "done", job["error"]
    return job, spy, (await (await client.get(f"/jobs/{job_id}/logs")).json())["lines"]


async def test_on_and_off_give_the_real_script_the_same_arguments(start_daemon, tmp_path: Path, monkeypatch) -> None:
    on_cfg = make_config(tmp_path / "on", port=free_port())
    off_cfg = make_config(tmp_path / "off", port=free_port(), fast_start=False)
    on, on_spy, on_lines = await _run_job(start_daemon, on_cfg, monkeypatch, tmp_path / "on.json")
    off, off_spy, _ = await _run_job(start_daemon, off_cfg, monkeypatch, tmp_path / "off.json")
    on_argv, off_argv = json.loads((tmp_path / "on.json").read_text()), json.loads((tmp_path / "off.json").read_text())
    # One process each: with fast_start it is the prestart wrapper, which then ran the logged command.
    assert len(on_spy.calls) == 1 and on_spy.calls[0][2] == str(fast_start.WRAPPER)
    assert len(off_spy.calls) == 1 and off_spy.calls[0][2] == str(KOHYA_DOUBLE)
    logged = next(line for line in on_lines if line.startswith("$ "))
    assert logged == "$ " + " ".join([*on_spy.calls[0][:2], str(KOHYA_DOUBLE), *on_argv])
    # The same arguments, but for the jobs' own paths and the latent files kept on disk.
    def same(argv: list[str], job: dict[str, Any], cfg: Config) -> list[str]:
        return [a.replace(str(cfg.jobs_dir / job["id"]), "JOB").replace(str(cfg.base_model), "MODEL")
                .replace(job["id"], "ID") for a in argv]

    assert same(on_argv, on, on_cfg) == kohya.with_latent_disk_cache(same(off_argv, off, off_cfg))
    assert "--cache_latents_to_disk" not in off_argv
    # The warm-up read the checkpoint whole: its sha256 is where the go file told the prestarted kohya to look.
    hashed = json.loads((on_cfg.jobs_dir / on["id"] / fast_start.MODEL_HASH_FILE).read_text())
    assert hashed["sha256"] == hashlib.sha256(Path(str(on_cfg.base_model)).read_bytes()).hexdigest()


async def test_a_cancel_during_prep_kills_the_prestarted_trainer_at_once(start_daemon, tmp_path: Path,
                                                                          monkeypatch) -> None:
    cfg = make_config(tmp_path, port=free_port())
    spy = Spy(monkeypatch)
    real_prepare = JobRunner._prepare

    def slow_prepare(self, *args: Any) -> None:
        time.sleep(3)  # a long prep (hundreds of pictures)
        real_prepare(self, *args)

    monkeypatch.setattr(JobRunner, "_prepare", slow_prepare)
    client = await start_daemon(cfg)
    job_id = (await (await client.post("/train", data=train_form(8))).json())["job_id"]
    await _until(lambda: bool(spy.pids))
    pid = spy.pids[0]
    assert _alive(pid)
    await client.post(f"/jobs/{job_id}/cancel")
    t0 = time.monotonic()
    await _until(lambda: not _alive(pid))
    assert time.monotonic() - t0 < 2.5  # not only once the prep is over
    job = await wait_for_state(client, job_id, {"cancelled", "error", "done"})
    assert job["state"] == "cancelled"
    assert spy.pids == [pid]  # and the real run never started


async def test_a_failed_prep_kills_the_prestarted_trainer_through_the_daemon(start_daemon, tmp_path: Path,
                                                                              monkeypatch) -> None:
    cfg = make_config(tmp_path, port=free_port())
    spy = Spy(monkeypatch)

    def failing_prepare(self, job, *args: Any) -> None:
        time.sleep(0.5)
        assert self._store.process_of(job.id) is not None  # recorded: a daemon crash now would still stop it
        raise JobFailed(JobError("bad_image", "pic3.png cannot be read.", "Upload it again."))

    monkeypatch.setattr(JobRunner, "_prepare", failing_prepare)
    client = await start_daemon(cfg)
    job_id = (await (await client.post("/train", data=train_form(8))).json())["job_id"]
    job = await wait_for_state(client, job_id, {"cancelled", "error", "done"})
    assert job["state"] == "error" and job["error"]["kind"] == "bad_image"
    assert len(spy.pids) == 1 and not _alive(spy.pids[0])
    assert JobStore(cfg.db_path).process_of(job_id) is None


async def test_the_warm_up_never_fails_a_job(client: TestClient, monkeypatch) -> None:
    calls: list[Path] = []

    def broken(path: Path, *_: Any, **__: Any) -> int:
        calls.append(path)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(fast_start, "warm_file", broken)
    job_id = (await (await client.post("/train", data=train_form(8))).json())["job_id"]
    job = await wait_for_state(client, job_id, {"done", "error"})
    assert job["state"] == "done", job["error"]
    assert [p.name for p in calls] == ["sd-test.safetensors"]


async def _until(check, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise AssertionError("timed out")
        await asyncio.sleep(0.02)


# ------------------------------------------------------------------------------------------------ model hash
def test_the_warm_up_hashes_the_checkpoint_once_per_daemon(tmp_path: Path) -> None:
    model = tmp_path / "model.safetensors"
    model.write_bytes(os.urandom(2 * 1024 * 1024 + 5))
    want = hashlib.sha256(model.read_bytes()).hexdigest()
    first = fast_start.Warmer(model, hash_file=tmp_path / "a.json").start()
    assert first.finished.wait(10)
    entry = json.loads((tmp_path / "a.json").read_text())
    assert entry == {"path": str(model.resolve()), "size": model.stat().st_size,
                     "mtime_ns": model.stat().st_mtime_ns, "sha256": want}
    again = fast_start.Warmer(model, hash_file=tmp_path / "b.json")
    again.stop()  # reads nothing: the hash comes from what this daemon already read
    assert again.start().finished.wait(10) and again.bytes_read == 0
    assert json.loads((tmp_path / "b.json").read_text())["sha256"] == want


def test_prestarted_kohya_takes_the_hash_only_for_the_unchanged_file(tmp_path: Path, monkeypatch) -> None:
    model, other = tmp_path / "model.safetensors", tmp_path / "other.safetensors"
    model.write_bytes(b"weights")
    other.write_bytes(b"more weights")
    hash_file = tmp_path / "model-sha256.json"
    st = model.stat()
    fast_start.write_json(hash_file, fast_start.hash_entry((str(model.resolve()), st.st_size, st.st_mtime_ns),
                                                          "f" * 64))
    # kohya's library.train_util at 48d368fa, reduced to the function replaced
    train_util = types.ModuleType("library.train_util")
    train_util.calculate_sha256 = lambda f: hashlib.sha256(Path(f).read_bytes()).hexdigest()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "library.train_util", train_util)
    assert kohya_prestart.use_known_hashes(str(hash_file))
    assert train_util.calculate_sha256(str(model)) == "f" * 64  # from the daemon's file
    assert train_util.calculate_sha256(str(other)) == hashlib.sha256(b"more weights").hexdigest()
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # changed since: kohya hashes it itself
    assert train_util.calculate_sha256(str(model)) == hashlib.sha256(b"weights").hexdigest()
    hash_file.unlink()
    assert kohya_prestart.known_sha256(str(hash_file), str(model)) is None
    monkeypatch.delitem(sys.modules, "library.train_util")
    assert not kohya_prestart.use_known_hashes(str(hash_file))  # no kohya there: nothing replaced
