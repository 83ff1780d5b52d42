"""A full disk, a read-only data folder, a data folder that cannot exist: one sentence each, nothing lost.

The full disk and the read-only folder are real: a small tmpfs mounted for the test (and remounted
read-only). Tests run as root, where chmod does not stop writes, so a mount is the honest way; without
the right to mount (not root) those tests are skipped, and the in-process variants below still run.
"""

from __future__ import annotations

import errno
import hashlib
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from daemon.config import Config
from daemon.errors import InsufficientStorage, Unavailable, database_error, storage_error
from tests.conftest import train_form, wait_for_state
from tests.helpers import REPO, TOKEN, free_port, make_config


def _mount(*args: str) -> bool:
    try:
        done = subprocess.run(["mount", *args], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs: two small jobs (1.7 MiB each) fit, an upload of 8 MiB does not."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=8m,mode=0755", "tmpfs", str(disk)):
        pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=20)


def noise_form(count: int = 8, size: int = 1024 * 1024) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("name", "Big Hero")
    form.add_field("trigger", "ohwx")
    for i in range(count):
        form.add_field("images", os.urandom(size), filename=f"big{i}.png", content_type="image/png")
    return form


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def integrity(db: Path) -> str:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


async def done_job(client: TestClient, name: str) -> str:
    resp = await client.post("/train", data=train_form(8, name=name, params='{"epochs": 1}'))
    assert resp.status == 202, await resp.text()
    job_id = (await resp.json())["job_id"]
    job = await wait_for_state(client, job_id, {"done", "error"}, timeout=60)
    assert job["state"] == "done", job["error"]
    return job_id


async def test_a_full_disk_during_an_upload_is_507_and_loses_nothing(small_disk: Path, tmp_path: Path,
                                                                   start_daemon) -> None:
    cfg = make_config(tmp_path, port=free_port(), data_dir=str(small_disk / "data"))
    client = await start_daemon(cfg)
    first = await done_job(client, "First")
    before = tree_digest(cfg.jobs_dir / first)
    first_json = await (await client.get(f"/jobs/{first}/status")).json()

    resp = await client.post("/train", data=noise_form())
    body = await resp.json()
    assert resp.status == 507, body
    assert str(cfg.data_dir) in body["error"] and "free some space" in body["error"]
    assert list((cfg.data_dir / "tmp").iterdir()) == []  # the partial upload is gone: the space is back

    assert tree_digest(cfg.jobs_dir / first) == before
    assert await (await client.get(f"/jobs/{first}/status")).json() == first_json
    assert integrity(cfg.db_path) == "ok"
    assert [j["id"] for j in (await (await client.get("/jobs")).json())["jobs"]] == [first]
    await done_job(client, "Second")  # and the daemon goes on


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[list[Path]]:
    """Folders made read-only in place by a read-only bind mount over each (as a disk remounted read-only
    would be; a running daemon's open database keeps the kernel from remounting its whole disk)."""
    mounted: list[Path] = []
    yield mounted
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=20)


