"""Running out of GPU memory, through the real daemon: its app and runner on a machine whose GPU probe finds an
RTX 4090 (as tests/test_fit_api.py's daemon), training with the kohya test double (a real subprocess) told to run
out of memory above a batch size or without gradient checkpointing (KOHYA_DOUBLE_OOM_*)."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from daemon.config import Config
from daemon.pipeline.env_check import GpuInfo
from daemon.pipeline.oom_retry import final_error
from daemon.pipeline.params import TrainParams, scaled_lr
from daemon.pipeline.runner import job_paths
from daemon.web.app import create_app
from tests.conftest import train_form, wait_for_state
from tests.helpers import TOKEN, free_port, make_config, torch_double_path
from tests.test_crash_recovery import Site
from tests.test_crash_recovery import site as site  # a fixture: pytest finds it by name
from tests.test_resume import kill_all

RTX_4090 = GpuInfo(cuda=True, name="NVIDIA GeForce RTX 4090", vram_gb=23.99, bf16=True, torch="2.5.1")
QUICK = '{"epochs": 2}'  # 8 pictures x 25 repeats = 200 views an epoch: 25 steps at batch 8, 50 at batch 4


@pytest.fixture
async def gpu_daemon(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Start the real app with a daemon config (`make_config` overrides) on a machine with an RTX 4090."""
    clients: list[TestClient] = []

    async def start(**overrides: Any) -> tuple[TestClient, Config]:
        config = make_config(tmp_path, port=free_port(), **overrides)

        def probe() -> GpuInfo:
            return GpuInfo(probed_at=time.time(), **{k: getattr(RTX_4090, k) for k in
                                                     ("cuda", "name", "vram_gb", "bf16", "torch")})

        client = TestClient(TestServer(create_app(config, gpu_probe=probe), host="127.0.0.1", port=config.port),
                            headers={"Authorization": f"Bearer {TOKEN}"})
        await client.start_server()
        clients.append(client)
        return client, config

    yield start
    for client in clients:
        await client.close()


async def train(client: TestClient, params: str = QUICK, states: frozenset[str] = frozenset({"done", "error"}),
                ) -> tuple[str, dict[str, Any]]:
    resp = await client.post("/train", data=train_form(8, params=params))
    body = await resp.json()
    assert resp.status == 202, body
    return body["job_id"], await wait_for_state(client, body["job_id"], set(states), timeout=90)


async def events(client: TestClient, job_id: str) -> list[dict[str, Any]]:
    return (await (await client.get(f"/jobs/{job_id}/events")).json())["events"]  # type: ignore[no-any-return]


def runs(config: Config, job_id: str) -> list[dict[str, int]]:
    """What each kohya launch of the job printed in its `running training` block."""
    text = job_paths(config, job_id).trainer_log.read_text(encoding="utf-8")
    found = []
    for block in text.split("running training / 学習開始")[1:]:
        def number(label: str, block: str = block) -> int:
            match = re.search(re.escape(label) + r"[^:\n]*: (\d+)", block)
            assert match, label
            return int(match.group(1))
        found.append({"views": number("num train images * repeats"), "epochs": number("num epochs"),
                      "batch": number("batch size per device"), "steps": number("total optimization steps")})
    return found


