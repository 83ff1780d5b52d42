"""Issue 10 §2: a job's saved epochs (GET /jobs/{id}/checkpoints) and publishing one into ED's LoRA folder."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestClient
from safetensors.numpy import save_file

from daemon.config import Config
from daemon.jobs.models import PublishedEpoch
from daemon.jobs.store import JobStore
from daemon.pipeline import checkpoints, publish
from daemon.pipeline.runner import job_paths
from tests.conftest import train_form, wait_for_state
from tests.helpers import free_port, make_config
from tests.test_real_kohya import ENV as REAL_ENV
from tests.test_real_kohya import needs

PARAMS = json.dumps({"epochs": 3, "save_every_n_epochs": 1, "sample_every_n_epochs": 1})
ED = "http://127.0.0.1:9000"


async def _done_job(client: TestClient, name: str = "Test Hero") -> dict[str, Any]:
    job_id = (await (await client.post("/train", data=train_form(8, name=name, params=PARAMS))).json())["job_id"]
    job = await wait_for_state(client, job_id, {"done", "error"})
    assert job["state"] == "done", job["error"]
    return job


async def _list(client: TestClient, job_id: str) -> dict[str, Any]:
    resp = await client.get(f"/jobs/{job_id}/checkpoints")
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def test_the_saved_epochs_are_listed_with_size_loss_previews_and_the_final_one(client: TestClient,
                                                                                    config: Config) -> None:
    job = await _done_job(client)
    body = await _list(client, job["id"])
    output = job_paths(config, job["id"]).output
    rows = body["checkpoints"]
    assert [(r["epoch"], r["file"], r["final"]) for r in rows] == [
        (1, "Test_Hero-000001.safetensors", False), (2, "Test_Hero-000002.safetensors", False),
        (3, "Test_Hero.safetensors", True)]
    assert [r["bytes"] for r in rows] == [(output / r["file"]).stat().st_size for r in rows]
    assert body["bytes"] == sum(r["bytes"] for r in rows)
    points = (await (await client.get(f"/jobs/{job['id']}/loss")).json())["points"]
    for row in rows:
        mine = [p[2] for p in points if p[1] == row["epoch"]]
        assert mine and abs(row["loss"] - sum(mine) / len(mine)) < 1e-9
        assert [s["file"][:18] for s in row["samples"]] == [f"Test_Hero_e{row['epoch']:06d}_"]
        assert row["samples"][0]["url"] == f"/jobs/{job['id']}/samples/{row['samples'][0]['file']}"
    assert [r["published"] for r in rows[:2]] == [None, None]
    assert rows[2]["published"] == {"lora_id": job["lora_id"], "artifact": job["artifact"]}  # the job's own LoRA


async def test_publishing_an_epoch_verifies_copies_and_remembers_it(client: TestClient, config: Config) -> None:
    job = await _done_job(client)
    job_id = job["id"]
    resp = await client.post(f"/jobs/{job_id}/checkpoints/2/publish", headers={"Origin": ED})
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    target = config.ed_lora_dir / "Test_Hero-e02.safetensors"
    assert body == {"epoch": 2, "lora_id": "Test_Hero-e02", "artifact": str(target)}
    source = job_paths(config, job_id).output / "Test_Hero-000002.safetensors"
    assert target.read_bytes() == source.read_bytes()
    publish.verify_lora(target, expected_arch="sd1")
    assert sorted(p.name for p in config.ed_lora_dir.iterdir()) == ["Test_Hero-e02.safetensors",
                                                                   "Test_Hero.safetensors"]
    # idempotent: the same answer, no second copy
    again = await client.post(f"/jobs/{job_id}/checkpoints/2/publish")
    assert again.status == 200 and await again.json() == body
    assert len(list(config.ed_lora_dir.iterdir())) == 2
    rows = (await _list(client, job_id))["checkpoints"]
    assert rows[1]["published"] == {"lora_id": "Test_Hero-e02", "artifact": str(target)}
    status = await (await client.get(f"/jobs/{job_id}/status")).json()
    assert status["published_epochs"] == {"2": {"lora_id": "Test_Hero-e02", "artifact": str(target)}}
    # the final epoch is the job's own LoRA: publishing it answers with that file
    final = await client.post(f"/jobs/{job_id}/checkpoints/3/publish")
    assert final.status == 200 and (await final.json())["artifact"] == job["artifact"]
    # the job's own LoRA deleted from ED's folder: the final epoch is published under its epoch name, once
    Path(job["artifact"]).rename(Path(job["artifact"]).with_suffix(".moved"))
    for status in (201, 200):
        resp = await client.post(f"/jobs/{job_id}/checkpoints/3/publish")
        assert resp.status == status and (await resp.json())["lora_id"] == "Test_Hero-e03"
    # the user deleted the copy from ED's folder: publishing again makes a new one
    target.unlink()
    resp = await client.post(f"/jobs/{job_id}/checkpoints/2/publish")
    assert resp.status == 201 and (await resp.json())["artifact"] == str(target) and target.is_file()
    # two clicks at once: one copy
    both = await asyncio.gather(*(client.post(f"/jobs/{job_id}/checkpoints/1/publish") for _ in range(2)))
    assert sorted(r.status for r in both) == [200, 201]
    assert len(list(config.ed_lora_dir.glob("Test_Hero-e01*"))) == 1
    assert len(list(config.ed_lora_dir.glob("Test_Hero-e03*"))) == 1


async def test_a_second_job_of_the_same_name_never_overwrites_a_published_epoch(client: TestClient,
                                                                                config: Config) -> None:
    first = await _done_job(client)
    second = await _done_job(client)
    a = await (await client.post(f"/jobs/{first['id']}/checkpoints/1/publish")).json()
    b = await (await client.post(f"/jobs/{second['id']}/checkpoints/1/publish")).json()
    assert (Path(a["artifact"]).name, Path(b["artifact"]).name) == ("Test_Hero-e01.safetensors",
                                                                   "Test_Hero-e01-2.safetensors")
    assert b["lora_id"] == "Test_Hero-e01-2"


async def test_bad_requests_are_named(client: TestClient, config: Config) -> None:
    job = await _done_job(client)
    job_id = job["id"]
    for path, status in ((f"/jobs/{job_id}/checkpoints/9/publish", 404), (f"/jobs/{job_id}/checkpoints/x/publish", 404),
                         (f"/jobs/{job_id}/checkpoints/..%2F1/publish", 404),
                         ("/jobs/nope/checkpoints/1/publish", 404)):
        resp = await client.post(path)
        assert resp.status == status, path
        assert "error" in await resp.json()
    assert (await client.get("/jobs/nope/checkpoints")).status == 404
    assert (await client.post(f"/jobs/{job_id}/checkpoints/1/publish", headers={"Authorization": ""})).status == 401
    assert (await client.get(f"/jobs/{job_id}/checkpoints", headers={"Authorization": ""})).status == 401
    evil = await client.post(f"/jobs/{job_id}/checkpoints/1/publish", headers={"Origin": "http://evil.example"})
    assert evil.status == 403
    assert not list(config.ed_lora_dir.glob("*-e01*"))
    # an epoch file kohya is still writing: not listed, and 409 when asked for
    output = job_paths(config, job_id).output
    whole = (output / "Test_Hero-000001.safetensors").read_bytes()
    (output / "Test_Hero-000001.safetensors").write_bytes(whole[: len(whole) // 2])
    assert [r["epoch"] for r in (await _list(client, job_id))["checkpoints"]] == [2, 3]
    resp = await client.post(f"/jobs/{job_id}/checkpoints/1/publish")
    assert resp.status == 409 and "still being saved" in (await resp.json())["error"]
    # complete, but no LoRA: refused with verify_lora's sentence, nothing copied
    save_file({"something.weight": np.zeros((2, 2), dtype=np.float16)}, str(output / "Test_Hero-000001.safetensors"))
    resp = await client.post(f"/jobs/{job_id}/checkpoints/1/publish")
    assert resp.status == 409 and "no kohya LoRA weights" in (await resp.json())["error"]
    assert not list(config.ed_lora_dir.glob("*-e01*"))


async def test_an_epoch_can_be_published_while_the_job_trains(client: TestClient, config: Config,
                                                            monkeypatch) -> None:
    monkeypatch.setenv("KOHYA_DOUBLE_STEP_SECONDS", "0.05")
    params = json.dumps({"epochs": 4, "save_every_n_epochs": 1})
    job_id = (await (await client.post("/train", data=train_form(8, params=params))).json())["job_id"]
    end = time.monotonic() + 60
    while not (await _list(client, job_id))["checkpoints"]:
        assert time.monotonic() < end
        await asyncio.sleep(0.05)
    resp = await client.post(f"/jobs/{job_id}/checkpoints/1/publish")
    assert resp.status == 201, await resp.text()
    assert (await (await client.get(f"/jobs/{job_id}/status")).json())["state"] == "training"
    job = await wait_for_state(client, job_id, {"done", "error"}, timeout=90)
    assert job["state"] == "done"
    # the job's runner saved its own copy of the job meanwhile: the published epoch is still recorded
    rows = (await _list(client, job_id))["checkpoints"]
    assert rows[0]["published"]["lora_id"] == "Test_Hero-e01"
    assert sorted(p.name for p in config.ed_lora_dir.iterdir()) == ["Test_Hero-e01.safetensors",
                                                                   "Test_Hero.safetensors"]


async def test_published_epochs_survive_a_restart_and_the_files_go_with_the_job(start_daemon, config: Config) -> None:
    client = await start_daemon(config)
    job = await _done_job(client)
    body = await (await client.post(f"/jobs/{job['id']}/checkpoints/1/publish")).json()
    await client.close()
    client = await start_daemon(config)
    rows = (await _list(client, job["id"]))["checkpoints"]
    assert rows[0]["published"] == {"lora_id": body["lora_id"], "artifact": body["artifact"]}
    again = await client.post(f"/jobs/{job['id']}/checkpoints/1/publish")
    assert again.status == 200 and await again.json() == body
    assert (await client.delete(f"/jobs/{job['id']}")).status == 200
    assert not job_paths(config, job["id"]).root.exists()  # the saved epochs go with the job
    assert Path(body["artifact"]).is_file() and Path(job["artifact"]).is_file()  # what ED has stays


def test_recovery_never_takes_a_published_epoch_for_the_jobs_lora(tmp_path: Path, config: Config) -> None:
    # the last epoch published by hand has the same bytes as the final file: it is not the job's copy
    source = tmp_path / "out" / "Hero.safetensors"
    source.parent.mkdir()
    save_file({"lora_unet_a.alpha": np.ones((), dtype=np.float16)}, str(source))
    lora_dir = tmp_path / "lora"
    lora_dir.mkdir()
    epoch_copy = lora_dir / f"{checkpoints.published_stem('Hero', 3)}.safetensors"
    epoch_copy.write_bytes(source.read_bytes())
    assert publish.find_published(source, lora_dir, "Hero") is None
    store = JobStore(config.db_path)
    from daemon.jobs.models import Job

    store.insert(Job(id="j", name="Hero", trigger="t", class_token="c", base_model="/m", params={}, image_count=8))
    store.set_published("j", 3, PublishedEpoch("Hero-e03", str(epoch_copy)))
    assert str(epoch_copy) in store.artifacts()  # no other job's recovery may claim it
    store.close()


def test_only_complete_files_of_this_job_are_epochs(tmp_path: Path) -> None:
    lora = {"lora_unet_a.alpha": np.ones((), dtype=np.float16)}
    for name in ("Hero-000001.safetensors", "Hero-000002.safetensors", "Hero.safetensors",
                 "Hero2-000001.safetensors", "Hero-000001-state.safetensors", "Hero-1.safetensors"):
        save_file(lora, str(tmp_path / name))
    cut = (tmp_path / "Hero-000002.safetensors").read_bytes()
    (tmp_path / "Hero-000002.safetensors").write_bytes(cut[:-1])
    found = checkpoints.scan(tmp_path, "Hero", 3)
    assert [(c.epoch, c.path.name, c.final, c.complete) for c in found] == [
        (1, "Hero-000001.safetensors", False, True), (2, "Hero-000002.safetensors", False, False),
        (3, "Hero.safetensors", True, True)]
    assert checkpoints.published_stem("x" * 70, 6) == "x" * 58 + "-e06"
    assert checkpoints.samples_by_epoch(["H_e000002_00_20261130.png", "H_e000002_01_20261130_42.png", "odd.png"]) \
        == {2: ["H_e000002_00_20261130.png", "H_e000002_01_20261130_42.png"]}


@pytest.mark.real_kohya
@needs(*REAL_ENV)
async def test_real_kohya_records_the_loss_and_an_epoch_is_published(start_daemon, tmp_path: Path) -> None:
    """Opt-in (see tests/test_real_kohya.py for the variables): the real sd-scripts through the daemon; its loss is
    recorded per step, its epoch file is listed once complete and publishes into ED's folder as a usable LoRA."""
    sd = Path(os.environ["KOHYA_SD"])
    cfg = make_config(tmp_path, port=free_port(), base_model=os.environ["KOHYA_MODEL"], allow_cpu=True,
                      kohya={"python": os.environ["KOHYA_PYTHON"], "script_path": str(sd / "train_network.py"),
                             "workspace": str(sd), "tokenizer_cache_dir": os.environ["KOHYA_TOKENIZER_CACHE"]})
    client = await start_daemon(cfg)
    params = {"resolution": 256, "epochs": 2, "repeats": 1, "batch_size": 4, "network_dim": 4, "network_alpha": 2,
              "save_every_n_epochs": 1, "sample_every_n_epochs": 1}
    resp = await client.post("/train", data=train_form(8, name="Real Epochs", params=json.dumps(params)))
    assert resp.status == 202, await resp.text()
    job_id = (await resp.json())["job_id"]
    job = await wait_for_state(client, job_id, {"done", "error"}, timeout=900)
    assert job["state"] == "done", (job["error"], job["logs"][-30:])
    total = job["progress"]["total"]
    points = (await (await client.get(f"/jobs/{job_id}/loss")).json())["points"]
    print("loss points:", json.dumps(points))
    assert [p[0] for p in points] == list(range(1, total + 1))
    assert [p[1] for p in points] == [1] * (total // 2) + [2] * (total // 2)
    assert points[-1][2] == pytest.approx(job["progress"]["loss"])
    listed = await _list(client, job_id)
    print("checkpoints:", json.dumps(listed))
    assert [(c["epoch"], c["file"], c["final"]) for c in listed["checkpoints"]] == [
        (1, "Real_Epochs-000001.safetensors", False), (2, "Real_Epochs.safetensors", True)]
    assert [len(c["samples"]) for c in listed["checkpoints"]] == [1, 1]
    resp = await client.post(f"/jobs/{job_id}/checkpoints/1/publish")
    body = await resp.json()
    print("publish:", resp.status, json.dumps(body))
    assert resp.status == 201 and body["lora_id"] == "Real_Epochs-e01"
    summary = publish.verify_lora(Path(body["artifact"]), expected_arch="sd1")
    assert summary.unet_modules == 192 and summary.te_modules == 72