def make_read_only(folder: Path, mounted: list[Path]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if not _mount("--bind", str(folder), str(folder)):
        pytest.skip("cannot bind-mount here (needs root / CAP_SYS_ADMIN)")
    mounted.append(folder)
    assert _mount("-o", "remount,ro,bind", str(folder))


async def test_a_read_only_data_dir_is_503_and_loses_nothing(read_only: list[Path], client: TestClient,
                                                             config: Config) -> None:
    first = await done_job(client, "First")
    before = tree_digest(config.jobs_dir / first)
    for folder in (config.data_dir / "tmp", config.jobs_dir):  # every folder an upload is written to
        make_read_only(folder, read_only)
    resp = await client.post("/train", data=train_form(8, name="Blocked"))
    body = await resp.json()
    assert resp.status == 503, body
    assert str(config.data_dir) in body["error"] and "writable" in body["error"]
    assert (await client.get(f"/jobs/{first}/status")).status == 200  # reading still works
    assert [j["id"] for j in (await (await client.get("/jobs")).json())["jobs"]] == [first]
    for folder in reversed(read_only):
        subprocess.run(["umount", str(folder)], capture_output=True, timeout=20, check=True)
    read_only.clear()
    assert tree_digest(config.jobs_dir / first) == before
    assert integrity(config.db_path) == "ok"
    await done_job(client, "Second")


async def test_a_file_where_the_upload_folder_belongs_is_503(client: TestClient, config: Config) -> None:
    tmp = config.data_dir / "tmp"
    if tmp.is_dir():
        tmp.rmdir()
    tmp.write_text("not a folder")
    resp = await client.post("/train", data=train_form(8))
    body = await resp.json()
    assert resp.status == 503 and str(config.data_dir / "tmp") in body["error"], body
    assert (config.data_dir / "tmp").read_text() == "not a folder"
    assert (await client.get("/jobs")).status == 200


async def test_enospc_while_writing_a_picture_is_507(client: TestClient, config: Config, monkeypatch) -> None:
    """The in-process variant (runs without mount rights): the disk fills up after the first picture."""
    real_open = Path.open
    written = {"n": 0}

    class FullDisk:
        def __init__(self, fh):
            self._fh = fh

        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc: object) -> None:
            self._fh.close()

    def open_(self: Path, mode: str = "r", *args, **kwargs):
        fh = real_open(self, mode, *args, **kwargs)
        if self.suffix == ".upload":
            written["n"] += 1
            if written["n"] > 1:
                return FullDisk(fh)
        return fh

    monkeypatch.setattr(Path, "open", open_)
    resp = await client.post("/train", data=train_form(8))
    body = await resp.json()
    assert resp.status == 507 and str(config.data_dir) in body["error"], body
    assert list((config.data_dir / "tmp").iterdir()) == []


def test_disk_errors_map_to_their_status() -> None:
    folder = Path("/data/tmp")
    assert isinstance(storage_error(OSError(errno.ENOSPC, "full"), folder), InsufficientStorage)
    for code in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR):
        err = storage_error(OSError(code, os.strerror(code)), folder)
        assert isinstance(err, Unavailable) and str(folder) in err.message
    assert storage_error(ConnectionResetError("gone"), folder) is None  # not a disk problem: not disguised
    assert storage_error(OSError(errno.EIO, "I/O error"), folder) is None


def test_a_read_only_database_is_503(tmp_path: Path) -> None:
    db = tmp_path / "ro.sqlite3"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    ro = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    with pytest.raises(sqlite3.OperationalError) as info:
        ro.execute("INSERT INTO t VALUES (1)")
    ro.close()
    err = database_error(info.value, db)
    assert isinstance(err, Unavailable) and str(tmp_path) in err.message
    assert database_error(sqlite3.OperationalError("no such table: jobs"), db) is None


# --- at start-up: one line and exit code 2 ---


def run_daemon(tmp_path: Path, data_dir: Path) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"token: {TOKEN}\nport: {free_port()}\ndata_dir: {data_dir}\n")
    return subprocess.run([sys.executable, "-m", "daemon", "--config", str(cfg)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def assert_one_line_exit_2(done: subprocess.CompletedProcess[str], data_dir: Path) -> None:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert str(data_dir) in lines[0] and "data_dir" in lines[0]


def test_a_data_dir_under_a_regular_file_stops_the_start_in_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    data_dir = blocker / "data"
    assert_one_line_exit_2(run_daemon(tmp_path, data_dir), data_dir)
    assert blocker.read_text() == "a file, not a folder"


def test_a_data_dir_on_a_read_only_disk_stops_the_start_in_one_line(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(ro)):
        pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN)")
    try:
        data_dir = ro / "data"
        assert_one_line_exit_2(run_daemon(tmp_path, data_dir), data_dir)
        existing = ro  # a folder that exists but cannot be written
        assert_one_line_exit_2(run_daemon(tmp_path, existing), existing)
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True, timeout=20)