async def test_one_retry_one_tier_lower_then_done(gpu_daemon: Callable[..., Any], monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    monkeypatch.setenv("KOHYA_DOUBLE_OOM_ABOVE_BATCH", "4")
    record = tmp_path / "argv.json"
    monkeypatch.setenv("KOHYA_DOUBLE_RECORD", str(record))
    client, config = await gpu_daemon()
    job_id, job = await train(client)
    assert job["state"] == "done", job["error"]
    assert Path(job["artifact"]).is_file()
    history = await events(client, job_id)
    first = TrainParams.from_json(history[0]["data"]["params"])  # job_created: the params /train resolved
    now = TrainParams.from_json(job["params"])  # stored again by the retry
    assert (first.memory_tier, first.batch_size, first.optimizer) == ("24gb", 8, "AdamW")
    assert (now.memory_tier, now.batch_size, now.optimizer) == ("16gb", 4, "AdamW")
    assert (now.epochs, now.repeats, now.resolution) == (first.epochs, first.repeats, first.resolution)
    assert now.unet_lr == scaled_lr(1e-4, batch_size=4, reference_batch=2, optimizer="AdamW") == 1.41e-4
    message = "Ran out of GPU memory at batch 8; retrying with batch 4 (retry 1 of 2)."
    retry = job["recovery"]["retries"]
    assert [{k: v for k, v in r.items() if k != "at_step"} for r in retry] == [
        {"attempt": 1, "from_tier": "24gb", "to_tier": "16gb", "from_batch": 8, "to_batch": 4, "message": message}]
    assert retry[0]["at_step"] == 0  # torch ran out at the first step, before the bar counted it
    assert job["recovery"]["notices"] == [message]
    # the same training amount: the same image views and epochs, twice the steps at half the batch
    first_run, second_run = runs(config, job_id)
    assert (first_run["batch"], second_run["batch"]) == (8, 4)
    assert second_run["views"] == first_run["views"] and second_run["epochs"] == first_run["epochs"] == 2
    assert second_run["steps"] * 4 == first_run["steps"] * 8
    assert job["progress"]["step"] == job["progress"]["total"] == second_run["steps"]
    argv = json.loads(record.read_text())  # the last launch's
    assert argv[argv.index("--unet_lr") + 1] == "0.000141"
    # the job's events: the notice between the two runs, and the job never left `training` in between
    notices = [e["data"] for e in history if e["type"] == "notice"]
    assert [(n["kind"], n["message"], len(n["recovery"]["retries"])) for n in notices] == [("oom_retry", message, 1)]
    assert [e["data"]["state"] for e in history if e["type"] == "state"] == ["prepping", "training", "copying", "done"]
    logs = (await (await client.get(f"/jobs/{job_id}/logs")).json())["lines"]
    plans = [line for line in logs if line.startswith("training SD 1.x with train_network.py on the GPU")]
    assert [("tier 24gb, batch 8" in p, "tier 16gb, batch 4" in p) for p in plans] == [(True, False), (False, True)]
    assert message in logs


async def test_two_retries_then_done(gpu_daemon: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOHYA_DOUBLE_OOM_ABOVE_BATCH", "2")
    client, config = await gpu_daemon()
    job_id, job = await train(client)
    assert job["state"] == "done", job["error"]
    assert [r["message"] for r in job["recovery"]["retries"]] == [
        "Ran out of GPU memory at batch 8; retrying with batch 4 (retry 1 of 2).",
        "Ran out of GPU memory at batch 4; retrying with batch 2 and the 8-bit AdamW optimizer (retry 2 of 2).",
    ]
    p = job["params"]
    assert (p["memory_tier"], p["batch_size"], p["optimizer"]) == ("8gb", 2, "AdamW8bit")
    assert [r["batch"] for r in runs(config, job_id)] == [8, 4, 2]
    assert len({r["views"] for r in runs(config, job_id)}) == 1
    notices = [e for e in await events(client, job_id) if e["type"] == "notice"]
    assert [n["data"]["recovery"]["retries"][-1]["attempt"] for n in notices] == [1, 2]


async def test_after_the_last_retry_the_error_says_what_was_tried_and_what_to_do(
        gpu_daemon: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOHYA_DOUBLE_OOM_ABOVE_BATCH", "1")
    client, config = await gpu_daemon()
    job_id, job = await train(client)
    assert job["state"] == "error" and job["artifact"] is None
    error = job["error"]
    assert error["kind"] == "out_of_memory"
    assert error["message"] == (
        "The graphics card ran out of memory 3 times: batch 8 (24 GB tier), then batch 4 (16 GB tier), then batch 2 "
        "with the 8-bit AdamW optimizer (8 GB tier). That was the last of the 2 automatic retries (oom_retries).")
    assert error["hint"].startswith("Free GPU memory and start the job again: close other programs that use the GPU")
    assert "choose the 6 GB memory tier under Advanced" in error["hint"]
    assert len(job["recovery"]["retries"]) == 2 and [r["batch"] for r in runs(config, job_id)] == [8, 4, 2]
    history = await events(client, job_id)
    assert [e["data"]["state"] for e in history if e["type"] == "state"] == ["prepping", "training", "error"]
    assert history[-1]["type"] == "result" and history[-1]["data"]["error"] == error


async def test_the_smallest_tier_failing_ends_at_once_with_its_own_error(
        gpu_daemon: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOHYA_DOUBLE_OOM_WITHOUT_CHECKPOINTING", "1")
    monkeypatch.setenv("KOHYA_DOUBLE_OOM_ABOVE_BATCH", "1")
    client, config = await gpu_daemon()
    job_id, job = await train(client, '{"epochs": 2, "memory_tier": "6gb"}')
    assert job["state"] == "error" and job["recovery"]["retries"] == []
    first = TrainParams.from_json(job["params"])
    assert job["error"]["message"] == final_error([first], RTX_4090, limit=2)[0]
    assert "These are the smallest settings for this card." in job["error"]["message"]
    assert len(runs(config, job_id)) == 1


async def test_without_checkpointing_the_retry_turns_it_on(gpu_daemon: Callable[..., Any],
                                                          monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KOHYA_DOUBLE_OOM_WITHOUT_CHECKPOINTING", "1")
    record = tmp_path / "argv.json"
    monkeypatch.setenv("KOHYA_DOUBLE_RECORD", str(record))
    client, _ = await gpu_daemon()
    _, job = await train(client, '{"epochs": 2, "memory_tier": "8gb"}')
    assert job["state"] == "done", job["error"]
    assert job["recovery"]["notices"] == [
        "Ran out of GPU memory at batch 2; retrying with gradient checkpointing (retry 1 of 2)."]
    assert job["params"]["gradient_checkpointing"] is True and job["params"]["memory_tier"] == "6gb"
    assert "--gradient_checkpointing" in json.loads(record.read_text())


async def test_oom_retries_zero_keeps_the_first_error(gpu_daemon: Callable[..., Any],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOHYA_DOUBLE_OOM_ABOVE_BATCH", "4")
    client, config = await gpu_daemon(oom_retries=0)
    job_id, job = await train(client)
    assert job["state"] == "error" and job["error"]["kind"] == "out_of_memory"
    assert job["error"]["message"] == "The graphics card ran out of memory."
    assert job["recovery"]["retries"] == [] and job["params"]["batch_size"] == 8
    assert len(runs(config, job_id)) == 1
    assert not [e for e in await events(client, job_id) if e["type"] == "notice"]


async def test_a_cpu_job_out_of_memory_is_not_retried(client: TestClient, config: Config,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOHYA_DOUBLE_OOM_ABOVE_BATCH", "1")  # on a CPU run: torch's RAM allocator error
    job_id, job = await train(client)
    assert job["state"] == "error" and job["error"]["kind"] == "out_of_memory"
    assert job["error"]["message"] == "The computer ran out of memory (RAM) during training."
    assert job["recovery"] == {**job["recovery"], "retries": [], "notices": []}
    assert job["params"]["memory_tier"] == "cpu" and len(runs(config, job_id)) == 1
    # even a CUDA-worded out-of-memory on a CPU run: the CPU has no tiers
    monkeypatch.delenv("KOHYA_DOUBLE_OOM_ABOVE_BATCH")
    monkeypatch.setenv("KOHYA_DOUBLE_FAIL", "oom")
    job_id, job = await train(client)
    assert job["state"] == "error" and job["error"]["kind"] == "out_of_memory"
    assert job["recovery"]["retries"] == [] and len(runs(config, job_id)) == 1


async def test_cancel_during_the_retry(gpu_daemon: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOHYA_DOUBLE_OOM_ABOVE_BATCH", "4")
    monkeypatch.setenv("KOHYA_DOUBLE_STEP_SECONDS", "0.2")
    client, config = await gpu_daemon()
    job_id, job = await train(client, states=frozenset({"training"}))
    end = time.monotonic() + 60
    while not (job["recovery"]["retries"] and job["progress"]["step"] > 0):  # the second run is training
        assert time.monotonic() < end and job["state"] == "training", job
        job = await (await client.get(f"/jobs/{job_id}/status")).json()
    resp = await client.post(f"/jobs/{job_id}/cancel")
    assert resp.status == 200, await resp.text()
    job = await wait_for_state(client, job_id, {"cancelled", "done", "error"})
    assert job["state"] == "cancelled" and job["error"] is None and job["artifact"] is None
    assert len(job["recovery"]["retries"]) == 1 and len(runs(config, job_id)) == 2
    assert "model saved." not in job_paths(config, job_id).trainer_log.read_text(encoding="utf-8")


async def test_a_retry_continues_from_the_saved_state(gpu_daemon: Callable[..., Any], monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    # batch 8: 25 steps an epoch, a state saved after each; the first step of epoch 3 runs out of memory
    monkeypatch.setenv("KOHYA_DOUBLE_OOM_ABOVE_BATCH", "4")
    monkeypatch.setenv("KOHYA_DOUBLE_OOM_AT_STEP", "51")
    record = tmp_path / "argv.json"
    monkeypatch.setenv("KOHYA_DOUBLE_RECORD", str(record))
    client, config = await gpu_daemon()
    job_id, job = await train(client, '{"epochs": 4, "save_every_n_epochs": 1}')
    assert job["state"] == "done", job["error"]
    message = ("Ran out of GPU memory at batch 8; retrying with batch 4, from the state saved after epoch 2 "
               "(retry 1 of 2).")
    assert job["recovery"]["notices"] == [message]
    assert job["recovery"]["retries"][0]["at_step"] == 50
    argv = json.loads(record.read_text())
    assert Path(argv[argv.index("--resume") + 1]).name == "Test_Hero-000002-state"
    assert argv[argv.index("--initial_epoch") + 1] == "3"
    # kohya restores the optimizer and its learning rates from the state: the stored params say so
    p = job["params"]
    assert (p["batch_size"], p["optimizer"], p["unet_lr"]) == (4, "AdamW", 2e-4)
    # epochs 1-2 at batch 8 (50 steps), 3-4 at batch 4 (100 steps): the bar ends on the resumed run's own total
    first_run, second_run = runs(config, job_id)
    assert (first_run["batch"], second_run["batch"], second_run["steps"]) == (8, 4, 200)
    assert job["progress"]["step"] == job["progress"]["total"] == 200
    output = job_paths(config, job_id).output
    assert sorted(f.name for f in output.glob("*.safetensors")) == [
        "Test_Hero-000001.safetensors", "Test_Hero-000002.safetensors", "Test_Hero-000003.safetensors",
        "Test_Hero.safetensors"]
    assert not list(output.glob("*-state"))  # dropped when the job ended


async def test_a_daemon_process_on_a_gpu_retries_and_finishes(site: Site) -> None:
    path = torch_double_path(site.root)  # the daemon's probe finds an RTX 4090
    await site.start({"PYTHONPATH": path, "KOHYA_DOUBLE_OOM_ABOVE_BATCH": "4", "KOHYA_DOUBLE_STEP_SECONDS": "0.005"})
    job_id = await site.submit(train_form(8, params=QUICK))
    job = await site.wait_for(job_id, {"done", "error"}, timeout=90)
    assert job["state"] == "done", job["error"]
    assert job["recovery"]["notices"] == ["Ran out of GPU memory at batch 8; retrying with batch 4 (retry 1 of 2)."]
    assert (job["params"]["memory_tier"], job["params"]["batch_size"]) == ("16gb", 4)
    assert [r["batch"] for r in runs(site.config, job_id)] == [8, 4]
    assert [lora.name for lora in site.loras()] == ["Test_Hero.safetensors"]


async def test_the_retries_used_before_a_restart_still_count(site: Site) -> None:
    """oom_retries is per job: a job that used its retry, then was resumed after the daemon died, ends when it runs
    out of memory again, and its error names every attempt, those before the restart too."""
    site.config_path.write_text(site.config_path.read_text(encoding="utf-8") + "oom_retries: 1\n", encoding="utf-8")
    gpu = {"PYTHONPATH": torch_double_path(site.root), "KOHYA_DOUBLE_STEP_SECONDS": "0.05"}
    daemon = await site.start({**gpu, "KOHYA_DOUBLE_OOM_ABOVE_BATCH": "4"})
    job_id = await site.submit(train_form(8, params='{"epochs": 3, "save_every_n_epochs": 1}'))
    end = time.monotonic() + 90
    while not ((job := await site.job(job_id))["recovery"]["retries"] and job["recovery"]["state_epoch"]):
        assert time.monotonic() < end and job["state"] not in ("done", "error"), job
        await asyncio.sleep(0.05)
    assert job["params"]["batch_size"] == 4  # the retry's batch, which saved a state
    kill_all(site, daemon)
    # after the restart even batch 4 runs out of memory (say Easy Diffusion now holds more of the card)
    await site.start({**gpu, "KOHYA_DOUBLE_OOM_ABOVE_BATCH": "2"})
    job = await site.wait_for(job_id, {"done", "error"}, timeout=90)
    assert job["state"] == "error" and job["error"]["kind"] == "out_of_memory", job["error"]
    assert job["error"]["message"] == ("The graphics card ran out of memory 2 times: batch 8 (24 GB tier), then "
                                       "batch 4 (16 GB tier). That was the last of the 1 automatic retries "
                                       "(oom_retries).")
    assert [r["attempt"] for r in job["recovery"]["retries"]] == [1]
    assert [r["batch"] for r in runs(site.config, job_id)] == [8, 4, 4]  # never a third, unasked-for batch
