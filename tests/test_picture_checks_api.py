"""POST /pictures/check through the real app: its answer, who may ask, bad uploads, and nothing left on disk."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from PIL import Image

from daemon.config import Config
from tests import rawhttp
from tests.helpers import picture_bytes
from tests.picture_scenes import blurred, jpeg, person, scene

ED = "http://localhost:9000"


@pytest.fixture(scope="module")
def photo_bytes() -> list[bytes]:
    me = person(4)
    return [jpeg(scene(me, k, (1024, 768))) for k in range(3)]


def form(pictures: list[tuple[str, bytes]]) -> aiohttp.FormData:
    data = aiohttp.FormData()
    for name, content in pictures:
        data.add_field("images", content, filename=name, content_type="image/jpeg")
    return data


def tmp_is_empty(config: Config) -> bool:
    tmp = config.data_dir / "tmp"
    return not tmp.exists() or list(tmp.iterdir()) == []


def stored_bytes(config: Config) -> int:
    tmp = config.data_dir / "tmp"
    return sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) if tmp.exists() else 0


async def test_the_answer_names_each_pictures_warnings(client: TestClient, config: Config,
                                                       photo_bytes: list[bytes]) -> None:
    sharp = Image.open(io.BytesIO(photo_bytes[0]))
    pictures = [("a.jpg", photo_bytes[0]), ("b.jpg", photo_bytes[1]), ("copy.jpg", jpeg(sharp, 70)),
                ("small.jpg", jpeg(sharp.resize((300, 225)))), ("soft.jpg", jpeg(blurred(Image.open(
                    io.BytesIO(photo_bytes[2])), 2.5))), ("broken.jpg", b"\xff\xd8\xff garbage")]
    resp = await client.post("/pictures/check", data=form(pictures))
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert [p["index"] for p in body["pictures"]] == list(range(6))
    assert [p["name"] for p in body["pictures"]] == [name for name, _ in pictures]
    found = {p["name"]: [w["code"] for w in p["warnings"]] for p in body["pictures"]}
    assert found["b.jpg"] == [] and found["soft.jpg"] == ["blurry"] and found["broken.jpg"] == ["unreadable"]
    assert "duplicate" in found["a.jpg"] and "duplicate" in found["copy.jpg"]
    assert found["small.jpg"] == ["duplicate", "small"]  # a smaller copy of a.jpg, and small
    first = body["pictures"][0]
    assert (first["width"], first["height"]) == (1024, 768)
    dup = next(w for w in first["warnings"] if w["code"] == "duplicate")
    assert dup["others"] == [2, 3] and dup["message"] and dup["hint"]
    assert body["pictures"][5]["width"] is None
    assert [w["code"] for w in body["set"]] == ["same_shape"]  # five 4:3 pictures; the broken one is not counted
    assert tmp_is_empty(config)


async def test_the_resolution_comes_from_the_query(client: TestClient, photo_bytes: list[bytes]) -> None:
    # 900×675: enough for 512, fewer than 3/4 of 1024² pixels
    pictures = [("a.jpg", jpeg(Image.open(io.BytesIO(photo_bytes[0])).resize((900, 675))))]
    at_512 = await (await client.post("/pictures/check", data=form(pictures))).json()
    at_1024 = await (await client.post("/pictures/check?resolution=1024", data=form(pictures))).json()
    assert at_512["pictures"][0]["warnings"] == []
    assert [w["code"] for w in at_1024["pictures"][0]["warnings"]] == ["small"]
    for bad in ("abc", "100", "4096", "512.5"):
        resp = await client.post(f"/pictures/check?resolution={bad}", data=form(pictures))
        assert resp.status == 400
        assert (await resp.json())["key"] == "resolution"


async def test_set_warnings(client: TestClient) -> None:
    pictures = [(f"p{i}.png", picture_bytes(i, size=(600, 600))) for i in range(4)]  # four flat squares
    body = await (await client.post("/pictures/check", data=form(pictures))).json()
    assert {w["code"] for w in body["set"]} == {"same_shape", "alike"}
    assert all(w["message"] and w["hint"] for w in body["set"])


async def test_the_token_and_the_origin_are_checked(client: TestClient, config: Config,
                                                    photo_bytes: list[bytes]) -> None:
    resp = await client.post("/pictures/check", data=form([("a.jpg", photo_bytes[0])]), headers={"Authorization": ""})
    assert resp.status == 401 and "token" in (await resp.json())["error"]
    resp = await client.post("/pictures/check", data=form([("a.jpg", photo_bytes[0])]),
                             headers={"Origin": "http://evil.example"})
    assert resp.status == 403
    resp = await client.post("/pictures/check", data=form([("a.jpg", photo_bytes[0])]), headers={"Origin": ED})
    assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == ED
    assert tmp_is_empty(config)


async def test_bad_uploads_are_400_with_a_sentence(client: TestClient, config: Config) -> None:
    resp = await client.post("/pictures/check", json={"images": []})
    # the sentence names the route the client called, not /train
    assert resp.status == 400 and (await resp.json())["error"].startswith(
        "POST /pictures/check expects multipart/form-data")
    empty = aiohttp.FormData()
    empty.add_field("other", b"x", filename="x.txt")
    resp = await client.post("/pictures/check", data=empty)
    assert resp.status == 400 and "Unknown form field 'other'" in (await resp.json())["error"]
    named = aiohttp.FormData()
    named.add_field("name", "Hero")
    named.add_field("images", picture_bytes(0), filename="a.png", content_type="image/png")
    resp = await client.post("/pictures/check", data=named)
    body = await resp.json()
    assert resp.status == 400 and body["key"] == "name" and "only pictures" in body["error"]
    resp = await client.post("/pictures/check", data=form([("void.png", b"")]))
    assert resp.status == 400 and "'void.png' is empty" in (await resp.json())["error"]
    reply = await rawhttp.send(config.port, rawhttp.request(
        config.port, "POST", "/pictures/check", body=rawhttp.multipart([]),
        headers={"Content-Type": f"multipart/form-data; boundary={rawhttp.BOUNDARY}"}))
    assert reply.status == 400 and reply.json()["error"] == "Send at least one picture in 'images'."
    reply = await rawhttp.send(config.port, rawhttp.request(
        config.port, "POST", "/pictures/check", body=b"--nope\r\nbroken",
        headers={"Content-Type": f"multipart/form-data; boundary={rawhttp.BOUNDARY}"}))
    assert reply.status == 400 and "error" in reply.json()
    assert tmp_is_empty(config)


async def test_too_many_pictures_are_refused(client: TestClient, config: Config) -> None:
    resp = await client.post("/pictures/check", data=form([(f"p{i}.png", picture_bytes(i)) for i in range(26)]))
    assert resp.status == 400
    body = await resp.json()
    assert body["key"] == "images" and "25" in body["error"]
    assert tmp_is_empty(config)


async def test_an_oversized_picture_is_refused(start_daemon, tmp_path: Path) -> None:
    from tests.helpers import free_port, make_config

    cfg = make_config(tmp_path, port=free_port(), max_image_mb=1)
    client = await start_daemon(cfg)
    resp = await client.post("/pictures/check", data=form([("huge.jpg", b"\xff" * (1024 * 1024 + 10))]))
    assert resp.status == 400 and "huge.jpg" in (await resp.json())["error"]
    assert tmp_is_empty(cfg)


async def test_the_daemon_answers_while_a_check_runs_and_a_client_that_leaves_leaves_nothing(
        client: TestClient, config: Config) -> None:
    big = [jpeg(scene(person(5), k, (3000, 2250))) for k in range(4)]
    task = asyncio.ensure_future(client.post("/pictures/check", data=form([(f"b{i}.jpg", b) for i, b in
                                                                           enumerate(big * 2)])))
    answered_during = 0
    while not task.done():
        resp = await client.get("/health")
        assert resp.status == 200
        answered_during += not task.done()
        await asyncio.sleep(0.02)
    assert (await task).status == 200
    assert answered_during >= 1  # the event loop was free while the pictures were decoded
    assert tmp_is_empty(config)

    # A client that sends everything and hangs up at once: the threads finish, then the files go.
    body = rawhttp.multipart([rawhttp.image(i, f"b{i}.jpg", b) for i, b in enumerate(big * 2)])
    _reader, writer = await asyncio.open_connection("127.0.0.1", config.port)
    writer.write(rawhttp.request(config.port, "POST", "/pictures/check", body=body,
                                 headers={"Content-Type": f"multipart/form-data; boundary={rawhttp.BOUNDARY}"}))
    await writer.drain()
    total = sum(len(b) for b in big) * 2
    deadline = time.monotonic() + 10
    while stored_bytes(config) < total and time.monotonic() < deadline:  # all of it on disk: the check runs
        await asyncio.sleep(0.005)
    writer.close()
    deadline = time.monotonic() + 30
    while not tmp_is_empty(config) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert tmp_is_empty(config)
    assert (await client.get("/health")).status == 200
