"""GET /fit, /models' trainable flag, /presets?arch= and POST /train with SDXL models and memory tiers."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer
from safetensors.numpy import save_file

from daemon.config import Config
from daemon.pipeline.env_check import GpuInfo
from daemon.pipeline.params import default_repeats
from daemon.web.app import create_app
from tests.conftest import train_form
from tests.helpers import TOKEN, write_sdxl_checkpoint

RTX_4090 = dict(cuda=True, name="NVIDIA GeForce RTX 4090", vram_gb=23.99, bf16=True, torch="2.5.1")


def write_sd2_checkpoint(path: Path) -> Path:
    """Not a model: the key layout detect_arch reads as SD 2.x (OpenCLIP text encoder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"cond_stage_model.model.transformer.resblocks.0.x": np.zeros((2,), dtype=np.float16)}, str(path))
    return path


def models_dir(config: Config) -> Path:
    assert config.ed_models_dir is not None
    return config.ed_models_dir / "stable-diffusion"


@pytest.fixture
async def gpu_daemon(config: Config) -> AsyncIterator[tuple[TestClient, list[float]]]:
    """The real app on a machine whose GPU probe finds an RTX 4090; the list records each probe."""
    probes: list[float] = []

    def probe() -> GpuInfo:
        probes.append(time.time())
        return GpuInfo(probed_at=time.time(), **RTX_4090)  # type: ignore[arg-type]

    write_sdxl_checkpoint(models_dir(config) / "xl" / "pony.safetensors")
    server = TestServer(create_app(config, gpu_probe=probe), host="127.0.0.1", port=config.port)
    client = TestClient(server, headers={"Authorization": f"Bearer {TOKEN}"})
    await client.start_server()
    yield client, probes
    await client.close()


async def get_json(client: TestClient, path: str, status: int = 200) -> Any:
    resp = await client.get(path)
    body = await resp.json()
    assert resp.status == status, body
    return body


async def test_fit_on_a_cpu_only_machine_answers_the_cpu_tier(client: TestClient) -> None:
    body = await get_json(client, "/fit")
    assert (body["arch"], body["arch_label"], body["trainable"]) == ("sd1", "SD 1.x", True)
    assert body["gpu"] == {"cuda": False, "name": None, "vram_gb": None, "bf16": None}
    assert (body["tier"], body["tier_label"], body["auto"]) == ("cpu", "CPU", True)
    assert body["reason"].startswith("No CUDA GPU: training on the CPU (very slow) → batch 2, fp32")
    assert [t["id"] for t in body["tiers"]] == ["cpu", "6gb", "8gb", "12gb", "16gb", "24gb", "40gb"]
    assert body["tiers"][-1]["label"] == "40+ GB"
    params = body["params"]
    assert (params["memory_tier"], params["mixed_precision"], params["optimizer"], params["repeats"]) == (
        "cpu", "no", "AdamW", default_repeats(20))
    assert params["fit_reason"] == body["reason"]


async def test_fit_for_an_sdxl_model_on_a_4090(gpu_daemon: tuple[TestClient, list[float]]) -> None:
    client, _ = gpu_daemon
    body = await get_json(client, "/fit?base_model=xl/pony&preset=quality&images=10")
    assert (body["arch"], body["arch_label"], body["trainable"], body["tier"], body["auto"]) == (
        "sdxl", "SDXL", True, "24gb", True)
    assert body["gpu"] == {"cuda": True, "name": "NVIDIA GeForce RTX 4090", "vram_gb": 23.99, "bf16": True}
    assert body["reason"] == ("NVIDIA GeForce RTX 4090, 24 GB → batch 4, bf16, gradient checkpointing, text "
                              "encoders cached, AdamW")
    p = body["params"]
    assert (p["arch"], p["preset"], p["resolution"], p["batch_size"], p["mixed_precision"]) == (
        "sdxl", "quality", 1024, 4, "bf16")
    assert (p["cache_text_encoder_outputs"], p["text_encoder_lr"], p["gradient_checkpointing"], p["fp8_base"]) == (
        True, 0.0, True, False)
    assert p["repeats"] == default_repeats(10, "sdxl") == 10
    by_hand = await get_json(client, "/fit?base_model=xl/pony&memory_tier=8gb")
    assert (by_hand["tier"], by_hand["auto"], by_hand["params"]["fp8_base"], by_hand["params"]["batch_size"]) == (
        "8gb", False, True, 1)
    assert "8 GB settings chosen by hand" in by_hand["reason"]
    sd1 = await get_json(client, "/fit?base_model=sd-test&memory_tier=auto")
    assert (sd1["arch"], sd1["params"]["batch_size"], sd1["reason"]) == (
        "sd1", 8, "NVIDIA GeForce RTX 4090, 24 GB → batch 8, bf16, no checkpointing, AdamW")


async def test_fit_never_probes_the_gpu_on_the_request_path(gpu_daemon: tuple[TestClient, list[float]]) -> None:
    client, probes = gpu_daemon
    for _ in range(5):
        await get_json(client, "/fit?base_model=xl/pony")
    assert len(probes) == 1  # the start-up probe, cached


@pytest.mark.parametrize("query", [
    "images=0", "images=26", "images=abc", "images=-1", "images=1e3",
    "memory_tier=99gb", "memory_tier=", "memory_tier=24gb",  # no GPU on the test machine
    "preset=turbo", "base_model=nope", "base_model=../../etc/passwd", "base_model=/etc/passwd",
    "base_model=" + "x" * 300, "colour=blue",
])
async def test_fit_refuses_bad_query_values_with_a_sentence(client: TestClient, query: str) -> None:
    resp = await client.get(f"/fit?{query}")
    body = await resp.json()
    assert resp.status == 400, body
    assert set(body) >= {"error"} and body["error"].endswith(".") and "Traceback" not in body["error"]
    assert body.get("key") in {"images", "memory_tier", "preset", "base_model", "colour"}


