from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from daemon.config import Config
from daemon.pipeline.clip_tokenizer import BIGG_TOKENIZER_ID, cached_snapshot
from daemon.pipeline.env_check import GpuInfo
from daemon.web.app import create_app
from tests.helpers import TOKEN, free_port, make_config, picture_bytes
from tests.tokenizer_files import write_hub_cache


def no_gpu() -> GpuInfo:
    return GpuInfo(cuda=False, error="test machine: no CUDA", probed_at=time.time())


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path, port=free_port())


@pytest.fixture(scope="session", autouse=True)
def hf_cache_with_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The test machine holds the CLIP tokenizers (SD 1.x's, and SDXL's second) in its Hugging Face cache, as after
    one online job of each, so no readiness check (in a test or in a daemon it starts) tries to reach
    huggingface.co."""
    if cached_snapshot(os.environ) is not None and cached_snapshot(os.environ, BIGG_TOKENIZER_ID) is not None:
        yield  # this machine has them already: nothing to reach either way
        return
    home = tmp_path_factory.mktemp("hf_home")
    write_hub_cache(home / "hub")
    write_hub_cache(home / "hub", tokenizer_id=BIGG_TOKENIZER_ID)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(home))
        for var in ("TRANSFORMERS_CACHE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
            mp.delenv(var, raising=False)
        yield


@pytest.fixture(autouse=True)
def fast_double(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOHYA_DOUBLE_STEP_SECONDS", "0.005")


StartDaemon = Callable[..., "asyncio.Future[TestClient]"]


@pytest.fixture
async def start_daemon() -> AsyncIterator[Callable[[Config], Any]]:
    """Start the real app on the config's own port (the Host check needs it); several may run in turn."""
    clients: list[TestClient] = []

    async def start(cfg: Config) -> TestClient:
        server = TestServer(create_app(cfg, gpu_probe=no_gpu), host="127.0.0.1", port=cfg.port)
        client = TestClient(server, headers={"Authorization": f"Bearer {TOKEN}"})
        await client.start_server()
        clients.append(client)
        return client

    yield start
    for client in clients:
        await client.close()


@pytest.fixture
async def client(config: Config, start_daemon: Callable[[Config], Any]) -> TestClient:
    return await start_daemon(config)


def train_form(count: int = 8, *, name: str = "Test Hero", trigger: str = "ohwx", params: str | None = None,
               **extra: str) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("name", name)
    form.add_field("trigger", trigger)
    for key, value in extra.items():
        form.add_field(key, value)
    if params is not None:
        form.add_field("params", params)
    for i in range(count):
        form.add_field("images", picture_bytes(i), filename=f"pic{i}.png", content_type="image/png")
    return form


async def wait_for_state(client: TestClient, job_id: str, states: set[str], timeout: float = 30.0) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while True:
        resp = await client.get(f"/jobs/{job_id}/status")
        job = await resp.json()
        if job["state"] in states:
            return job
        if time.monotonic() > end:
            raise AssertionError(f"job {job_id} stayed {job['state']} (wanted {states}); logs: {job['logs'][-10:]}")
        await asyncio.sleep(0.05)
