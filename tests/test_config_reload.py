"""Config changes take effect without a restart: real config files edited under a running daemon.

The headline cases run a real `python -m daemon` and edit its file as a user (or an editor) would; the
job and /config/test cases run the app in-process (it is the same watcher) to keep the suite quick.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestClient

from daemon.config import (
    SETTINGS,
    ConfigError,
    load_config,
    reload_config,
    setting_values,
)
from tests.conftest import train_form, wait_for_state
from tests.helpers import KOHYA_DOUBLE, TOKEN, free_port, make_config
from tests.test_crash_recovery import Site

NEW_TOKEN = "a-new-token-fedcba9876543210"
PAGE = "http://192.168.1.20:9000"  # an ED page on the LAN, not allowed at first


def write_config(path: Path, raw: dict[str, Any], *, how: str = "rename") -> None:
    """Save as editors do: `rename` (a new file renamed over the old: atomic writes, vim's default when it
    can), `backup` (vim with backupcopy=no: the old file renamed away, a new one written), `inplace`."""
    text = raw if isinstance(raw, str) else yaml.safe_dump(raw)
    if how == "rename":
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    elif how == "backup":
        os.replace(path, path.with_name(f"{path.name}~"))
        path.write_text(text, encoding="utf-8")
    else:
        with path.open("r+", encoding="utf-8") as fh:
            fh.truncate(0)
            fh.write(text)


def site_raw(site: Site) -> dict[str, Any]:
    return dict(yaml.safe_load(site.config_path.read_text(encoding="utf-8")))


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    config = make_config(tmp_path, port=free_port())
    raw = {
        "port": config.port, "token": TOKEN, "data_dir": str(config.data_dir),
        "ed_lora_dir": str(config.ed_lora_dir), "ed_models_dir": str(config.ed_models_dir),
        "base_model": str(config.base_model), "allow_cpu": True,
        "kohya": {"python": sys.executable, "script_path": str(KOHYA_DOUBLE), "workspace": str(tmp_path / "workspace")},
    }
    path = tmp_path / "conf" / "config.yaml"  # its own folder: the watch sees only the config's neighbours
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    s = Site(tmp_path, config, path)
    yield s
    for daemon in s.daemons:
        if daemon.proc.poll() is None:
            daemon.proc.send_signal(signal.SIGINT)
            try:
                daemon.proc.wait(15)
            except subprocess.TimeoutExpired:
                daemon.proc.kill()
                daemon.proc.wait()


@contextlib.asynccontextmanager
async def events(url: str, token: str = TOKEN) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    async with aiohttp.ClientSession() as http, http.ws_connect(f"{url}/ws?token={token}") as ws:
        first = await ws.receive_json(timeout=10)
        assert first["type"] == "snapshot"
        yield ws


async def next_config_event(ws: aiohttp.ClientWebSocketResponse | Any, timeout: float = 10) -> dict[str, Any]:
    """The next `config` frame (its raw text is checked too: it must never carry a token)."""
    end = time.monotonic() + timeout
    while True:
        msg = await ws.receive(timeout=max(0.1, end - time.monotonic()))
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        assert TOKEN not in msg.data and NEW_TOKEN not in msg.data
        frame = msg.json()
        if frame["type"] == "config":
            assert frame["job_id"] is None
            return dict(frame["data"])


async def get(url: str, path: str, *, token: str | None = TOKEN, origin: str | None = None) -> aiohttp.ClientResponse:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if origin:
        headers["Origin"] = origin
    async with aiohttp.ClientSession() as http, http.get(f"{url}{path}", headers=headers) as resp:
        await resp.read()
        return resp


# ------------------------------------------------------------------------------------------ a real daemon
async def test_a_new_origin_and_token_apply_live_and_the_socket_hears_it(site: Site) -> None:
    daemon = await site.start({})
    assert (await get(daemon.url, "/jobs", origin=PAGE)).status == 403
    async with events(daemon.url) as ws:
        raw = site_raw(site)
        raw["allowed_origins"] = ["http://localhost:9000", PAGE]
        raw["token"] = NEW_TOKEN
        write_config(site.config_path, raw, how="rename")
        event = await next_config_event(ws)
    assert sorted(event["changed"]) == ["allowed_origins", "token"]
    assert event["restart_needed"] == [] and event["error"] is None

    resp = await get(daemon.url, "/jobs", token=NEW_TOKEN, origin=PAGE)
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Origin"] == PAGE
    assert (await get(daemon.url, "/jobs", token=TOKEN)).status == 401
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        async with events(daemon.url, TOKEN):
            pass
    assert refused.value.status == 401
    log = daemon.output()
    assert "token, allowed_origins now in effect" in log
    assert NEW_TOKEN not in log and TOKEN not in log


async def test_a_port_edit_needs_a_restart_and_the_old_port_keeps_answering(site: Site) -> None:
    daemon = await site.start({})
    new_port = free_port()
    async with events(daemon.url) as ws:
        raw = site_raw(site)
        raw["port"] = new_port
        raw["allow_cpu"] = False
        write_config(site.config_path, raw, how="backup")  # vim's rename-away save
        event = await next_config_event(ws)
    assert event == {"changed": ["allow_cpu"], "restart_needed": ["port"], "error": None, "key": None}
    assert (await get(daemon.url, "/jobs")).status == 200
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(f"http://127.0.0.1:{new_port}", "/health")
    assert f"port changed in {site.config_path}; restart the daemon" in daemon.output()
    assert daemon.proc.poll() is None


async def test_invalid_edits_keep_the_running_config_and_name_the_key(site: Site) -> None:
    daemon = await site.start({})
    async with events(daemon.url) as ws:
        raw = site_raw(site)
        # A bad value next to a good one: nothing of the edit is applied, not even the good part.
        write_config(site.config_path, {**raw, "port": 9000, "token": NEW_TOKEN}, how="inplace")
        bad_port = await next_config_event(ws)
        write_config(site.config_path, {**raw, "alow_cpu": True})
        typo = await next_config_event(ws)
        write_config(site.config_path, "port: [9131\ntoken: x\n")
        broken = await next_config_event(ws)
        assert (await get(daemon.url, "/jobs")).status == 200
        assert (await get(daemon.url, "/jobs", token=NEW_TOKEN)).status == 401
        write_config(site.config_path, {**raw, "max_queued_jobs": 3})
        fixed = await next_config_event(ws)

    assert bad_port["key"] == "port" and bad_port["changed"] == []
    assert "config key 'port': 9000 belongs to Easy Diffusion" in bad_port["error"]
    assert "keeps running with its previous settings" in bad_port["error"]
    assert typo["key"] == "alow_cpu" and "unknown setting" in typo["error"]
    assert broken["key"] is None and "is not valid YAML" in broken["error"] and "line 1" in broken["error"]
    assert fixed == {"changed": ["max_queued_jobs"], "restart_needed": [], "error": None, "key": None}
    log = daemon.output()
    assert log.count("was not applied") == 3
    assert daemon.proc.poll() is None


# ------------------------------------------------------------------------------------------ in-process
@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    cfg = make_config(tmp_path, port=free_port())
    raw = {
        "port": cfg.port, "token": TOKEN, "data_dir": str(cfg.data_dir), "ed_lora_dir": str(cfg.ed_lora_dir),
        "ed_models_dir": str(cfg.ed_models_dir), "base_model": str(cfg.base_model), "allow_cpu": False,
        "kohya": {"python": sys.executable, "script_path": str(KOHYA_DOUBLE), "workspace": str(tmp_path / "workspace")},
    }
    path = tmp_path / "conf" / "config.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def edit(path: Path, **changes: Any) -> None:
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    write_config(path, {**raw, **changes})


async def test_allow_cpu_turned_on_makes_config_test_report_the_cpu(config_file: Path, start_daemon: Any) -> None:
    client: TestClient = await start_daemon(load_config(config_file))
    before = await (await client.post("/config/test")).json()
    assert before["device"] is None
    assert not next(c for c in before["checks"] if c["name"] == "gpu")["ok"]
    async with client.ws_connect(f"/ws?token={TOKEN}") as ws:
        assert (await ws.receive_json(timeout=10))["type"] == "snapshot"
        edit(config_file, allow_cpu=True)
        assert (await next_config_event(ws))["changed"] == ["allow_cpu"]
    after = await (await client.post("/config/test")).json()
    assert after["device"] == "cpu"
    assert next(c for c in after["checks"] if c["name"] == "gpu")["ok"]


async def test_a_job_under_way_keeps_its_settings_and_the_next_job_gets_the_new_ones(
        config_file: Path, start_daemon: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOHYA_DOUBLE_STEP_SECONDS", "0.05")  # long enough to edit the file while it trains
    edit(config_file, allow_cpu=True)
    first_dir, second_dir = load_config(config_file).ed_lora_dir, tmp_path / "other-lora"
    client: TestClient = await start_daemon(load_config(config_file))
    first = (await (await client.post("/train", data=train_form(8, name="First", params='{"epochs": 1}'))).json())
    await wait_for_state(client, first["job_id"], {"training"})
    async with client.ws_connect(f"/ws?token={TOKEN}") as ws:
        assert (await ws.receive_json(timeout=10))["type"] == "snapshot"
        edit(config_file, ed_lora_dir=str(second_dir))
        assert (await next_config_event(ws))["changed"] == ["ed_lora_dir"]
    assert (await (await client.get(f"/jobs/{first['job_id']}/status")).json())["state"] == "training"
    second = (await (await client.post("/train", data=train_form(8, name="Second", params='{"epochs": 1}'))).json())

    done_first = await wait_for_state(client, first["job_id"], {"done", "error"}, timeout=60)
    done_second = await wait_for_state(client, second["job_id"], {"done", "error"}, timeout=60)
    assert done_first["state"] == done_second["state"] == "done", (done_first["error"], done_second["error"])
    assert Path(done_first["artifact"]).parent == first_dir
    assert Path(done_second["artifact"]).parent == second_dir


async def test_max_queued_jobs_follows_the_file(config_file: Path, start_daemon: Any,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOHYA_DOUBLE_STEP_SECONDS", "0.05")
    edit(config_file, allow_cpu=True, max_queued_jobs=1)
    client: TestClient = await start_daemon(load_config(config_file))
    ids = []
    for name in ("One", "Two"):  # one trains, one waits: the queue is full
        resp = await client.post("/train", data=train_form(8, name=name, params='{"epochs": 1}'))
        assert resp.status == 202
        ids.append((await resp.json())["job_id"])
        await wait_for_state(client, ids[0], {"training"})
    full = await client.post("/train", data=train_form(8, name="Three"))
    assert full.status == 429 and "at most 1 may" in (await full.json())["error"]
    async with client.ws_connect(f"/ws?token={TOKEN}") as ws:
        assert (await ws.receive_json(timeout=10))["type"] == "snapshot"
        edit(config_file, max_queued_jobs=2)
        assert (await next_config_event(ws))["changed"] == ["max_queued_jobs"]
    assert (await client.post("/train", data=train_form(8, name="Three", params='{"epochs": 1}'))).status == 202
    for job_id in ids:
        await client.post(f"/jobs/{job_id}/cancel")


# ------------------------------------------------------------------------------------------ the pure part
def test_every_setting_is_compared_on_reload(tmp_path: Path) -> None:
    assert set(setting_values(make_config(tmp_path, port=9200))) == {s.name for s in SETTINGS}


def test_restart_keys_keep_their_running_values_and_the_lora_default_stays(config_file: Path, tmp_path: Path) -> None:
    raw = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    del raw["ed_lora_dir"]  # the default, <data_dir>/lora, must not move with an edit of data_dir
    write_config(config_file, raw)
    running = load_config(config_file)
    write_config(config_file, {**raw, "data_dir": str(tmp_path / "elsewhere"), "host": "0.0.0.0", "port": 9300})
    result = reload_config(config_file, running, running)
    assert result.restart_needed == ("host", "port", "data_dir")
    assert result.changed == ()
    assert result.running == running
    assert result.file_config.data_dir == tmp_path / "elsewhere"


def test_a_port_given_on_the_command_line_is_not_reported_again(config_file: Path) -> None:
    from dataclasses import replace

    from_file = load_config(config_file)
    running = replace(from_file, port=9400)  # `--port 9400`
    edit(config_file, allow_cpu=True)
    result = reload_config(config_file, running, from_file)
    assert result.changed == ("allow_cpu",) and result.restart_needed == ()
    assert result.running.port == 9400


@pytest.mark.parametrize(("content", "key"), [
    ("", "(file)"),
    ("allow_cpu: true\n", "token"),
    ("- a list\n", "(file)"),
])
def test_files_a_reload_refuses(config_file: Path, content: str, key: str) -> None:
    running = load_config(config_file)
    config_file.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError) as refused:
        reload_config(config_file, running, running)
    assert refused.value.key == key
    assert config_file.read_text(encoding="utf-8") == content  # never rewritten (no token generated mid-save)


def test_a_deleted_file_is_refused(config_file: Path) -> None:
    running = load_config(config_file)
    config_file.unlink()
    with pytest.raises(ConfigError, match="is missing"):
        reload_config(config_file, running, running)
