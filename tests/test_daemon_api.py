"""The daemon end to end over HTTP, with the kohya test double as the trainer."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestClient
from safetensors import safe_open

from daemon.config import Config
from tests.conftest import train_form, wait_for_state
from tests.helpers import picture_bytes


async def test_health_needs_no_token(client: TestClient) -> None:
    resp = await client.get("/health", headers={"Authorization": ""})
    assert resp.status == 200
    body = await resp.json()
    assert body["status"] == "ok" and body["version"]


async def test_upload_trains_and_publishes_a_kohya_lora(client: TestClient, config: Config) -> None:
    resp = await client.post("/train", data=train_form(8, name="Mira Blue", trigger="mirab"))
    assert resp.status == 202, await resp.text()
    body = await resp.json()
    assert body["state"] == "queued"
    job = await wait_for_state(client, body["job_id"], {"done", "error"})
    assert job["state"] == "done", job["error"]
    artifact = Path(job["artifact"])
    assert artifact.parent == config.ed_lora_dir
    assert artifact.name == "Mira_Blue.safetensors"
    assert job["lora_id"] == "Mira_Blue"
    assert job["progress"]["step"] == job["progress"]["total"] > 0
    assert job["progress"]["epoch"] == job["progress"]["epochs"]
    with safe_open(str(artifact), framework="numpy") as fh:
        keys = list(fh.keys())
    assert any(k.startswith("lora_unet_") and k.endswith(".alpha") for k in keys)
    assert any(k.startswith("lora_te_") for k in keys)
    # nothing half-written is left in ED's folder
    assert sorted(p.name for p in config.ed_lora_dir.iterdir()) == ["Mira_Blue.safetensors"]
    # the dataset kohya got: our own names, squared to the resolution, captions trigger first
    img_dir = config.jobs_dir / body["job_id"] / "dataset" / "img"
    captions = sorted(img_dir.glob("*.txt"))
    assert len(captions) == 8
    assert captions[0].read_text(encoding="utf-8").strip() == "mirab person"


async def test_second_job_with_the_same_name_never_overwrites(client: TestClient, config: Config) -> None:
    first = await (await client.post("/train", data=train_form(8, name="Twin"))).json()
    second = await (await client.post("/train", data=train_form(8, name="Twin"))).json()
    a = await wait_for_state(client, first["job_id"], {"done", "error"})
    b = await wait_for_state(client, second["job_id"], {"done", "error"})
    assert (a["state"], b["state"]) == ("done", "done")
    assert Path(a["artifact"]).name == "Twin.safetensors"
    assert Path(b["artifact"]).name == "Twin-2.safetensors"
    assert b["lora_id"] == "Twin-2"


async def test_jobs_are_listed_newest_first(client: TestClient) -> None:
    ids = []
    for name in ("One", "Two"):
        ids.append((await (await client.post("/train", data=train_form(8, name=name))).json())["job_id"])
    for job_id in ids:
        await wait_for_state(client, job_id, {"done"})
    jobs = (await (await client.get("/jobs")).json())["jobs"]
    assert [j["id"] for j in jobs] == list(reversed(ids))


async def test_too_few_images_is_refused_and_nothing_is_kept(client: TestClient, config: Config) -> None:
    resp = await client.post("/train", data=train_form(7))
    assert resp.status == 400
    body = await resp.json()
    assert body["key"] == "images" and "7" in body["error"]
    assert list((config.data_dir / "tmp").iterdir()) == []
    assert not config.jobs_dir.exists() or list(config.jobs_dir.iterdir()) == []


async def test_too_many_images_is_refused(client: TestClient) -> None:
    resp = await client.post("/train", data=train_form(26))
    assert resp.status == 400
    assert (await resp.json())["key"] == "images"


async def test_a_file_that_is_not_a_picture_is_named(client: TestClient, config: Config) -> None:
    form = train_form(8)
    form.add_field("images", b"this is not a png", filename="notes.png", content_type="image/png")
    resp = await client.post("/train", data=form)
    assert resp.status == 400
    body = await resp.json()
    assert "notes.png" in body["error"]
    assert list((config.data_dir / "tmp").iterdir()) == []


async def test_an_oversized_file_is_refused_by_name(start_daemon, tmp_path: Path) -> None:
    from tests.helpers import free_port, make_config

    cfg = make_config(tmp_path, port=free_port(), max_image_mb=1)
    client = await start_daemon(cfg)
    form = train_form(8)
    form.add_field("images", b"\0" * (1024 * 1024 + 10), filename="huge.png", content_type="image/png")
    resp = await client.post("/train", data=form)
    assert resp.status == 400
    assert "huge.png" in (await resp.json())["error"]
    assert list((cfg.data_dir / "tmp").iterdir()) == []


async def test_bad_fields_name_the_key(client: TestClient) -> None:
    cases = [
        ({"name": "bad/name"}, "name"),
        ({"trigger": "two words"}, "trigger"),
        ({"trigger": "a,b"}, "trigger"),
        ({"params": '{"epochs": 0}'}, "epochs"),
        ({"params": '{"bogus": 1}'}, "bogus"),
        ({"params": "not json"}, "params"),
        ({"base_model": "../../etc/passwd"}, "base_model"),
        ({"base_model": "/abs/model.safetensors"}, "base_model"),
    ]
    for fields, key in cases:
        form = train_form(8, **{"name": "Hero", "trigger": "ohwx", **fields})  # type: ignore[arg-type]
        resp = await client.post("/train", data=form)
        assert resp.status == 400, (fields, await resp.text())
        body = await resp.json()
        assert body["key"] == key, (fields, body)
        assert body["error"] and "Traceback" not in body["error"]


async def test_base_model_is_chosen_by_ed_id(client: TestClient, config: Config) -> None:
    resp = await client.post("/train", data=train_form(8, base_model="sd-test"))
    assert resp.status == 202
    job = await wait_for_state(client, (await resp.json())["job_id"], {"done"})
    assert job["base_model"] == str(config.ed_models_dir / "stable-diffusion" / "sd-test.safetensors")


async def test_sd2_base_model_is_refused_naming_what_to_pick(client: TestClient, config: Config) -> None:
    from tests.test_fit_api import write_sd2_checkpoint

    write_sd2_checkpoint(config.ed_models_dir / "stable-diffusion" / "v2.safetensors")  # type: ignore[operator]
    resp = await client.post("/train", data=train_form(8, base_model="v2"))
    assert resp.status == 400
    body = await resp.json()
    assert body["key"] == "base_model" and "SD 2.x" in body["error"] and "SDXL" in body["error"]
    assert (await (await client.get("/jobs")).json())["jobs"] == []


async def test_failing_trainer_gives_a_classified_error(client: TestClient, monkeypatch) -> None:
    monkeypatch.setenv("KOHYA_DOUBLE_FAIL", "oom")
    job_id = (await (await client.post("/train", data=train_form(8))).json())["job_id"]
    job = await wait_for_state(client, job_id, {"done", "error"})
    assert job["state"] == "error"
    assert job["error"]["kind"] == "out_of_memory"
    assert job["error"]["hint"]
    assert job["artifact"] is None


async def test_exit_zero_without_a_model_is_an_error(client: TestClient, monkeypatch, config: Config) -> None:
    monkeypatch.setenv("KOHYA_DOUBLE_FAIL", "no_output")
    job_id = (await (await client.post("/train", data=train_form(8))).json())["job_id"]
    job = await wait_for_state(client, job_id, {"done", "error"})
    assert job["state"] == "error"
    assert job["error"]["kind"] == "no_output"
    assert not any(config.ed_lora_dir.glob("*.safetensors"))


async def test_cancel_stops_the_trainer_tree(client: TestClient, monkeypatch, config: Config) -> None:
    import psutil

    monkeypatch.setenv("KOHYA_DOUBLE_STEP_SECONDS", "0.5")
    monkeypatch.setenv("KOHYA_DOUBLE_SPAWN_CHILD", "1")
    job_id = (await (await client.post("/train", data=train_form(8))).json())["job_id"]
    job = await wait_for_state(client, job_id, {"training"})
    child_pid = None
    for _ in range(100):
        logs = (await (await client.get(f"/jobs/{job_id}/logs")).json())["lines"]
        pids = [int(line.rsplit(" ", 1)[1]) for line in logs if line.startswith("double child pid:")]
        if pids:
            child_pid = pids[0]
            break
        import asyncio

        await asyncio.sleep(0.05)
    assert child_pid is not None and psutil.pid_exists(child_pid)
    resp = await client.post(f"/jobs/{job_id}/cancel")
    assert resp.status == 200
    job = await resp.json()
    assert job["state"] == "cancelled"
    assert not psutil.pid_exists(child_pid) or psutil.Process(child_pid).status() == psutil.STATUS_ZOMBIE
    assert not any(config.ed_lora_dir.glob("*.safetensors"))
    again = await client.post(f"/jobs/{job_id}/cancel")
    assert again.status == 409


async def test_queued_job_can_be_cancelled_before_it_starts(client: TestClient, monkeypatch) -> None:
    monkeypatch.setenv("KOHYA_DOUBLE_STEP_SECONDS", "0.2")
    first = (await (await client.post("/train", data=train_form(8, name="First"))).json())["job_id"]
    second = (await (await client.post("/train", data=train_form(8, name="Second"))).json())["job_id"]
    resp = await client.post(f"/jobs/{second}/cancel")
    assert (await resp.json())["state"] == "cancelled"
    await client.post(f"/jobs/{first}/cancel")
    assert (await wait_for_state(client, first, {"cancelled"}))["state"] == "cancelled"


async def test_delete_removes_working_files_but_not_the_published_lora(client: TestClient, config: Config) -> None:
    job_id = (await (await client.post("/train", data=train_form(8))).json())["job_id"]
    job = await wait_for_state(client, job_id, {"done"})
    assert (config.jobs_dir / job_id).is_dir()
    resp = await client.delete(f"/jobs/{job_id}")
    assert resp.status == 200
    assert not (config.jobs_dir / job_id).exists()
    assert Path(job["artifact"]).is_file()
    assert (await client.get(f"/jobs/{job_id}/status")).status == 404


async def test_unknown_job_is_404_json(client: TestClient) -> None:
    resp = await client.get("/jobs/nope/status")
    assert resp.status == 404
    assert "nope" in (await resp.json())["error"]
    resp = await client.get("/no/such/route")
    assert resp.status == 404
    assert "error" in await resp.json()


async def test_config_test_reports_each_check(client: TestClient) -> None:
    resp = await client.post("/config/test")
    assert resp.status == 200
    body = await resp.json()
    names = {c["name"] for c in body["checks"]}
    assert {"kohya_script", "kohya_workspace", "launcher", "base_model", "lora_dir", "disk", "gpu"} <= names
    assert body["ready"] is True, body
    assert body["device"] == "cpu" and body["gpu"] is None
    gpu = next(c for c in body["checks"] if c["name"] == "gpu")
    assert "no CUDA GPU" in gpu["detail"]


async def test_config_test_not_ready_without_gpu_unless_cpu_allowed(start_daemon, tmp_path: Path) -> None:
    from tests.helpers import free_port, make_config

    cfg = make_config(tmp_path, port=free_port(), allow_cpu=False, kohya={"script_path": str(tmp_path / "nope.py")})
    client = await start_daemon(cfg)
    body = await (await client.post("/config/test")).json()
    assert body["ready"] is False and body["device"] is None
    failing = {c["name"]: c for c in body["checks"] if not c["ok"]}
    assert set(failing) == {"kohya_script", "gpu"}
    assert all(c["fix"] for c in failing.values())


async def test_models_lists_ed_checkpoints_with_architecture(client: TestClient) -> None:
    body = await (await client.get("/models")).json()
    assert {"id": "sd-test", "file": "sd-test.safetensors", "arch": "sd1", "trainable": True} in body["models"]


async def test_restart_keeps_jobs_and_marks_a_running_one_interrupted(
    start_daemon, config: Config, monkeypatch
) -> None:
    import psutil

    monkeypatch.setenv("KOHYA_DOUBLE_STEP_SECONDS", "0.5")
    client = await start_daemon(config)
    job_id = (await (await client.post("/train", data=train_form(8))).json())["job_id"]
    await wait_for_state(client, job_id, {"training"})
    pid = None
    for _ in range(50):
        from daemon.jobs.store import JobStore

        store = JobStore(config.db_path)
        proc = store.process_of(job_id)
        store.close()
        if proc:
            pid = proc[0]
            break
        import asyncio

        await asyncio.sleep(0.05)
    assert pid is not None
    await client.close()  # graceful daemon shutdown
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    client2 = await start_daemon(config)
    job = await (await client2.get(f"/jobs/{job_id}/status")).json()
    assert job["state"] == "interrupted"
    assert job["error"]["kind"] == "interrupted"
    jobs = (await (await client2.get("/jobs")).json())["jobs"]
    assert [j["id"] for j in jobs] == [job_id]


async def test_websocket_streams_snapshot_then_events_in_order(client: TestClient) -> None:
    ws = await client.ws_connect("/ws?token=test-token-0123456789abcdef", headers={"Authorization": ""})
    first = await ws.receive_json(timeout=5)
    assert first["type"] == "snapshot" and first["data"]["jobs"] == []
    job_id = (await (await client.post("/train", data=train_form(8))).json())["job_id"]
    frames = []
    while True:
        frame = await ws.receive_json(timeout=30)
        frames.append(frame)
        if frame["type"] == "result":
            break
    await ws.close()
    seqs = [f["seq"] for f in frames]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert all(f["job_id"] == job_id for f in frames)
    states = [f["data"]["state"] for f in frames if f["type"] == "state"]
    assert states == ["prepping", "training", "copying", "done"]
    types = [f["type"] for f in frames]
    assert types[0] == "job_created"
    assert "progress" in types and "log" in types and "checkpoint" in types
    assert types.index("progress") > types.index("state")
    last_progress = [f for f in frames if f["type"] == "progress"][-1]["data"]
    assert last_progress["step"] == last_progress["total"]
    assert frames[-1]["data"]["lora_id"]


async def test_websocket_snapshot_after_reconnect_shows_current_jobs(client: TestClient) -> None:
    job_id = (await (await client.post("/train", data=train_form(8))).json())["job_id"]
    await wait_for_state(client, job_id, {"done"})
    ws = await client.ws_connect("/ws", headers={"Authorization": "Bearer test-token-0123456789abcdef"})
    first = await ws.receive_json(timeout=5)
    await ws.close()
    assert [j["id"] for j in first["data"]["jobs"]] == [job_id]
    assert first["data"]["jobs"][0]["state"] == "done"


async def test_event_history_is_persisted(client: TestClient) -> None:
    job_id = (await (await client.post("/train", data=train_form(8))).json())["job_id"]
    await wait_for_state(client, job_id, {"done"})
    events = (await (await client.get(f"/jobs/{job_id}/events")).json())["events"]
    types = [e["type"] for e in events]
    assert types[0] == "job_created" and types[-1] == "result"
    assert [e["data"]["state"] for e in events if e["type"] == "state"] == ["prepping", "training", "copying", "done"]


async def test_params_are_resolved_and_reach_kohya(client: TestClient, monkeypatch, tmp_path: Path) -> None:
    record = tmp_path / "argv.json"
    monkeypatch.setenv("KOHYA_DOUBLE_RECORD", str(record))
    params = json.dumps({"epochs": 3, "network_dim": 8, "network_alpha": 4, "seed": 7})
    job_id = (await (await client.post("/train", data=train_form(8, params=params))).json())["job_id"]
    job = await wait_for_state(client, job_id, {"done", "error"})
    assert job["state"] == "done", job["error"]
    assert job["params"]["epochs"] == 3 and job["params"]["repeats"] == 25  # 8 images × 25 ≈ 200
    argv = json.loads(record.read_text())
    assert argv[argv.index("--network_dim") + 1] == "8"
    assert argv[argv.index("--max_train_epochs") + 1] == "3"
    assert argv[argv.index("--mixed_precision") + 1] == "no"  # no GPU here: CPU-safe settings


async def test_rgba_and_jpeg_uploads_are_normalised(client: TestClient, config: Config) -> None:
    from PIL import Image

    form = aiohttp.FormData()
    form.add_field("name", "Mixed")
    form.add_field("trigger", "mixd")
    for i in range(8):
        fmt, mode = (("PNG", "RGBA"), ("JPEG", "RGB"), ("WEBP", "RGB"))[i % 3]
        form.add_field("images", picture_bytes(i, fmt=fmt, mode=mode, size=(200, 90)), filename=f"p{i}.{fmt.lower()}")
    job_id = (await (await client.post("/train", data=form)).json())["job_id"]
    job = await wait_for_state(client, job_id, {"done", "error"})
    assert job["state"] == "done", job["error"]
    pngs = sorted((config.jobs_dir / job_id / "dataset" / "img").glob("*.png"))
    assert len(pngs) == 8
    for png in pngs:
        with Image.open(png) as img:
            assert img.size == (200, 90) and img.mode == "RGB"  # the shape kept: never padded nor enlarged


async def test_config_test_is_ready_without_a_default_when_ed_has_sd1_models(start_daemon, tmp_path: Path) -> None:
    from tests.helpers import free_port, make_config

    cfg = make_config(tmp_path, port=free_port(), base_model=None)
    client = await start_daemon(cfg)
    body = await (await client.post("/config/test")).json()
    check = next(c for c in body["checks"] if c["name"] == "base_model")
    assert check["ok"] and "1 SD 1.x" in check["detail"]
    assert body["ready"] is True
    # each family's tokenizers are answered on their own, outside the blocking checks
    assert set(body["tokenizers"]) == {"sd1", "sdxl"} and body["tokenizers"]["sd1"]["ok"] is True
    models = await (await client.get("/models")).json()
    assert models["supported_archs"] == ["sd1", "sdxl"] and models["default"] is None
    (cfg.ed_models_dir / "stable-diffusion" / "sd-test.safetensors").unlink()  # type: ignore[operator]
    body = await (await client.post("/config/test")).json()
    check = next(c for c in body["checks"] if c["name"] == "base_model")
    assert not check["ok"] and check["fix"]


async def test_an_oversized_text_field_is_refused(client: TestClient, config: Config) -> None:
    resp = await client.post("/train", data=train_form(8, params="{" + " " * 70_000 + "}"))
    assert resp.status == 400
    assert (await resp.json())["key"] == "params"
    assert list((config.data_dir / "tmp").iterdir()) == []


async def test_unknown_form_field_and_non_multipart_are_refused(client: TestClient) -> None:
    resp = await client.post("/train", data=train_form(8, colour="blue"))
    assert resp.status == 400 and (await resp.json())["key"] == "colour"
    resp = await client.post("/train", json={"name": "x"})
    assert resp.status == 400 and (await resp.json())["error"].startswith("POST /train expects multipart/form-data")


async def test_preview_pictures_are_reported_and_served(client: TestClient, config: Config) -> None:
    ws = await client.ws_connect("/ws")
    assert (await ws.receive_json(timeout=5))["type"] == "snapshot"
    params = json.dumps({"epochs": 2, "sample_every_n_epochs": 1})
    job_id = (await (await client.post("/train", data=train_form(8, name="Preview", params=params))).json())["job_id"]
    samples = []
    while True:
        frame = await ws.receive_json(timeout=30)
        if frame["type"] == "sample":
            samples.append(frame["data"])
        if frame["type"] == "result":
            break
    await ws.close()
    assert [s["file"][:16] for s in samples] == ["Preview_e000001_", "Preview_e000002_"]
    job = await (await client.get(f"/jobs/{job_id}/status")).json()
    assert job["samples"] == samples
    prompt = (config.jobs_dir / job_id / "sample_prompts.txt").read_text(encoding="utf-8")
    assert prompt.startswith("ohwx person") and "--d 42" in prompt
    resp = await client.get(samples[0]["url"])
    assert resp.status == 200 and resp.content_type == "image/png"
    assert (await resp.read())[:8] == b"\x89PNG\r\n\x1a\n"
    assert (await client.get(samples[0]["url"], headers={"Authorization": ""})).status == 401
    for bad in ("nope.png", "..%2F..%2Fjobs.sqlite3", "%2e%2e"):
        assert (await client.get(f"/jobs/{job_id}/samples/{bad}")).status == 404, bad


async def test_no_previews_on_cpu_unless_asked(client: TestClient, config: Config) -> None:
    job_id = (await (await client.post("/train", data=train_form(8))).json())["job_id"]
    job = await wait_for_state(client, job_id, {"done"})
    assert job["params"]["sample_every_n_epochs"] == 0 and job["samples"] == []
    assert not (config.jobs_dir / job_id / "sample_prompts.txt").exists()


async def test_a_request_over_the_total_limit_is_refused(start_daemon, tmp_path: Path) -> None:
    from tests.helpers import free_port, make_config

    cfg = make_config(tmp_path, port=free_port(), max_request_mb=1)
    client = await start_daemon(cfg)
    form = train_form(7)
    form.add_field("images", b"\0" * (1024 * 1024), filename="big.png", content_type="image/png")
    resp = await client.post("/train", data=form)
    assert resp.status == 400
    body = await resp.json()
    assert body["key"] == "images" and "per request" in body["error"]
    assert list((cfg.data_dir / "tmp").iterdir()) == []
