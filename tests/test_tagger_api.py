"""The tagger API with the real daemon and the tagger double run as a real subprocess (tests/tagger_double)."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from aiohttp.test_utils import TestClient
from PIL import Image

from daemon.config import Config
from tests.conftest import train_form, wait_for_state
from tests.helpers import TOKEN, free_port, make_config
from tests.tagger_double.layout import REPO_FOLDER, onnx_pythonpath, sd_scripts_with_double, write_model

RED, BLUE, GREEN = (200, 30, 30), (30, 30, 200), (30, 200, 30)


def picture(colour: tuple[int, int, int], size: tuple[int, int] = (96, 128)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def tag_form(colours: list[tuple[int, int, int]], **fields: str) -> aiohttp.FormData:
    form = aiohttp.FormData()
    for key, value in fields.items():
        form.add_field(key, value)
    for i, colour in enumerate(colours):
        form.add_field("images", picture(colour), filename=f"p{i}.png", content_type="image/png")
    return form


@pytest.fixture
def tagger_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    monkeypatch.setenv("PYTHONPATH", onnx_pythonpath())
    monkeypatch.setenv("TAGGER_DOUBLE_RECORD", str(tmp_path / "argv.json"))
    return make_config(tmp_path, port=free_port(), kohya={"workspace": str(sd_scripts_with_double(tmp_path))})


@pytest.fixture
async def tagger(tagger_config: Config, start_daemon: Callable[[Config], Any]) -> TestClient:
    return await start_daemon(tagger_config)


def model_dir(config: Config) -> Path:
    return config.data_dir / "wd14_tagger_model"


async def wait_run(client: TestClient, task_id: str, timeout: float = 60.0) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while True:
        body = await (await client.get(f"/tagger/runs/{task_id}")).json()
        if body["state"] != "running":
            return body
        assert time.monotonic() < end, body
        await asyncio.sleep(0.1)


async def start(client: TestClient, colours: list[tuple[int, int, int]], **fields: str) -> str:
    resp = await client.post("/tagger/runs", data=tag_form(colours, **fields))
    assert resp.status == 202, await resp.text()
    return str((await resp.json())["task_id"])


def leftovers(config: Config) -> list[Path]:
    tmp = config.data_dir / "tmp"
    return sorted(tmp.iterdir()) if tmp.exists() else []


async def test_readiness_says_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              start_daemon: Callable[[Config], Any]) -> None:
    monkeypatch.delenv("PYTHONPATH", raising=False)  # the test python has no onnxruntime, like a plain sd-scripts venv
    cfg = make_config(tmp_path, port=free_port(), kohya={"workspace": str(sd_scripts_with_double(tmp_path))})
    client = await start_daemon(cfg)
    body = await (await client.get("/tagger")).json()
    assert body["available"] is False and body["model_cached"] is False
    assert body["repo_id"] == "SmilingWolf/wd-v1-4-convnext-tagger-v2"
    assert body["model_dir"] == str(model_dir(cfg).absolute())
    problem = body["problems"][0]
    assert "onnxruntime" in problem["detail"] and "pip install onnx onnxruntime" in problem["fix"]
    resp = await client.post("/tagger/runs", data=tag_form([RED]))
    assert resp.status == 503
    assert "onnx" in (await resp.json())["error"]
    assert leftovers(cfg) == []  # the upload was removed


async def test_readiness_without_the_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            start_daemon: Callable[[Config], Any]) -> None:
    monkeypatch.setenv("PYTHONPATH", onnx_pythonpath())
    client = await start_daemon(make_config(tmp_path, port=free_port()))  # workspace without finetune/
    body = await (await client.get("/tagger")).json()
    assert body["available"] is False
    assert body["problems"][0]["title"] == "Tagger script missing"
    assert "finetune/tag_images_by_wd14_tagger.py" in body["problems"][0]["detail"].replace("\\", "/")


async def test_model_counts_as_cached_only_with_its_files(tagger: TestClient, tagger_config: Config) -> None:
    body = await (await tagger.get("/tagger")).json()
    assert body["available"] is True and body["model_cached"] is False
    location = model_dir(tagger_config) / REPO_FOLDER
    (location / ".cache").mkdir(parents=True)  # what a failed download leaves
    assert (await (await tagger.get("/tagger")).json())["model_cached"] is False
    write_model(model_dir(tagger_config))
    assert (await (await tagger.get("/tagger")).json())["model_cached"] is True
    (location / "model.onnx").write_bytes(b"")
    assert (await (await tagger.get("/tagger")).json())["model_cached"] is False


async def test_config_test_has_a_tagger_row_that_never_blocks(tagger: TestClient) -> None:
    body = await (await tagger.post("/config/test")).json()
    assert body["tagger"]["name"] == "tagger" and body["tagger"]["ok"] is True
    assert "not downloaded yet" in body["tagger"]["detail"]
    assert all(c["name"] != "tagger" for c in body["checks"])


async def test_tags_pictures_and_suggests_what_to_drop(tagger: TestClient, tagger_config: Config,
                                                       tmp_path: Path) -> None:
    write_model(model_dir(tagger_config))
    task = await start(tagger, [RED, RED, BLUE, GREEN])
    body = await wait_run(tagger, task)
    assert body["state"] == "done", body
    assert body["done"] == body["total"] == 4
    tags = [p["tags"] for p in body["pictures"]]
    assert tags[0] == ["1girl", "solo", "red hair", "simple background", "closed mouth"]  # underscores removed
    assert tags[2][2] == "blue hair"
    summary = {t["tag"]: t for t in body["tags"]}
    assert summary["red hair"]["count"] == 2 and summary["red hair"]["suggest_drop"] is False  # half is not most
    assert summary["closed mouth"]["count"] == 4 and summary["closed mouth"]["suggest_drop"] is True
    assert summary["1girl"]["count"] == 4 and summary["1girl"]["suggest_drop"] is False  # generic
    assert summary["simple background"]["suggest_drop"] is False
    assert "more than half" in body["rule"]
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv[argv.index("--model_dir") + 1] == str(model_dir(tagger_config).absolute())
    assert argv[argv.index("--character_threshold") + 1] == "1.01"
    assert "--onnx" in argv and "--force_download" not in argv
    assert leftovers(tagger_config) == []


async def test_threshold_is_passed_and_checked(tagger: TestClient, tagger_config: Config) -> None:
    write_model(model_dir(tagger_config))
    body = await wait_run(tagger, await start(tagger, [RED], threshold="0.25"))
    assert "looking at viewer" in body["pictures"][0]["tags"]  # scores 0.3: only above a lower threshold
    for bad in ("2", "abc", "nan", "0.05"):
        resp = await tagger.post("/tagger/runs", data=tag_form([RED], threshold=bad))
        assert resp.status == 400, bad
        assert (await resp.json())["key"] == "threshold"
    assert leftovers(tagger_config) == []


async def test_bad_forms_are_refused(tagger: TestClient, tagger_config: Config) -> None:
    with aiohttp.MultipartWriter("form-data") as empty:
        empty.append("0.4").set_content_disposition("form-data", name="threshold")
    resp = await tagger.post("/tagger/runs", data=empty)
    assert resp.status == 400 and (await resp.json())["key"] == "images"
    form = aiohttp.FormData()
    form.add_field("images", b"not a picture at all", filename="x.png", content_type="image/png")
    resp = await tagger.post("/tagger/runs", data=form)
    assert resp.status == 400 and "x.png" in (await resp.json())["error"]
    resp = await tagger.post("/tagger/runs", data=tag_form([RED], trigger="ohwx"))
    assert resp.status == 400 and "threshold and images" in (await resp.json())["error"]
    resp = await tagger.post("/tagger/runs", json={"images": []})
    assert resp.status == 400 and "multipart/form-data" in (await resp.json())["error"]
    assert (await tagger.get("/tagger/runs/nope")).status == 404
    assert (await tagger.delete("/tagger/runs/nope")).status == 404
    assert leftovers(tagger_config) == []


async def test_first_use_downloads_the_model(tagger: TestClient, tagger_config: Config,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAGGER_DOUBLE_DOWNLOAD", "1")
    async with tagger.ws_connect("/ws") as ws:
        await ws.receive_json()  # snapshot
        task = await start(tagger, [RED, BLUE])
        phases = []
        while True:
            frame = await asyncio.wait_for(ws.receive_json(), 30)
            if frame["type"] == "tagging":
                assert frame["data"]["task_id"] == task and frame["job_id"] is None
                phases.append((frame["data"]["phase"], frame["data"]["done"]))
                if frame["data"]["state"] != "running":
                    assert frame["data"]["state"] == "done"
                    break
    assert phases[0] == ("preparing", 0)
    assert ("downloading", 0) in phases and ("tagging", 2) in phases
    assert (await (await tagger.get("/tagger")).json())["model_cached"] is True


async def test_offline_first_use_fails_with_a_sentence_and_recovers(tagger: TestClient, tagger_config: Config,
                                                                    tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    body = await wait_run(tagger, await start(tagger, [RED]))
    assert body["state"] == "error"
    assert "not downloaded yet" in body["error"] and "internet" in body["error"]
    assert (model_dir(tagger_config) / REPO_FOLDER).is_dir()  # the folder the failed download left behind
    monkeypatch.setenv("TAGGER_DOUBLE_DOWNLOAD", "1")
    body = await wait_run(tagger, await start(tagger, [RED]))
    assert body["state"] == "done", body
    assert "--force_download" in json.loads((tmp_path / "argv.json").read_text())  # else the script never refetches


async def test_a_crash_mid_run_is_an_error_and_cleans_up(tagger: TestClient, tagger_config: Config,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    write_model(model_dir(tagger_config))
    monkeypatch.setenv("TAGGER_DOUBLE_CRASH_AT", "1")
    body = await wait_run(tagger, await start(tagger, [RED, BLUE, GREEN]))
    assert body["state"] == "error" and "could not read one of the pictures" in body["error"]
    assert body["pictures"] == [] and body["tags"] == []
    assert leftovers(tagger_config) == []


async def test_the_character_tag_bug_is_avoided(tagger: TestClient, tagger_config: Config,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    write_model(model_dir(tagger_config))
    monkeypatch.setenv("TAGGER_DOUBLE_CHARACTER", "1")  # would crash the script at the default thresholds
    body = await wait_run(tagger, await start(tagger, [RED]))
    assert body["state"] == "done", body
    assert "hatsune miku" not in body["pictures"][0]["tags"]


async def child_pid(tmp_path: Path, task: str, client: TestClient) -> int:
    """The double logs its child's pid; the daemon does not show logs, so the child finds itself by its parent."""
    end = time.monotonic() + 30
    while time.monotonic() < end:
        for proc in psutil.process_iter(["cmdline"]):
            cmd = proc.info["cmdline"] or []
            if any("tag_images_by_wd14_tagger.py" in part for part in cmd) and str(tmp_path) in " ".join(cmd):
                children = proc.children(recursive=True)
                if children:
                    return children[0].pid
        await asyncio.sleep(0.1)
    raise AssertionError("the double's child never started")