async def test_an_sd2_model_is_refused_saying_why_and_an_unreadable_one_is_trained_as_sd1(
        client: TestClient, config: Config) -> None:
    write_sd2_checkpoint(models_dir(config) / "v2-768.safetensors")
    (models_dir(config) / "old.ckpt").write_bytes(b"pickle, never opened")
    body = await get_json(client, "/fit?base_model=v2-768")
    assert (body["arch"], body["arch_label"], body["trainable"]) == ("sd2", "SD 2.x", False)
    assert "SD 2.x is not trained here" in body["why"] and "SDXL" in body["why"]
    assert "tier" not in body and "params" not in body and len(body["tiers"]) == 7
    ckpt = await get_json(client, "/fit?base_model=old")
    # an unreadable family is trained as SD 1.x, as /train does, and the note says so
    assert (ckpt["arch"], ckpt["trainable"], ckpt["params"]["arch"]) == ("unknown", True, "sd1")
    assert ".ckpt" in ckpt["note"] and "trained as SD 1.x" in ckpt["note"] and "why" not in ckpt
    odd_file = models_dir(config) / "odd.safetensors"
    save_file({"model.diffusion_model.x": np.zeros((2,), dtype=np.float16)}, str(odd_file))
    odd = await get_json(client, "/fit?base_model=odd")
    assert (odd["arch"], odd["trainable"]) == ("unknown", True)
    assert "contents do not say" in odd["note"] and ".ckpt" not in odd["note"]
    models = {m["id"]: m for m in (await get_json(client, "/models"))["models"]}
    assert models["v2-768"]["trainable"] is False and models["v2-768"]["why"] == body["why"]
    assert models["old"]["trainable"] is True and models["old"]["note"] == ckpt["note"]
    assert models["sd-test"] == {"id": "sd-test", "file": "sd-test.safetensors", "arch": "sd1", "trainable": True}


async def test_models_report_sdxl_as_trainable(client: TestClient, config: Config) -> None:
    write_sdxl_checkpoint(models_dir(config) / "illustrious.safetensors")
    body = await get_json(client, "/models")
    assert body["supported_archs"] == ["sd1", "sdxl"]
    assert {"id": "illustrious", "file": "illustrious.safetensors", "arch": "sdxl", "trainable": True} in body["models"]
    assert body["default"] == {"file": "sd-test.safetensors", "arch": "sd1", "trainable": True}


async def test_presets_per_family(client: TestClient) -> None:
    sd1 = await get_json(client, "/presets")
    assert sd1 == await get_json(client, "/presets?arch=sd1")
    xl = await get_json(client, "/presets?arch=sdxl")
    assert xl["default"] == "balanced" and set(xl["presets"]) == set(sd1["presets"]) == {"fast", "balanced", "quality"}
    for preset in xl["presets"].values():
        assert (preset["arch"], preset["resolution"], preset["text_encoder_lr"], preset["memory_tier"]) == (
            "sdxl", 1024, 0.0, "auto")
    assert {p["resolution"] for p in sd1["presets"].values()} == {512}
    body = await get_json(client, "/presets?arch=sd2", status=400)
    assert body["key"] == "arch"


async def stored_params(client: TestClient, resp: Any) -> dict[str, Any]:
    body = await resp.json()
    assert resp.status == 202, body
    job = await get_json(client, f"/jobs/{body['job_id']}/status")
    return job["params"]  # type: ignore[no-any-return]


async def test_train_stores_the_sdxl_family_tier_and_levers(gpu_daemon: tuple[TestClient, list[float]],
                                                            caplog: pytest.LogCaptureFixture) -> None:
    client, _ = gpu_daemon
    with caplog.at_level(logging.INFO, logger="daemon.web.api"):
        p = await stored_params(client, await client.post("/train", data=train_form(8, base_model="xl/pony")))
    assert f"SDXL, 24gb tier: {p['fit_reason']}" in caplog.text  # the daemon's log says which tier and why
    assert (p["arch"], p["memory_tier"], p["batch_size"], p["mixed_precision"], p["resolution"]) == (
        "sdxl", "24gb", 4, "bf16", 1024)
    assert (p["cache_text_encoder_outputs"], p["gradient_checkpointing"], p["fp8_base"], p["text_encoder_lr"]) == (
        True, True, False, 0.0)
    assert p["fit_reason"].startswith("NVIDIA GeForce RTX 4090, 24 GB → batch 4")
    p = await stored_params(client, await client.post("/train", data=train_form(
        8, base_model="xl/pony", params='{"memory_tier": "8gb", "batch_size": 2}')))
    assert (p["memory_tier"], p["fp8_base"], p["batch_size"], p["optimizer"]) == ("8gb", True, 2, "AdamW8bit")


async def test_train_refuses_a_tier_this_machine_cannot_use(client: TestClient) -> None:
    resp = await client.post("/train", data=train_form(8, params='{"memory_tier": "24gb"}'))
    body = await resp.json()
    assert resp.status == 400 and body["key"] == "memory_tier" and "needs a CUDA GPU" in body["error"]
    resp = await client.post("/train", data=train_form(8, params='{"fp8_base": true}'))
    body = await resp.json()
    assert resp.status == 400 and body["key"] == "fp8_base"
    assert (await get_json(client, "/jobs"))["jobs"] == []


