"""The GPU probe (a torch import in the kohya venv, seconds) is never on a request's path."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from daemon.gpu import GpuCache
from daemon.pipeline.env_check import GpuInfo
from daemon.web.app import create_app
from tests.conftest import train_form
from tests.helpers import TOKEN, free_port, make_config


class GatedProbe:
    """A probe that blocks until the test lets it finish: a request that waited for it would hang."""

    def __init__(self) -> None:
        self.calls = 0
        self.gates: list[threading.Event] = []

    def __call__(self) -> GpuInfo:
        gate = threading.Event()
        self.gates.append(gate)
        self.calls += 1
        call = self.calls
        if not gate.wait(30):
            raise AssertionError("the probe was never released")
        return GpuInfo(cuda=False, error=f"probe {call}", probed_at=time.time())

    def release(self, index: int) -> None:
        self.gates[index].set()

    async def started(self, count: int) -> None:
        deadline = time.monotonic() + 10
        while len(self.gates) < count:
            assert time.monotonic() < deadline, f"probe {count} never started"
            await asyncio.sleep(0.01)


async def test_first_caller_waits_for_the_start_up_probe_only() -> None:
    probe = GatedProbe()
    cache = GpuCache(probe)
    cache.start()
    await probe.started(1)
    waiting = [asyncio.create_task(cache.get()) for _ in range(3)]
    await asyncio.sleep(0.05)
    assert not any(t.done() for t in waiting)  # no answer yet: they wait, for the one probe in flight
    probe.release(0)
    infos = await asyncio.wait_for(asyncio.gather(*waiting), 5)
    assert [i.error for i in infos] == ["probe 1"] * 3
    assert probe.calls == 1
    assert (await cache.get()).error == "probe 1" and probe.calls == 1  # fresh: no new probe
    await cache.close()


async def test_a_stale_answer_is_returned_at_once_and_refreshed_in_the_background() -> None:
    probe = GatedProbe()
    cache = GpuCache(probe, max_age=0.05)
    cache.start()
    await probe.started(1)
    probe.release(0)
    assert (await cache.get()).error == "probe 1"
    await asyncio.sleep(0.1)  # now stale
    # Returns the old answer although the second probe is blocked: a waiting get() would time out here.
    assert (await asyncio.wait_for(cache.get(), 1)).error == "probe 1"
    await probe.started(2)
    assert (await asyncio.wait_for(cache.get(), 1)).error == "probe 1"
    assert probe.calls == 2  # one background probe at a time, however many callers see the stale answer
    probe.release(1)
    for _ in range(100):
        if (await cache.get()).error == "probe 2":
            break
        await asyncio.sleep(0.01)
    assert (await cache.get()).error == "probe 2"
    await cache.close()


async def test_refresh_waits_for_a_new_answer_and_a_failing_probe_does_not_wedge_the_cache() -> None:
    calls = []

    def flaky() -> GpuInfo:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("torch exploded")
        return GpuInfo(cuda=True, name="card", probed_at=time.time())

    cache = GpuCache(flaky)
    first = await cache.get()
    assert not first.cuda and "torch exploded" in (first.error or "")
    assert (await cache.get(refresh=True)).name == "card"
    await cache.close()


async def test_the_first_train_after_start_does_not_wait_for_a_second_probe(tmp_path: Path) -> None:
    probe = GatedProbe()
    cfg = make_config(tmp_path, port=free_port())
    server = TestServer(create_app(cfg, gpu_probe=probe), host="127.0.0.1", port=cfg.port)
    client = TestClient(server, headers={"Authorization": f"Bearer {TOKEN}"})
    await client.start_server()
    try:
        await probe.started(1)  # begun at start-up, before any request
        health = await asyncio.wait_for(client.get("/health"), 5)
        assert health.status == 200  # nothing but /train and the job need the probe
        train = asyncio.create_task(client.post("/train", data=train_form(8)))
        await asyncio.sleep(0.3)
        assert not train.done()  # waiting for the start-up probe, the only one
        probe.release(0)
        resp = await asyncio.wait_for(train, 30)
        assert resp.status == 202, await resp.text()
        second = await asyncio.wait_for(client.post("/train", data=train_form(8)), 30)
        assert second.status == 202
        assert probe.calls == 1
    finally:
        for gate in probe.gates:
            gate.set()
        await client.close()


async def test_a_train_with_a_stale_cache_answers_without_waiting(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("daemon.gpu.CACHE_SECONDS", 0.0)  # every answer is stale at once
    probe = GatedProbe()
    cfg = make_config(tmp_path, port=free_port())
    server = TestServer(create_app(cfg, gpu_probe=probe), host="127.0.0.1", port=cfg.port)
    client = TestClient(server, headers={"Authorization": f"Bearer {TOKEN}"})
    await client.start_server()
    try:
        await probe.started(1)
        probe.release(0)
        first = await asyncio.wait_for(client.post("/train", data=train_form(8)), 30)
        assert first.status == 202
        await probe.started(2)  # the answer is stale at once: a refresh runs (and stays blocked)
        resp = await asyncio.wait_for(client.post("/train", data=train_form(8)), 30)
        assert resp.status == 202  # answered with the stale answer while the refresh is blocked
        assert probe.calls == 2
    finally:
        for gate in probe.gates:
            gate.set()
        await client.close()