async def test_cancel_kills_the_tree_and_forgets(tagger: TestClient, tagger_config: Config, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    write_model(model_dir(tagger_config))
    monkeypatch.setenv("TAGGER_DOUBLE_SLOW_S", "30")
    monkeypatch.setenv("TAGGER_DOUBLE_SPAWN_CHILD", "1")
    task = await start(tagger, [RED, BLUE])
    child = await child_pid(tmp_path, task, tagger)
    resp = await tagger.post("/tagger/runs", data=tag_form([RED]))
    assert resp.status == 409 and "one run at a time" in (await resp.json())["error"]
    resp = await tagger.delete(f"/tagger/runs/{task}")
    assert resp.status == 200 and (await resp.json())["state"] == "cancelled"
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
    assert (await tagger.get(f"/tagger/runs/{task}")).status == 404
    assert leftovers(tagger_config) == []


async def test_shutdown_kills_a_running_tagger(tagger_config: Config, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               start_daemon: Callable[[Config], Any]) -> None:
    write_model(model_dir(tagger_config))
    monkeypatch.setenv("TAGGER_DOUBLE_SLOW_S", "30")
    monkeypatch.setenv("TAGGER_DOUBLE_SPAWN_CHILD", "1")
    client = await start_daemon(tagger_config)
    task = await start(client, [RED])
    child = await child_pid(tmp_path, task, client)
    await client.close()  # the app's cleanup runs, as on Ctrl+C
    end = time.monotonic() + 10
    while psutil.pid_exists(child) and psutil.Process(child).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < end, "the tagger's child survived the daemon's shutdown"
        await asyncio.sleep(0.1)
    assert leftovers(tagger_config) == []


async def test_no_tagging_while_a_job_trains(tagger: TestClient, tagger_config: Config,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOHYA_DOUBLE_STEP_SECONDS", "0.5")
    resp = await tagger.post("/train", data=train_form(8))
    job = (await resp.json())["job_id"]
    await wait_for_state(tagger, job, {"training"})
    resp = await tagger.post("/tagger/runs", data=tag_form([RED]))
    assert resp.status == 409 and "training job is running" in (await resp.json())["error"]
    assert leftovers(tagger_config) == []
    await tagger.post(f"/jobs/{job}/cancel")


async def test_tagger_routes_need_the_token(tagger: TestClient) -> None:
    no_auth = {"Authorization": ""}
    for method, path in [("GET", "/tagger"), ("POST", "/tagger/runs"), ("GET", "/tagger/runs/x"),
                         ("DELETE", "/tagger/runs/x")]:
        resp = await tagger.request(method, path, headers=no_auth)
        assert resp.status == 401, (method, path)
    resp = await tagger.get("/tagger", headers={"Origin": "http://evil.example", "Authorization": f"Bearer {TOKEN}"})
    assert resp.status == 403
